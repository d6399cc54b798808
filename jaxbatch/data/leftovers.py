"""Temporary files a killed process left behind, and their removal.

`atomic.write_atomic` writes `<folder>/.<name>.<pid>.tmp`, then renames it to
`<name>`; on any error it removes the temporary file itself. Only a process
that cannot run its cleanup (SIGKILL, a power cut, the OOM killer) leaves
one, and nothing would ever remove it: the cache and the downloader remove
those of their own files whose process is no longer running, each time they
use the folder. A temporary file of a process still running (another
download, another decode) is kept.

Process ids are this machine's: a folder shared with another machine (a
home folder on NFS) may hold temporaries of processes running there, which
look dead here. Removing one costs that process its write (it then fails
with one line, or skips the cache), never a half-written file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp")  # as atomic.write_all_atomic names them


def running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (one we may not signal exists too)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows: keep everything there
    if pid <= 0:
        return False  # no writer has such an id; os.kill would signal a whole process group
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_dead_temporaries(folder, wanted: Callable[[str], bool]) -> list[Path]:
    """Remove the `.<name>.<pid>.tmp` files in `folder` whose process is gone and
    whose `name` passes `wanted` (only the caller's own kind of file); return
    them. A file that cannot be removed (a read-only folder) stays."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):  # nothing when the folder does not exist
        match = TEMPORARY.fullmatch(path.name)
        if match and wanted(match["name"]) and not running(int(match["pid"])) and path.is_file():
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed
