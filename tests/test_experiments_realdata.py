"""The experiments' targets on the real datasets (skipped unless JAXBATCH_DATA_DIR is set).
Smaller than the full runs whose results are in results/, the same code."""

import json
from pathlib import Path

import pytest

from jaxbatch.experiments import make_config
from jaxbatch.experiments import equality, input_scale, variance

RESULTS = Path(__file__).resolve().parent.parent / "results"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_equality_on_mnist_every_model(real_data_dir):
    # The two comparisons held to a target; float32 at the default precision is only reported (on a
    # CPU it is the float32 one again) and took a third of this test's time.
    result = equality.run(make_config("equality", data_dir=str(real_data_dir), repeats=1,
                                      comparisons=("float32", "float64")))
    assert result["config"]["dataset"] == "mnist"
    assert set(result["models"]) == {"mlp", "mlp_scratch", "cnn", "cnn_tanh", "lenet5", "fc_nobias"}
    for name, m in result["models"].items():
        assert m["float64"]["max_rel"] <= 1e-12, name
        assert m["float32"]["max_rel"] <= 1e-5, name
        assert m["note"] is None  # 28x28: every model takes MNIST as it is


def test_variance_slope_on_mnist(real_data_dir):
    dataset = "mnist"  # the full run (results/variance) covers fashion_mnist and cifar10 too
    config = make_config("variance", datasets=(dataset,), data_dir=str(real_data_dir),
                         batch_sizes=(1, 4, 16, 64, 256, 1024), samples=2048, min_repeats=16,
                         trace_examples=2000)
    d = variance.run(config)["datasets"][dataset]
    for point in variance.POINTS:
        assert -1.1 <= d[point]["with_replacement"]["slope"] <= -0.9, point
        assert d[point]["b_noise"] > 1


def test_input_scale_x255_diverges_on_cifar10(real_data_dir):
    result = input_scale.run(make_config("input-scale", data_dir=str(real_data_dir), epochs=1, grad_steps=10))
    rows = result["rows"]
    assert rows["ii"]["diverged"] is not None and rows["ii"]["diverged"]["epoch"] == 1
    # Row (i)'s one epoch is the first epoch of the published 20-epoch run (results/input-scale:
    # 0.3846, then 0.505 after 20; the recipe's full run is held to its target in
    # test_recipes_real). Within 2 points: that run was made with earlier code, and
    # float32 sums in another order move a first epoch by about a point (0.3776 measured now).
    published = json.loads((RESULTS / "input-scale" / "result.json").read_text())["rows"]["i"]["test_accuracy"][0]
    assert rows["i"]["diverged"] is None and rows["i"]["final_test_accuracy"] == pytest.approx(published, abs=0.02)
    hidden = next(iter(rows["i"]["first_steps"]["grad_norm"]))
    assert rows["ii"]["first_steps"]["grad_norm"][hidden][0] > 100 * rows["i"]["first_steps"]["grad_norm"][hidden][0]
