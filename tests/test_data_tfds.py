"""The tfds source, through tensorflow-datasets' own mock (no TensorFlow, no network)."""

import numpy as np
import pytest

from jaxbatch.data import load, locate
from jaxbatch.data.tfds_source import prepare
from jaxbatch.data.catalog import get_spec
from jaxbatch.errors import JaxbatchError

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_source_under_mock(tmp_path, name, shape, split):
    with tfds.testing.mock_data(num_examples=9):
        data = load(name, split, data_dir=tmp_path, source="tfds")
    assert data.images.shape == (9, *shape) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and ((0 <= data.labels) & (data.labels < 10)).all()
    assert data.class_names == get_spec(name).class_names


def test_auto_does_not_pick_an_unprepared_tfds(tmp_path):
    assert locate("mnist", "train", tmp_path) is None
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "train", data_dir=tmp_path)
    message = str(err.value)
    for way in ("jaxbatch data download mnist", "jaxbatch data prepare mnist", "--data-dir"):
        assert way in message


def test_auto_finds_a_prepared_tfds_copy(tmp_path):
    version = tmp_path / "tfds" / "mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    (version / "mnist-train.array_record-00000-of-00001").write_bytes(b"")
    assert locate("mnist", "train", tmp_path) == ("tfds", version)


def test_tfds_not_prepared_is_one_line(tmp_path):
    with pytest.raises(JaxbatchError) as err:
        load("kmnist", "test", data_dir=tmp_path, source="tfds")
    assert "\n" not in str(err.value) and "jaxbatch data prepare kmnist" in str(err.value)


def test_digits_has_no_tfds_source():
    with pytest.raises(JaxbatchError, match="no tfds source"):
        load("digits", "train", source="tfds")


def test_prepare_without_tensorflow_says_what_to_install(tmp_path):
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(JaxbatchError, match=r'pip install -e "\.\[tfds\]"'):
            prepare(get_spec("mnist"), tmp_path)
    else:
        pytest.skip("TensorFlow is installed here: prepare would download")


class Records:
    """What tfds.data_source returns: a sequence of records, here made by `make(i)`."""

    def __init__(self, count, make):
        self.count, self.make = count, make

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.make(i)


def good(i):
    return {"image": np.zeros((28, 28, 1), np.uint8), "label": np.int64(i % 10)}


@pytest.mark.parametrize("records,needle", [
    (Records(0, good), "0 records, but mnist test has 10000"),
    (Records(10001, good), "10001 records, but mnist test has 10000"),  # refused before arrays of that size
    (Records(5, lambda i: {"image": np.zeros((28, 28), np.uint8), "label": 0}),
     "record 0: image is uint8 (28, 28), expected uint8 (28, 28, 1)"),  # numpy would broadcast it into place
    (Records(5, lambda i: {"image": np.full((28, 28, 1), 1e9), "label": 0}),
     "record 0: image is float64 (28, 28, 1)"),  # numpy would cast it to garbage
    (Records(5, lambda i: {"image": np.zeros((28, 28, 1), np.uint8), "label": "3"}),
     "record 0: unreadable (TypeError"),
    (Records(5, lambda i: {"image": np.zeros((28, 28, 1), np.uint8), "label": 2**70}),
     "record 0: label 1180591620717411303424 is outside 0..9"),  # int64 would overflow
    (Records(5, lambda i: {"label": 0}), "record 0: unreadable (KeyError"),
], ids=["none", "too-many", "image-2d", "image-float", "label-text", "label-2**70", "no-image"])
def test_damaged_tfds_records_are_one_line(tmp_path, monkeypatch, records, needle):
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: records)
    with pytest.raises(JaxbatchError) as err:
        load("mnist", "test", data_dir=tmp_path, source="tfds")
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("TFDS mnist test in ")
