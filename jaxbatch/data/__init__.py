"""Datasets in: one entry point, `load(name, split)`.

Every dataset comes back the same way, whatever its source: uint8 images
(N, H, W, C) channels-last (what Flax convolutions expect), int32 labels (N,),
the class names, and the dataset's name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from jaxbatch.data import cache, files
from jaxbatch.data.catalog import DATASETS, SPLITS, get_spec, check_split  # noqa: F401
from jaxbatch.errors import JaxbatchError

SOURCES = ("auto", "files", "tfds")


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int32 (N,)
    class_names: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def default_data_dir() -> Path:
    """`$JAXBATCH_DATA`, else `~/.jaxbatch/data`."""
    return Path(os.environ.get("JAXBATCH_DATA") or Path.home() / ".jaxbatch" / "data")


def load(name: str, split: str, data_dir=None, source: str = "auto") -> Dataset:
    """Load one split of a dataset as uint8 NHWC images and int32 labels.

    source="files" reads the canonical files in `<data_dir>/<name>/` (files.py),
    "tfds" a TFDS dataset prepared in `<data_dir>/tfds/` (tfds_source.py), and
    "auto" tries them in that order. `digits` ships with scikit-learn and needs
    neither. `data_dir` defaults to `default_data_dir()`.

    Repeated calls in one process return the same arrays without reading the
    files again (unless the files changed); the arrays are read-only, so copy
    before changing them in place.
    """
    spec = get_spec(name)
    check_split(split)
    if source not in SOURCES:
        raise JaxbatchError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if name == "digits":
        if source == "tfds":
            raise JaxbatchError("digits ships with scikit-learn and has no tfds source; use --source auto")
        return _read(name, split, "digits", None, ())
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    found = files.find_files(spec, split, data_dir) if source in ("auto", "files") else None
    if found:
        return _read(name, split, "files", found, cache.file_state(found.files))
    if source == "files":
        raise JaxbatchError(
            f"no files for {name} {split}; expected {files.expected_layouts(spec, split, data_dir)}"
            f" (or run `jaxbatch data download {name}`)"
        )
    raise JaxbatchError(
        f"{name} {split} is not in {data_dir}; get it one of three ways: "
        f"`jaxbatch data download {name}`, "
        f"or point --data-dir at a folder holding {name}/ with its canonical files"
    )


@functools.lru_cache(maxsize=8)
def _read(name: str, split: str, kind: str, where, state: tuple) -> Dataset:
    """Read one split; `state` (file sizes and mtimes) is only part of the cache key."""
    spec = get_spec(name)
    if kind == "digits":
        from jaxbatch.data.digits import load_digits

        images, labels = load_digits(split)
    else:
        images, labels = files.load_files(spec, split, where)
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    images.flags.writeable = False  # shared by every caller of load(): nobody may change it
    labels.flags.writeable = False
    return Dataset(images, labels, spec.class_names, name)
