"""IDX files: the format MNIST, Fashion-MNIST and KMNIST are distributed in.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension,
then the values, row-major (http://yann.lecun.com/exdb/mnist/):

    magic = 0x00 0x00 <type> <ndim>      type 0x08 = unsigned byte

Images are `<prefix>-images-idx3-ubyte` (N, rows, cols), labels
`<prefix>-labels-idx1-ubyte` (N,), with prefix `train` or `t10k`, usually
gzipped. The whole file is read at once: 47 MB for MNIST's training images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from jaxbatch.errors import JaxbatchError

UBYTE = 0x08
PREFIX = {"train": "train", "test": "t10k"}  # IDX file prefix of each split


def read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when the name ends in .gz."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise JaxbatchError(f"{path}: corrupt or truncated gzip file ({err}); download it again")


def parse_idx(data: bytes, ndim: int, where: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes in `ndim` dimensions."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise JaxbatchError(f"{where}: not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    if data[2] != UBYTE or data[3] != ndim:
        raise JaxbatchError(
            f"{where}: IDX magic number 0x{data[:4].hex()} says type 0x{data[2]:02x} in "
            f"{data[3]} dimensions; expected 0x{UBYTE:02x} (unsigned byte) in {ndim}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise JaxbatchError(f"{where}: IDX header cut short ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise JaxbatchError(
            f"{where}: IDX dimensions {shape} need {expected} bytes but the file has "
            f"{len(data)}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes."""
    return parse_idx(read_bytes(path), ndim, str(path))


def find_idx(folder: Path, split: str, kind: str) -> Path | None:
    """`<prefix>-<kind>-idx?-ubyte[.gz]` in `folder`, or None."""
    stem = f"{PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_paths(folder: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX paths of a split, or None unless both are present."""
    images, labels = find_idx(folder, split, "images"), find_idx(folder, split, "labels")
    return (images, labels) if images and labels else None


def load_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, rows, cols, 1) and int32 labels (N,) from an IDX pair."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise JaxbatchError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images[..., None], labels.astype(np.int32)
