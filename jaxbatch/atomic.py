"""Files that are either whole or absent: write to a temporary name, then rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

Writer = Callable[[Path], None]


def write_atomic(path, write: Writer) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to
    `path` (os.replace is atomic within a folder). On any failure the temporary
    file is removed and `path` is left as it was. The temporary name carries the
    process id, so two processes writing the same file do not collide, and it is
    opened the ordinary way, so the user's umask sets its permissions."""
    return write_all_atomic({path: write})[0]


def write_all_atomic(writes: dict) -> list[Path]:
    """{path: write}: every `write(tmp)` on its temporary file first, as in
    `write_atomic`, and the renames only once all of them have succeeded, so
    a failure in any leaves every path as it was and no temporary file
    behind. Returns the paths. (Each rename is atomic, the group is not: a
    crash between two renames leaves some files new and some old, none
    half-written.)"""
    staged = [(Path(path), write) for path, write in writes.items()]
    temporary = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path, _ in staged]
    try:
        for tmp, (path, write) in zip(temporary, staged):
            try:
                write(tmp)
            except OSError as err:
                # Name the file the user asked for, not its temporary name; a failed
                # write() (a full disk) names no file at all.
                if err.filename is None or str(err.filename) == str(tmp):
                    raise OSError(err.errno, err.strerror, str(path)) from err
                raise
        for tmp, (path, _) in zip(temporary, staged):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the error that brought us here is the one to report
                pass
    return [path for path, _ in staged]


def make_folder(path) -> list[Path]:
    """Create the folder `path` with its missing parents; returns the folders
    made, deepest first, for `remove_made` should what was to go in them fail."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_made(made)
        raise
    return made


def remove_made(made: list[Path]) -> None:
    """Undo `make_folder` after a failed start: remove each folder it made
    that is still empty, so nothing but what the start created goes."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone: leave it
            pass
