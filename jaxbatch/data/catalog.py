"""What jaxbatch knows about each dataset: shape, sizes, class names.

One table, read by the loaders, `jaxbatch data list` and the downloader.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxbatch.errors import JaxbatchError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, size in bytes and SHA-256, checked before use."""

    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_shape: tuple[int, int, int]  # (H, W, C), channels-last
    sizes: dict  # split -> number of examples
    class_names: tuple[str, ...]
    tfds_name: str | None = None  # name in the TFDS catalogue, if any
    # Image-folder class folders in label order; None: sorted folder names.
    class_folders: tuple[str, ...] | None = None
    download_url: str | None = None  # folder URL holding `downloads`
    downloads: tuple[RemoteFile, ...] = ()


DIGITS_CLASSES = tuple(str(i) for i in range(10))
# The official files, as pinned by tensorflow-datasets' url_checksums (4.9.x).
def _idx_files(train_images, train_labels, test_images, test_labels):
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    pins = [train_images, train_labels, test_images, test_labels]
    return tuple(RemoteFile(name, size, sha) for name, (size, sha) in zip(names, pins))


MNIST_FILES = _idx_files(
    (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)
FASHION_MNIST_FILES = _idx_files(
    (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
)
KMNIST_FILES = _idx_files(
    (18165135, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4"),
    (29497, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17"),
    (3041136, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5"),
    (5120, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"),
)
CIFAR10_FILES = (
    RemoteFile("cifar-10-binary.tar.gz", 170052171,
               "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        # 1,797 images bundled with jaxbatch; split 1,347 / 450 (see digits.py).
        DatasetSpec("digits", (8, 8, 1), {"train": 1347, "test": 450}, DIGITS_CLASSES),
        DatasetSpec("mnist", (28, 28, 1), {"train": 60000, "test": 10000}, DIGITS_CLASSES, "mnist",
                    download_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
                    downloads=MNIST_FILES),
        DatasetSpec(
            "fashion_mnist",
            (28, 28, 1),
            {"train": 60000, "test": 10000},
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            "fashion_mnist",
            # The dataset's own repository (the HTTP-only S3 site serves the same files).
            download_url="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            downloads=FASHION_MNIST_FILES,
        ),
        DatasetSpec(
            "kmnist",
            (28, 28, 1),
            {"train": 60000, "test": 10000},
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            "kmnist",
            download_url="https://codh.rois.ac.jp/kmnist/dataset/kmnist/",
            downloads=KMNIST_FILES,
        ),
        DatasetSpec(
            "cifar10",
            (32, 32, 3),
            {"train": 50000, "test": 10000},
            CIFAR10_CLASSES,
            "cifar10",
            class_folders=CIFAR10_CLASSES,
            download_url="https://www.cs.toronto.edu/~kriz/",
            downloads=CIFAR10_FILES,
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise JaxbatchError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        )
    return DATASETS[name]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise JaxbatchError(f"unknown split {split!r}; choose 'train' or 'test'")


def one_line(text) -> str:
    """`text` with its whitespace runs made single spaces.

    Messages quote other libraries' errors (zlib, tarfile, Pillow, numpy),
    which may span lines; a JaxbatchError is always one line.
    """
    return " ".join(str(text).split())


# An image folder may hold more than the official split (extra or augmented
# images), within reason: decoded pixels cost memory in proportion, and a small
# .tar.gz of many tiny images would otherwise decide how much.
FOLDER_HEADROOM = 4


def max_examples(spec: DatasetSpec, split: str, official: bool = True) -> int:
    """The most examples one split may hold: the official count for the official
    formats (IDX, CIFAR-10 batches, TFDS), FOLDER_HEADROOM times it for an image
    folder. Claims above it are refused before anything of their size is read."""
    return spec.sizes[split] * (1 if official else FOLDER_HEADROOM)


def check_arrays(images, labels, spec: DatasetSpec, where, labels_where=None, most: int | None = None) -> None:
    """Fail with one line if (images, labels) do not fit the dataset's entry.

    The rule, for arrays from any source (a fresh decode or a cache entry):
    uint8 images (N, H, W, C) of the catalogue's shape, integer labels (N,) in
    0..classes-1, as many labels as images, and 1 <= N <= `most` (if given).
    `where` names the source in messages; `labels_where` the labels' own file, if separate.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise JaxbatchError(f"{where}: images are {kind}, not uint8 pixels; the file is corrupt or not {spec.name}'s")
    if images.shape[1:] != spec.image_shape:
        raise JaxbatchError(
            f"{where}: images have shape {images.shape[1:]}, but {spec.name} images are "
            f"{spec.image_shape} (H, W, C)"
        )
    if not (isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)):
        kind = f"{labels.dtype} of shape {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise JaxbatchError(f"{labels_where or where}: labels are {kind}, not integers (N,); "
                            f"the file is corrupt or not {spec.name}'s")
    if len(images) != len(labels):
        raise JaxbatchError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:  # nothing to train on or to average: a split holds at least one example
        raise JaxbatchError(f"{where}: holds no examples; the file is incomplete, get it again")
    if most is not None and len(images) > most:
        raise JaxbatchError(f"{where}: {len(images)} examples, more than the {most} a {spec.name} split may hold; "
                            "the file is corrupt or not this dataset's")
    bad = (labels < 0) | (labels >= len(spec.class_names))
    if bad.any():
        i = int(bad.argmax())
        raise JaxbatchError(
            f"{labels_where or where}: label {int(labels[i])} at index {i} is outside 0..{len(spec.class_names) - 1}"
        )
