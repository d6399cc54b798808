"""`digits`: the zero-setup default dataset, bundled with scikit-learn.

1,797 grey 8x8 images of handwritten digits (UCI ML hand-written digits),
pixels 0..16. We rescale them to 0..255 uint8 so every dataset in jaxbatch has
the same dtype and range, and split them once, stratified by class with a fixed
seed: 1,347 train / 450 test (test_size=0.25).
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
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
