"""The run folder: which one a run writes to, whether it may, and its lock.

A run's folder is its record, so nothing replaces it without being asked:

- `jaxbatch train` with no --out writes to a new numbered folder,
  runs/<recipe or model-dataset>/1, /2, ... (`numbered_out`), so running the
  README's commands one after another leaves every run to compare;
- a folder given with --out that already holds a run is refused unless the
  run is continued (--resume) or replaced (--overwrite) (`check_out`, asked
  once every setting has passed its checks, so a bad flag is reported
  first, and again once the folder is locked);
- one run at a time writes to a folder (`FolderLock`).

Plain Python, no JAX: the command line checks a folder before importing it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxbatch.errors import JaxbatchError

# What makes a folder a run's: a new run refuses a folder holding any of these.
RUN_FILES = ("config.json", "metrics.jsonl", "params.msgpack", "checkpoints")
LOCK = ".lock"


def run_files_in(out) -> list[str]:
    """The run files `out` holds (none if it does not exist)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def check_out(out: str | None, resume: bool, overwrite: bool) -> None:
    """Reject an output folder this run cannot use, touching nothing: an
    empty name, a path through a regular file, a folder holding another run
    (unless resuming it or asked to overwrite it), a place we cannot write."""
    if out is None:
        if resume or overwrite:
            raise JaxbatchError("{setting} needs an output folder: pass --out DIR",
                                setting="resume" if resume else "overwrite")
        return
    if resume and overwrite:
        raise JaxbatchError("--resume continues the run in --out and {setting} replaces it; pass one of them",
                            setting="overwrite")
    check_folder(out)
    held = run_files_in(out)
    if held and not (resume or overwrite):
        raise JaxbatchError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                            "--overwrite to replace it, or another {setting}", setting="out")


def check_folder(out: str, setting: str = "out") -> None:
    """Reject an output folder that cannot be, touching nothing: an empty
    name, a path through a regular file, a place we cannot write. (The
    benchmark and the experiments ask this too, before their work.)"""
    if not str(out).strip():
        raise JaxbatchError("{setting} is empty; name a folder, e.g. --out runs/mine", setting=setting)
    path = Path(out).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == path else f"sits under {existing}, which is a file"
        raise JaxbatchError(f"{out} {where}, not a folder; pass {{setting}} a folder path", setting=setting)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JaxbatchError(f"cannot write in {existing} (no permission, or a read-only filesystem); pass "
                            "{setting} a folder you can write to", setting=setting)


def numbered_out(base, resume: bool) -> str:
    """A run's default folder under `base` (runs/<name>): a new numbered one,
    base/1, base/2, ...; with `resume`, the newest that holds a run."""
    base = Path(base)
    numbers = sorted(int(p.name) for p in base.glob("*") if re.fullmatch(r"[0-9]+", p.name) and p.is_dir()) \
        if base.is_dir() else []
    if not resume:
        return str(base / str(numbers[-1] + 1 if numbers else 1))
    for n in reversed(numbers):
        if run_files_in(base / str(n)):
            return str(base / str(n))
    if run_files_in(base):  # a run from before numbered folders
        return str(base)
    raise JaxbatchError(f"no run to resume in {base}/; start one without --resume, or pass {{setting}} the "
                        "run's folder", setting="out")


class FolderLock:
    """An exclusive lock on `folder/.lock`, held until `release` (or the
    process's end: the OS drops it even after a kill). A second run on the
    same folder fails at once, naming the holder."""

    def __init__(self, folder: Path):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            self.file = None
            return
        self.path = folder / LOCK
        self.created = not self.path.exists()  # a failed start removes it again (`release(remove=True)`)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise JaxbatchError(f"another run ({holder}) is writing to {folder}; wait for it to end, or pass "
                                "another {setting}", setting="out") from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"process {os.getpid()}\n")
            self.file.flush()
        except OSError as err:  # a full disk: no lock file left behind, and the line names it
            self.release(remove=True)
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with `remove`, also the lock file if this run created it (a start that failed)."""
        if self.file is not None:
            if remove and self.created:
                self.path.unlink(missing_ok=True)  # while still held: no other run locks the file going away
            try:
                self.file.close()  # closing drops the lock
            except OSError:  # a full disk again, flushing: the lock goes all the same
                pass
            self.file = None


