"""The real datasets (skipped unless $JAXBATCH_DATA_DIR points at them)."""

import numpy as np
import pytest

from jaxbatch.data import load

pytestmark = pytest.mark.realdata

CASES = [
    # name, train size, test size, train mean pixel (see the data folder's README)
    ("mnist", 60000, 10000, 33.32),
    ("fashion_mnist", 60000, 10000, 72.94),
    pytest.param("cifar10", 50000, 10000, 120.69, marks=pytest.mark.slow),  # JPEG copy
]


@pytest.mark.parametrize("name,n_train,n_test,train_mean", CASES)
def test_real_dataset(real_data_dir, name, n_train, n_test, train_mean):
    train = load(name, "train", data_dir=real_data_dir, source="files")
    test = load(name, "test", data_dir=real_data_dir, source="files")
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    counts = np.bincount(train.labels, minlength=10)
    if name == "mnist":  # MNIST's classes are close to, not exactly, balanced
        assert counts.min() > 5000 and counts.max() < 7000
    else:
        assert (counts == n_train // 10).all()
        assert (np.bincount(test.labels, minlength=10) == n_test // 10).all()
    assert abs(float(train.images.mean()) - train_mean) < 0.01
