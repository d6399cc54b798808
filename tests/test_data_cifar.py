"""CIFAR-10's binary and python layouts, loose and in the official tarballs."""

import pickle
import tracemalloc

import numpy as np
import pytest
from data_fixtures import (cifar_batches, cifar_binary_bytes, cifar_pickle_bytes, random_split,
                           write_tar)

from jaxbatch.cli import main
from jaxbatch.data import load
from jaxbatch.errors import JaxbatchError


def write_layout(root, layout, split, images, labels):
    """Write one split of CIFAR-10 into root/cifar10 in the given layout."""
    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    batches = cifar_batches(images, labels, split)
    if layout.startswith("binary"):
        members = {f"cifar-10-batches-bin/{name}.bin": cifar_binary_bytes(x, y) for name, x, y in batches}
    else:
        members = {f"cifar-10-batches-py/{name}": cifar_pickle_bytes(x, y) for name, x, y in batches}
    if layout.endswith("tar"):
        tarball = "cifar-10-binary.tar.gz" if layout.startswith("binary") else "cifar-10-python.tar.gz"
        return write_tar(folder / tarball, members)
    for name, data in members.items():
        target = folder / (name.split("/")[1] if layout == "binary-loose" else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


LAYOUTS = ["binary-loose", "binary-folder", "binary-tar", "python-folder", "python-tar"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_round_trip(tmp_path, layout, split):
    images, labels = random_split(25, (32, 32, 3), seed=3)
    write_layout(tmp_path, layout, split, images, labels)
    data = load("cifar10", split, data_dir=tmp_path, source="files")
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.class_names[0] == "airplane" and data.images.flags.c_contiguous


def test_channel_order_is_planar_rgb(tmp_path):
    """A record's first 1,024 bytes are red: a pure-red image stays red."""
    record = bytes([3]) + bytes([200]) * 1024 + bytes(2048)
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(record)
    data = load("cifar10", "test", data_dir=tmp_path)
    assert data.labels.tolist() == [3]
    assert (data.images[0, :, :, 0] == 200).all() and (data.images[0, :, :, 1:] == 0).all()


def expect_error(tmp_path, capsys, split, *needles):
    with pytest.raises(JaxbatchError) as err:
        load("cifar10", split, data_dir=tmp_path, source="files")
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value)
    rc = main(["data", "check", "cifar10", "--split", split, "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and needles[0] in lines[0]


def test_truncated_binary_batch(tmp_path, capsys):
    images, labels = random_split(3, (32, 32, 3))
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(cifar_binary_bytes(images, labels)[:-10])
    expect_error(tmp_path, capsys, "test", "test_batch.bin", "truncated")


def test_missing_training_batch(tmp_path, capsys):
    images, labels = random_split(10, (32, 32, 3))
    folder = write_layout(tmp_path, "binary-loose", "train", images, labels)
    (folder / "data_batch_4.bin").unlink()
    expect_error(tmp_path, capsys, "train", "data_batch_4.bin", "missing")


def test_label_out_of_range(tmp_path, capsys):
    images, labels = random_split(4, (32, 32, 3))
    labels[2] = 12
    write_layout(tmp_path, "python-folder", "test", images, labels)
    expect_error(tmp_path, capsys, "test", "label 12 at index 2")


def test_bad_labels_in_a_tarball_are_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXBATCH_CACHE", str(tmp_path / "cache"))
    images, labels = random_split(4, (32, 32, 3))
    labels[0] = 255
    write_layout(tmp_path, "binary-tar", "test", images, labels)
    expect_error(tmp_path, capsys, "test", "label 255 at index 0")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_pickle_counts_differ(tmp_path, capsys):
    images, labels = random_split(4, (32, 32, 3))
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(cifar_pickle_bytes(images, labels[:3]))
    expect_error(tmp_path, capsys, "test", "test_batch", "4 images but 3 labels")


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_tarball(tmp_path, capsys, cut):
    images, labels = random_split(25, (32, 32, 3))
    tarball = write_layout(tmp_path, "binary-tar", "test", images, labels)
    data = tarball.read_bytes()
    tarball.write_bytes(data[: int(len(data) * cut)])
    expect_error(tmp_path, capsys, "test", "cifar-10-binary.tar.gz")


def test_tarball_without_the_batches(tmp_path, capsys):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    write_tar(folder / "cifar-10-python.tar.gz", {"README": b"hello"})
    expect_error(tmp_path, capsys, "test", "cifar-10-python.tar.gz", "test_batch")


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"  # what the payload creates if it runs (outside the data folder)

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps({b"data": Evil(), b"labels": []})
    pickle.loads(data)
    assert marker.exists(), "the payload does not run, so refusing it proves nothing"
    marker.unlink()
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(data)
    expect_error(tmp_path, capsys, "test", "test_batch", "refusing")
    assert not marker.exists()


def test_oversized_loose_batch_is_refused_unread(tmp_path, capsys):
    """A loose batch larger than any official one (sparse: 64 MiB + 1 that cost no disk) is refused
    from its size, as a tarball member is: nothing of it is read."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with open(folder / "test_batch.bin", "wb") as f:
        f.truncate((64 << 20) + 1)
    tracemalloc.start()
    try:
        expect_error(tmp_path, capsys, "test", "test_batch.bin: 67108865 bytes, more than 67108864")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("layout", ["python-folder", "python-tar"])
def test_batch_with_no_images_is_refused(tmp_path, capsys, layout):
    """A well-formed batch of 0 images: the split would be empty (ZeroDivisionError after training)."""
    batch = pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=3)
    folder = tmp_path / "cifar10"
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    if layout == "python-tar":
        write_tar(folder / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": batch})
    else:
        (folder / "cifar-10-batches-py" / "test_batch").write_bytes(batch)
    expect_error(tmp_path, capsys, "test", "holds no examples")


def test_more_records_than_the_official_split_are_refused(tmp_path, capsys):
    images, labels = random_split(10001, (32, 32, 3))
    write_layout(tmp_path, "binary-loose", "test", images, labels)
    expect_error(tmp_path, capsys, "test", "10001 examples, more than the 10000 a cifar10 split may hold")
