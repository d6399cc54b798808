"""What jaxbatch knows about each dataset: shape, sizes, class names.

One table, read by the loaders, `jaxbatch data list` and the downloader.
"""

from __future__ import annotations

import dataclasses

from jaxbatch.errors import JaxbatchError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_shape: tuple[int, int, int]  # (H, W, C), channels-last
    sizes: dict  # split -> number of examples
    class_names: tuple[str, ...]
    tfds_name: str | None = None  # name in the TFDS catalogue, if any
    # Image-folder class folders in label order; None: sorted folder names.
    class_folders: tuple[str, ...] | None = None


DIGITS_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        # 1,797 images bundled with scikit-learn; split 1,347 / 450 (see digits.py).
        DatasetSpec("digits", (8, 8, 1), {"train": 1347, "test": 450}, DIGITS_CLASSES),
        DatasetSpec("mnist", (28, 28, 1), {"train": 60000, "test": 10000}, DIGITS_CLASSES, "mnist"),
        DatasetSpec(
            "fashion_mnist",
            (28, 28, 1),
            {"train": 60000, "test": 10000},
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            "fashion_mnist",
        ),
        DatasetSpec(
            "kmnist",
            (28, 28, 1),
            {"train": 60000, "test": 10000},
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            "kmnist",
        ),
        DatasetSpec(
            "cifar10",
            (32, 32, 3),
            {"train": 50000, "test": 10000},
            CIFAR10_CLASSES,
            "cifar10",
            class_folders=CIFAR10_CLASSES,
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
