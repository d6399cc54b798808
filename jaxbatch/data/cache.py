"""Decoded arrays cached on disk as .npz, so slow sources are decoded once.

Decoding 60,000 JPEGs takes seconds to minutes; loading the same pixels from
an uncompressed .npz takes a fraction of a second. A cache entry is named by
what it was made from (dataset, split, the source's path) and by the source's
state (the size and modification time of every file read). Changing, touching
or replacing a source file changes the state, so the entry is rebuilt; the
stale entry for the same source is removed then.

The cache folder is `$JAXBATCH_CACHE`, else `~/.cache/jaxbatch`: never next to
the data, which may be read-only.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from jaxbatch.atomic import write_atomic


def cache_dir() -> Path:
    """`$JAXBATCH_CACHE`, else `~/.cache/jaxbatch`."""
    return Path(os.environ.get("JAXBATCH_CACHE") or Path.home() / ".cache" / "jaxbatch")


def file_state(paths) -> tuple:
    """(path, size, mtime in ns) for each file: changes whenever a file does."""
    state = []
    for path in paths:
        stat = os.stat(path)
        state.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def cache_path(name: str, split: str, source: Path, state: tuple) -> Path:
    """Where the arrays decoded from `source` in `state` are cached."""
    return cache_dir() / f"{name}-{split}-{_digest(str(source.resolve()))}-{_digest(state)}.npz"


def cached_arrays(
    name: str,
    split: str,
    source: Path,
    state: tuple,
    decode: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from the cache, or from `decode()`, then cached.

    The entry is written under a temporary name and renamed, so an interrupted
    run never leaves a half-written entry under the final name. A cache that
    cannot be read is rebuilt; one that cannot be written is skipped.
    """
    path = cache_path(name, split, source, state)
    if path.is_file():
        try:
            with np.load(path) as entry:
                return entry["images"], entry["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable (e.g. disk filled while writing): decode again
    images, labels = decode()
    try:
        _write(path, images, labels)
    except OSError:
        pass  # a read-only or full cache folder costs speed, not correctness
    return images, labels


def _write(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, images=images, labels=labels)  # uncompressed: loads at disk speed

    write_atomic(path, write)
    # Entries for the same source in an older state are stale now.
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.npz"):
        if old != path:
            old.unlink(missing_ok=True)
