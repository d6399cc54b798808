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
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxbatch.data.catalog import one_line
from jaxbatch.errors import JaxbatchError

UBYTE = 0x08
PREFIX = {"train": "train", "test": "t10k"}  # IDX file prefix of each split
MAX_RATIO = 1032  # deflate's limit: one byte of a gzip file unpacks to at most 1032 bytes
CHUNK = 1 << 20  # bytes unpacked at a time


def header_size(ndim: int) -> int:
    return 4 + 4 * ndim


def idx_shape(data: bytes, ndim: int, where: str = "IDX data") -> tuple[int, ...]:
    """The dimensions an IDX header claims, once its magic number is checked.

    `data` needs only the header; nothing here depends on the claim's size.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise JaxbatchError(f"{where}: not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    if data[2] != UBYTE or data[3] != ndim:
        raise JaxbatchError(
            f"{where}: IDX magic number 0x{data[:4].hex()} says type 0x{data[2]:02x} in "
            f"{data[3]} dimensions; expected 0x{UBYTE:02x} (unsigned byte) in {ndim}"
        )
    if len(data) < header_size(ndim):
        raise JaxbatchError(f"{where}: IDX header cut short ({len(data)} bytes)")
    return struct.unpack_from(f">{ndim}I", data, 4)


def claimed_size(shape: tuple[int, ...]) -> int:
    """Bytes of an IDX file with these dimensions (Python ints: np.prod would wrap at 2**63)."""
    return header_size(len(shape)) + math.prod(shape)


def parse_idx(data: bytes, ndim: int, where: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes in `ndim` dimensions.

    The size the header claims is checked against `len(data)` before any
    array is made, so a header claiming terabytes costs nothing.
    """
    shape = idx_shape(data, ndim, where)
    expected = claimed_size(shape)
    if len(data) != expected:
        raise JaxbatchError(
            f"{where}: IDX dimensions {shape} need {expected} bytes but the file has "
            f"{len(data)}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, np.uint8, offset=header_size(ndim)).reshape(shape)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gunzip_idx(data, ndim, str(path))
    return parse_idx(data, ndim, str(path))


def gunzip_idx(packed: bytes, ndim: int, where: str) -> bytes:
    """The IDX bytes inside a gzip file, unpacked no further than its header allows.

    gzip.decompress would unpack everything before anything is checked, so a
    gzip bomb (megabytes of zeros on disk, gigabytes unpacked) would fill
    memory. Here the IDX header is unpacked first; the size it claims must
    fit in what `packed` can hold at deflate's largest ratio; then at most
    that many bytes (plus one, to notice extra data) are unpacked, a chunk at
    a time, so memory follows the bytes really there, never the claim.
    Reading to the end of the stream also checks gzip's CRC.
    """
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            chunks = _read_at_most(stream, header_size(ndim))
            shape = idx_shape(b"".join(chunks), ndim, where)
            size = claimed_size(shape)
            if size > MAX_RATIO * len(packed):
                raise JaxbatchError(
                    f"{where}: IDX dimensions {shape} need {size} bytes, more than a gzip file of "
                    f"{len(packed)} bytes can hold; the file is corrupt, download it again"
                )
            chunks += _read_at_most(stream, size - header_size(ndim) + 1)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise JaxbatchError(f"{where}: corrupt or truncated gzip file ({one_line(err)}); download it again")
    data = b"".join(chunks)
    if len(data) > size:
        raise JaxbatchError(
            f"{where}: holds more than the {size} bytes its IDX dimensions {shape} need; "
            "the file is corrupt, download it again"
        )
    return data


def _read_at_most(stream, size: int) -> list[bytes]:
    """Up to `size` bytes from `stream`, in chunks: read(size) would allocate `size` at once."""
    chunks = []
    while size > 0 and (chunk := stream.read(min(size, CHUNK))):
        chunks.append(chunk)
        size -= len(chunk)
    return chunks


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
