"""The clipping experiment's --quick run on digits, offline: mean of clipped
against clipped mean on one float64 batch, and SGD, clipping only and DP-SGD
at equal steps."""

import json
import math

import numpy as np
import pytest

from jaxbatch import privacy
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments import clipping, make_config, run_experiment
from jaxbatch.experiments.report import jsonable
from jaxbatch.precision import matmul_precision


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("clipping")
    result, paths = run_experiment("clipping", make_config("clipping", quick=True), out)
    return result, paths, out


def test_files_written_and_precision_recorded(quick):
    result, paths, out = quick
    assert sorted(p.name for p in paths) == sorted(p.name for p in out.iterdir()) == [
        "clipping_batch.png", "clipping_training.png", "result.json"]
    assert json.loads((out / "result.json").read_text()) == jsonable(result)
    assert result["precision"] == matmul_precision()


@pytest.mark.parametrize("point", clipping.POINTS)
def test_mean_of_clipped_equals_clipped_mean_exactly_when_c_reaches_the_largest_norm(quick, point):
    b = quick[0]["batch"][point]
    norms = np.array(b["norms"])
    assert len(norms) == quick[0]["config"]["batch_size"] and b["max_norm"] == norms.max()
    # ||g|| <= (1/B) sum ||g_i|| <= max ||g_i||: so clip(mean) needs nothing more than C >= max ||g_i||.
    assert b["mean_grad_norm"] <= norms.mean() <= b["max_norm"]
    sweep = b["sweep"]
    clips = [s["clip"] for s in sweep]
    assert clips == sorted(clips) and clips[0] <= b["mean_grad_norm"]
    assert b["max_norm"] in clips and clips[-1] > b["max_norm"]
    above = [s for s in sweep if s["clip"] >= b["max_norm"]]
    below = [s for s in sweep if s["clip"] < b["max_norm"]]
    assert len(above) >= 2 and len(below) >= 5
    for s in above:  # nothing clipped: equal to float64 rounding, not merely close
        assert s["clipped_fraction"] == 0 and s["rel_diff"] <= 1e-12 and s["cosine"] == pytest.approx(1, abs=1e-12)
    for s in below:  # at least the largest example is scaled down: they differ
        assert s["clipped_fraction"] > 0 and s["rel_diff"] > 1e-6
    assert below[0]["rel_diff"] > 0.1  # small C: clipping changes the gradient by its own size
    fractions = [s["clipped_fraction"] for s in sweep]
    assert all(a >= b_ for a, b_ in zip(fractions, fractions[1:]))  # monotone in C
    assert fractions[0] >= 0.9
    assert b["coincide_exactly_above_max_norm"] is True
    q = b["norm_quantiles"]
    assert q["0"] == norms.min() and q["1"] == norms.max() and q["0"] <= q["0.5"] <= q["1"]


def test_training_at_equal_steps_and_dp_sgds_epsilon(quick):
    result = quick[0]
    c, t = result["config"], result["training"]
    runs = t["runs"]
    assert list(runs) == list(clipping.RUNS)
    steps = {name: [h["steps"] for h in r["history"]] for name, r in runs.items()}
    assert steps["sgd"] == steps["clip"] == steps["dp_sgd"] and steps["sgd"][-1] == t["steps"]
    assert len(steps["sgd"]) == c["epochs"]
    assert runs["sgd"]["epsilon"] is None and "clipped_fraction" not in runs["sgd"]["history"][-1]
    assert runs["clip"]["epsilon"] is None and 0 < runs["clip"]["history"][-1]["clipped_fraction"] <= 1
    eps = runs["dp_sgd"]["epsilon"]
    assert eps is not None and 0 < eps < math.inf
    assert eps == pytest.approx(privacy.epsilon(t["sampling_rate"], c["train_noise"], t["steps"], c["delta"]))
    epsilons = [h["epsilon"] for h in runs["dp_sgd"]["history"]]
    assert epsilons == sorted(epsilons)  # privacy spent only grows
    for r in runs.values():  # every run learns something in a few steps
        assert r["final_train_loss"] < r["history"][0]["train_loss"] and r["final_test_accuracy"] > 0.5


def test_summary_and_figures(quick):
    result = quick[0]
    text = clipping.summary(result)
    assert text.count("coincide exactly when C >= max||g_i||: yes") == 2
    assert "DP-SGD" in text and "(= max ||g_i||)" in text
    assert set(clipping.figures(result)) == {"clipping_batch", "clipping_training"}


@pytest.mark.parametrize("setting", [dict(clip_points=1), dict(low_quantile=1.0), dict(high_factor=1.0),
                                     dict(train_noise=0.0), dict(dp_chunk=0), dict(batch_size=1)])
def test_bad_settings_are_refused_before_any_work(setting):
    with pytest.raises(JaxbatchError):
        clipping.validate(make_config("clipping", quick=True, **setting))
