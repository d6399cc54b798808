"""CIFAR-10 in its two official layouts (https://www.cs.toronto.edu/~kriz/cifar.html).

Binary (`cifar-10-binary.tar.gz` -> `cifar-10-batches-bin/`): each record is
1 label byte then 3,072 pixel bytes, the 1,024 red values of the 32x32 image
row by row, then green, then blue. Python (`cifar-10-python.tar.gz` ->
`cifar-10-batches-py/`): each batch is a pickled dict with b"data", a
(10000, 3072) uint8 array in the same channel-planar order, and b"labels".
Training is data_batch_1..5, test is test_batch; 10,000 images per batch.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from jaxbatch.errors import JaxbatchError

BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
RECORD = 1 + 32 * 32 * 3
TARBALLS = {"binary": "cifar-10-binary.tar.gz", "python": "cifar-10-python.tar.gz"}
FOLDERS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}


def _member_name(layout: str, batch: str) -> str:
    return batch + ".bin" if layout == "binary" else batch


def cifar_source(folder: Path, split: str) -> tuple[str, Path] | None:
    """(layout, path) of the first CIFAR-10 copy in `folder`, or None.

    Looks for extracted batches (binary ones also loose in `folder`), then the
    official tarballs.
    """
    first = BATCHES[split][0]
    for layout, sub in FOLDERS.items():
        for where in (folder / sub, folder) if layout == "binary" else (folder / sub,):
            if (where / _member_name(layout, first)).is_file():
                return layout, where
    for layout, name in TARBALLS.items():
        if (folder / name).is_file():
            return layout, folder / name
    return None


def source_files(layout: str, path: Path, split: str) -> list[Path]:
    """The files a split is read from (for cache keys)."""
    if path.is_file():
        return [path]
    files = [path / _member_name(layout, batch) for batch in BATCHES[split]]
    return [file for file in files if file.is_file()]  # a missing batch is reported on reading


def load_cifar(layout: str, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and int32 labels (N,) of one split."""
    batches = _read_tar(layout, path, split) if path.is_file() else _read_folder(layout, path, split)
    parse = parse_binary if layout == "binary" else parse_pickle
    parts = [parse(data, where) for where, data in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _read_folder(layout: str, folder: Path, split: str) -> list[tuple[str, bytes]]:
    out = []
    for batch in BATCHES[split]:
        file = folder / _member_name(layout, batch)
        if not file.is_file():
            raise JaxbatchError(f"{file}: missing; CIFAR-10 {split} needs {', '.join(BATCHES[split])}")
        out.append((str(file), file.read_bytes()))
    return out


def _read_tar(layout: str, tarball: Path, split: str) -> list[tuple[str, bytes]]:
    wanted = {f"{FOLDERS[layout]}/{_member_name(layout, b)}": b for b in BATCHES[split]}
    found = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise JaxbatchError(f"{tarball}: corrupt or truncated archive ({err}); download it again")
    missing = [name for name in wanted if name not in found]
    if missing:
        raise JaxbatchError(f"{tarball}: has no member {missing[0]}; is it the official CIFAR-10 {layout} archive?")
    return [(f"{tarball}:{name}", found[name]) for name in wanted]


def planar_to_nhwc(flat: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-planar rows -> (N, 32, 32, 3) channels-last."""
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def parse_binary(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % RECORD:
        raise JaxbatchError(
            f"{where}: {len(data)} bytes is not a whole number of {RECORD}-byte CIFAR records; "
            "the file is truncated or corrupt"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    return np.ascontiguousarray(planar_to_nhwc(records[:, 1:])), records[:, 0].astype(np.int32)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a tarball from the web must not run code."""

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; the files predate that
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def parse_pickle(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
        flat = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
    except Exception as err:  # unpickling fails in many ways on bad bytes
        raise JaxbatchError(f"{where}: not a CIFAR-10 python batch ({type(err).__name__}: {err})")
    if flat.ndim != 2 or flat.shape[1] != 3072:
        raise JaxbatchError(f"{where}: data has shape {flat.shape}, expected (N, 3072)")
    if len(flat) != len(labels):
        raise JaxbatchError(f"{where}: {len(flat)} images but {len(labels)} labels")
    return np.ascontiguousarray(planar_to_nhwc(flat)), labels.astype(np.int32)
