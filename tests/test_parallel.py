"""Data-parallel training: one program over a "data" mesh axis, on 1 device,
4 devices, and 2 processes of 2 devices each, ends with the same parameters.

This process has one CPU device, and JAX fixes the device count when its
backend starts, so runs with several devices go to child processes with
JAX_NUM_CPU_DEVICES set. Each child is bounded in time and killed, with its
whole process group, if the test ends early.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import serialization

from jaxbatch.errors import JaxbatchError
from jaxbatch.precision import relative_difference
from jaxbatch.train import TrainConfig, train_and_evaluate

TIMEOUT_S = 240


def child_env(devices: int) -> dict:
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}


def start(argv, devices: int, log):
    # A new session: the child and anything it starts form one group we can kill.
    return subprocess.Popen(argv, env=child_env(devices), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_child(code: str, devices: int, tmp_path) -> dict:
    """Run `code` in a fresh Python with `devices` CPU devices; it prints one JSON line last."""
    with open(tmp_path / "child.log", "w+") as log:
        proc = start([sys.executable, "-c", textwrap.dedent(code)], devices, log)
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            stop([proc])
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_more_devices_than_there_are_is_one_clear_error():
    with pytest.raises(JaxbatchError, match=r"devices 64 asks for more devices than the \d+ cpu devices"):
        train_and_evaluate(TrainConfig(devices=64))


# (model, dtype, steps): the runs compared across device counts and processes
CASES = [("mlp", "float64", 30), ("mlp", "float32", 30), ("cnn", "float64", 4)]
# Runs that read per-example gradient norms (float64, 3 steps): clipping and
# DP-SGD's noise (one pass, jaxbatch/ghost.py, summed over devices), the noise scale.
# DP-SGD runs draw Poisson batches (padded to slots that split over the devices).
PER_EXAMPLE = {"cnn-dp": dict(model="cnn", dp_clip=0.1, dp_noise=1.0, dp_nonprivate_metrics=True),
               "mlp-dp": dict(model="mlp", dp_clip=0.1, dp_noise=1.0, dp_nonprivate_metrics=True),
               "cnn-noise-scale": dict(model="cnn", log_noise_scale=True, noise_scale_every=1)}


def case_config(model, dtype, steps, **kw) -> TrainConfig:
    return TrainConfig(model=model, dtype=dtype, epochs=2, batch_size=64, max_steps=steps, **kw)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """The CASES trained on 4 CPU devices in a child process (parameters in
    files), and what else needs 4 devices: the batch placement, the
    indivisible batch error, and text D's data-parallel gradient."""
    tmp = tmp_path_factory.mktemp("four")
    result = run_child(f"""
        import json, jax
        import jax.numpy as jnp
        import numpy as np
        from flax import serialization
        from jaxbatch import losses
        from jaxbatch.errors import JaxbatchError
        from jaxbatch.models import get_model
        from jaxbatch.precision import enable_x64, relative_difference
        from jaxbatch import TrainConfig, train_and_evaluate
        from jaxbatch.devices import by_example, data_mesh, place

        out = {{"devices": jax.device_count(), "runs": {{}}}}
        for model, dtype, steps in {CASES!r}:
            run = train_and_evaluate(TrainConfig(model=model, dtype=dtype, epochs=2, batch_size=64,
                                                 max_steps=steps))  # default: every device
            path = "{tmp}/" + f"{{model}}-{{dtype}}.msgpack"
            open(path, "wb").write(serialization.to_bytes(run.params))
            out["runs"][f"{{model}}-{{dtype}}"] = {{"devices": run.history[-1]["devices"],
                                                   "seen": run.history[-1]["examples_seen"]}}
        for name, kw in {PER_EXAMPLE!r}.items():
            run = train_and_evaluate(TrainConfig(dtype="float64", epochs=1, batch_size=64, max_steps=3, **kw))
            open("{tmp}/" + name + ".msgpack", "wb").write(serialization.to_bytes(run.params))
            out["runs"][name] = run.history[-1]
        # each device holds a quarter of every batch's indices
        idx = place(np.arange(2 * 64).reshape(2, 64), by_example(data_mesh()))
        out["shard_shapes"] = sorted({{tuple(s.data.shape) for s in idx.addressable_shards}})
        try:
            train_and_evaluate(TrainConfig(batch_size=50))
        except JaxbatchError as err:
            out["indivisible"] = str(err)
        # text D: K devices, each the batched gradient of B/K examples, averaged
        with enable_x64():
            model = get_model("cnn")
            params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), jnp.zeros((28, 28, 1))))
            xs = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), jnp.float64)
            ys = jnp.arange(8) % 10
            reference = jax.jit(losses.batched_grad, static_argnums=0)(model.apply, params, xs, ys)
            split = jax.jit(losses.data_parallel_grad, static_argnums=(0, 4))
            out["data_parallel"] = {{k: relative_difference(split(model.apply, params, xs, ys, data_mesh(k)), reference)
                                    for k in (1, 2, 4)}}
        print(json.dumps(out))
    """, 4, tmp)
    result["dir"] = tmp
    return result


def read_params(path):
    return serialization.msgpack_restore(path.read_bytes())


