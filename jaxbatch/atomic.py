"""Files that are either whole or absent: write to a temporary name, then rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to
    `path` (os.replace is atomic within a folder). On any failure the temporary
    file is removed and `path` is left as it was. The temporary name carries the
    process id, so two processes writing the same file do not collide, and it is
    opened the ordinary way, so the user's umask sets its permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
