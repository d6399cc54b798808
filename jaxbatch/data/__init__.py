"""Datasets in: one entry point, `load(name, split)`.

Every dataset comes back the same way, whatever its source: uint8 images
(N, H, W, C) channels-last (what Flax convolutions expect), int32 labels (N,),
the class names, and the dataset's name.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

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
    """Load one split of a dataset as uint8 NHWC images and int32 labels."""
    spec = get_spec(name)
    check_split(split)
    if source not in SOURCES:
        raise JaxbatchError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if name == "digits":
        from jaxbatch.data.digits import load_digits

        images, labels = load_digits(split)
        return Dataset(images, labels, spec.class_names, name)
    raise JaxbatchError(f"dataset {name!r} is not available yet")
