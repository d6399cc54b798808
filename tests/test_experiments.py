"""Every experiment's --quick run on digits, offline, with assertions on its numbers."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.experiments import make_config, run_experiment
from jaxbatch.experiments import equality, input_scale, lr_scaling, variance
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments.report import jsonable
from jaxbatch.losses import loop_grad
from jaxbatch.models import get_model
from jaxbatch.precision import matmul_precision


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(name, **settings) -> (result, folder): each quick experiment run once
    for the module, with `settings` over its quick preset."""
    cache = {}

    def get(name, **settings):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            result, paths = run_experiment(name, make_config(name, quick=True, **settings), out)
            assert sorted(p.name for p in paths) == sorted(p.name for p in out.iterdir())
            assert json.loads((out / "result.json").read_text()) == jsonable(result)
            assert result["precision"] == matmul_precision()  # every result file says what it ran at
            cache[name] = (result, out)
        return cache[name]

    return get


def pngs(out):
    return sorted(p.name for p in out.glob("*.png"))


# ---- equality ---------------------------------------------------------------


def test_equality_every_pair_of_ways_agrees_in_float32_and_float64(quick):
    # One dense and one convolutional model: tests/test_losses.py checks the
    # other models' vmap, batched and per-example gradients to the same targets.
    result, out = quick("equality", models=("mlp", "cnn"))
    assert set(result["models"]) == {"mlp", "cnn"}
    # The fifth way, data-parallel, on the devices this process has (tests/test_equality_devices.py: 4).
    dp = result["data_parallel"]
    assert dp["device_count"] == jax.device_count() and dp["ks"][0] == 1
    assert all(jax.device_count() % k == 0 and 50 % k == 0 for k in dp["ks"])
    for name, m in result["models"].items():
        for comparison, target in (("float32", 1e-5), ("float64", 1e-12)):
            assert m[comparison]["precision"]["matmul_precision"] == "highest"  # the claim: true float32 products
            pairs = m[comparison]["pairs"]
            assert len(pairs) == 6 + 4 * len(dp["ks"])  # the 4 ways, every pair; each K against each of them
            assert all(m[comparison]["data_parallel"][str(k)]["max_rel"] <= target for k in dp["ks"])
            for per_param in pairs.values():
                for d in per_param.values():
                    assert d["max_rel"] <= target, (name, comparison, d)
            assert m[comparison]["within_target"] is True
        # float64 agrees far more closely than float32: the differences are rounding.
        assert m["float64"]["max_rel"] < m["float32"]["max_rel"] / 1e3, name
        assert m["float32"]["max_rel"] > 0, name  # different summation orders do round differently
        assert m["float64"]["sum_vs_mean_step_max_abs"] < 1e-12
        # Reported beside the claim, not held to it: float32 at the backend's default precision.
        default = m["float32_default"]
        assert default["precision"]["matmul_precision"] == "default" and default["within_target"] is None
        assert len(default["pairs"]) == 6 + 4 * len(dp["ks"])
        if jax.default_backend() == "cpu":  # the default is float32 here: the same numbers
            assert default["max_rel"] == m["float32"]["max_rel"], name
        assert all(t > 0 for t in default["seconds"].values())
        assert m["note"] is None and m["input_shape"][1:] == [8, 8, 1]
    assert result["all_within_target"]
    assert set(result["comparisons"]) == {"float32", "float64", "float32_default"}
    assert result["comparisons"]["float32_default"]["target"] is None
    assert "TF32" in result["precision_note"] and "bfloat16" in result["precision_note"]
    text = equality.summary(result)
    assert "f32 rel default" in text and "not held to the target" in text
    assert "Data-parallel, as in text D (understanding batch size)" in text and "are one batch of K*b" in text and "K-fold fewer steps" in text
    assert pngs(out) == ["equality.png"]


def test_equality_comparisons_are_checked():
    for comparisons, message in (((), "comparisons must list at least one comparison; choose from: float32, "),
                                 (("float16",), "unknown comparison 'float16'; choose one of: float32, ")):
        with pytest.raises(JaxbatchError, match=message):
            equality.validate(make_config("equality", quick=True, comparisons=comparisons))


def test_equality_enlarges_digits_to_lenet5s_size():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    batch, note = equality.model_batch(get_model("lenet5"), images)
    assert batch.shape == (2, 32, 32, 1) and "enlarged 4x" in note
    np.testing.assert_array_equal(batch[:, ::4, ::4], images)  # every pixel repeated 4x4
    same, none = equality.model_batch(get_model("mlp"), images)
    assert same is images and none is None


def test_loop_grad_is_one_example_at_a_time():
    # jaxbatch.losses.loop_grad, the experiment's "loop" way.
    calls = []

    def grad_one(params, x, y):
        calls.append(x.shape)
        return {"w": np.full(2, float(y), np.float32)}

    g = loop_grad(grad_one, None, np.zeros((4, 3)), np.array([1, 2, 3, 6]))
    assert calls == [(3,)] * 4
    np.testing.assert_allclose(g["w"], [3.0, 3.0])


