"""Image folders: `<split>/<class>/*.png|jpg`, as a folder or a tarball.

The layout works for any dataset: one folder per class, named after it. The
label of an image is the index of its class folder: the dataset's own class
order where the catalogue defines one (CIFAR-10: airplane, automobile, ...),
else the sorted order of the folder names.

Decoding tens of thousands of small images takes seconds, so it runs in a
pool of threads (Pillow releases the GIL while it decodes; threads, unlike
worker processes, also work from notebooks and unguarded scripts and never
fork a process running JAX), and `files.py` caches the result.

A tarball is read member by member into memory and never extracted, so
nothing is written to disk; links, devices, FIFOs and paths leaving the
archive are refused (tarballs.py).
"""

from __future__ import annotations

import io
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from jaxbatch.data import tarballs
from jaxbatch.data.catalog import FOLDER_HEADROOM, DatasetSpec, max_examples, one_line
from jaxbatch.errors import JaxbatchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
WORKERS = 2
PARALLEL_MIN = 2048  # below this, a pool costs more than it saves
CHUNK = 2500  # images per task
MAX_IMAGE_BYTES = 1 << 24  # no PNG or JPEG of a catalogued image size comes near 16 MiB
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_folder_source(folder: Path, split: str) -> Path | None:
    """`<folder>/<split>/` or `<folder>/<split>.tar.gz` (.tgz, .tar), or None."""
    if (folder / split).is_dir():
        return folder / split
    for suffix in TAR_SUFFIXES:
        if (folder / (split + suffix)).is_file():
            return folder / (split + suffix)
    return None


def source_files(source: Path) -> list[Path]:
    """The files whose size and mtime decide whether a cached decode is stale."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file())


def load_image_folder(
    source: Path, spec: DatasetSpec, workers: int = WORKERS
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) and int32 labels (N,) from an image folder or tarball.

    Images come back sorted by (class folder, file name), whatever the order
    on disk or in the archive.
    """
    split = source.name.split(".")[0]
    most = max_examples(spec, split, official=False)
    counts = {}  # class folder -> number of images in it
    keys = []  # (class folder, display name) of each image, in reading order

    def images():
        entries = _walk_folder(source) if source.is_dir() else _walk_tar(source, split)
        for class_name, where, payload in entries:
            counts[class_name] = counts.get(class_name, 0) + (payload is not None)
            if payload is not None:
                if len(keys) == most:  # counted as they come: refused before the extra ones are decoded
                    raise JaxbatchError(f"{source}: more than {most} images, {FOLDER_HEADROOM} times the "
                                        f"{spec.sizes[split]} of {spec.name} {split}; is it the right folder?")
                keys.append((class_name, where))
                yield where, payload

    pixels = decode_images(images(), spec.image_shape, workers)
    if not keys:
        raise JaxbatchError(f"{source}: no images found; expected {split}/<class>/*.png or *.jpg")
    for class_name, count in counts.items():
        if count == 0:
            raise JaxbatchError(f"{source}: class folder {class_name!r} has no images")
    index = class_index(set(counts), spec, source)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    labels = np.array([index[keys[i][0]] for i in order], np.int32)
    return pixels[order], labels


def class_index(found: set, spec: DatasetSpec, where) -> dict[str, int]:
    """Label of each class folder name."""
    if spec.class_folders is not None:
        unknown = sorted(found - set(spec.class_folders))
        if unknown:
            raise JaxbatchError(
                f"{where}: unknown class folder {unknown[0]!r}; {spec.name} expects "
                f"folders named {', '.join(spec.class_folders)}"
            )
        missing = [name for name in spec.class_folders if name not in found]
        if missing:
            raise JaxbatchError(f"{where}: class folder {missing[0]!r} is missing")
        return {name: i for i, name in enumerate(spec.class_folders)}
    if len(found) != len(spec.class_names):
        raise JaxbatchError(
            f"{where}: found {len(found)} class folders but {spec.name} has "
            f"{len(spec.class_names)} classes"
        )
    return {name: i for i, name in enumerate(sorted(found))}


def _is_hidden(parts) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _check_image_name(name: str, where: str) -> None:
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise JaxbatchError(f"{where}: not a PNG or JPEG image (expected .png, .jpg or .jpeg)")


def shown(path: Path) -> str:
    """A path for messages: quoted if it is not printable text (a name may hold a newline)."""
    return str(path) if str(path).isprintable() else ascii(str(path))


