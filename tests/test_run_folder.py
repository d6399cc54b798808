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


def test_a_run_saved_before_numbered_folders_is_resumed_in_place(tmp_path, monkeypatch, capsys):
    # Runs once went straight into runs/<name>/; --resume with no --out still finds one there.
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "runs" / "mlp-digits"
    assert main(["train", "--quiet", "--epochs", "2", "--out", "runs/mlp-digits", "--checkpoint-every", "5"]) == 0
    whole = (base / "metrics.jsonl").read_text().splitlines()
    newest = max((base / "checkpoints").iterdir())
    newest.unlink()  # as if killed before the last epoch's end: the newest checkpoint left is mid-epoch 2
    assert numbered_out("runs/mlp-digits", resume=True) == "runs/mlp-digits"
    assert main(["train", "--epochs", "2", "--resume"]) == 0, capsys.readouterr().err
    assert "resum" in capsys.readouterr().out.lower()
    again = (base / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in again] == [1, 2]
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in json.loads(line).items() if k not in drop} for line in again] == \
        [{k: v for k, v in json.loads(line).items() if k not in drop} for line in whole]  # the same epoch 2
    assert not [p for p in base.iterdir() if p.name.isdigit()]  # no numbered folder made beside it
    assert numbered_out("runs/mlp-digits", resume=False) == "runs/mlp-digits/1"  # a new run gets the first number


def test_no_run_to_resume_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *QUICK, "--resume"]) == 2
    assert "no run to resume in runs/mlp-digits/" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("left", [None, "config.json", "checkpoints"])
def test_a_resume_with_nothing_to_resume_gives_advice_that_works(tmp_path, capsys, left):
    out = tmp_path / "run"
    if left:  # what a run killed before its first checkpoint leaves
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"epochs": 1}))
        if left == "checkpoints":
            (out / "checkpoints").mkdir()
    capsys.readouterr()
    assert train(*QUICK, "--out", str(out), "--resume") == 2
    line = one_error_line(capsys)
    advice = {"run without --resume": [], "with --overwrite in place of --resume": ["--overwrite"]}
    taken = [flags for words, flags in advice.items() if words in line]
    assert len(taken) == 1, line
    assert train(*QUICK, "--out", str(out), *taken[0]) == 0, capsys.readouterr().err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


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


