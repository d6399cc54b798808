"""Writers for small dataset files in the canonical formats, for the data tests."""

from __future__ import annotations

import gzip
import io
import itertools
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def random_split(n: int, shape: tuple, num_classes: int = 10, seed: int = 0):
    """n random uint8 images of `shape` and labels covering every class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    return images, labels


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_split(folder: Path, split: str, images, labels, gz: bool = True) -> tuple[Path, Path]:
    """`<prefix>-images-idx3-ubyte[.gz]` and labels for (N, H, W, 1) images."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    paths = []
    for kind, dims, array in (("images", 3, images[..., 0]), ("labels", 1, labels)):
        path = folder / f"{prefix}-{kind}-idx{dims}-ubyte{suffix}"
        data = idx_bytes(np.asarray(array, np.uint8))
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(path)
    return tuple(paths)


def cifar_binary_bytes(images, labels) -> bytes:
    """CIFAR-10 binary records: label byte, then R, G, B planes of 32x32."""
    planar = np.asarray(images).transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], planar], axis=1).tobytes()


def cifar_pickle_bytes(images, labels) -> bytes:
    planar = np.asarray(images).transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {b"batch_label": b"test", b"labels": [int(x) for x in labels], b"data": planar}
    return pickle.dumps(batch, protocol=2)


def cifar_py2_pickle_bytes(images, labels) -> bytes:
    """A batch pickled the way the official files were: Python 2 cPickle, protocol 2.

    Python 3 cannot write this: keys, file names and the pixel buffer are
    Python 2 `str` (SHORT_BINSTRING / BINSTRING, unpickled as bytes with
    encoding="bytes"), the array is numpy.core.multiarray._reconstruct then
    BUILD, and memo indices start at 1.
    """
    planar = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
    out = []  # opcodes in order
    memo = itertools.count(1)

    def put():  # BINPUT: one byte of index, so keep the batch under about 100 images
        out.append(b"q" + bytes([next(memo)]))

    def text(value: bytes):  # a Python 2 str
        size = len(value)
        out.append((b"U" + bytes([size]) if size < 256 else b"T" + size.to_bytes(4, "little")) + value)
        put()

    def integer(value: int):
        out.append(b"K" + bytes([value]) if value < 256 else b"J" + value.to_bytes(4, "little", signed=True))

    out.append(b"\x80\x02}")
    put()
    out.append(b"(")
    text(b"data")
    out.append(b"cnumpy.core.multiarray\n_reconstruct\n")
    put()
    out.append(b"cnumpy\nndarray\n")
    put()
    out.append(b"K\x00\x85")
    text(b"b")
    out.append(b"\x87R")
    put()
    out.append(b"(K\x01")
    integer(planar.shape[0])
    integer(planar.shape[1])
    out.append(b"\x86cnumpy\ndtype\n")
    put()
    text(b"u1")
    out.append(b"K\x00K\x01\x87R")
    put()
    out.append(b"(K\x03")
    text(b"|")
    out.append(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
    text(planar.tobytes())
    out.append(b"tb")
    for key, values in ((b"labels", [int(y) for y in labels]),
                        (b"filenames", [f"image_{i}.png".encode() for i in range(len(labels))])):
        text(key)
        out.append(b"]")
        put()
        out.append(b"(")
        for value in values:
            integer(value) if isinstance(value, int) else text(value)
        out.append(b"e")
    text(b"batch_label")
    text(b"testing batch 1 of 1")
    out.append(b"u.")
    return b"".join(out)


def cifar_batches(images, labels, split: str):
    """(batch name, images, labels): train in 5 batches, test in 1, like the release."""
    if split == "test":
        return [("test_batch", images, labels)]
    parts = np.array_split(np.arange(len(labels)), 5)
    return [(f"data_batch_{i + 1}", images[p], labels[p]) for i, p in enumerate(parts)]


def write_tar(path: Path, members: dict, mode: str = "w:gz") -> Path:
    """A tarball holding {member name: bytes, None for a folder, or a TarInfo (a link, a device)}."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tarfile.TarInfo):
                data.name = name
                tar.addfile(data)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def image_bytes(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    pixels = image[..., 0] if image.shape[-1] == 1 else image
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def image_folder_members(split: str, images, labels, class_folders, fmt: str = "PNG") -> dict:
    """{`<split>/<class>/<i>.png`: bytes} for an image-folder layout."""
    suffix = ".png" if fmt == "PNG" else ".jpg"
    return {
        f"{split}/{class_folders[label]}/{i:05d}{suffix}": image_bytes(image, fmt)
        for i, (image, label) in enumerate(zip(images, labels))
    }


def write_members(root: Path, members: dict) -> None:
    """Write {relative path: bytes, or None for a folder} under `root`."""
    for name, data in members.items():
        path = root / name
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def write_image_folder(folder: Path, split: str, members: dict, as_tar: bool) -> None:
    """`members` as `folder/<split>.tar.gz`, or written out as files under `folder`."""
    if as_tar:
        folder.mkdir(parents=True, exist_ok=True)
        write_tar(folder / f"{split}.tar.gz", members)
    else:
        write_members(folder, members)


# ---- what a test measures --------------------------------------------------------


def peak_bytes(call) -> int:
    """The most memory Python and numpy held at once while `call()` ran (it may raise)."""
    tracemalloc.start()
    try:
        call()
    except Exception:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def idx_header(*shape) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + np.asarray(shape, ">u4").tobytes()


def count_decodes(monkeypatch):
    """How many times an image folder is decoded from here on (not served from the cache)."""
    from jaxbatch.data import imagefolder

    calls = []
    real = imagefolder.decode_images

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "decode_images", counting)
    return calls
