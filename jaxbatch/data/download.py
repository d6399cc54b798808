"""Downloads without TensorFlow: the official files, checked against pinned SHA-256.

Each file streams into a temporary name beside its destination while its
SHA-256 is computed (`atomic.write_atomic`); only a file of the pinned size
and hash is renamed to its final name, so a cut transfer or a corrupted copy
never sits where the loaders look. The official URLs and hashes live in
catalog.py.

What a server can do to a download is bounded:
  * size: a file announced at another size than the pinned one is refused
    before its body is read, and reading stops at the pinned size plus one
    byte, so an endless response costs one byte more than the real file;
  * time: each file has a deadline (`default_deadline`: a minute plus one
    second per 64 KiB, or `deadline_s`), covering the request, the headers
    and the body. When it passes, the connection is shut down, so a server
    that trickles bytes cannot hold a read past it. Connecting (and the TLS
    handshake) is bounded by TIMEOUT_S of silence;
  * leftovers: a failed or interrupted download leaves no temporary file and
    no dataset folder it created empty; temporary files of a download that
    was killed (SIGKILL) are removed by the next one (leftovers.py).

A mirror (argument `mirror`, or `$JAXBATCH_MIRROR`) replaces the official
servers: `<mirror>/<dataset>/<file>`, the same layout as the data folder. It
must be an http(s) URL with a host, or a file URL.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from jaxbatch.atomic import write_atomic
from jaxbatch.data import leftovers
from jaxbatch.data.catalog import DatasetSpec, RemoteFile, one_line
from jaxbatch.errors import JaxbatchError

CHUNK = 1 << 20
TIMEOUT_S = 60  # the longest a connection may stay silent
DEADLINE_BASE_S = 60  # a file's default deadline: this, plus a second per DEADLINE_RATE bytes
DEADLINE_RATE = 64 << 10  # 64 KiB/s, about 0.5 Mbit/s: a slower link needs deadline_s
MIRROR_SCHEMES = ("http", "https", "file")

# on_progress(file name, bytes done, bytes in all): called as each file arrives.
Progress = Callable[[str, int, int], None]


def default_deadline(size: int) -> float:
    """Seconds a file of `size` bytes may take by default: a minute, plus a second
    per 64 KiB (MNIST's largest file: 3.5 minutes; CIFAR-10's 162 MiB: 44)."""
    return DEADLINE_BASE_S + size / DEADLINE_RATE


def resolve_mirror(mirror: str | None) -> str | None:
    """`mirror`, else `$JAXBATCH_MIRROR`, else None (the official servers).

    A mirror must be an http(s) URL with a host or a file URL: anything else
    (a bare word, ftp://) is refused with one line, before anything is fetched.
    """
    origin = "" if mirror is not None else " (from $JAXBATCH_MIRROR)"
    mirror = mirror if mirror is not None else os.environ.get("JAXBATCH_MIRROR")
    if not mirror:
        return None
    try:
        parts = urllib.parse.urlsplit(mirror)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in MIRROR_SCHEMES or (parts.scheme != "file" and not parts.hostname):
        raise JaxbatchError(f"mirror {mirror!r}{origin} is not an http(s) or file URL; give the base URL that "
                            "serves <name>/<file>, e.g. https://example.org/datasets or file:///srv/datasets")
    return mirror


def file_url(spec: DatasetSpec, remote: RemoteFile, mirror: str | None = None) -> str:
    mirror = resolve_mirror(mirror)
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
    deadline_s: float | None = None,
) -> list[Path]:
    """Fetch every official file of `spec` into `<data_dir>/<name>/`; return their paths.

    Files already there with the right SHA-256 are kept, not fetched again.
    `deadline_s` limits each file's transfer (default: `default_deadline`).
    On failure or interruption, the files verified so far stay; the folders
    this call created are removed if they hold nothing.
    """
    if not spec.downloads:
        raise JaxbatchError(f"{spec.name} has no files to download (it ships with jaxbatch)")
    mirror = resolve_mirror(mirror)
    if deadline_s is not None and not (math.isfinite(deadline_s) and deadline_s > 0):
        raise JaxbatchError(f"a download deadline must be a number of seconds above 0, not {deadline_s}")
    folder = Path(data_dir) / spec.name
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(created)
        raise JaxbatchError(f"cannot create {folder} ({err.strerror}); choose another --data-dir")
    try:
        names = {remote.name for remote in spec.downloads}
        leftovers.remove_dead_temporaries(folder, names.__contains__)
        paths = []
        for remote in spec.downloads:
            dest = folder / remote.name
            if not (dest.is_file() and dest.stat().st_size == remote.size and sha256_of(dest) == remote.sha256):
                fetch(file_url(spec, remote, mirror), dest, remote, on_progress, deadline_s)
            elif on_progress:
                on_progress(remote.name, remote.size, remote.size)
            paths.append(dest)
        return paths
    except BaseException:  # a failure, or Ctrl-C: no empty folder stays behind
        _remove_empty(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (verified files stay), or gone
            return


def fetch(url: str, dest: Path, remote: RemoteFile, on_progress: Progress | None = None,
          deadline_s: float | None = None) -> None:
    """Download `url` to `dest`, verified; on any failure nothing is left under either name."""
    deadline = Deadline(default_deadline(remote.size) if deadline_s is None else deadline_s)
    try:
        write_atomic(dest, lambda tmp: _receive(url, tmp, remote, on_progress, deadline))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # HTTP, DNS, cut
        if deadline.expired:
            raise deadline.error(url, dest.name)
        reason = getattr(err, "reason", None) or err
        raise JaxbatchError(f"downloading {url} failed ({one_line(reason)}); nothing was saved as {dest.name}")
    finally:
        deadline.cancel()


def _receive(url: str, tmp: Path, remote: RemoteFile, on_progress: Progress | None, deadline: Deadline) -> None:
    """Stream `url` into `tmp`, hashing as it comes; raise unless it is the pinned file.

    At most the pinned size plus one byte is read: one byte more proves the
    file is not the pinned one.
    """
    digest, done = hashlib.sha256(), 0
    with open(tmp, "wb") as out, deadline.open(url) as response:
        announced = _announced_length(response)
        if announced is not None and announced != remote.size:
            raise JaxbatchError(f"{url}: the server announces {announced} bytes, but the official file has "
                                f"{remote.size}; not the official file, nothing was saved")
        while done <= remote.size:
            block = response.read1(min(CHUNK, remote.size + 1 - done))  # what has arrived: never waits for more
            if deadline.expired or not block:
                break
            out.write(block)
            digest.update(block)
            done += len(block)
            if on_progress:
                on_progress(remote.name, min(done, remote.size), remote.size)
    if deadline.expired:
        raise deadline.error(url, remote.name)
    if done > remote.size:
        raise JaxbatchError(f"{url}: more than the {remote.size} bytes of the official file; "
                            "not the official file, discarded")
    if announced is not None and done < announced:
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


def _announced_length(response) -> int | None:
    """The Content-Length a response announces, or None (absent, or not a number: a server may send anything)."""
    try:
        return int(response.headers.get("Content-Length"))
    except (TypeError, ValueError):
        return None


class Deadline:
    """One file's time limit, from its creation.

    When it passes, `expired` turns true and the sockets of the connections
    opened through `open` are shut down, which ends any read blocked on them:
    a server that trickles a byte at a time cannot hold a read past the
    limit. `cancel` once the file is done.
    """

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets, self._lock = [], threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut_down(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def open(self, url: str):
        """urlopen(url), with each connection's socket watched; no silence longer than TIMEOUT_S."""
        handlers = (_HTTPHandler(self), _HTTPSHandler(self))
        return urllib.request.build_opener(*handlers).open(url, timeout=min(TIMEOUT_S, self.seconds))

    def error(self, url: str, name: str) -> JaxbatchError:
        seconds = f"{self.seconds:.1f}".rstrip("0").rstrip(".")  # 0.5, 1, 211.2
        return JaxbatchError(f"downloading {url} took longer than its deadline of {seconds} s; nothing "
                             f"was saved as {name}; check the connection or mirror, or allow more time "
                             "(--deadline SECONDS)")


def _shut_down(sock: socket.socket) -> None:
    try:
        # socket.socket's own shutdown, also on an SSLSocket: it acts on the descriptor at once.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _watched(connection_class, deadline: Deadline):
    """`connection_class` with its socket handed to `deadline` as soon as it is connected."""

    class Watched(connection_class):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        self.context = ssl.create_default_context()  # certificates and host names checked, as urlopen does
        super().__init__(context=self.context)
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self.context)