def test_relative_difference_uses_the_array_scale():
    a = {"w": np.array([1.0, 1e-9, 2.0])}
    b = {"w": np.array([1.0, 2e-9, 2.5])}
    (diff, rel), = equality.differences(a, b).values()
    assert diff == pytest.approx(0.5)
    assert rel == pytest.approx(0.5 / 2.5)  # not 1e-9 / 2e-9 = 0.5 from the tiny entry


# ---- variance ---------------------------------------------------------------


def test_variance_falls_as_one_over_b(quick):
    result, out = quick("variance")
    d = result["datasets"]["digits"]
    for point in variance.POINTS:
        p = d[point]
        for sampling in variance.SAMPLING:
            assert -1.1 <= p[sampling]["slope"] <= -0.9, (point, sampling, p[sampling]["slope"])
            ratios = np.array(p[sampling]["measured_over_theory"])
            assert 0.9 <= np.median(ratios) <= 1.1
        assert p["b_noise"] == pytest.approx(p["trace_sigma"] / p["grad_norm_sq"])
        assert p["trace_sigma_from_samples"] == pytest.approx(p["trace_sigma"], rel=0.1)
    # Without replacement the largest batch (1024 of 1347) has far less variance.
    w, wo = d["init"]["with_replacement"]["measured"][-1], d["init"]["without_replacement"]["measured"][-1]
    assert wo < 0.5 * w
    assert "B_noise" in d["interpretation"]
    assert pngs(out) == ["variance_digits.png"]


def test_gradient_moments_match_brute_force():
    from jaxbatch.losses import per_example_grads
    from jaxbatch.models import get_model
    from jaxbatch import init_key, init_params

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=37).astype(np.int32)
    model = get_model("mlp_scratch")
    params = init_params(model, init_key(0), (8, 8, 1))
    # A chunk that does not divide 37: the wrapped-around last chunk must weigh 0.
    g, tr_sigma, m = variance.make_gradient_moments(model.apply, images, labels, chunk=10, examples=100,
                                                    seed=0)(params)
    assert m == 37
    grads = per_example_grads(model.apply, params, jnp.asarray(images / 255.0, jnp.float32), labels)
    flat = np.concatenate([np.asarray(x).reshape(37, -1) for x in jax.tree.leaves(grads)], axis=1)
    np.testing.assert_allclose(g, flat.mean(0), rtol=1e-4, atol=1e-9)
    expected = np.mean(np.sum((flat - flat.mean(0)) ** 2, axis=1))
    assert tr_sigma == pytest.approx(expected, rel=1e-4)


def test_batches_without_replacement_have_distinct_examples():
    idx = variance.draw_batches(np.random.default_rng(0), 20, 20, 5, "without_replacement")
    assert idx.shape == (5, 20)
    assert all(sorted(row) == list(range(20)) for row in idx)


def test_fit_slope_recovers_a_power_law():
    sizes = np.array([1, 2, 4, 8, 16])
    slope, intercept = variance.fit_slope(sizes, 3.0 / sizes)
    assert slope == pytest.approx(-1.0)
    assert math.exp(intercept) == pytest.approx(3.0)


# ---- input-scale ------------------------------------------------------------


