"""Image folders (`<split>/<class>/*.png|jpg`), as folders and tarballs, and their cache."""

import dataclasses
import io
import os

import numpy as np
import pytest
from data_fixtures import (
    CIFAR10_CLASSES,
    count_decodes,
    image_bytes,
    image_folder_members,
    random_split,
    write_image_folder,
    write_members,
    write_tar,
)

import jaxbatch.data as data_module
from jaxbatch.cli import main
from jaxbatch.data import get_spec, imagefolder, load
from jaxbatch.errors import JaxbatchError

DIGIT_FOLDERS = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cifar_members(split="train", n=30, fmt="PNG", seed=0):
    images, labels = random_split(n, (32, 32, 3), seed=seed)
    return images, labels, image_folder_members(split, images, labels, CIFAR10_CLASSES, fmt)


@pytest.mark.parametrize("as_tar", [False, True])
def test_png_round_trip_is_exact(tmp_path, as_tar):
    images, labels, members = cifar_members()
    write_image_folder(tmp_path / "data" / "cifar10", "train", members, as_tar)
    data = load("cifar10", "train", data_dir=tmp_path / "data", source="files")
    # Members are named <class>/<index>; match each loaded image to its original by content.
    assert sorted(map(bytes, data.images)) == sorted(map(bytes, images))
    originals = {bytes(image): label for image, label in zip(images, labels)}
    assert [originals[bytes(image)] for image in data.images] == data.labels.tolist()
    assert np.bincount(data.labels, minlength=10).tolist() == np.bincount(labels, minlength=10).tolist()


def test_grey_jpeg_tarball_and_sorted_class_folders(tmp_path):
    """No class order in the catalogue for folders named 0..9: sorted names give the labels."""
    images, labels = random_split(20, (28, 28, 1))
    images[:] = (labels * 25)[:, None, None, None]  # flat images survive JPEG almost exactly
    members = image_folder_members("test", images, labels, DIGIT_FOLDERS, fmt="JPEG")
    (tmp_path / "mnist").mkdir()
    write_tar(tmp_path / "mnist" / "test.tar.gz", members)
    data = load("mnist", "test", data_dir=tmp_path, source="files")
    assert data.images.shape == (20, 28, 28, 1)
    assert np.abs(data.images.astype(int) - (data.labels * 25)[:, None, None, None]).max() <= 2


def test_catalogue_class_order_wins_over_sorted(monkeypatch):
    spec = dataclasses.replace(get_spec("cifar10"), class_folders=tuple(reversed(CIFAR10_CLASSES)))
    index = imagefolder.class_index(set(CIFAR10_CLASSES), spec, "here")
    assert index["truck"] == 0 and index["airplane"] == 9
    sorted_index = imagefolder.class_index(set("jihgfedcba"), get_spec("fashion_mnist"), "here")
    assert sorted_index["a"] == 0 and sorted_index["j"] == 9


def test_cache_is_reused_then_invalidated(tmp_path, monkeypatch, own_cache):
    calls = count_decodes(monkeypatch)
    images, labels, members = cifar_members(n=20)
    (tmp_path / "cifar10").mkdir()
    tarball = write_tar(tmp_path / "cifar10" / "train.tar.gz", members)
    first = load("cifar10", "train", data_dir=tmp_path)
    data_module._read.cache_clear()  # forget the in-memory copy: the disk cache must serve it
    second = load("cifar10", "train", data_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.images, second.images)
    assert len(list(own_cache.glob("cifar10-train-*.npz"))) == 1

    new_images, _, new_members = cifar_members(n=20, seed=5)
    write_tar(tarball, new_members)
    os.utime(tarball, ns=(1, 1))  # a new mtime even on coarse-grained file systems
    third = load("cifar10", "train", data_dir=tmp_path)
    assert len(calls) == 2
    assert sorted(map(bytes, third.images)) == sorted(map(bytes, new_images))
    assert len(list(own_cache.glob("cifar10-train-*.npz"))) == 1  # the stale entry is gone


