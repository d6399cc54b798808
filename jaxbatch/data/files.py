"""The `files` source: a dataset's canonical files in `<data_dir>/<name>/`.

Looked for in this order, first match wins:
  1. IDX files, gzipped or not (MNIST, Fashion-MNIST, KMNIST): idx.py
  2. CIFAR-10's binary or python batches, extracted or as the official tarball: cifar.py
  3. an image folder, `<split>/<class>/*.png|jpg` or `<split>.tar.gz`: imagefolder.py
Sources that are slow to decode (tarballs, image folders) are cached: cache.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxbatch.data import cache, cifar, idx, imagefolder
from jaxbatch.data.catalog import DatasetSpec, check_arrays, max_examples


@dataclasses.dataclass(frozen=True)
class FileSource:
    kind: str  # "idx" | "cifar-binary" | "cifar-python" | "image-folder"
    path: Path  # the folder or tarball read (IDX: the images file)
    files: tuple[Path, ...]  # every file read; their sizes and mtimes key the caches

    def describe(self) -> str:
        folder = self.path if self.path.is_dir() and self.kind != "image-folder" else self.path.parent
        return f"{self.kind} in {folder}"


def find_files(spec: DatasetSpec, split: str, data_dir: Path) -> FileSource | None:
    """Which canonical files hold this split, without reading them; None if none do."""
    folder = Path(data_dir) / spec.name
    pair = idx.idx_paths(folder, split)
    if pair:
        return FileSource("idx", pair[0], pair)
    if spec.name == "cifar10":
        found = cifar.cifar_source(folder, split)
        if found:
            layout, path = found
            return FileSource(f"cifar-{layout}", path, tuple(cifar.source_files(layout, path, split)))
    path = imagefolder.image_folder_source(folder, split)
    if path:
        return FileSource("image-folder", path, tuple(imagefolder.source_files(path)))
    return None


def load_files(spec: DatasetSpec, split: str, source: FileSource) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split from the files `find_files` chose, checked.

    The same check (check_arrays) holds for a fresh decode and for a cache
    entry read back, so a damaged or outdated entry is never used.
    """
    idx_pair = source.kind == "idx"
    most = max_examples(spec, split, official=source.kind != "image-folder")

    def check(images, labels):
        check_arrays(images, labels, spec, source.files[0] if idx_pair else source.path,
                     source.files[1] if idx_pair else None, most)

    def read():
        if idx_pair:
            return idx.load_idx(*source.files, spec, split)
        if source.kind == "image-folder":
            return imagefolder.load_image_folder(source.path, spec)
        return cifar.load_cifar(source.kind.split("-")[1], source.path, split)

    if idx_pair or source.path.is_dir() and source.kind != "image-folder":
        images, labels = read()  # plain files: reading them is as fast as reading a cache
        check(images, labels)
        return images, labels
    state = cache.file_state(source.files)
    return cache.cached_arrays(spec.name, split, source.path, state, read, check)


def expected_layouts(spec: DatasetSpec, split: str, data_dir: Path) -> str:
    """One phrase naming the files `find_files` looks for, for error messages."""
    folder = Path(data_dir) / spec.name
    prefix = idx.PREFIX[split]
    layouts = [f"{folder}/{prefix}-images-idx3-ubyte.gz + {prefix}-labels-idx1-ubyte.gz"]
    if spec.name == "cifar10":
        layouts.append(f"{folder}/{cifar.TARBALLS['binary']} or {cifar.TARBALLS['python']}")
    layouts.append(f"{folder}/{split}/<class>/*.png|jpg or {folder}/{split}.tar.gz")
    return "; ".join(layouts)
