"""IDX files (MNIST, Fashion-MNIST, KMNIST): exact round trip and every bad input."""

import gzip
import os

import numpy as np
import pytest
from data_fixtures import (
    idx_bytes,
    idx_header,
    peak_bytes,
    random_split,
    write_idx_split,
)

from jaxbatch.cli import main
from jaxbatch.data import load
from jaxbatch.data.idx import parse_idx
from jaxbatch.errors import JaxbatchError


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, gz, split):
    images, labels = random_split(30, (28, 28, 1), seed=1)
    write_idx_split(tmp_path / "kmnist", split, images, labels, gz=gz)
    data = load("kmnist", split, data_dir=tmp_path, source="files")
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int32
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.name == "kmnist" and data.class_names[0] == "o"


def test_repeated_load_is_cached_and_read_only(tmp_path):
    images, labels = random_split(20, (28, 28, 1))
    write_idx_split(tmp_path / "mnist", "test", images, labels)
    first = load("mnist", "test", data_dir=tmp_path)
    assert load("mnist", "test", data_dir=tmp_path) is first
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 1
    # New files under the same names are read again, not served from memory.
    write_idx_split(tmp_path / "mnist", "test", images[:10], labels[:10])
    assert len(load("mnist", "test", data_dir=tmp_path)) == 10


def one_line_error(tmp_path, *needles):
    """load() and `jaxbatch data check` both fail with one line naming what is wrong."""
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "train", data_dir=tmp_path, source="files")
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def check_cli_fails(tmp_path, capsys, needle):
    rc = main(["data", "check", "mnist", "--split", "train", "--data-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert rc != 0
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.err


def write_pair(tmp_path, images_bytes, labels_bytes):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(images_bytes)
    (folder / "train-labels-idx1-ubyte").write_bytes(labels_bytes)


def good_pair(n=12):
    images, labels = random_split(n, (28, 28, 1))
    return idx_bytes(images[..., 0]), idx_bytes(labels)


def test_wrong_magic(tmp_path, capsys):
    images, labels = good_pair()
    write_pair(tmp_path, b"\x12\x34" + images[2:], labels)
    one_line_error(tmp_path, "train-images-idx3-ubyte", "magic")
    check_cli_fails(tmp_path, capsys, "magic")


def test_wrong_type_or_rank(tmp_path):
    images, labels = good_pair()
    write_pair(tmp_path, images, images)  # labels file holding 3-D data
    one_line_error(tmp_path, "train-labels-idx1-ubyte", "dimensions")


def test_dimensions_disagree_with_size(tmp_path, capsys):
    images, labels = good_pair()
    write_pair(tmp_path, images[:-100], labels)
    one_line_error(tmp_path, "train-images-idx3-ubyte", "truncated")
    check_cli_fails(tmp_path, capsys, "truncated")


def test_wrong_image_size(tmp_path):
    images = np.zeros((4, 20, 20), np.uint8)
    write_pair(tmp_path, idx_bytes(images), idx_bytes(np.zeros(4, np.uint8)))
    one_line_error(tmp_path, "train-images-idx3-ubyte", "(20, 20, 1)", "(28, 28, 1)")


def test_counts_differ(tmp_path, capsys):
    images, _ = good_pair(12)
    _, labels = good_pair(11)
    write_pair(tmp_path, images, labels)
    one_line_error(tmp_path, "12 images", "11 labels")
    check_cli_fails(tmp_path, capsys, "11 labels")


def test_label_out_of_range(tmp_path, capsys):
    images, _ = good_pair(12)
    labels = np.zeros(12, np.uint8)
    labels[7] = 10
    write_pair(tmp_path, images, idx_bytes(labels))
    one_line_error(tmp_path, "train-labels-idx1-ubyte", "label 10 at index 7", "0..9")
    check_cli_fails(tmp_path, capsys, "label 10")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not-gzip"])
def test_bad_gzip(tmp_path, capsys, damage):
    images, labels = good_pair()
    packed = gzip.compress(images)
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    elif damage == "corrupt":
        packed = packed[:20] + bytes(b ^ 0xFF for b in packed[20:60]) + packed[60:]
    else:
        packed = b"plain text, not gzip"
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(packed)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    one_line_error(tmp_path, "train-images-idx3-ubyte.gz", "gzip")
    check_cli_fails(tmp_path, capsys, "gzip")


def test_parse_idx_rejects_short_header():
    with pytest.raises(JaxbatchError, match="header"):
        parse_idx(bytes([0, 0, 8, 3, 0, 0]), 3)


# Claims the catalogue rules out are refused from the header, before the body is read or a buffer made.


def write_gz_pair(tmp_path, images_packed: bytes, n_labels=12):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(images_packed)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(n_labels, np.uint8))))


