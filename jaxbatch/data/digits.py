"""`digits`: the zero-setup default dataset, bundled with jaxbatch.

1,797 grey 8x8 images of handwritten digits: the UCI ML hand-written digits
(E. Alpaydin and C. Kaynak, 1998, CC BY 4.0), as scikit-learn ships them,
pixels 0..16. They are rescaled to 0..255 uint8, so every dataset in
jaxbatch has the same dtype and range, and split once, stratified by class
with a fixed seed: 1,347 train / 450 test (scikit-learn's train_test_split,
test_size=0.25, random_state=0).

The two splits are stored in digits.npz beside this file (48 KB), so a run
needs no scikit-learn: importing it, and SciPy with it, took 1.8-2.4 s of
every `jaxbatch train`'s start on a 2-core CPU (a one-epoch run on digits
took 13-14 s instead of 14.5-17 s). `from_sklearn` makes the same arrays
from scikit-learn; `python -m jaxbatch.data.digits` rewrites the file from
it, and tests/test_data_load.py checks the file against it.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

from jaxbatch.data.catalog import get_spec
from jaxbatch.errors import JaxbatchError

SPLIT_SEED = 0
TEST_FRACTION = 0.25
FILE = Path(__file__).resolve().parent / "digits.npz"
SIZES = get_spec("digits").sizes  # {"train": 1347, "test": 450}, from the catalogue


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split, (uint8 images (n, 8, 8, 1), int32 labels), from the bundled file."""
    reinstall = "reinstall jaxbatch (pip install -e . from the clone)"
    if not zipfile.is_zipfile(FILE):  # missing, cut short or overwritten: np.load's own error would
        # speak of pickles and suggest allow_pickle, the wrong advice for a package's data file
        state = "is not an npz archive (cut short or overwritten)" if FILE.exists() else "is missing"
        raise JaxbatchError(f"the bundled digits file {FILE} {state}; {reinstall}")
    try:
        with np.load(FILE, allow_pickle=False) as arrays:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise JaxbatchError(f"the bundled digits file {FILE} cannot be read ({type(err).__name__}: {err}); "
                            f"{reinstall}") from None
    n = SIZES[split]
    if images.shape != (n, 8, 8, 1) or images.dtype != np.uint8 or labels.shape != (n,) \
            or labels.dtype != np.int32:
        raise JaxbatchError(f"the bundled digits file {FILE} holds {split} arrays of shape {images.shape} "
                            f"{images.dtype} and {labels.shape} {labels.dtype}, not ({n}, 8, 8, 1) uint8 and "
                            f"({n},) int32; {reinstall}")
    return images, labels


def from_sklearn(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The same split made from scikit-learn's copy (pip install scikit-learn)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    # 0..16 -> 0..255, rounded: 16 maps to 255 exactly.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return images[chosen], labels[chosen]


def write_file(path: Path = FILE) -> None:
    """Write both splits, from scikit-learn, to `path` (compressed)."""
    arrays = {}
    for split in SIZES:
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = from_sklearn(split)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


if __name__ == "__main__":
    write_file(Path(sys.argv[1]) if len(sys.argv) > 1 else FILE)