def test_folder_cache_notices_one_changed_file(tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    images, labels, members = cifar_members(split="test", n=12)
    write_members(tmp_path / "cifar10", members)
    load("cifar10", "test", data_dir=tmp_path)
    data_module._read.cache_clear()
    load("cifar10", "test", data_dir=tmp_path)
    assert len(calls) == 1
    one = tmp_path / "cifar10" / sorted(members)[0]
    one.write_bytes(image_bytes(np.zeros((32, 32, 3), np.uint8), "PNG"))
    os.utime(one, ns=(1, 1))
    data = load("cifar10", "test", data_dir=tmp_path)
    assert len(calls) == 2 and (data.images == 0).all(axis=(1, 2, 3)).sum() == 1


def test_unreadable_cache_entry_is_rebuilt(tmp_path, monkeypatch, own_cache):
    calls = count_decodes(monkeypatch)
    _, _, members = cifar_members(split="test", n=10)
    write_members(tmp_path / "cifar10", members)
    first = load("cifar10", "test", data_dir=tmp_path)
    (entry,) = own_cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    data_module._read.cache_clear()
    again = load("cifar10", "test", data_dir=tmp_path)
    assert len(calls) == 2
    np.testing.assert_array_equal(first.images, again.images)


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    images, labels, members = cifar_members(n=40)
    items = [(name, data) for name, data in sorted(members.items())]
    serial = imagefolder.decode_images(items, (32, 32, 3), workers=1)
    monkeypatch.setattr(imagefolder, "PARALLEL_MIN", 1)
    monkeypatch.setattr(imagefolder, "CHUNK", 7)
    parallel = imagefolder.decode_images(items, (32, 32, 3), workers=2)
    np.testing.assert_array_equal(serial, parallel)
    items[23] = ("bad.png", b"not an image")
    with pytest.raises(JaxbatchError, match="bad.png: not a readable PNG or JPEG"):
        imagefolder.decode_images(items, (32, 32, 3), workers=2)


# Bad input: one line naming the file and the problem, from load() and from the CLI.

def expect_error(tmp_path, capsys, *needles, split="train"):
    with pytest.raises(JaxbatchError) as err:
        load("cifar10", split, data_dir=tmp_path, source="files")
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    rc = main(["data", "check", "cifar10", "--split", split, "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and needles[-1] in lines[0]


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "cifar10" / "train").mkdir(parents=True)
    expect_error(tmp_path, capsys, "train", "no images found")


def test_empty_tarball(tmp_path, capsys):
    (tmp_path / "cifar10").mkdir()
    write_tar(tmp_path / "cifar10" / "train.tar.gz", {})
    expect_error(tmp_path, capsys, "train.tar.gz", "no images found")


@pytest.mark.parametrize("as_tar", [False, True])
def test_class_folder_without_images(tmp_path, capsys, as_tar):
    _, _, members = cifar_members()
    members = {k: v for k, v in members.items() if "/frog/" not in k}
    members["train/frog"] = None  # the folder is there, empty
    write_image_folder(tmp_path / "cifar10", "train", members, as_tar)
    expect_error(tmp_path, capsys, "'frog' has no images")


def test_missing_class_folder(tmp_path, capsys):
    _, _, members = cifar_members()
    write_members(tmp_path / "cifar10", {k: v for k, v in members.items() if "/frog/" not in k})
    expect_error(tmp_path, capsys, "'frog' is missing")


def test_unknown_class_folder(tmp_path, capsys):
    _, _, members = cifar_members()
    members["train/zebra/1.png"] = members[sorted(members)[0]]
    write_members(tmp_path / "cifar10", members)
    expect_error(tmp_path, capsys, "unknown class folder 'zebra'")


def test_wrong_number_of_class_folders(tmp_path):
    images, labels = random_split(10, (28, 28, 1), num_classes=3)
    write_members(tmp_path / "mnist", image_folder_members("train", images, labels, DIGIT_FOLDERS))
    with pytest.raises(JaxbatchError, match="found 3 class folders but mnist has 10 classes"):
        load("mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize("as_tar", [False, True])
def test_file_that_is_not_an_image(tmp_path, capsys, as_tar):
    _, _, members = cifar_members()
    members["train/cat/notes.txt"] = b"hello"
    write_image_folder(tmp_path / "cifar10", "train", members, as_tar)
    expect_error(tmp_path, capsys, "notes.txt", "not a PNG or JPEG image")


@pytest.mark.parametrize("as_tar", [False, True])
def test_corrupt_image(tmp_path, capsys, as_tar):
    _, _, members = cifar_members()
    members["train/cat/broken.png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    write_image_folder(tmp_path / "cifar10", "train", members, as_tar)
    expect_error(tmp_path, capsys, "broken.png", "not a readable PNG or JPEG image")


def test_image_of_the_wrong_size(tmp_path, capsys):
    _, _, members = cifar_members()
    members["train/cat/big.png"] = image_bytes(np.zeros((40, 32, 3), np.uint8), "PNG")
    write_members(tmp_path / "cifar10", members)
    expect_error(tmp_path, capsys, "big.png", "32x40 pixels, expected 32x32")


def test_file_outside_class_folders(tmp_path, capsys):
    _, _, members = cifar_members()
    members["train/stray.png"] = members[sorted(members)[0]]
    write_members(tmp_path / "cifar10", members)
    expect_error(tmp_path, capsys, "stray.png", "inside class folders")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_tarball(tmp_path, capsys, damage):
    _, _, members = cifar_members()
    (tmp_path / "cifar10").mkdir()
    tarball = write_tar(tmp_path / "cifar10" / "train.tar.gz", members)
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    expect_error(tmp_path, capsys, "train.tar.gz", "corrupt or truncated archive")


def test_nothing_half_written_after_a_failed_decode(tmp_path, capsys, own_cache):
    _, _, members = cifar_members()
    members["train/cat/broken.jpg"] = b"\xff\xd8 not really"
    write_members(tmp_path / "cifar10", members)
    expect_error(tmp_path, capsys, "broken.jpg")
    assert not own_cache.exists() or not any(own_cache.iterdir())


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 pixels (H, W) grey or (H, W, 3) RGB, written chunk by chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_refused(tmp_path, capsys, own_cache, as_tar, channels):
    """Pillow clips 16-bit grey to 255 (40000 -> 255) and truncates 16-bit RGB: refused, naming the file."""
    from PIL import Image

    name, shape = ("mnist", (28, 28)) if channels == 1 else ("cifar10", (32, 32))
    folders = DIGIT_FOLDERS if channels == 1 else CIFAR10_CLASSES
    images, labels = random_split(12, (*shape, channels))
    members = image_folder_members("train", images, labels, folders)
    deep = np.full(shape if channels == 1 else (*shape, 3), 40000, np.uint16)
    members[f"train/{folders[3]}/deep.png"] = png16(deep)
    assert Image.open(io.BytesIO(png16(deep))).size == shape[::-1]  # a valid PNG Pillow would read
    write_image_folder(tmp_path / name, "train", members, as_tar)
    with pytest.raises(JaxbatchError) as err:
        load(name, "train", data_dir=tmp_path, source="files")
    assert "deep.png: a 16-bit PNG; jaxbatch reads 8-bit images only" in str(err.value)
    assert "\n" not in str(err.value)
    rc = main(["data", "check", name, "--split", "train", "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "deep.png: a 16-bit PNG" in lines[0]
    assert not own_cache.exists() or not any(own_cache.iterdir())  # nothing cached from a refused folder


def test_pngs_of_fewer_bits_still_load(tmp_path):
    """1-bit and palette PNGs are 8 bits or fewer: Pillow scales them to 0..255 exactly."""
    from PIL import Image

    images, labels = random_split(10, (28, 28, 1))
    members = image_folder_members("train", images, labels, DIGIT_FOLDERS)
    bits = (np.arange(28 * 28).reshape(28, 28) % 2).astype(bool)
    palette = Image.fromarray(images[0, ..., 0]).convert("P")
    for name, image in [("one-bit", Image.fromarray(bits)), ("palette", palette)]:
        out = io.BytesIO()
        image.save(out, format="PNG")
        members[f"train/0/{name}.png"] = out.getvalue()
    write_members(tmp_path / "mnist", members)
    data = load("mnist", "train", data_dir=tmp_path, source="files")
    assert len(data) == 12
    decoded = {bytes(image) for image in data.images}
    assert bytes((bits * 255).astype(np.uint8)[..., None]) in decoded


def test_file_names_that_are_not_printable_stay_on_one_line(tmp_path, capsys):
    images, labels = random_split(10, (28, 28, 1))
    members = image_folder_members("train", images, labels, DIGIT_FOLDERS)
    members["train/3/a\nb.png"] = b"not a PNG"
    write_members(tmp_path / "mnist", members)
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "train", data_dir=tmp_path, source="files")
    assert "3/a\\nb.png'" in str(err.value) and "not a readable PNG" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("as_tar", [False, True])
def test_folder_with_far_more_images_than_the_split_is_refused(tmp_path, monkeypatch, own_cache, as_tar):
    """An image folder may exceed the official count (extra images) up to 4 times, not beyond:
    counted as images arrive, so the rest is never decoded."""
    monkeypatch.setitem(data_module.DATASETS, "mnist",
                        dataclasses.replace(get_spec("mnist"), sizes={"train": 5, "test": 5}))
    for n, folder in [(21, "too-many"), (20, "four-times")]:
        members = image_folder_members("train", *random_split(n, (28, 28, 1)), DIGIT_FOLDERS)
        write_image_folder(tmp_path / folder / "mnist", "train", members, as_tar)
    with pytest.raises(JaxbatchError, match="more than 20 images, 4 times the 5 of mnist train") as err:
        load("mnist", "train", data_dir=tmp_path / "too-many", source="files")
    assert "\n" not in str(err.value) and (not own_cache.exists() or not any(own_cache.iterdir()))
    assert len(load("mnist", "train", data_dir=tmp_path / "four-times", source="files")) == 20