def test_gzip_claim_within_deflate_ratio_is_refused_by_the_catalogue(tmp_path, capsys):
    """The user's file: 11.7 MB of gzip claiming 12 GB. It fits deflate's 1032:1, so only the
    catalogue (60,000 MNIST training images) rules it out; the old loader unpacked 7.4 GB."""
    count = 15_306_123  # x 784 bytes: 12.0 GB
    packed = gzip.compress(idx_header(count, 28, 28) + np.random.default_rng(0).bytes(11_700_000), compresslevel=0)
    assert 16 + count * 784 <= 1032 * len(packed)  # within what deflate's ratio lets the file hold
    write_gz_pair(tmp_path, packed)
    one_line_error(tmp_path, "train-images-idx3-ubyte.gz", f"IDX header claims {count} images",
                   "more than the 60000 of mnist train")
    assert peak_bytes(lambda: load("mnist", "train", data_dir=tmp_path, source="files")) < 1 << 20
    check_cli_fails(tmp_path, capsys, "more than the 60000 of mnist train")


def test_plain_file_claiming_more_than_the_split_is_not_read(tmp_path):
    """A plain file whose size matches its claim of 60,001 images (sparse: 47 MB that cost no disk)."""
    images, labels = good_pair()
    write_pair(tmp_path, b"", labels)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(idx_header(60001, 28, 28))
    os.truncate(path, 16 + 60001 * 784)
    one_line_error(tmp_path, "train-images-idx3-ubyte", "claims 60001 images, more than the 60000 of mnist train")
    assert peak_bytes(lambda: load("mnist", "train", data_dir=tmp_path, source="files")) < 1 << 20


@pytest.mark.parametrize("shape,needle", [
    ((0, 28, 28), "holds 0 images"),
    ((10001, 28, 28), "claims 10001 images, more than the 10000 of mnist test"),
    ((5, 20, 28), "images have shape (20, 28, 1), but mnist images are (28, 28, 1)"),
    ((5, 28, 27), "images have shape (28, 27, 1)"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_header_claims_refused_before_any_buffer(tmp_path, monkeypatch, shape, needle, gz):
    """No buffer exists when the header is refused: np.empty fails the test if called."""
    body = idx_header(*shape) + bytes(int(np.prod(shape)))
    labels = idx_bytes(np.zeros(5, np.uint8))
    folder = tmp_path / "mnist"
    folder.mkdir()
    suffix = ".gz" if gz else ""
    (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(gzip.compress(body) if gz else body)
    (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(gzip.compress(labels) if gz else labels)

    def no_buffer(*args, **kwargs):
        raise AssertionError("a buffer was made before the header was checked")

    monkeypatch.setattr(np, "empty", no_buffer)
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "test", data_dir=tmp_path, source="files")
    assert "\n" not in str(err.value) and f"t10k-images-idx3-ubyte{suffix}: " in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_empty_split_is_refused_at_load_time(tmp_path, capsys, which):
    """0 items: ZeroDivisionError after training and "mean pixel nan" from `data check`, before."""
    images, labels = random_split(12, (28, 28, 1))
    if which == "images":
        images, labels = images[:0], labels[:0]
    else:
        labels = labels[:0]
    write_idx_split(tmp_path / "mnist", "test", images, labels)
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "test", data_dir=tmp_path, source="files")
    name = "t10k-images-idx3-ubyte.gz" if which == "images" else "t10k-labels-idx1-ubyte.gz"
    assert f"{name}: holds 0 {which}" in str(err.value) and "\n" not in str(err.value)
    rc = main(["data", "check", "mnist", "--split", "test", "--data-dir", str(tmp_path)])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and f"{name}: holds 0 {which}" in lines[0] and "nan" not in out.out


@pytest.mark.parametrize("body,needle", [
    (bytes(12 * 784 - 1), "need 9424 bytes but the file has 9423"),  # the stream ends one byte early
    (bytes(12 * 784 + 1), "holds more than the 9424 bytes"),  # one byte after the claim
])
def test_gzip_stream_shorter_or_longer_than_its_claim(tmp_path, body, needle):
    """Both gzip files are whole (CRC right): only the claim says the body is wrong."""
    write_gz_pair(tmp_path, gzip.compress(idx_header(12, 28, 28) + body))
    one_line_error(tmp_path, "train-images-idx3-ubyte.gz", needle)
