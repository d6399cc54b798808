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
