"""IDX files (MNIST, Fashion-MNIST, KMNIST): exact round trip and every bad input."""

import gzip

import numpy as np
import pytest
from data_fixtures import idx_bytes, random_split, write_idx_split

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
