"""IDX files: the format MNIST, Fashion-MNIST and KMNIST are distributed in.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension,
then the values, row-major (http://yann.lecun.com/exdb/mnist/):

    magic = 0x00 0x00 <type> <ndim>      type 0x08 = unsigned byte

Images are `<prefix>-images-idx3-ubyte` (N, rows, cols), labels
`<prefix>-labels-idx1-ubyte` (N,), with prefix `train` or `t10k`, usually
gzipped. The header is read and checked first; the body then goes into one
buffer of the size it claims: 47 MB for MNIST's training images, and never
more than the catalogue's count for the split allows.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxbatch.data.catalog import DatasetSpec, max_examples, one_line
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


def read_idx(path: Path, ndim: int, spec: DatasetSpec, split: str) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes: the `split` of `spec`.

    Nothing of the size the header claims is read or allocated until the claim
    is checked against the file (its size; for a .gz, what deflate's largest
    ratio lets it hold) and against the catalogue (`check_claim`). Then the
    body is read into a buffer of exactly the claimed size: a stream shorter
    or longer than the claim is refused, and reading a .gz to its end checks
    gzip's CRC.
    """
    where = str(path)
    with open(path, "rb") as raw:
        size_on_disk = os.fstat(raw.fileno()).st_size
        if path.suffix != ".gz":
            return _read_body(raw, ndim, spec, split, where, file_size=size_on_disk)
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                return _read_body(stream, ndim, spec, split, where, packed_size=size_on_disk)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise JaxbatchError(f"{where}: corrupt or truncated gzip file ({one_line(err)}); download it again")


def _read_body(stream, ndim: int, spec: DatasetSpec, split: str, where: str,
               file_size: int | None = None, packed_size: int | None = None) -> np.ndarray:
    """The array in an IDX stream: its header checked first, then its body read into a buffer of the claimed size.

    `file_size` is the size of a plain file (the claim must equal it),
    `packed_size` that of a gzip file (the claim must fit what it can hold).
    """
    header = b"".join(_read_at_most(stream, header_size(ndim)))
    shape = idx_shape(header, ndim, where)
    size = claimed_size(shape)
    if file_size is not None and size != file_size:
        raise JaxbatchError(
            f"{where}: IDX dimensions {shape} need {size} bytes but the file has "
            f"{file_size}; the file is truncated or corrupt"
        )
    if packed_size is not None and size > MAX_RATIO * packed_size:
        raise JaxbatchError(
            f"{where}: IDX dimensions {shape} need {size} bytes, more than a gzip file of "
            f"{packed_size} bytes can hold; the file is corrupt, download it again"
        )
    check_claim(shape, spec, split, where)
    body = np.empty(math.prod(shape), np.uint8)  # at most the catalogue's split: 47 MB for MNIST's training images
    done = _read_into(stream, body)
    if done < body.size:
        raise JaxbatchError(
            f"{where}: IDX dimensions {shape} need {size} bytes but the file has "
            f"{header_size(ndim) + done}; the file is truncated or corrupt"
        )
    if stream.read(1):  # for a .gz this also reads the trailer: gzip's CRC and length are checked
        raise JaxbatchError(
            f"{where}: holds more than the {size} bytes its IDX dimensions {shape} need; "
            "the file is corrupt, download it again"
        )
    return body.reshape(shape)


def check_claim(shape: tuple[int, ...], spec: DatasetSpec, split: str, where: str) -> None:
    """Refuse IDX dimensions the catalogue rules out, from the header alone:
    no items, more items than the official split holds, or images of another
    height, width or channel count than the dataset's."""
    kind = "images" if len(shape) == 3 else "labels"
    most = max_examples(spec, split)
    if shape[0] == 0:
        raise JaxbatchError(f"{where}: holds 0 {kind}; a split needs at least one example, so the file is "
                            "incomplete: download it again")
    if shape[0] > most:
        raise JaxbatchError(f"{where}: IDX header claims {shape[0]} {kind}, more than the {most} of {spec.name} "
                            f"{split}; the file is corrupt or not {spec.name}'s")
    if kind == "images" and (*shape[1:], 1) != spec.image_shape:
        raise JaxbatchError(f"{where}: images have shape {(*shape[1:], 1)}, but {spec.name} images are "
                            f"{spec.image_shape} (H, W, C)")


def _read_at_most(stream, size: int) -> list[bytes]:
    """Up to `size` bytes from `stream`, in chunks: read(size) would allocate `size` at once."""
    chunks = []
    while size > 0 and (chunk := stream.read(min(size, CHUNK))):
        chunks.append(chunk)
        size -= len(chunk)
    return chunks


def _read_into(stream, buffer: np.ndarray) -> int:
    """Fill `buffer` from `stream` a chunk at a time; return the bytes read (fewer at the stream's end)."""
    view, done = memoryview(buffer), 0
    while done < len(view) and (count := stream.readinto(view[done:done + CHUNK])):
        done += count
    return done


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


def load_idx(images_path: Path, labels_path: Path, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, rows, cols, 1) and int32 labels (N,) of `spec`'s `split` from an IDX pair."""
    images = read_idx(images_path, 3, spec, split)
    labels = read_idx(labels_path, 1, spec, split)
    if len(images) != len(labels):
        raise JaxbatchError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images[..., None], labels.astype(np.int32)
