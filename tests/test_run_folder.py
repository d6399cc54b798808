"""The run folder is the user's record (jaxbatch/rundir.py): a new run never
replaces another unless asked (--overwrite), one run writes to a folder at a
time, every setting is checked before a file is touched, and a signal at any
moment of start-up ends as one line with nothing half-written."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import cli, one_error_line

from jaxbatch.cli import main
from jaxbatch.cli.train import resume_command
from jaxbatch.rundir import FolderLock, numbered_out

QUICK = ["--quiet", "--epochs", "1"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (the lock aside) with its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def train(*args) -> int:
    """`jaxbatch train ARGS`' exit status, flags refused by the parser included."""
    return cli("train", *args)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished one-epoch run and its files' hashes."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out, snapshot(out)


def test_the_readmes_two_runs_both_stay(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *QUICK]) == 0
    assert main(["train", *QUICK, "--loss", "batched"]) == 0
    out = capsys.readouterr().out
    assert "metrics and params in runs/mlp-digits/1/" in out and "metrics and params in runs/mlp-digits/2/" in out
    for n, loss in ((1, "vmap"), (2, "batched")):
        run = tmp_path / "runs" / "mlp-digits" / str(n)
        assert json.loads((run / "config.json").read_text())["loss"] == loss
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # --resume with no --out continues the newest
    assert numbered_out("runs/mlp-digits", resume=True) == "runs/mlp-digits/2"
    assert numbered_out("runs/mlp-digits", resume=False) == "runs/mlp-digits/3"


def test_no_run_to_resume_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *QUICK, "--resume"]) == 2
    assert "no run to resume in runs/mlp-digits/" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