def _walk_folder(root: Path):
    """(class folder, display name, path) for `root/<class>/<image>`; path None for a folder."""
    for entry in sorted(root.iterdir()):
        if _is_hidden([entry.name]):
            continue
        if not entry.is_dir():
            raise JaxbatchError(f"{shown(entry)}: files must sit inside class folders (<split>/<class>/)")
        yield entry.name, shown(entry), None
        for path in sorted(entry.iterdir()):
            if _is_hidden([path.name]):
                continue
            if path.is_dir():
                raise JaxbatchError(f"{shown(path)}: nested folders are not part of the image-folder layout")
            if not path.is_file():
                raise JaxbatchError(f"{shown(path)}: not a regular file; a class folder holds only images")
            _check_image_name(path.name, shown(path))
            yield entry.name, shown(path), path


def _walk_tar(path: Path, split: str):
    """(class folder, display name, bytes) for `<split>/<class>/<image>` members; bytes None for a folder.

    Members are read into memory, never extracted; tarballs.members refuses
    links, devices and paths leaving the archive.
    """
    for member, where, read in tarballs.members(path, "download or copy it again"):
        parts = PurePosixPath(member.name).parts
        if parts and parts[0] == split:  # `train/cat/1.jpg`, or just `cat/1.jpg`
            parts = parts[1:]
        if not parts or _is_hidden(parts):
            continue
        if member.isdir():
            if len(parts) == 1:
                yield parts[0], where, None
            continue
        if len(parts) != 2:
            raise JaxbatchError(f"{where}: expected {split}/<class>/<image>")
        _check_image_name(parts[1], where)
        yield parts[0], where, read(MAX_IMAGE_BYTES, "one image")


def decode_images(items, shape: tuple, workers: int = WORKERS) -> np.ndarray:
    """Decode (display name, path or bytes) pairs into uint8 (N, H, W, C).

    `items` may be a generator (e.g. members streaming out of a tarball): chunks
    go to the thread pool as soon as they are read, so decoding overlaps
    reading. Fewer than PARALLEL_MIN items are decoded in the calling thread.
    """
    items = iter(items)
    first = list(itertools.islice(items, PARALLEL_MIN))
    if workers <= 1 or len(first) < PARALLEL_MIN:
        return _decode_chunk(first + list(items), shape)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_decode_chunk, first, shape)]
        while chunk := list(itertools.islice(items, CHUNK)):
            futures.append(pool.submit(_decode_chunk, chunk, shape))
        return np.concatenate([future.result() for future in futures])


def _decode_chunk(items: list, shape: tuple) -> np.ndarray:
    out = np.empty((len(items), *shape), np.uint8)
    for i, (where, source) in enumerate(items):
        out[i] = _decode_one(where, source, shape)
    return out


def png_bit_depth(head: bytes) -> int | None:
    """Bits per sample from the IHDR of a PNG file starting with `head`, or None if it is not one.

    IHDR is always the first chunk: the 8-byte signature, its length and
    type (8), width and height (8), then the bit depth, byte 24.
    """
    if len(head) > 24 and head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return head[24]
    return None


def _decode_one(where: str, source, shape: tuple) -> np.ndarray:
    """One image's pixels, (H, W, C); its size and bit depth are checked from its header, before decoding.

    Only 8-bit images are read (and PNGs of 1, 2 or 4 bits, which Pillow
    scales to 0..255). A 16-bit PNG is refused: Pillow clips 16-bit grey to
    255 when it converts to 8 bits (and truncates 16-bit colour), and scaling
    it here would still not give the 8-bit pixels the dataset is made of.
    """
    from PIL import Image

    mode = "L" if shape[2] == 1 else "RGB"
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fp:
            depth = png_bit_depth(fp.read(25))
            fp.seek(0)
            with Image.open(fp, formats=["PNG", "JPEG"]) as image:
                width, height = image.size  # from the header: an 8000x8000 claim is refused undecoded
                if (height, width) == shape[:2] and not (depth and depth > 8):
                    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    except Exception as err:  # Pillow raises many types for one cause: unreadable data
        raise JaxbatchError(f"{where}: not a readable PNG or JPEG image ({one_line(err)})")
    if depth and depth > 8:
        raise JaxbatchError(f"{where}: a {depth}-bit PNG; jaxbatch reads 8-bit images only (converting would "
                            "clip or round every pixel): save it with 8 bits per channel")
    if (height, width) != shape[:2]:
        raise JaxbatchError(f"{where}: image is {width}x{height} pixels, expected {shape[1]}x{shape[0]}")
    return pixels.reshape(shape)
