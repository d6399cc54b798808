"""Datasets in: one entry point, `load(name, split)`.

Every dataset comes back the same way, whatever its source: uint8 images
(N, H, W, C) channels-last (what Flax convolutions expect), int32 labels (N,),
the class names, and the dataset's name.

Where they come from: digits.py (bundled with jaxbatch), files.py (the
canonical files in a data folder: idx.py, cifar.py, imagefolder.py, with
tarballs.py to read archives and cache.py for slow ones), tfds_source.py
(tensorflow-datasets); download.py fetches the canonical files. catalog.py
says what each dataset is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

import numpy as np

from jaxbatch.data import cache, files, tfds_source
from jaxbatch.data.catalog import DATASETS, SPLITS, check_arrays, check_split, get_spec, max_examples  # noqa: F401
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


def check_batch_size(batch_size: int, dataset: Dataset, setting: str = "batch_size") -> None:
    """Refuse a batch larger than the training split it is drawn from."""
    if batch_size > len(dataset):
        raise JaxbatchError(f"batch size {batch_size} is larger than the {len(dataset)} training examples "
                            f"of {dataset.name}; pass a smaller {{setting}}", setting=setting)


DATA_DIR_VARIABLE = "JAXBATCH_DATA_DIR"


def default_data_dir() -> Path:
    """`$JAXBATCH_DATA_DIR`, else `~/.jaxbatch/data`. The old name,
    `$JAXBATCH_DATA`, is still read, with a one-line notice."""
    folder = os.environ.get(DATA_DIR_VARIABLE)
    if not folder and os.environ.get("JAXBATCH_DATA"):
        folder = os.environ["JAXBATCH_DATA"]
        _deprecated_variable()
    return Path(folder or Path.home() / ".jaxbatch" / "data").expanduser()


@functools.cache  # once per process
def _deprecated_variable() -> None:
    print(f"jaxbatch: $JAXBATCH_DATA is deprecated; name the data folder with ${DATA_DIR_VARIABLE}",
          file=sys.stderr)


def data_dir_or_default(data_dir) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def locate(name: str, split: str, data_dir=None, source: str = "auto"):
    """Where `load` reads a split from, without reading it.

    Returns ("digits", None), ("files", FileSource), ("tfds", prepared folder
    or None when source="tfds" is forced), or None when nothing is found.
    """
    spec = get_spec(name)
    check_split(split)
    if source not in SOURCES:
        raise JaxbatchError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if name == "digits":
        if source == "tfds":
            raise JaxbatchError("digits ships with jaxbatch and has no tfds source; use --source auto")
        return "digits", None
    data_dir = data_dir_or_default(data_dir)
    if source in ("auto", "files"):
        found = files.find_files(spec, split, data_dir)
        if found:
            return "files", found
    if source == "tfds":
        return "tfds", tfds_source.prepared_dir(spec, data_dir)
    if source == "auto" and tfds_source.prepared_dir(spec, data_dir):
        return "tfds", tfds_source.prepared_dir(spec, data_dir)
    return None


def prepare_data(name: str, model, batch_size: int, data_dir=None, source: str = "auto", train=None, test=None,
                 setting: str = "batch_size") -> tuple[Dataset, Dataset]:
    """(train, test) ready for `model` (models.Model) at `batch_size`: each
    split loaded unless given, the images checked against what the model
    takes, the batch against the training split (`setting` names the batch
    size in the error)."""
    train = load(name, "train", data_dir, source) if train is None else train
    test = load(name, "test", data_dir, source) if test is None else test
    model.check_image_shape(train.image_shape)
    check_batch_size(batch_size, train, setting)
    return train, test


def load(name: str, split: str, data_dir=None, source: str = "auto") -> Dataset:
    """Load one split of a dataset as uint8 NHWC images and int32 labels.

    source="files" reads the canonical files in `<data_dir>/<name>/` (files.py),
    "tfds" a TFDS dataset prepared in `<data_dir>/tfds/` (tfds_source.py), and
    "auto" tries them in that order. `digits` ships with jaxbatch and needs
    neither. `data_dir` defaults to `default_data_dir()`.

    Repeated calls in one process return the same arrays without reading the
    files again (unless the files changed); the arrays are read-only, so copy
    before changing them in place.
    """
    data_dir = data_dir_or_default(data_dir)
    found = locate(name, split, data_dir, source)
    if found is None:
        spec = get_spec(name)
        if source == "files":
            raise JaxbatchError(
                f"no files for {name} {split}; expected {files.expected_layouts(spec, split, data_dir)}"
                f" (or run `jaxbatch data download {name}`)"
            )
        raise JaxbatchError(
            f"{name} {split} is not in {data_dir}; get it one of three ways: "
            f"`jaxbatch data download {name}` (official files, no TensorFlow), "
            f"`jaxbatch data prepare {name}` (TFDS, needs TensorFlow), "
            f"or --data-dir pointing at a folder that holds {name}/ with its files"
        )
    kind, where = found
    if kind == "files":
        state = cache.file_state(where.files)
    elif kind == "tfds":
        state = cache.file_state(tfds_source.source_files(get_spec(name), data_dir))
        where = data_dir
    else:
        state = ()
    return _read(name, split, kind, where, state)


@functools.lru_cache(maxsize=4)  # a CIFAR-10 train split is 150 MB
def _read(name: str, split: str, kind: str, where, state: tuple) -> Dataset:
    """Read one split; `state` (file sizes and mtimes) is only part of the cache key."""
    spec = get_spec(name)
    if kind == "digits":
        from jaxbatch.data.digits import load_digits

        images, labels = load_digits(split)
    elif kind == "files":
        images, labels = files.load_files(spec, split, where)
    else:
        images, labels = _read_tfds(spec, split, where, state)
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    images.flags.writeable = False  # shared by every caller of load(): nobody may change it
    labels.flags.writeable = False
    return Dataset(images, labels, spec.class_names, name)


def _read_tfds(spec, split: str, data_dir: Path, state: tuple):
    decode = lambda: tfds_source.load_tfds(spec, split, data_dir)  # noqa: E731
    where = f"TFDS {spec.tfds_name} {split} in {tfds_source.tfds_dir(data_dir)}"

    def check(images, labels):
        check_arrays(images, labels, spec, where, most=max_examples(spec, split))

    folder = tfds_source.prepared_dir(spec, data_dir)
    # Records are decoded one by one (seconds for 60,000): cache them like image folders.
    if folder:
        return cache.cached_arrays(spec.name, split, folder, state, decode, check)
    images, labels = decode()
    check(images, labels)
    return images, labels