def test_weights_over_255_keep_the_hidden_activations():
    # Row (iv): W1 / 255 applied to 255 x is W1 x, to float32 rounding; the logits are row (i)'s / 255.
    config = make_config("input-scale", quick=True)
    model = get_model(config.model)
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    outputs = {}
    for row, scale in (("i", 1.0), ("iv", 255.0)):
        params = input_scale.row_params(input_scale.row_config(config, row), row, x.shape[1:])
        logits, state = model.apply(params, x * scale, capture_intermediates=True)
        outputs[row] = logits, state["intermediates"]["hidden"]["__call__"][0]
    np.testing.assert_allclose(np.maximum(outputs["iv"][1], 0), np.maximum(outputs["i"][1], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["iv"][0] * 255, outputs["i"][0], rtol=1e-5, atol=1e-6)


def test_input_scale_shows_why_x255_fails(quick):
    result, out = quick("input-scale")
    rows = result["rows"]
    assert list(rows) == ["i", "ii", "iii", "iv", "v", "vi"]
    acc = {row: r["final_test_accuracy"] for row, r in rows.items()}
    assert acc["i"] >= 0.85 and acc["vi"] >= 0.85
    # (ii) does not train: it diverges, or every output dies and it sits at chance.
    ii = rows["ii"]
    assert ii["diverged"] is not None or acc["ii"] <= 0.15
    assert [z for z in ii["first_steps"]["zero_output_fraction"] if z is not None][-1] == 1.0
    assert rows["i"]["first_steps"]["zero_output_fraction"][-1] < 0.5
    # x255 makes the first gradients hundreds of times larger...
    first = {row: {k: v[0] for k, v in r["first_steps"]["grad_norm"].items()} for row, r in rows.items()}
    for layer in first["i"]:
        assert first["ii"][layer] > 100 * first["i"][layer]
        # ...unless the initial weights are scaled down by the same 255: the same hidden
        # activations (test_weights_over_255_keep_the_hidden_activations), logits / 255, so
        # gradients that differ only through softmax(z / 255) against softmax(z).
        assert first["iv"][layer] == pytest.approx(first["i"][layer], rel=0.25)
    assert acc["iii"] >= 0.5  # lr/255 trains
    assert rows["iv"]["lr"] == pytest.approx(0.02 / 255) and rows["v"]["lr"] == pytest.approx(0.02 / 255**2)
    assert set(result["text_c_outcome"]) == {"ii_diverges", "iii_trains_below_i", "iv_within_2_points_of_i"}
    assert pngs(out) == ["input_scale_accuracy.png", "input_scale_grad_norms.png"]


def test_outcome_checks_text_c():
    def row(acc, diverged=None):
        return {"final_test_accuracy": acc, "diverged": diverged}

    rows = {"i": row(0.50), "ii": row(None, {"epoch": 1}), "iii": row(0.43), "iv": row(0.49),
            "v": row(0.45), "vi": row(0.52)}
    assert all(input_scale.outcome(rows).values())
    rows["iv"] = row(0.45)
    rows["ii"] = row(0.10)
    assert input_scale.outcome(rows) == {"ii_diverges": False, "iii_trains_below_i": True,
                                         "iv_within_2_points_of_i": False}


# ---- lr-scaling -------------------------------------------------------------


def test_lr_scaling_rules_and_budgets(quick):
    result, out = quick("lr-scaling")
    runs = result["runs"]
    assert len(runs) == 2 * 3 * 2 * 2  # budgets x rules x warm-up x batch sizes
    acc = {(r["budget"], r["rule"], r["warmup"], r["batch_size"]): r["test_accuracy"] for r in runs}
    lrs = {(r["rule"], r["batch_size"]): r["lr"] for r in runs}
    assert lrs[("linear", 256)] == pytest.approx(0.1 * 8) and lrs[("sqrt", 256)] == pytest.approx(0.1 * 8**0.5)
    assert lrs[("constant", 256)] == pytest.approx(0.1)
    # Fixed epochs: a bigger batch takes 8x fewer steps; a constant lr falls behind, a scaled one less so.
    assert acc[("epochs", "constant", False, 256)] < acc[("epochs", "constant", False, 32)] - 0.1
    assert acc[("epochs", "linear", False, 256)] > acc[("epochs", "constant", False, 256)] + 0.1
    # Fixed steps: the bigger batch with the linear rule sees 8x the examples and does better.
    assert acc[("steps", "linear", False, 256)] > acc[("steps", "linear", False, 32)]
    steps = {(r["budget"], r["batch_size"]): r["steps"] for r in runs}
    assert steps[("steps", 32)] == steps[("steps", 256)] == 40
    assert steps[("epochs", 32)] == 4 * math.ceil(1347 / 32)
    warm = [r for r in runs if r["warmup"]]
    assert all(r["warmup_steps"] == round(0.2 * r["steps"]) for r in warm)
    assert pngs(out) == ["lr_scaling.png"]


def test_scaled_lr():
    assert lr_scaling.scaled_lr("linear", 0.1, 256, 1024) == pytest.approx(0.4)
    assert lr_scaling.scaled_lr("sqrt", 0.1, 256, 1024) == pytest.approx(0.2)
    assert lr_scaling.scaled_lr("constant", 0.1, 256, 1024) == pytest.approx(0.1)


# ---- activations ------------------------------------------------------------


def test_activations_derivatives_and_two_linear_layers(quick):
    result, out = quick("activations")
    for name, a in result["activations"].items():
        assert a["max_abs_error_vs_closed_form"] <= 1e-6, name
    grid = np.array(result["grid"])
    relu = np.array(result["activations"]["relu"]["derivative"])
    np.testing.assert_array_equal(relu, (grid > 0).astype(float))
    lin = result["two_linear_layers"]
    assert lin["float32"]["precision"]["matmul_precision"] == "highest"
    assert lin["float32"]["max_rel"] <= 1e-5
    assert lin["float64"]["max_rel"] <= 1e-12
    for dtype in lin:
        assert lin[dtype]["with_relu_max_rel"] > 0.1  # a ReLU between them breaks the equality
    assert lin["float64"]["W_shape"] == [64, 10]
    assert pngs(out) == ["activations.png"]
