"""On CPU, a model with a convolution starts with one host device per core
(jaxbatch/backends.py, choice 3), unless the user chose the count; models
without one stay on one device; the Python API, whose JAX started before
jaxbatch could choose, is told once.

tests/conftest.py pins JAX_NUM_CPU_DEVICES=1 for the suite; the tests here
lift it where they test the default.
"""

import os
import subprocess
import sys
import warnings

import jax
import pytest
from flax import serialization

from jaxbatch import backends
from jaxbatch.backends import DevicesWarning, host_devices, start_host_devices, wanted_host_devices
from jaxbatch.precision import relative_difference
from jaxbatch.train import TrainConfig, train_and_evaluate

TIMEOUT_S = 240


@pytest.mark.parametrize("has_conv,batch,cores,backend,expected", [
    (True, 256, 2, "cpu", 2),     # one per core
    (True, 256, 8, "cpu", 8),
    (True, 50, 4, "cpu", 2),      # 4 and 3 do not divide 50: the most that do
    (True, 7, 2, "cpu", 1),       # an odd batch does not split over 2
    (False, 256, 8, "cpu", 1),    # no convolution: nothing to gain
    (True, 256, 8, "gpu", 1),     # only XLA:CPU has the choice
])
def test_host_devices_one_per_core_for_a_convolution(has_conv, batch, cores, backend, expected):
    assert host_devices(has_conv, batch, cores, backend) == expected


@pytest.mark.parametrize("model,extra,expected", [
    ("cnn", {}, 4), ("lenet5", {"dataset": "mnist"}, 4), ("cnn_tanh", {"dataset": "mnist"}, 4),
    ("cnn_tanh", {}, 1),  # refuses 8x8 digits: the run says so in one line, not this choice
    ("mlp", {}, 1), ("fc_nobias", {}, 1), ("mlp_scratch", {}, 1),
    ("cnn", {"batch_size": 50}, 2),
    ("cnn", {"dp_clip": 1.0, "dp_chunk": 16}, 1),  # per-example gradients in chunks: one device only
])
def test_a_run_wants_a_device_per_core_when_its_model_has_a_convolution(monkeypatch, model, extra, expected):
    monkeypatch.setattr(backends, "cores", lambda: 4)
    assert wanted_host_devices(TrainConfig(model=model, **{"batch_size": 64, **extra})) == expected


def test_the_users_count_wins(monkeypatch):
    monkeypatch.setattr(backends, "cores", lambda: 4)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    # (None when nothing is set: the command-line test below, whose child chooses)
    # --devices: the run's own count, nothing set in JAX
    assert start_host_devices(TrainConfig(model="cnn", devices=1)) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert backends.count_set_by_user() == "XLA_FLAGS"
    assert start_host_devices(TrainConfig(model="cnn")) is None
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
    assert backends.count_set_by_user() == "JAX_NUM_CPU_DEVICES"


def test_too_late_to_choose_is_no_error(monkeypatch):
    # This process's backend has started: the count is fixed, and choosing says so by None.
    jax.devices()
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(backends, "count_set_by_user", lambda: None)
    monkeypatch.setattr(backends, "cores", lambda: 2)
    assert start_host_devices(TrainConfig(model="cnn")) is None


def test_the_api_says_when_more_devices_would_help(monkeypatch):
    monkeypatch.setattr(backends, "count_set_by_user", lambda: None)
    monkeypatch.setattr(backends, "cores", lambda: 2)
    assert jax.device_count() == 1
    with pytest.warns(DevicesWarning, match=r"jax_num_cpu_devices', 2\)"):
        backends.warn_if_few_devices(TrainConfig(model="cnn"), has_conv=True)
    for config, has_conv in ((TrainConfig(model="mlp"), False), (TrainConfig(model="cnn", devices=1), True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            backends.warn_if_few_devices(config, has_conv)
        assert not [w for w in seen if issubclass(w.category, DevicesWarning)], config.model


def test_train_and_evaluate_asks(monkeypatch):
    asked = []
    monkeypatch.setattr(backends, "warn_if_few_devices",
                        lambda config, has_conv: asked.append((config.model, has_conv)))
    train_and_evaluate(TrainConfig(model="cnn", epochs=1, max_steps=1, devices=1))
    assert asked == [("cnn", True)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_the_command_line_spreads_a_cnn_over_two_cores_to_the_same_numbers(tmp_path):
    """The child may run on 2 cores, and is not told a device count: it takes
    2 host devices, says so, and ends where 1 device does (test_parallel's
    float64 tolerance)."""
    two = sorted(os.sched_getaffinity(0))[:2]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    train = ["train", "--model", "cnn", "--dtype", "float64", "--batch-size", "64", "--epochs", "2",
             "--max-steps", "4", "--quiet", "--out", str(tmp_path / "run")]
    on_two_cores = (f"import os, sys; os.sched_setaffinity(0, {two}); from jaxbatch.cli import main; "
                    f"sys.exit(main({train!r}))")
    proc = subprocess.Popen([sys.executable, "-c", on_two_cores], env={**env, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, out
    assert "2 x cpu (2 host devices, one per core" in out
    two_devices = serialization.msgpack_restore((tmp_path / "run" / "params.msgpack").read_bytes())
    one = train_and_evaluate(TrainConfig(model="cnn", dtype="float64", batch_size=64, epochs=2, max_steps=4,
                                         devices=1))
    assert relative_difference(two_devices, one.params) <= 1e-12
