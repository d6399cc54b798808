"""Decoded arrays cached on disk as .npz, so slow sources are decoded once.

Decoding 60,000 JPEGs takes seconds to minutes; loading the same pixels from
an uncompressed .npz takes a fraction of a second. A cache entry is named by
what it was made from (dataset, split, the source's path) and by the source's
state (the size and modification time of every file read) and by FORMAT, the
layout's number. Changing, touching or replacing a source file changes the
state, so the entry is rebuilt; the stale entry for the same source is removed
then. An entry read back is checked like a fresh decode, and rebuilt if it
fails.

The cache folder is `$JAXBATCH_CACHE`, else `~/.cache/jaxbatch`: never next to
the data, which may be read-only.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from jaxbatch.atomic import write_atomic
from jaxbatch.data import leftovers
from jaxbatch.errors import JaxbatchError

# The layout of an entry: which arrays, their dtypes, what they were checked
# against. It is part of every entry's name, so a version that changes it
# never reads an entry written by another (2: first numbered; entries
# are checked on reading). Raise it with any such change.
FORMAT = 2
ENTRY = ("images", "labels")  # the arrays of an entry, as named in its .npz
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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


def _source_prefix(name: str, split: str, source: Path) -> str:
    """The start of every entry's name made from this source, whatever its state or format."""
    return f"{name}-{split}-{_digest(str(source.resolve()))}-"


def cache_path(name: str, split: str, source: Path, state: tuple) -> Path:
    """Where the arrays decoded from `source` in `state` are cached under this FORMAT."""
    return cache_dir() / f"{_source_prefix(name, split, source)}f{FORMAT}-{_digest(state)}.npz"


def cached_arrays(
    name: str,
    split: str,
    source: Path,
    state: tuple,
    decode: Callable[[], tuple[np.ndarray, np.ndarray]],
    check: Callable[[np.ndarray, np.ndarray], None],
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from the cache, or from `decode()`, then cached.

    `check(images, labels)` raises JaxbatchError for arrays that do not fit the
    dataset. It runs on a fresh decode before it is cached (a bad decode is
    never written) and on every entry read back: an entry that cannot be read
    whole, or that fails the check, is removed and rebuilt from the source.
    The entry is written under a temporary name and renamed, so an
    interrupted run never leaves a half-written entry under the final name;
    temporaries of runs that were killed are removed here (leftovers.py). A
    cache that cannot be written is skipped.
    """
    leftovers.remove_dead_temporaries(cache_dir(), lambda entry: entry.endswith(".npz"))
    path = cache_path(name, split, source, state)
    entry = _read(path)
    if entry is not None:
        try:
            check(*entry)
            return entry
        except JaxbatchError:
            pass  # well-formed but wrong (damaged, edited, or written by a buggy version): rebuild
    if path.is_file():
        try:
            path.unlink()
        except OSError:
            pass  # a read-only cache: the rebuilt arrays are not written either
    images, labels = decode()
    check(images, labels)
    try:
        _write(path, images, labels, _source_prefix(name, split, source))
    except OSError:
        pass  # a read-only or full cache folder costs speed, not correctness
    return images, labels


def _read(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The entry's (images, labels), or None if there is none or it cannot be read back whole."""
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return tuple(_read_member(archive, f"{key}.npy") for key in ENTRY)
    except Exception:  # zipfile and numpy's parsers fail in many ways on damage (even tokenize.TokenError)
        return None  # e.g. the disk filled while writing it: an entry is only ever a shortcut


def _read_member(archive: zipfile.ZipFile, member_name: str) -> np.ndarray:
    """One array of an entry. Its .npy header must claim exactly the bytes the
    member holds before numpy allocates the array: a damaged header claiming
    terabytes is refused, not allocated. Reading to the end checks the zip CRC."""
    info = archive.getinfo(member_name)
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"{member_name}: .npy format {version}")
        shape, _, dtype = read_header(member)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize != info.file_size - member.tell():
            raise ValueError(f"{member_name}: header claims {shape} {dtype}, not the bytes there")
        member.seek(0)
        return np.lib.format.read_array(member, allow_pickle=False)


def _write(path: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """Write the entry at `path`, then remove the other entries whose names start with `prefix` (the same source)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **dict(zip(ENTRY, (images, labels))))  # uncompressed: loads at disk speed

    write_atomic(path, write)
    # Entries for the same source in an older state, or in another format, are stale now.
    for old in path.parent.glob(prefix + "*.npz"):
        if old != path:
            old.unlink(missing_ok=True)
