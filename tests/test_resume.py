"""Runs that survive interruption, for real: `jaxbatch train` in a child
process is killed (SIGKILL from outside, mid-epoch; SIGKILL inside a
checkpoint save), or stopped (SIGINT, SIGTERM), then resumed; it must end with
a params.msgpack byte for byte equal to an uninterrupted run's, and with the
same metrics, each epoch once.

Every child runs in its own session, bounded in time, and is killed with its
whole process group by its id if the test ends early.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

TIMEOUT_S = 180
# mlp on digits, batch 8: 169 steps per epoch, a checkpoint at the first chunk
# end past every 60 steps, so there are checkpoints mid-epoch from epoch 1 on.
RUN = ["--epochs", "6", "--batch-size", "8", "--lr", "0.02", "--checkpoint-every", "60", "--quiet"]


def child_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def start(argv, log):
    return subprocess.Popen(argv, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def jaxbatch(*args) -> list[str]:
    return [sys.executable, "-m", "jaxbatch", "train", *args]


def run(argv, tmp_path, name) -> tuple[int, str]:
    """Run a child to its end (bounded); (exit status, its output)."""
    with open(tmp_path / f"{name}.log", "w+") as log:
        proc = start(argv, log)
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            stop(proc)
        log.seek(0)
        return proc.returncode, log.read()


def checkpoints(out) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def start_and_signal(argv, out, tmp_path, name, signum, after: int = 1) -> tuple[int, str, list]:
    """Start a run, send `signum` once `after` checkpoints exist (mid-epoch:
    the first ones are), wait for its end; (exit status, output, checkpoints seen)."""
    with open(tmp_path / f"{name}.log", "w+") as log:
        proc = start(argv, log)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            # Complete checkpoints only: a save under way shows first as its temporary file.
            while len(seen := [n for n in checkpoints(out) if n.startswith("ckpt-")]) < after:
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a checkpoint"
                time.sleep(0.002)
            os.kill(proc.pid, signum)
            proc.wait(timeout=TIMEOUT_S)
        finally:
            stop(proc)
        log.seek(0)
        return proc.returncode, log.read(), seen


def metrics(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (params bytes, metrics)."""
    tmp = tmp_path_factory.mktemp("reference")
    status, output = run(jaxbatch(*RUN, "--out", str(tmp / "run")), tmp, "reference")
    assert status == 0, output
    return (tmp / "run" / "params.msgpack").read_bytes(), metrics(tmp / "run")


def assert_same_run(out, reference):
    params, history = reference
    assert (out / "params.msgpack").read_bytes() == params  # bit-identical
    assert metrics(out) == history  # every epoch once, with the same numbers
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial save left


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    status, output, seen = start_and_signal(jaxbatch(*RUN, "--out", str(out)), out, tmp_path, "killed",
                                            signal.SIGKILL)
    assert status == -signal.SIGKILL, output
    assert not (out / "params.msgpack").exists()  # it really stopped before the end
    status, output = run(jaxbatch(*RUN, "--out", str(out), "--resume"), tmp_path, "resumed")
    assert status == 0, output
    assert "resuming from" in output
    assert_same_run(out, reference)


def test_sigkill_mid_save_leaves_the_previous_checkpoint_and_resumes_exactly(tmp_path, reference):
    # The third save writes half its file under the temporary name, then the
    # process kills itself with SIGKILL: what a crash mid-save leaves behind.
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from jaxbatch import checkpoint
        from jaxbatch.cli import main
        saves, write_atomic = [], checkpoint.write_atomic
        def dying(path, write):
            saves.append(path)
            if len(saves) < 3:
                return write_atomic(path, write)
            def half(tmp):
                write(tmp)
                data = tmp.read_bytes()
                tmp.write_bytes(data[:len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return write_atomic(path, half)
        checkpoint.write_atomic = dying
        sys.exit(main({["train", *RUN, "--out", str(out)]!r}))
    """)
    status, output = run([sys.executable, "-c", script], tmp_path, "killed")
    assert status == -signal.SIGKILL, output
    names = checkpoints(out)
    assert len([n for n in names if n.startswith(".ckpt-") and n.endswith(".tmp")]) == 1, names
    assert len([n for n in names if n.startswith("ckpt-")]) == 2, names  # the two before are intact
    status, output = run(jaxbatch(*RUN, "--out", str(out), "--resume"), tmp_path, "resumed")
    assert status == 0, output
    assert_same_run(out, reference)


def test_ctrl_c_saves_prints_how_to_resume_and_exits_130(tmp_path, reference):
    out = tmp_path / "run"
    status, output, _ = start_and_signal(jaxbatch(*RUN, "--out", str(out)), out, tmp_path, "stopped",
                                         signal.SIGINT)
    assert status == 130, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0], output
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "jaxbatch" and "--resume" in command
    status, output = run([sys.executable, "-m", *command], tmp_path, "resumed")  # the printed command
    assert status == 0, output
    assert_same_run(out, reference)


def test_sigterm_saves_and_exits_143(tmp_path):
    out = tmp_path / "run"
    status, output, seen = start_and_signal(jaxbatch(*RUN, "--out", str(out)), out, tmp_path, "stopped",
                                            signal.SIGTERM)
    assert status == 143, output
    assert "Traceback" not in output and "stopped by SIGTERM" in output
    saved = checkpoints(out)
    assert saved[-1] > seen[-1]  # a newer checkpoint, saved on the signal
    assert not (out / "params.msgpack").exists()
