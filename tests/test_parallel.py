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

import numpy as np
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


def test_one_and_four_devices_end_equal(tmp_path):
    result = run_child("""
        import json, jax
        from jaxbatch.errors import JaxbatchError
        from jaxbatch.precision import relative_difference
        from jaxbatch.train import TrainConfig, by_example, data_mesh, place, train_and_evaluate
        import numpy as np

        out = {"devices": jax.device_count()}
        for model, dtype, steps in [("mlp", "float64", 30), ("mlp", "float32", 30), ("cnn", "float64", 4)]:
            kw = dict(model=model, dtype=dtype, epochs=2, batch_size=64, max_steps=steps, steps_per_chunk=2)
            one = train_and_evaluate(TrainConfig(devices=1, **kw))
            four = train_and_evaluate(TrainConfig(**kw))  # default: every device
            out[f"{model}-{dtype}"] = {
                "rel": relative_difference(four.params, one.params),
                "dtype": str(jax.tree.leaves(four.params)[0].dtype),
                "devices": [one.history[-1]["devices"], four.history[-1]["devices"]],
                "seen": [one.history[-1]["examples_seen"], four.history[-1]["examples_seen"]]}
        # each device holds a quarter of every batch's indices
        idx = place(np.arange(2 * 64).reshape(2, 64), by_example(data_mesh()))
        out["shard_shapes"] = sorted({tuple(s.data.shape) for s in idx.addressable_shards})
        try:
            train_and_evaluate(TrainConfig(batch_size=50))
        except JaxbatchError as err:
            out["indivisible"] = str(err)
        # text D: K devices, each the batched gradient of B/K examples, averaged
        import jax.numpy as jnp
        from jaxbatch import losses
        from jaxbatch.models import get_model
        from jaxbatch.precision import enable_x64
        with enable_x64():
            model = get_model("cnn")
            params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), jnp.zeros((28, 28, 1))))
            xs = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), jnp.float64)
            ys = jnp.arange(8) % 10
            reference = jax.jit(losses.batched_grad, static_argnums=0)(model.apply, params, xs, ys)
            split = jax.jit(losses.data_parallel_grad, static_argnums=(0, 4))
            out["data_parallel"] = {k: relative_difference(split(model.apply, params, xs, ys, data_mesh(k)), reference)
                                    for k in (1, 2, 4)}
        print(json.dumps(out))
    """, 4, tmp_path)
    assert result["devices"] == 4
    assert result["mlp-float64"]["rel"] <= 1e-12 and result["mlp-float64"]["dtype"] == "float64"
    assert result["cnn-float64"]["rel"] <= 1e-12
    assert result["mlp-float32"]["rel"] <= 1e-5 and result["mlp-float32"]["dtype"] == "float32"
    assert result["mlp-float64"]["devices"] == [1, 4]
    assert result["mlp-float64"]["seen"][0] == result["mlp-float64"]["seen"][1]
    assert result["shard_shapes"] == [[2, 16]]
    assert "batch size 50 does not split evenly over 4 devices" in result["indivisible"]
    assert set(result["data_parallel"]) == {"1", "2", "4"}
    assert max(result["data_parallel"].values()) <= 1e-12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path):
    train = [sys.executable, "-m", "jaxbatch", "train", "--quiet", "--epochs", "2", "--batch-size", "64",
             "--dtype", "float64"]
    port = free_port()
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(3)]
    procs = []
    try:
        for i in range(2):
            procs.append(start([*train, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), "--out", str(tmp_path / f"hosts{i}")], 2, logs[i]))
        procs.append(start([*train, "--out", str(tmp_path / "one")], 4, logs[2]))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        stop(procs)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert "4 x cpu in 2 processes" in outputs[0]
    assert "test accuracy" not in outputs[1]  # only process 0 prints and writes
    assert not (tmp_path / "hosts1").exists()
    read = lambda d: serialization.msgpack_restore((tmp_path / d / "params.msgpack").read_bytes())  # noqa: E731
    assert relative_difference(read("hosts0"), read("one")) <= 1e-12
    config = json.loads((tmp_path / "hosts0" / "config.json").read_text())
    assert config["environment"]["devices"] == 4 and config["environment"]["processes"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "hosts0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["devices"] for m in metrics] == [4, 4]
    assert np.isclose(metrics[-1]["test_accuracy"],
                      json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"])