# Every setting is checked before the folder: a bad flag aimed at a folder that
# holds a run is reported for itself, not after the folder's refusal is dealt with.
@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "5000"], "larger than the 1347 training examples"),
    (["--model", "lenet5"], "lenet5 takes 32x32 images"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--schedule", "warmup"], "needs --warmup-steps of 1 or more"),
    (["--schedule", "warmup", "--warmup-steps", "1000000"], "is as long as the run (43 steps) or longer"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs optimizer sgd"),
    (["--dp-clip", "0"], "--dp-clip is the largest norm a per-example gradient keeps"),
    (["--dp-noise", "1"], "pass --dp-clip C too"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"], "--dp-delta must be between 0 and 1"),
    (["--dp-clip", "1", "--dp-noise", "0.5", "--dp-epsilon", "1"], "above the budget 1; raise --dp-noise"),
    (["--dp-clip", "1", "--loss", "batched"], "clipping needs every example's own gradient"),
])
def test_a_bad_flag_is_reported_before_the_folder(done_run, capsys, flags, message):
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
    import builtins

    real_open = builtins.open

    class FullDisk:  # what a full disk does to an append: open works, write() fails naming no file
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if str(file).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(builtins, "open", open_)
    assert main(["train", *QUICK, "--out", str(tmp_path / "run")]) == 1
    line = one_error_line(capsys)
    assert f"{tmp_path / 'run' / 'metrics.jsonl'}: No space left on device" in line
    assert "resume with" not in line  # epoch 1's end: no checkpoint yet


@pytest.mark.parametrize("full", ["config.json", ".lock"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_start_refused_for_a_full_disk_leaves_nothing_it_created(tmp_path, capsys, monkeypatch, full, existing):
    from jaxbatch import atomic, rundir

    out = tmp_path / "new" / "run"
    if existing:  # a folder of the user's, with a file of theirs
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    if full == "config.json":
        real = atomic.write_all_atomic

        def full_disk(writes):
            def write_none(tmp):
                raise OSError(28, "No space left on device")
            return real({path: write_none for path in writes})

        monkeypatch.setattr(atomic, "write_all_atomic", full_disk)
    else:
        real_open = open

        class FullDisk:
            def __init__(self, f):
                self.f = f

            def __getattr__(self, name):
                return getattr(self.f, name)

            def write(self, text):
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(rundir, "open", lambda *a, **kw: FullDisk(real_open(*a, **kw)), raising=False)
    assert main(["train", *QUICK, "--out", str(out)]) == 1
    assert f"{out / full}: No space left on device" in one_error_line(capsys)
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not (tmp_path / "new").exists()


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


def child(args, env=None, stdout=subprocess.PIPE, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxbatch", "train", *args], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, **kw)


def end(proc) -> None:
    """The child and all it started killed, if it is still running (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(proc) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, output
    finally:
        end(proc)


def test_a_chunked_clip_on_two_devices_is_refused_before_touching_the_run(done_run):
    out, before = done_run
    # no --overwrite: the flag is refused before the folder holding a run is
    status, output = finish(child([*QUICK, "--out", str(out), "--dp-clip", "1", "--dp-chunk", "4"],
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
    (signal.SIGTERM, (0.2,)), (signal.SIGINT, (0.5, 0)), (signal.SIGINT, (1.5, 0)),
])
def test_a_signal_at_any_moment_is_one_clean_stop(tmp_path, signum, delays):
    out, log_path = tmp_path / "run", tmp_path / "log"
    # Epochs enough to outlast the last signal (2 s in) on any machine (about 50 ms
    # each on 2 CPU cores): every signal finds the run on, so each case is checked.
    with open(log_path, "w") as log:
        proc = child(["--quiet", "--epochs", "10000", "--out", str(out)], stdout=log)
        try:
            wait_for_stop_handlers(proc)
            time.sleep(delays[0])
            os.kill(proc.pid, signum)
            if len(delays) > 1:  # the second once the first is seen: Python runs one handler for
                wait_for(log_path, "stopping at the next safe point", proc)  # signals in one C call
                os.kill(proc.pid, signum)
            status = proc.wait(timeout=TIMEOUT_S)
        finally:
            end(proc)
    output = log_path.read_text()
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


def wait_for(path: Path, text: str, proc) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.01)


# What the process does after main returns (JAX's teardown), made long enough to signal it.
LINGERING_EXIT = """
import atexit, os, sys, time
from jaxbatch.cli import main
atexit.register(lambda: (os.write(1, b"exiting\\n"), time.sleep(60)))
sys.argv = ["jaxbatch", "train", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_second_signal_while_the_process_exits_still_stops_it_at_once(tmp_path):
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", LINGERING_EXIT, "--quiet", "--epochs", "50",
                                 "--out", str(tmp_path / "run")], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        try:
            wait_for(log_path, "training mlp on digits", proc)
            os.kill(proc.pid, signal.SIGINT)  # stops at the next chunk; main returns 130
            wait_for(log_path, "exiting", proc)
            os.kill(proc.pid, signal.SIGINT)
            status = proc.wait(timeout=TIMEOUT_S)
        finally:
            end(proc)
    output = log_path.read_text()
    assert status == 130, output
    assert "resume with:" in output and "jaxbatch: stopped at once by a second SIGINT" in output, output
    assert "Traceback" not in output, output


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
            write(tmp)  # the bytes reach the temporary file, then the disk is full: write() names no file
            raise OSError(28, "No space left on device")

        return atomic.write_atomic(path, partial_then_full)

    monkeypatch.setattr(checkpoint, "write_atomic", second_save_fills_the_disk)
    assert main(["train", "--quiet", "--epochs", "2", "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert f"{out / 'checkpoints' / 'ckpt-000000086.msgpack'}: No space left on device" in line, line
    # the first checkpoint is whole: the line says how to go on from it
    assert line.endswith(f"resume with: jaxbatch train --quiet --epochs 2 --out {out} --resume"), line
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
