"""The recipes on the real datasets (JAXBATCH_DATA_DIR; CI sets it), seed 0.

Thresholds are the targets the recipes are held to, except where a recipe's
own noise is larger than the gap between a target and the text's result (see
each comment and the README's recipe table, which gives the spread over seeds).
"""

import dataclasses

import pytest

from jaxbatch import data
from jaxbatch.precision import highest_precision, relative_difference
from jaxbatch.recipes import get_recipe
from jaxbatch.train import TrainConfig, train_and_evaluate

# Each trains a whole recipe on a real dataset (minutes on a CPU): never in the fast tier.
pytestmark = [pytest.mark.realdata, pytest.mark.slow]

THRESHOLDS = {
    "mlp-scratch-fashion": 0.83,  # text E from scratch: 0.832
    "cnn-mnist": 0.98,            # text A in PyTorch: 0.982
    "fc-cifar10": 0.49,           # text C: about 0.50
    # SGD at lr 0.5 without momentum makes the last-epoch accuracy swing by several
    # points from seed to seed (0.776-0.855 over seeds 0-7, median 0.848; text E's own
    # run went 0.854 -> 0.836 in its last two epochs). The target 0.85 is the median's
    # level; one seed is held to the text's level minus that swing.
    "mlp-fashion": 0.80,
    # One epoch of SGD: 0.968, 0.968, 0.973 over seeds 0-2 (PyTorch here: 0.972).
    "lenet-mnist": 0.965,
}


def load_both(name, data_dir):
    return data.load(name, "train", data_dir), data.load(name, "test", data_dir)


@pytest.mark.parametrize("recipe", list(THRESHOLDS))
def test_recipe_reaches_its_accuracy(recipe, real_data_dir):
    config = TrainConfig(**get_recipe(recipe))
    train_ds, test_ds = load_both(config.dataset, real_data_dir)
    history = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history
    assert len(history) == config.epochs
    assert history[-1]["examples_seen"] == len(train_ds)
    assert history[-1]["test_accuracy"] >= THRESHOLDS[recipe], [h["test_accuracy"] for h in history]


def test_vmap_and_batched_epochs_end_with_equal_params(real_data_dir):
    config = TrainConfig(**get_recipe("mlp-fashion"))
    config.epochs = 1
    train_ds, test_ds = load_both(config.dataset, real_data_dir)
    with highest_precision():  # float32 rounding is the claim, not a GPU's TF32 products
        runs = [train_and_evaluate(dataclasses.replace(config, loss=loss), train_ds=train_ds, test_ds=test_ds)
                for loss in ("vmap", "batched")]
    assert relative_difference(runs[0].params, runs[1].params) <= 1e-5


def test_text_c_inputs_x255_diverge_with_one_clear_error(real_data_dir):
    from jaxbatch.train import Diverged

    config = TrainConfig(**get_recipe("fc-cifar10"))
    config.input_scale, config.epochs = 255.0, 2
    train_ds, test_ds = load_both(config.dataset, real_data_dir)
    with pytest.raises(Diverged) as info:
        train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds)
    assert info.value.epoch == 1
