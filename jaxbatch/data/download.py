"""Downloads without TensorFlow: the official files, checked against pinned SHA-256.

Each file streams into a temporary name beside its destination while its
SHA-256 is computed (`atomic.write_atomic`); only a file of the pinned size
and hash is renamed to its final name, so a cut transfer or a corrupted copy
never sits where the loaders look. The official URLs and hashes live in
catalog.py.

A mirror (argument `mirror`, or `$JAXBATCH_MIRROR`) replaces the official
servers: `<mirror>/<dataset>/<file>`, the same layout as the data folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from jaxbatch.atomic import write_atomic
from jaxbatch.data.catalog import DatasetSpec, RemoteFile
from jaxbatch.errors import JaxbatchError

CHUNK = 1 << 20
TIMEOUT_S = 60

# on_progress(file name, bytes done, bytes in all): called as each file arrives.
Progress = Callable[[str, int, int], None]


def file_url(spec: DatasetSpec, remote: RemoteFile, mirror: str | None = None) -> str:
    mirror = mirror if mirror is not None else os.environ.get("JAXBATCH_MIRROR")
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.name}/{remote.name}"
    return spec.download_url + remote.name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download(
    spec: DatasetSpec,
    data_dir: Path,
    mirror: str | None = None,
    on_progress: Progress | None = None,
) -> list[Path]:
    """Fetch every official file of `spec` into `<data_dir>/<name>/`; return their paths.

    Files already there with the right SHA-256 are kept, not fetched again.
    """
    if not spec.downloads:
        raise JaxbatchError(f"{spec.name} has no files to download (it ships with scikit-learn)")
    folder = Path(data_dir) / spec.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JaxbatchError(f"cannot create {folder} ({err.strerror}); choose another --data-dir")
    paths = []
    for remote in spec.downloads:
        dest = folder / remote.name
        if not (dest.is_file() and dest.stat().st_size == remote.size and sha256_of(dest) == remote.sha256):
            fetch(file_url(spec, remote, mirror), dest, remote, on_progress)
        elif on_progress:
            on_progress(remote.name, remote.size, remote.size)
        paths.append(dest)
    return paths


def fetch(url: str, dest: Path, remote: RemoteFile, on_progress: Progress | None = None) -> None:
    """Download `url` to `dest`, verified; on any failure nothing is left under either name."""
    try:
        write_atomic(dest, lambda tmp: _receive(url, tmp, remote, on_progress))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # HTTP, DNS, cut
        reason = getattr(err, "reason", None) or err
        raise JaxbatchError(f"downloading {url} failed ({reason}); nothing was saved as {dest.name}")


def _receive(url: str, tmp: Path, remote: RemoteFile, on_progress: Progress | None) -> None:
    """Stream `url` into `tmp`, hashing as it comes; raise unless it is the pinned file."""
    digest, done = hashlib.sha256(), 0
    with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        announced = int(response.headers.get("Content-Length") or -1)
        while block := response.read(CHUNK):
            out.write(block)
            digest.update(block)
            done += len(block)
            if on_progress:
                on_progress(remote.name, done, remote.size)
    if done < announced:
        raise JaxbatchError(
            f"{url}: the transfer stopped after {done} of {announced} bytes; run the download again"
        )
    if done != remote.size:
        raise JaxbatchError(
            f"{url}: {done} bytes, but the official file has {remote.size}; "
            "not the official file, discarded"
        )
    if digest.hexdigest() != remote.sha256:
        raise JaxbatchError(
            f"{url}: SHA-256 {digest.hexdigest()} does not match the pinned "
            f"{remote.sha256}; the file is corrupt or not the official one and was discarded"
        )