@pytest.mark.parametrize("model,dtype,steps", CASES)
def test_one_and_four_devices_end_equal(four_devices, model, dtype, steps):
    one = train_and_evaluate(case_config(model, dtype, steps, devices=1))  # this process: 1 device
    four = read_params(four_devices["dir"] / f"{model}-{dtype}.msgpack")
    assert four_devices["runs"][f"{model}-{dtype}"]["devices"] == 4
    assert four_devices["runs"][f"{model}-{dtype}"]["seen"] == one.history[-1]["examples_seen"]
    assert str(jax.tree.leaves(four)[0].dtype) == dtype
    assert relative_difference(four, one.params) <= (1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_norms_are_the_same_on_four_devices(four_devices, name):
    # Each device takes the norms of its own examples (losses.per_example_sq_norms under shard_map).
    one = train_and_evaluate(TrainConfig(dtype="float64", epochs=1, batch_size=64, max_steps=3, devices=1,
                                         **PER_EXAMPLE[name]))
    four = read_params(four_devices["dir"] / f"{name}.msgpack")
    assert relative_difference(four, one.params) <= 1e-12
    last, last_four = one.history[-1], four_devices["runs"][name]
    last, last_four = {**last, **last.get("nonprivate", {})}, {**last_four, **last_four.get("nonprivate", {})}
    for key in ("mean_grad_norm", "clipped_fraction", "noise_scale", "epsilon", "examples_seen"):
        if key in last:
            assert last_four[key] == pytest.approx(last[key], rel=1e-10), key


def test_batches_split_over_four_devices(four_devices):
    assert four_devices["devices"] == 4
    assert four_devices["shard_shapes"] == [[2, 16]]
    assert "batch size 50 does not split evenly over 4 devices" in four_devices["indivisible"]


def test_text_d_data_parallel_gradient_is_the_batch_gradient(four_devices):
    assert set(four_devices["data_parallel"]) == {"1", "2", "4"}
    assert max(four_devices["data_parallel"].values()) <= 1e-12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path, four_devices):
    train = [sys.executable, "-m", "jaxbatch", "train", "--quiet", "--epochs", "2", "--batch-size", "64",
             "--max-steps", "30", "--dtype", "float64"]  # CASES[0]
    port = free_port()
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = []
    try:
        for i in range(2):
            procs.append(start([*train, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), "--out", str(tmp_path / f"hosts{i}")], 2, logs[i]))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        stop(procs)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "4 x cpu in 2 processes" in outputs[0]
    assert "test accuracy" not in outputs[1]  # only process 0 prints and writes
    assert not (tmp_path / "hosts1").exists()
    hosts = read_params(tmp_path / "hosts0" / "params.msgpack")
    assert relative_difference(hosts, read_params(four_devices["dir"] / "mlp-float64.msgpack")) <= 1e-12
    config = json.loads((tmp_path / "hosts0" / "config.json").read_text())
    assert config["environment"]["devices"] == 4 and config["environment"]["processes"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "hosts0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["devices"] for m in metrics] == [4, 4] and metrics[-1]["steps"] == 30


def test_a_process_with_another_num_processes_stops_with_one_line(tmp_path):
    # XLA takes the coordinator's count; the process started with another one
    # must not train as if nothing were wrong, and must not then sit at JAX's
    # shutdown barrier waiting for peers that never come (it did, ~35 s).
    # (Process 0 ends too, after its collectives time out, ~30 s, with one
    # line; it is stopped here.)
    train = [sys.executable, "-m", "jaxbatch", "train", "--quiet", "--epochs", "1", "--join-timeout", "60"]
    port = free_port()
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = []
    try:
        for i, count in enumerate((2, 3)):
            procs.append(start([*train, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
                                "--process-id", str(i), "--out", str(tmp_path / f"hosts{i}")], 1, logs[i]))
        procs[1].wait(timeout=25)  # before process 0's collectives give up (30 s): it left on its own
    finally:
        stop(procs)
    logs[1].seek(0)
    output = logs[1].read().strip()
    for log in logs:
        log.close()
    assert procs[1].returncode == 2, output
    assert output.splitlines()[-1] == (f"jaxbatch train: error: this process was started with --num-processes 3, "
                                       f"but the coordinator at 127.0.0.1:{port} runs 2; pass the same "
                                       "--num-processes to every process")
    assert not (tmp_path / "hosts1").exists()


def test_process_0_whose_peer_never_comes_stops_with_one_line(tmp_path):
    # XLA's coordination service ended process 0 from C++ (SIGABRT, a stack
    # trace) when a peer never registered; the check-in finds it first.
    port = free_port()
    with open(tmp_path / "p0.log", "w+") as log:
        procs = [start([sys.executable, "-m", "jaxbatch", "train", "--quiet", "--epochs", "1", "--coordinator",
                        f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0", "--join-timeout", "3",
                        "--out", str(tmp_path / "run")], 1, log)]
        try:
            procs[0].wait(timeout=TIMEOUT_S)
        finally:
            stop(procs)
        log.seek(0)
        output = log.read().strip()
    assert procs[0].returncode == 2, output
    assert output == ("jaxbatch train: error: 0 of the 1 other processes joined within 3 s; start every process "
                      "with the same --coordinator and --num-processes, or raise --join-timeout")
    assert not (tmp_path / "run").exists()
