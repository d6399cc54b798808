"""load(): the bundled default, name checks, source selection and `jaxbatch data list`."""

import zipfile

import numpy as np
import pytest
from data_fixtures import random_split, write_idx_split

from jaxbatch.cli import main
from jaxbatch.data import DATASETS, digits, load, locate
from jaxbatch.errors import JaxbatchError


def test_digits_needs_no_setup():
    train, test = load("digits", "train"), load("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.labels.dtype == np.int32
    assert np.bincount(train.labels).min() >= 130  # stratified: every class well represented
    assert not train.images.flags.writeable


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_digits_are_scikit_learns_split(split):
    # The file is what jaxbatch/data/digits.py says it is: scikit-learn's copy, rescaled and split.
    pytest.importorskip("sklearn")
    images, labels = digits.load_digits(split)
    made_images, made_labels = digits.from_sklearn(split)
    assert images.dtype == made_images.dtype and labels.dtype == made_labels.dtype
    assert np.array_equal(images, made_images) and np.array_equal(labels, made_labels)


def test_a_damaged_digits_file_is_one_clear_error(tmp_path, monkeypatch):
    damaged = tmp_path / "digits.npz"
    damaged.write_bytes(digits.FILE.read_bytes()[:1000])  # cut short, as a broken install would leave it
    monkeypatch.setattr(digits, "FILE", damaged)
    with pytest.raises(JaxbatchError, match=r"bundled digits file .* is not an npz archive .*; reinstall jaxbatch"):
        digits.load_digits("train")
    damaged.write_bytes(b"not an archive")  # no pickle talk: np.load alone suggested allow_pickle
    with pytest.raises(JaxbatchError, match=r"is not an npz archive \(cut short or overwritten\); reinstall") as err:
        digits.load_digits("train")
    assert "pickle" not in str(err.value)
    with zipfile.ZipFile(damaged, "w") as archive:  # an archive without the split's arrays
        archive.writestr("other.npy", b"")
    with pytest.raises(JaxbatchError, match=r"cannot be read \(KeyError: .*reinstall jaxbatch"):
        digits.load_digits("train")
    monkeypatch.setattr(digits, "FILE", tmp_path / "gone.npz")
    with pytest.raises(JaxbatchError, match=r"gone.npz is missing; reinstall jaxbatch"):
        digits.load_digits("train")
    monkeypatch.setattr(digits, "FILE", damaged)
    np.savez(damaged, train_images=np.zeros((3, 8, 8, 1), np.uint8), train_labels=np.zeros(3, np.int32))
    with pytest.raises(JaxbatchError, match=r"holds train arrays of shape \(3, 8, 8, 1\).*reinstall"):
        digits.load_digits("train")


@pytest.mark.parametrize("args,needle", [
    (("nope", "train"), "unknown dataset 'nope'"),
    (("mnist", "validation"), "unknown split 'validation'"),
    (("mnist", "train", None, "web"), "unknown source 'web'"),
])
def test_bad_names(args, needle, capsys):
    with pytest.raises(JaxbatchError, match=needle):
        load(*args)


@pytest.mark.parametrize("argv", [
    ["data", "check", "nope"],
    ["data", "check", "mnist", "--split", "validation"],
    ["data", "download", "digits"],
])
def test_cli_bad_names_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(err) == 1 and "invalid choice" in err[0]


def test_auto_prefers_files(tmp_path):
    images, labels = random_split(10, (28, 28, 1))
    write_idx_split(tmp_path / "mnist", "train", images, labels)
    kind, where = locate("mnist", "train", tmp_path)
    assert kind == "files" and where.kind == "idx"
    assert locate("mnist", "test", tmp_path) is None  # only train was written
    with pytest.raises(JaxbatchError, match="no files for mnist test"):
        load("mnist", "test", data_dir=tmp_path, source="files")


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    images, labels = random_split(10, (28, 28, 1))
    write_idx_split(tmp_path / "fashion_mnist", "test", images, labels)
    monkeypatch.setenv("JAXBATCH_DATA_DIR", str(tmp_path))
    np.testing.assert_array_equal(load("fashion_mnist", "test").labels, labels)


def test_old_data_variable_is_read_with_one_notice(tmp_path):
    import os
    import subprocess
    import sys

    images, labels = random_split(10, (28, 28, 1))
    write_idx_split(tmp_path / "fashion_mnist", "test", images, labels)
    env = {k: v for k, v in os.environ.items() if k != "JAXBATCH_DATA_DIR"}
    env["JAXBATCH_DATA"] = str(tmp_path)
    code = "from jaxbatch import load; print(len(load('fashion_mnist', 'test')), len(load('fashion_mnist', 'test')))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["10", "10"]
    assert proc.stderr.count("\n") == 1  # one notice, however often the folder is asked for
    assert "$JAXBATCH_DATA is deprecated" in proc.stderr and "$JAXBATCH_DATA_DIR" in proc.stderr


def test_cli_list_says_where_each_dataset_is(tmp_path, capsys):
    images, labels = random_split(10, (28, 28, 1))
    for split in ("train", "test"):
        write_idx_split(tmp_path / "kmnist", split, images, labels)
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == set(DATASETS)
    assert "60,000" in rows["kmnist"] and f"idx in {tmp_path / 'kmnist'}" in rows["kmnist"]
    assert "bundled" in rows["digits"]
    assert "not here (jaxbatch data download cifar10)" in rows["cifar10"]


def test_cli_check(tmp_path, capsys):
    images, labels = random_split(30, (28, 28, 1))
    write_idx_split(tmp_path / "mnist", "test", images, labels)
    assert main(["data", "check", "mnist", "--split", "test", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"mean pixel {images.mean():.2f}" in out and "30 images" in out