# A flag rejected anywhere before training (seeds out of range, a chunked clip on
# two devices is the subprocess test below) leaves the earlier run as it was,
# with or without --overwrite.
@pytest.mark.parametrize("flags,message", [
    ([], "already holds a run (config.json, metrics.jsonl, params.msgpack, checkpoints); pass --resume"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--seed", str(2**32), "--overwrite"], "--seed: must be 4294967295 or less"),
    (["--seed", str(2**63), "--overwrite"], "--seed: must be 4294967295 or less"),
    (["--seed", str(2**64), "--overwrite"], "--seed: must be 4294967295 or less"),
    (["--seed", str(-2**63), "--overwrite"], "--seed: must be 0 or more"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
    (["--batch-size", "5000", "--overwrite"], "larger than the 1347 training examples"),
    (["--resume", "--batch-size", "16"], "made with batch_size 32 and this run has 16"),
])
def test_a_refused_run_leaves_the_folder_as_it_was(done_run, capsys, flags, message):
    out, before = done_run
    capsys.readouterr()
    assert train(*QUICK, "--out", str(out), *flags) == 2
    assert message in one_error_line(capsys)
    assert snapshot(out) == before


def test_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    assert main(["train", *QUICK, "--out", str(out), "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_folder_with_other_files_is_used_and_they_are_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", *QUICK, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "params.msgpack").exists()


def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out)  # as a run in progress holds it
    try:
        assert main(["train", *QUICK, "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"another run (process {os.getpid()}) is writing to {out}" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        lock.release()
    assert main(["train", *QUICK, "--out", str(out)]) == 0  # the lock goes with its holder


@pytest.mark.parametrize("out,message", [
    ("", "--out is empty"),
    ("{file}", "is a file, not a folder"),
    ("{file}/run", "sits under"),
])
def test_an_output_folder_that_cannot_be_is_one_line(tmp_path, capsys, out, message):
    (tmp_path / "file").write_text("x")
    assert main(["train", *QUICK, "--out", out.format(file=tmp_path / "file")]) == 2
    assert message in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_folder_under_proc_is_one_line(capsys):
    assert main(["train", *QUICK, "--out", "/proc/jaxbatch-run"]) == 2
    assert "/proc/jaxbatch-run" in one_error_line(capsys)


def test_a_full_disk_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    from jaxbatch import runlog

    def full(self, record):
        raise OSError(28, "No space left on device", str(self.dir / "metrics.jsonl"))

    monkeypatch.setattr(runlog.RunFiles, "epoch", full)
    assert main(["train", *QUICK, "--out", str(tmp_path / "run")]) == 1
    line = one_error_line(capsys)
    assert "metrics.jsonl: No space left on device" in line


def test_atomic_cleanup_does_not_mask_the_real_error(tmp_path, monkeypatch):
    from jaxbatch.atomic import write_atomic

    def disk_full(tmp):
        tmp.write_bytes(b"part")
        raise OSError(28, "No space left on device")

    def cannot_unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", cannot_unlink)
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(tmp_path / "x", disk_full)


def test_abbreviated_flags_are_refused_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epoch", "2"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --epoch 2; did you mean --epochs?" in one_error_line(capsys)


def test_the_resume_command_drops_overwrite():
    command = resume_command(["--overwrite", "--out", "R", "--epochs", "3"], "R")
    assert command == "jaxbatch train --out R --epochs 3 --resume"


# ---- in child processes: two devices, and signals at every moment of start-up ----

TIMEOUT_S = 120


def child(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxbatch", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, **kw)


def finish(proc) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_chunked_clip_on_two_devices_is_refused_before_touching_the_run(done_run):
    out, before = done_run
    status, output = finish(child([*QUICK, "--out", str(out), "--overwrite", "--dp-clip", "1", "--dp-chunk", "4"],
                                  env={"JAX_NUM_CPU_DEVICES": "2"}))
    assert status == 2, output
    assert "--dp-chunk" in output and len(output.strip().splitlines()) == 1, output
    assert snapshot(out) == before


def wait_for_stop_handlers(proc) -> None:
    """Until the child catches SIGTERM (/proc's SigCgt mask), which only
    jaxbatch's StopSignals does, first thing in `main`: before that, a signal
    falls on Python's own start-up, which no program can make clean."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError("the child never installed its stop handlers")


# After the handlers: 0.1-0.3 s: jaxbatch importing; 0.6-3 s: JAX importing,
# the data loading, the first compile; the two-signal cases stop at once.
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("signum,delays", [
    (signal.SIGINT, (0.1,)), (signal.SIGINT, (0.3,)), (signal.SIGINT, (0.8,)), (signal.SIGINT, (2.0,)),
    (signal.SIGTERM, (0.2,)), (signal.SIGINT, (0.5, 0.05)), (signal.SIGINT, (1.5, 0.05)),
])
def test_a_signal_at_any_moment_is_one_clean_stop(tmp_path, signum, delays):
    out = tmp_path / "run"
    # Epochs enough to outlast the last signal (2 s in) on any machine (about 50 ms
    # each on 2 CPU cores): every signal finds the run on, so each case is checked.
    proc = child(["--quiet", "--epochs", "10000", "--out", str(out)])
    try:
        wait_for_stop_handlers(proc)
        for delay in delays:
            time.sleep(delay)
            os.kill(proc.pid, signum)
    finally:
        status, output = finish(proc)
    assert status == 128 + signum, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    if len(delays) > 1:
        assert "stopped at once" in output, output
    elif "before training began" in output:
        assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"], output
    else:
        assert "resume with:" in output, output
    if (out / "config.json").exists():  # whole or absent
        json.loads((out / "config.json").read_text())


def test_two_runs_started_on_one_folder_leave_one_run(tmp_path):
    out = tmp_path / "run"
    procs = [child(["--quiet", "--epochs", "3", "--out", str(out)]) for _ in range(2)]
    results = [finish(proc) for proc in procs]
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 2], results
    refused = next(output for status, output in results if status == 2).strip().splitlines()
    assert len(refused) == 1, refused
    assert "another run (process" in refused[0] or "already holds a run" in refused[0], refused
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_full_disk_mid_checkpoint_keeps_the_checkpoints_before(tmp_path, capsys, monkeypatch):
    from jaxbatch import atomic, checkpoint

    out = tmp_path / "run"
    calls = []

    def second_save_fills_the_disk(path, write):
        calls.append(path)
        if len(calls) < 2:
            return atomic.write_atomic(path, write)

        def partial_then_full(tmp):
            write(tmp)  # the bytes reach the temporary file, then the disk is full
            raise OSError(28, "No space left on device", str(tmp))

        return atomic.write_atomic(path, partial_then_full)

    monkeypatch.setattr(checkpoint, "write_atomic", second_save_fills_the_disk)
    assert main(["train", "--quiet", "--epochs", "2", "--out", str(out)]) == 1
    assert "No space left on device" in one_error_line(capsys)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["ckpt-000000043.msgpack"]  # the first save whole, no temporary file of the second
    monkeypatch.undo()
    assert main(["train", "--quiet", "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    # what access() says of a read-only filesystem (even to root) or a folder without permission
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    assert main(["train", *QUICK, "--out", str(tmp_path / "run")]) == 2
    assert f"cannot write in {tmp_path} (no permission, or a read-only filesystem)" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
