"""The downloader against a local HTTP server: verified, atomic, nothing half-written."""

import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from data_fixtures import idx_bytes, random_split

from jaxbatch.cli import main
from jaxbatch.data import DATASETS, get_spec, load
from jaxbatch.data import download as download_module
from jaxbatch.data.download import download
from jaxbatch.data.catalog import RemoteFile
from jaxbatch.errors import JaxbatchError


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    cut: set = set()  # paths whose transfer stops half-way
    announce: dict = {}  # path -> the Content-Length sent, when it is not the file's length
    endless: set = set()  # paths served without Content-Length, zeros until the client leaves
    trickle: set = set()  # paths whose body comes a byte at a time, 10 bytes a second
    trickle_headers: set = set()  # paths whose status line and headers come a byte at a time
    stall: set = set()  # paths that send half their body, then nothing
    stop = threading.Event()  # set when the test ends: every slow response stops
    MOST_S = 15  # a slow response never lasts longer than this, client or not

    def do_GET(self):
        if self.path in self.trickle_headers:
            return self._slowly(b"HTTP/1.0 200 OK\r\n" + b"X-Slow: yes\r\n" * 1000)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path not in self.endless:
            self.send_header("Content-Length", str(self.announce.get(self.path, len(data))))
        self.end_headers()
        if self.path in self.endless:
            return self._endless()
        if self.path in self.trickle:
            return self._slowly(data)
        self.wfile.write(data[: len(data) // 2] if self.path in self.cut | self.stall else data)
        self.wfile.flush()
        if self.path in self.stall:
            self.stop.wait(self.MOST_S)
        if self.path in self.cut:
            self.close_connection = True

    def _slowly(self, data: bytes):
        for i in range(min(len(data), self.MOST_S * 10)):
            if self.stop.wait(0.1):
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def _endless(self):
        block = bytes(1 << 16)
        for _ in range(1 << 10):  # 64 MiB at most
            try:
                self.wfile.write(block)
            except OSError:  # the client gave up
                return

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A server on 127.0.0.1 serving Handler.files; yields its base URL."""
    Handler.files, Handler.cut, Handler.announce = {}, set(), {}
    Handler.endless, Handler.trickle, Handler.trickle_headers, Handler.stall = set(), set(), set(), set()
    Handler.stop = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


def mnist_like_files(n=16):
    images, labels = random_split(n, (28, 28, 1))
    names = {"train": "train", "test": "t10k"}
    files = {}
    for split, prefix in names.items():
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images[..., 0]))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels))
    return images, labels, files


def pinned_spec(monkeypatch, files, name="mnist"):
    """The dataset's catalogue entry with its downloads pinned to these test files."""
    remotes = tuple(RemoteFile(f, len(d), hashlib.sha256(d).hexdigest()) for f, d in files.items())
    spec = dataclasses.replace(get_spec(name), downloads=remotes)
    monkeypatch.setitem(DATASETS, name, spec)
    return spec


def serve(files, under="mnist"):
    Handler.files.update({f"/{under}/{name}": data for name, data in files.items()})


def test_good_files_are_accepted_and_load(tmp_path, server, monkeypatch):
    images, labels, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    seen = []
    paths = download(spec, tmp_path, mirror=server, on_progress=lambda *a: seen.append(a))
    assert sorted(p.name for p in paths) == sorted(files)
    assert all(p.read_bytes() == files[p.name] for p in paths)
    assert seen[-1][1] == seen[-1][2]  # the last report is a finished file
    data = load("mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(data.images, images)
    # A second run finds every file verified and fetches nothing.
    Handler.files.clear()
    assert download(spec, tmp_path, mirror=server) == paths


def test_mirror_from_environment(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    monkeypatch.setenv("JAXBATCH_MIRROR", server + "/")
    assert len(download(spec, tmp_path)) == 4


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_corrupted_file_is_rejected_and_removed(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    bad = dict(files)
    bad["t10k-images-idx3-ubyte.gz"] = bytes(b ^ 1 for b in files["t10k-images-idx3-ubyte.gz"])
    serve(bad)
    with pytest.raises(JaxbatchError) as err:
        download(spec, tmp_path, mirror=server)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value) and "SHA-256" in str(err.value)
    assert "t10k-images-idx3-ubyte.gz" not in leftovers(tmp_path / "mnist")
    assert not [name for name in leftovers(tmp_path / "mnist") if name.startswith(".")]  # no temporary file


def test_file_of_another_size_is_rejected(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve({**files, "train-labels-idx1-ubyte.gz": files["train-labels-idx1-ubyte.gz"] + b"extra"})
    with pytest.raises(JaxbatchError, match="train-labels-idx1-ubyte.gz: .*not the official file"):
        download(spec, tmp_path, mirror=server)
    assert "train-labels-idx1-ubyte.gz" not in leftovers(tmp_path / "mnist")


def test_cut_transfer_leaves_nothing_under_the_final_name(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files(n=400)
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    Handler.cut.add("/mnist/train-images-idx3-ubyte.gz")
    with pytest.raises(JaxbatchError) as err:
        download(spec, tmp_path, mirror=server)
    assert "train-images-idx3-ubyte.gz" in str(err.value) and "stopped after" in str(err.value)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path / "mnist") == []


def test_missing_file_on_the_server(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve({k: v for k, v in files.items() if not k.startswith("t10k-labels")})
    with pytest.raises(JaxbatchError, match="t10k-labels-idx1-ubyte.gz failed .*Not Found"):
        download(spec, tmp_path, mirror=server)
    assert "t10k-labels-idx1-ubyte.gz" not in leftovers(tmp_path / "mnist")


def test_cli_download(tmp_path, server, monkeypatch, capsys):
    _, _, files = mnist_like_files()
    pinned_spec(monkeypatch, files)
    serve(files)
    rc = main(["data", "download", "mnist", "--data-dir", str(tmp_path), "--mirror", server, "--quiet"])
    assert rc == 0 and "4 files verified" in capsys.readouterr().out
    Handler.files["/mnist/t10k-labels-idx1-ubyte.gz"] = b"tampered"
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    rc = main(["data", "download", "mnist", "--data-dir", str(tmp_path), "--mirror", server, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "t10k-labels-idx1-ubyte.gz" in err[0]


def test_official_pins_are_https_and_complete():
    for name in ("mnist", "fashion_mnist", "kmnist", "cifar10"):
        spec = get_spec(name)
        assert spec.download_url.startswith("https://")
        assert spec.downloads and all(len(f.sha256) == 64 and f.size > 0 for f in spec.downloads)


# Size and time are bounded; a mirror is a URL; nothing is left behind.


def everything_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def one_line_error(call, *needles) -> str:
    """The message of the JaxbatchError `call()` raises: one line, holding every needle."""
    with pytest.raises(JaxbatchError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


def test_endless_response_stops_one_byte_past_the_pinned_size(tmp_path, server, monkeypatch):
    """No Content-Length, zeros until the client leaves: read to the pinned size + 1 byte, then refused."""
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    Handler.endless.add("/mnist/train-images-idx3-ubyte.gz")
    size = len(files["train-images-idx3-ubyte.gz"])
    received = count_reads(monkeypatch)
    one_line_error(lambda: download(spec, tmp_path / "data", mirror=server),
                   f"train-images-idx3-ubyte.gz: more than the {size} bytes of the official file")
    assert sum(received) == size + 1
    assert everything_under(tmp_path) == []  # no temporary file, no empty folder


def count_reads(monkeypatch) -> list:
    """The length of every block the downloader reads from a response."""
    received = []
    real_open = download_module.Deadline.open

    def counting_open(self, url):
        response = real_open(self, url)
        for name in ("read", "read1"):
            def read(*args, real=getattr(response, name)):
                block = real(*args)
                received.append(len(block))
                return block
            setattr(response, name, read)
        return response

    monkeypatch.setattr(download_module.Deadline, "open", counting_open)
    return received


def test_announced_size_other_than_the_pinned_one_is_refused_unread(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    size = len(files["train-images-idx3-ubyte.gz"])
    Handler.announce["/mnist/train-images-idx3-ubyte.gz"] = 12 * size
    seen = []
    one_line_error(lambda: download(spec, tmp_path / "data", mirror=server, on_progress=lambda *a: seen.append(a)),
                   f"train-images-idx3-ubyte.gz: the server announces {12 * size} bytes, but the official file has "
                   f"{size}")
    assert seen == [] and everything_under(tmp_path) == []


def test_content_length_that_is_not_a_number_is_ignored(tmp_path, server, monkeypatch):
    """`Content-Length: abc` was a ValueError traceback: the size is checked on the bytes that come."""
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    Handler.announce["/mnist/train-images-idx3-ubyte.gz"] = "abc"
    assert len(download(spec, tmp_path, mirror=server)) == 4


@pytest.mark.parametrize("deadline", [0, -1, float("nan"), float("inf")])
def test_deadline_must_be_a_positive_number(tmp_path, deadline):
    one_line_error(lambda: download(get_spec("mnist"), tmp_path / "data", deadline_s=deadline),
                   "deadline must be a number of seconds above 0")
    assert everything_under(tmp_path) == []


@pytest.mark.parametrize("slow", ["trickle", "trickle_headers"])
def test_deadline_ends_a_trickling_server(tmp_path, server, monkeypatch, slow):
    """A byte every 0.1 s never trips a silence timeout; the deadline still ends the file at 1 s,
    in the body or in the headers (the connection is shut down, not waited on)."""
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    getattr(Handler, slow).add("/mnist/train-images-idx3-ubyte.gz")
    start = time.monotonic()
    with pytest.raises(JaxbatchError) as err:
        download(spec, tmp_path / "data", mirror=server, deadline_s=1.0)
    took = time.monotonic() - start
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz took longer than its deadline of 1 s" in message and "\n" not in message
    # Not before the deadline, and well before the server gives up by itself (MOST_S,
    # what a deadline that never acted would take): the margin is for a loaded machine.
    margin_s = Handler.MOST_S / 3
    assert 1.0 <= took < 1.0 + margin_s, f"{took:.1f} s for a 1 s deadline"
    assert everything_under(tmp_path) == []


def test_default_deadline_grows_with_the_file():
    assert download_module.default_deadline(0) == 60
    assert download_module.default_deadline(64 << 20) == 60 + 1024  # 64 MiB: 1 s per 64 KiB
    cifar = get_spec("cifar10").downloads[0].size
    assert 40 * 60 < download_module.default_deadline(cifar) < 50 * 60


def test_cli_deadline(tmp_path, server, monkeypatch, capsys):
    _, _, files = mnist_like_files()
    pinned_spec(monkeypatch, files)
    serve(files)
    Handler.trickle.add("/mnist/train-images-idx3-ubyte.gz")
    rc = main(["data", "download", "mnist", "--data-dir", str(tmp_path / "d"), "--mirror", server, "--quiet",
               "--deadline", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train-images-idx3-ubyte.gz took longer than its deadline of 0.5 s" in err[0]
    assert everything_under(tmp_path) == []
    with pytest.raises(SystemExit) as exit_:
        main(["data", "download", "mnist", "--data-dir", str(tmp_path / "d"), "--deadline", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "must be greater than 0" in err[0]
    assert everything_under(tmp_path) == []


@pytest.mark.parametrize("mirror", ["nope", "ftp://example.org/data", "http://", "https://:80/x",
                                    "http://example.org:port/", "http://[::1/x", "mailto:me@example.org"])
def test_mirror_must_be_an_http_or_file_url(tmp_path, mirror, capsys):
    with pytest.raises(JaxbatchError) as err:
        download(get_spec("mnist"), tmp_path / "data", mirror=mirror)
    assert f"mirror {mirror!r} is not an http(s) or file URL" in str(err.value) and "\n" not in str(err.value)
    rc = main(["data", "download", "mnist", "--data-dir", str(tmp_path / "data"), "--mirror", mirror, "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "is not an http(s) or file URL" in lines[0]
    assert everything_under(tmp_path) == []  # refused before anything was created


def test_mirror_from_environment_is_checked_too(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBATCH_MIRROR", "nope")
    one_line_error(lambda: download(get_spec("mnist"), tmp_path / "data"),
                   "mirror 'nope' (from $JAXBATCH_MIRROR) is not an http(s) or file URL")
    assert everything_under(tmp_path) == []


def test_file_mirror(tmp_path, monkeypatch):
    images, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    for name, data in files.items():
        (tmp_path / "mirror" / "mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mirror" / "mnist" / name).write_bytes(data)
    assert len(download(spec, tmp_path / "data", mirror=(tmp_path / "mirror").as_uri())) == 4
    np.testing.assert_array_equal(load("mnist", "test", data_dir=tmp_path / "data").images, images)


def test_failed_download_leaves_no_folder_it_created(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve({k: v for k, v in files.items() if k != "train-images-idx3-ubyte.gz"})  # the first file: 404
    one_line_error(lambda: download(spec, tmp_path / "new" / "data", mirror=server),
                   "train-images-idx3-ubyte.gz failed (Not Found)")
    assert everything_under(tmp_path) == []
    # A folder that was there before stays, empty or not.
    (tmp_path / "data").mkdir()
    one_line_error(lambda: download(spec, tmp_path / "data", mirror=server), "Not Found")
    assert everything_under(tmp_path) == ["data"]


def test_later_failure_keeps_the_verified_files(tmp_path, server, monkeypatch):
    _, _, files = mnist_like_files()
    spec = pinned_spec(monkeypatch, files)
    serve({k: v for k, v in files.items() if k != "t10k-labels-idx1-ubyte.gz"})  # the last file: 404
    one_line_error(lambda: download(spec, tmp_path, mirror=server), "t10k-labels-idx1-ubyte.gz failed")
    assert leftovers(tmp_path / "mnist") == sorted(k for k in files if k != "t10k-labels-idx1-ubyte.gz")


def test_interrupted_download_leaves_nothing(tmp_path, server, monkeypatch):
    """Ctrl-C while a file arrives: no temporary file, no empty folder."""
    _, _, files = mnist_like_files(n=400)
    spec = pinned_spec(monkeypatch, files)
    serve(files)

    def interrupt(name, done, total):
        if done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(spec, tmp_path / "data", mirror=server, on_progress=interrupt)
    assert everything_under(tmp_path) == []


CHILD = """
import dataclasses, json, sys
from jaxbatch.data import get_spec
from jaxbatch.data.catalog import RemoteFile
from jaxbatch.data.download import download
pins, data_dir, mirror = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = dataclasses.replace(get_spec("mnist"), downloads=tuple(RemoteFile(*pin) for pin in pins))
download(spec, data_dir, mirror=mirror)
"""


def wait_for(predicate, what: str, seconds: float = 30):
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, f"no {what} after {seconds} s"
        time.sleep(0.05)


def test_temporary_file_of_a_killed_download_is_removed_by_the_next(tmp_path, server, monkeypatch):
    """SIGKILL mid-file leaves `.<file>.<pid>.tmp`; the next download removes it (its process is gone),
    and keeps the temporaries of processes still running and files that are not its own."""
    _, _, files = mnist_like_files(n=400)
    spec = pinned_spec(monkeypatch, files)
    serve(files)
    Handler.stall.add("/mnist/train-images-idx3-ubyte.gz")
    pins = json.dumps([[r.name, r.size, r.sha256] for r in spec.downloads])
    folder = tmp_path / "mnist"
    child = subprocess.Popen([sys.executable, "-c", CHILD, pins, str(tmp_path), server])
    try:
        temporary = folder / f".train-images-idx3-ubyte.gz.{child.pid}.tmp"
        wait_for(lambda: temporary.is_file() and temporary.stat().st_size > 0, "partial download")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=30)
    assert temporary.is_file()  # nothing could remove it
    alive = folder / f".t10k-images-idx3-ubyte.gz.{os.getppid()}.tmp"  # another download, still running
    not_ours = folder / f".notes.txt.{child.pid}.tmp"
    alive.write_bytes(b"x")
    not_ours.write_bytes(b"x")
    Handler.stall.clear()
    download(spec, tmp_path, mirror=server)
    assert leftovers(folder) == sorted([*files, alive.name, not_ours.name])


def test_sigterm_ends_a_cli_download_cleanly(tmp_path, server):
    """The CLI turns SIGTERM into an interruption: exit 130, one line, nothing left behind."""
    official = get_spec("mnist").downloads[0]
    Handler.files["/mnist/" + official.name] = bytes(1 << 16)
    Handler.announce["/mnist/" + official.name] = official.size  # the real size: the transfer starts
    Handler.stall.add("/mnist/" + official.name)
    data_dir = tmp_path / "fresh"
    proc = subprocess.Popen([sys.executable, "-m", "jaxbatch", "data", "download", "mnist", "--data-dir",
                             str(data_dir), "--mirror", server, "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any((data_dir / "mnist").glob(".*.tmp")), "temporary file")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 130 and err.strip().splitlines() == ["jaxbatch data download: interrupted"], err
    assert not data_dir.exists()
