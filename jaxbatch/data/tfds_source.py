"""The `tfds` source: datasets prepared by tensorflow-datasets, in `<data_dir>/tfds/`.

Reading goes through `tfds.data_source`, which reads the prepared ArrayRecord
files by index and needs no TensorFlow. Preparing (download, then convert to
ArrayRecord) does need TensorFlow: `pip install -e ".[tfds]"`.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from jaxbatch.data.catalog import DatasetSpec, max_examples, one_line
from jaxbatch.errors import JaxbatchError

INSTALL_HINT = 'pip install -e ".[tfds]" (or: pip install tensorflow importlib_resources)'


def tfds_dir(data_dir: Path) -> Path:
    """Where TFDS datasets are prepared and read: `<data_dir>/tfds`."""
    return Path(data_dir) / "tfds"


def prepared_dir(spec: DatasetSpec, data_dir: Path) -> Path | None:
    """The prepared version folder (e.g. tfds/mnist/3.0.1), newest first, or None."""
    if spec.tfds_name is None:
        return None
    versions = sorted(tfds_dir(data_dir).glob(f"{spec.tfds_name}/*/dataset_info.json"))
    prepared = [info.parent for info in versions if any(info.parent.glob("*.array_record*"))]
    return prepared[-1] if prepared else None


def source_files(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    """The prepared files (for cache keys); empty when nothing is prepared on disk."""
    folder = prepared_dir(spec, data_dir)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder else []


def load_tfds(spec: DatasetSpec, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) and int32 labels (N,) from a prepared TFDS dataset."""
    if spec.tfds_name is None:
        raise JaxbatchError(f"{spec.name} is not in the TFDS catalogue; use --source files")
    import tensorflow_datasets as tfds

    folder = tfds_dir(data_dir)
    try:
        records = tfds.data_source(spec.tfds_name, split=split, data_dir=str(folder), download=False)
    except Exception as err:  # TFDS reports "not prepared" in several ways
        # TFDS's reason helps only when something is there (e.g. a TFRecord copy).
        reason = f" ({str(err).splitlines()[0]})" if (folder / spec.tfds_name).exists() and str(err) else ""
        raise JaxbatchError(
            f"no prepared TFDS copy of {spec.name} {split} in {folder}{reason}; "
            f"run `jaxbatch data prepare {spec.name}`"
        )
    where = f"TFDS {spec.tfds_name} {split} in {folder}"
    count, most = len(records), max_examples(spec, split)
    if not 0 < count <= most:  # checked before the arrays are made: their size follows the count
        raise JaxbatchError(f"{where}: {count} records, but {spec.name} {split} has {most}; the prepared copy "
                            f"is damaged: delete it and run `jaxbatch data prepare {spec.name}`")
    images = np.empty((count, *spec.image_shape), np.uint8)
    labels = np.empty(count, np.int64)
    for i in range(count):  # one by one: records[i] is the access every TFDS version supports
        images[i], labels[i] = _record(records, i, spec, f"{where}, record {i}")
    return images, labels


def _record(records, i: int, spec: DatasetSpec, where: str) -> tuple[np.ndarray, int]:
    """Record `i`'s image, uint8 of the dataset's shape (numpy would cast or broadcast
    anything else into place), and its integer label."""
    try:
        record = records[i]
        image, label = np.asarray(record["image"]), record["label"]
        label = operator.index(label)  # an integer of any kind, never a float or a string
    except Exception as err:  # a damaged record fails inside TFDS or its decoders in many ways
        raise JaxbatchError(f"{where}: unreadable ({type(err).__name__}: {one_line(err)}); delete the "
                            f"prepared copy and run `jaxbatch data prepare {spec.name}`")
    if image.dtype != np.uint8 or image.shape != spec.image_shape:
        raise JaxbatchError(f"{where}: image is {image.dtype} {image.shape}, expected uint8 {spec.image_shape}; "
                            f"delete the prepared copy and run `jaxbatch data prepare {spec.name}`")
    if not 0 <= label < len(spec.class_names):
        raise JaxbatchError(f"{where}: label {label} is outside 0..{len(spec.class_names) - 1}")
    return image, label


def prepare(spec: DatasetSpec, data_dir: Path) -> Path:
    """Download and convert `spec` to ArrayRecord with TFDS; needs TensorFlow."""
    if spec.tfds_name is None:
        raise JaxbatchError(f"{spec.name} is not in the TFDS catalogue and needs no preparing")
    try:
        import importlib_resources  # noqa: F401  (tensorflow-datasets 4.9 needs it, undeclared)
        import tensorflow  # noqa: F401
    except ImportError as err:
        raise JaxbatchError(f"preparing with TFDS needs {err.name}: {INSTALL_HINT}")
    import tensorflow_datasets as tfds

    builder = tfds.builder(spec.tfds_name, data_dir=str(tfds_dir(data_dir)))
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError as err:
        raise JaxbatchError(f"preparing {spec.name} with TFDS failed: {str(err).splitlines()[0]}")
    return Path(builder.data_dir)
