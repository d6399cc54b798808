"""The downloader against a local HTTP server: verified, atomic, nothing half-written."""

import dataclasses
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
from data_fixtures import idx_bytes, random_split

from jaxbatch.cli import main
from jaxbatch.data import DATASETS, get_spec, load
from jaxbatch.data.download import download
from jaxbatch.data.catalog import RemoteFile
from jaxbatch.errors import JaxbatchError


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    cut: set = set()  # paths whose transfer stops half-way

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path in self.cut else data)
        if self.path in self.cut:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A server on 127.0.0.1 serving Handler.files; yields its base URL."""
    Handler.files, Handler.cut = {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
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
