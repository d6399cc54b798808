"""Per-example clipping against a direct loop (float64), DP-SGD's noise and
accounting, and the gradient noise scale measured during training."""

import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import data, devices, ghost, losses, optim, privacy, train
from jaxbatch.errors import JaxbatchError
from jaxbatch.data.inputs import input_numbers
from jaxbatch.models import get_model, init_params
from jaxbatch.precision import enable_x64, relative_difference
from jaxbatch import Interrupted, TrainConfig, train_and_evaluate
from jaxbatch.noise_scale import terms as noise_scale_terms


def setup(name, b=6, shape=(8, 8, 1)):
    model = get_model(name)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    rng = np.random.default_rng(1)
    return model, params, rng.random((b, *shape)), rng.integers(0, 10, b)


@functools.partial(jax.jit, static_argnums=0)
def example_cross_entropy(apply_fn, params, x, y):
    return -jax.nn.log_softmax(apply_fn(params, x))[y]


def check_by_finite_differences(apply_fn, params, x, y, g, directions=3):
    """g against central differences of the example's cross-entropy (written
    here from the model's logits, float64) along random unit directions v:
    (l(theta + h v) - l(theta - h v)) / 2h = g . v + O(h^2), within 1e-6 ||g||."""
    loss = lambda p: float(example_cross_entropy(apply_fn, p, x, y))  # noqa: E731
    leaves, structure = jax.tree.flatten(params)
    rng, h = np.random.default_rng(3), 1e-5
    for _ in range(directions):
        v = [rng.standard_normal(a.shape) for a in leaves]
        size = np.sqrt(sum(np.sum(a**2) for a in v))
        v = [a / size for a in v]
        step = lambda sign: jax.tree.unflatten(structure, [a + sign * h * d for a, d in zip(leaves, v)])  # noqa: E731
        slope = (loss(step(1)) - loss(step(-1))) / (2 * h)
        dot = sum(float(np.sum(a * d)) for a, d in zip(jax.tree.leaves(g), v))
        assert abs(slope - dot) <= 1e-6 * np.sqrt(sum(np.sum(a**2) for a in jax.tree.leaves(g)))


def loop_clipped_mean(model, params, xs, ys, clip):
    """The definition, one example at a time in NumPy: g_i, ||g_i||, scale,
    average. Each g_i is first checked by finite differences (float64), so
    the reference does not rest on the gradient code it is compared with."""
    grad_one = losses.example_grad_fn(model.apply)
    total, norms = None, []
    for x, y in zip(xs, ys):
        g = jax.tree.map(np.asarray, grad_one(params, x, y))
        check_by_finite_differences(model.apply, params, x, y, g)
        norm = np.sqrt(sum(np.sum(a**2) for a in jax.tree.leaves(g)))
        norms.append(norm)
        scaled = jax.tree.map(lambda a: a * min(1.0, clip / norm), g)
        total = scaled if total is None else jax.tree.map(np.add, total, scaled)
    return jax.tree.map(lambda t: t / len(ys), total), np.array(norms)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
# auto: ghost norms and one reweighted backward pass; vmap: every g_i formed,
# whole or 4 at a time (a chunk of 4 and a padded one of 2).
@pytest.mark.parametrize("method,chunk", [("auto", None), ("vmap", None), ("vmap", 4)])
def test_clipped_mean_is_the_per_example_loop_in_float64(name, method, chunk):
    with enable_x64():
        model, params, xs, ys = setup(name)
        _, norms = loop_clipped_mean(model, params, xs, ys, 1.0)
        clip = float(np.median(norms))  # half the examples clipped, half not
        expected, norms = loop_clipped_mean(model, params, xs, ys, clip)
        got, got_norms = jax.jit(lambda p, x, y: losses.clipped_mean_grad(model.apply, p, x, y, clip, chunk=chunk,
                                                                  method=method))(
            params, xs, ys)
    assert relative_difference(got, expected) <= 1e-12
    np.testing.assert_allclose(got_norms, norms, rtol=1e-12)


def test_clipping_is_where_the_ways_part():
    with enable_x64():
        model, params, xs, ys = setup("mlp")
        mean = losses.mean_per_example_grads(model.apply, params, xs, ys)
        _, norms = losses.clipped_mean_grad(model.apply, params, xs, ys, 1.0)
        # C below the norms: the mean of clipped gradients is not the clipped mean.
        small = float(norms.min()) / 2
        clipped, _ = losses.clipped_mean_grad(model.apply, params, xs, ys, small)
        mean_norm = np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree.leaves(mean)))
        clip_of_mean = jax.tree.map(lambda a: a * min(1.0, small / mean_norm), mean)
        assert relative_difference(clipped, clip_of_mean) > 1e-2
        # C at or above every norm: nothing is clipped, both are the plain mean gradient.
        unclipped, _ = losses.clipped_mean_grad(model.apply, params, xs, ys, float(norms.max()))
        assert relative_difference(unclipped, mean) <= 1e-12


train_step = jax.jit(train.train_step, static_argnames=("grad_fn", "optimizer"))


def added_noise(sampling: str, seed: int, steps, clip: float, sigma: float, batch: int):
    """The noise real DP-SGD steps add, in units of their stated std: each
    step of `steps` taken from the same state with sigma and with sigma 0
    (train.train_step, its gradient, noise and optimiser composed by train.py
    from the settings; sgd, lr 1, no momentum, so the update is -g_tilde),
    the difference divided by sigma C / B for Poisson batches, by sigma C /
    (the batch's real examples) for shuffled ones. Returns those (steps, P)
    draws and the leaves' sizes."""
    config = TrainConfig(batch_size=batch, dp_clip=clip, dp_noise=sigma, dp_sampling=sampling, seed=seed,
                         lr=1.0, momentum=0.0)
    model = get_model(config.model)
    train_ds, _ = data.prepare_data(config.dataset, model, batch)
    n = len(train_ds)
    parts, optimizer_numbers = train.optimizer_parts(config, total_steps=max(steps) + 1)
    numbers = train.step_numbers(config, train_ds, optimizer_numbers)
    quiet = {**numbers, "dp": {**numbers["dp"], "noise": np.zeros_like(numbers["dp"]["noise"])}}
    grad_fn = train.gradient_fn(config, model, devices.data_mesh(1))
    params = init_params(model, train.init_key(seed), train_ds.image_shape)
    state = (params, optim.chain(parts, numbers).init(params))
    slots = privacy.batch_slots(batch, n) if sampling == "poisson" else None
    idx, weights = train.batches_of(config, 1, 0, n, max(steps) + 1, slots, 8)
    draws = []
    for t in steps:
        one = (train_ds.images[idx[t]], train_ds.labels[idx[t]], weights[t], np.int32(t))
        noisy, plain = (flat(train_step(state, one, given, grad_fn=grad_fn, optimizer=parts)[0][0])
                        for given in (numbers, quiet))
        divisor = batch if sampling == "poisson" else weights[t].sum()
        draws.append((plain - noisy) / (sigma * clip / divisor))
    return np.array(draws), [a.size for a in jax.tree.leaves(params)]


def flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("sampling,steps", [
    ("poisson", range(6)),
    # digits' 1347 examples in batches of 64: 21 full ones, then step 21 of 3 examples, divided by 3.
    ("shuffle", [0, 1, 2, 3, 21]),
])
def test_a_training_step_adds_noise_of_std_sigma_c_over_b(sampling, steps):
    clip, sigma, batch = 0.5, 1.7, 64  # C != 1: a noise missing its factor C is off by 2
    (first, sizes), (second, _) = (added_noise(sampling, seed, steps, clip, sigma, batch) for seed in (0, 1))
    draws = np.concatenate([first, second])
    p = draws.shape[1]  # the mlp's 19,210 parameters on digits
    # Every step's noise, alone: mean 0 and std 1 in units of sigma C / B, within
    # 4 standard errors (the sample std's is 1/sqrt(2P), 0.5%). Per step, so a
    # Poisson divisor that followed the batch's drawn size (about 12% off) fails.
    for z in draws:
        assert abs(z.mean()) < 4 / np.sqrt(p)
        assert abs(z.std() - 1) < 4 / np.sqrt(2 * p)
    # Every parameter array gets its share (10 output biases too).
    for leaf in np.split(draws, np.cumsum(sizes)[:-1], axis=1):
        assert abs(leaf.std() - 1) < 4 / np.sqrt(2 * leaf.size)
    # Independent across steps and seeds: every pair of the (2 seeds x steps)
    # draws uncorrelated, within 4 standard errors of a correlation (1/sqrt(P)).
    corr = np.corrcoef(draws)
    assert np.all(np.abs(corr[~np.eye(len(draws), dtype=bool)]) < 4 / np.sqrt(p))


def gaussian_delta(eps: float, sigma: float) -> float:
    """The exact delta(eps) of one Gaussian mechanism of sensitivity 1 and
    std sigma (Balle & Wang 2018, Theorem 8)."""
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)


def test_accounting_matches_the_librarys_own_example_and_the_exact_gaussian():
    # dp_accounting's rdp_privacy_accountant_test: noise 4.530877117, sampled
    # always (q = 1), one step, is (1, 1e-6)-DP by RDP. Its test uses a finer grid
    # of RDP orders than the accountant's default, so ours is that bound or a bit above.
    assert 1.0 <= privacy.epsilon(1.0, 4.530877117, 1, 1e-6, "rdp") < 1.03
    # The PLD accountant is tight: for one unsampled Gaussian it gives the exact
    # epsilon, where delta(eps) of the closed form is 1e-6 (0.927), to its discretisation.
    pld = privacy.epsilon(1.0, 4.530877117, 1, 1e-6, "pld")
    low, high = 0.0, 2.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_delta(mid, 4.530877117) > 1e-6 else (low, mid)
    assert high <= pld <= high * 1.005
    # Both default to PLD; PLD is never above RDP.
    assert privacy.epsilon(1.0, 4.530877117, 1, 1e-6) == pld
    assert privacy.epsilon(0.01, 1.1, 1000, 1e-5, "pld") < privacy.epsilon(0.01, 1.1, 1000, 1e-5, "rdp")
    # More steps cost more; more noise costs less.
    assert privacy.epsilon(0.01, 1.1, 2000, 1e-5) > privacy.epsilon(0.01, 1.1, 1000, 1e-5)
    assert privacy.epsilon(0.01, 2.0, 1000, 1e-5) < privacy.epsilon(0.01, 1.1, 1000, 1e-5)


def test_private_training_reports_epsilon_and_resumes_exactly(tmp_path):
    config = dict(epochs=2, batch_size=32, steps_per_chunk=10, dp_clip=1.0, dp_noise=1.0)
    full = train_and_evaluate(TrainConfig(**config, out=str(tmp_path / "full")))
    eps = [h["epsilon"] for h in full.history]
    assert eps[0] < eps[1] == pytest.approx(privacy.epsilon(32 / 1347, 1.0, 86, 1e-5))  # PLD
    assert all(h["epsilon_rdp"] > h["epsilon"] for h in full.history)  # RDP beside it, looser
    # What the epsilon does not cover is not released...
    for h in full.history:
        assert not set(h) & {"train_loss", "train_accuracy", "clipped_fraction", "mean_grad_norm", "nonprivate"}
        # Poisson batches: an epoch's 43 steps see Binomial(43 N, B/N) examples, within 4 standard deviations.
        assert abs(h["examples_seen"] - 43 * 32) < 4 * math.sqrt(43 * 32 * (1 - 32 / 1347))
    # The test accuracy (released: it reads no training data) is the final parameters' own.
    test = data.load("digits", "test")
    _, accuracy = train.evaluate(full.params, test.images, test.labels, input_numbers(),
                                 apply_fn=get_model("mlp").apply, batch_size=1000)
    assert full.history[-1]["test_accuracy"] == accuracy
    # ... unless asked for, and then marked; asking changes nothing of the run.
    shown = train_and_evaluate(TrainConfig(**config, dp_nonprivate_metrics=True))
    assert all(0 < h["nonprivate"]["clipped_fraction"] <= 1 and h["nonprivate"]["mean_grad_norm"] > 0
               and "train_loss" not in h for h in shown.history)
    assert relative_difference(shown.params, full.params) == 0
    little_noise = train_and_evaluate(TrainConfig(**{**config, "dp_noise": 0.3}))
    assert relative_difference(little_noise.params, full.params) > 1e-3  # the noise is really added
    asked = []
    with pytest.raises(Interrupted):
        train_and_evaluate(TrainConfig(**config, out=str(tmp_path / "cut")),
                           stop_requested=lambda: "SIGINT" if asked.append(1) or len(asked) == 3 else None)
    train_and_evaluate(TrainConfig(**config, out=str(tmp_path / "cut"), resume=True))
    assert (tmp_path / "cut" / "params.msgpack").read_bytes() == (tmp_path / "full" / "params.msgpack").read_bytes()


def test_noise_scale_estimators_follow_mccandlish():
    with enable_x64():
        model, params, xs, ys = setup("mlp", b=8)
        mean = losses.batched_grad(model.apply, params, xs, ys)
        extra = noise_scale_terms(params, xs, ys, np.ones(8), mean, apply_fn=model.apply)
        g = losses.per_example_grads(model.apply, params, xs, ys)
        flat = np.concatenate([np.asarray(a).reshape(8, -1) for a in jax.tree.leaves(g)], axis=1)
        small, big = np.mean(np.sum(flat**2, axis=1)), np.sum(flat.mean(0) ** 2)
        np.testing.assert_allclose(float(extra["ns_g2"]), (8 * big - small) / 7, rtol=1e-10)
        np.testing.assert_allclose(float(extra["ns_trace"]), (small - big) / (1 - 1 / 8), rtol=1e-10)
        # Unbiased for tr(S): the per-example covariance's trace, with the sample's 1/(B-1).
        np.testing.assert_allclose(float(extra["ns_trace"]), np.sum(np.var(flat, axis=0, ddof=1)), rtol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet5", "fc_nobias", "mlp_scratch"])
def test_ghost_norms_are_the_per_example_gradient_norms(name):
    # Dense layers by the outer-product formula, the rest (convolutions, plain
    # arrays) by vmap: against the norms of per-example gradients formed whole.
    shape = {"lenet5": (32, 32, 1), "fc_nobias": (32, 32, 3)}.get(name, (8, 8, 1))
    with enable_x64():
        model, params, xs, ys = setup(name, b=5, shape=shape)
        ghost_sq, ghost_losses, _ = jax.jit(lambda p, x, y: losses.per_example_sq_norms(model.apply, p, x, y))(
            params, xs, ys)
        plain_sq, plain_losses, _ = losses.per_example_sq_norms(model.apply, params, xs, ys, method="vmap")
    np.testing.assert_allclose(ghost_sq, plain_sq, rtol=1e-12)
    np.testing.assert_allclose(ghost_losses, plain_losses, rtol=1e-12)


class ConvShapes(nn.Module):
    """Convolutions of every geometry ghost.py unfolds (strides, SAME, VALID,
    explicit and uneven padding, kernel dilation, 1-D, no bias), big and
    small outputs so both norm formulas run, and two it must leave to vmap
    (feature groups, circular padding)."""
    leave_to_vmap: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))  # 8x8 -> 4x4: T = 16, P C = 144
        x = nn.relu(nn.Conv(6, (2, 3), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2))(x))
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID", use_bias=False)(x))  # T = 2 x 2: 2T^2 < P C
        if self.leave_to_vmap:
            x = nn.Conv(12, (1, 1), feature_group_count=3)(x)
            x = nn.Conv(12, (3, 3), padding="CIRCULAR")(x)
        x = nn.Conv(5, (3,), strides=2, padding=1)(x.reshape(*x.shape[:-3], -1, x.shape[-1]))  # 1-D
        return nn.Dense(10)(x.reshape(*x.shape[:-2], -1))  # one example or a batch, like jaxbatch's models


def ghost_against_the_loop(model, xs, ys, init_seed: int, unfolded: bool):
    """Whether ghost.py unfolds every layer of `model` (`unfolded`), then its
    per-example norms and its clipped mean (C at the median norm) against the
    float64 loop, to 1e-12. Returns (params, ||g_i||^2) for further checks."""
    with enable_x64():
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), model.init(jax.random.key(init_seed), xs[:1]))
        assert ghost.covers_all(model.apply, params, xs) is unfolded
        auto_sq, _, _ = jax.jit(lambda p, x, y: losses.per_example_sq_norms(model.apply, p, x, y))(params, xs, ys)
        _, norms = loop_clipped_mean(model, params, xs, ys, 1.0)
        clip = float(np.median(norms))
        expected, _ = loop_clipped_mean(model, params, xs, ys, clip)
        got, _ = jax.jit(lambda p, x, y: losses.clipped_mean_grad(model.apply, p, x, y, clip))(params, xs, ys)
    np.testing.assert_allclose(np.sqrt(auto_sq), norms, rtol=1e-12)
    assert relative_difference(got, expected) <= 1e-12
    return params, auto_sq


@pytest.mark.parametrize("leave_to_vmap", [False, True])
def test_convolution_norms_and_clipped_sums_for_every_geometry(leave_to_vmap):
    model = ConvShapes(leave_to_vmap)
    rng = np.random.default_rng(2)
    xs, ys = rng.standard_normal((5, 8, 8, 3)), rng.integers(0, 10, 5)
    params, auto_sq = ghost_against_the_loop(model, xs, ys, 1, unfolded=not leave_to_vmap)
    with enable_x64():
        plain_sq, _, _ = losses.per_example_sq_norms(model.apply, params, xs, ys, method="vmap")
    np.testing.assert_allclose(auto_sq, plain_sq, rtol=1e-12)


class OneOddLayer(nn.Module):
    """A small conv net with one layer of a kind ghost.py must judge: "twice"
    (one Dense applied on two inputs, whose gradient is a sum over its calls),
    "input_dilation" and "mask" (Conv options the unfolding ignores), all three
    left to vmap; "same_lower" (padding put low when uneven), unfolded."""
    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "input_dilation":
            x = nn.Conv(3, (2, 2), padding=((1, 1), (1, 1)), input_dilation=2)(x)
        elif self.kind == "mask":
            x = nn.Conv(3, (3, 3), mask=jnp.ones((3, 3, x.shape[-1], 3)).at[2].set(0))(x)  # its last row masked
        else:
            x = nn.Conv(3, (2, 2), strides=1, padding="SAME_LOWER" if self.kind == "same_lower" else "SAME")(x)
        x = nn.relu(x).reshape(*x.shape[:-3], -1)
        head = nn.Dense(10)
        if self.kind == "twice":
            shared = nn.Dense(x.shape[-1])
            x = shared(nn.tanh(shared(x)))
        return head(x)


@pytest.mark.parametrize("kind,unfolded", [("twice", False), ("input_dilation", False), ("mask", False),
                                           ("same_lower", True)])
def test_layers_ghost_norms_leave_to_vmap_still_clip_exactly(kind, unfolded):
    # A layer the formulas do not hold for must send the model to vmap (every
    # g_i formed), not give wrong norms; SAME_LOWER is unfolded like SAME.
    rng = np.random.default_rng(4)
    xs, ys = rng.standard_normal((4, 5, 5, 2)), rng.integers(0, 10, 4)
    ghost_against_the_loop(OneOddLayer(kind), xs, ys, 2, unfolded)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_pass_gives_the_gradient_and_the_norms_for_dense_models(reduction):
    # The mlp is all Dense layers: the step's own backward pass gives every ||g_i||.
    with enable_x64():
        model, params, xs, ys = setup("mlp", b=6)
        weights = np.array([1.0, 1, 1, 1, 1, 0])  # the last example is padding
        grads, loss, _, sq = ghost.grads_and_sq_norms(model.apply, params, xs, ys, weights, losses.cross_entropy,
                                                      reduction)
        expected = losses.per_example_sq_norms(model.apply, params, xs, ys, method="vmap")[0]
        loss_ref, grads_ref = jax.value_and_grad(
            lambda p: losses.vmap_loss(model.apply, p, xs, ys, weights, reduction=reduction))(params)
    np.testing.assert_allclose(sq[:5], expected[:5], rtol=1e-12)
    assert float(sq[5]) == 0.0
    assert relative_difference(grads, grads_ref) <= 1e-12 and abs(float(loss - loss_ref)) <= 1e-12
    assert ghost.covers_all(model.apply, params, xs, dense_only=True)
    assert not ghost.covers_all(get_model("cnn").apply, setup("cnn")[1], xs, dense_only=True)


def test_logging_the_noise_scale_trains_the_same_run():
    plain = train_and_evaluate(TrainConfig(epochs=2))
    logged = train_and_evaluate(TrainConfig(epochs=2, log_noise_scale=True, noise_scale_every=3))
    assert relative_difference(logged.params, plain.params) <= 1e-5  # per-example mean = batched, to rounding
    # Steps are numbered across epochs: 0, 3, ..., 42 in epoch 1 (43 steps), 45, ..., 84 in epoch 2.
    assert [h["noise_scale_steps"] for h in logged.history] == [15, 14]
    for h in logged.history:
        assert h["noise_scale"] == pytest.approx(h["noise_scale_trace"] / h["noise_scale_g2"])
        assert 1 < h["noise_scale"] < 1e4
    # The cnn's convolutions take the other path: norms on every k-th step only, in a separate pass.
    cnn = train_and_evaluate(TrainConfig(model="cnn", epochs=1, log_noise_scale=True, noise_scale_every=10))
    assert cnn.history[0]["noise_scale_steps"] == 5 and cnn.history[0]["noise_scale"] > 0


@pytest.mark.parametrize("change,setting", [
    (dict(dp_clip=0.0), "dp_clip"), (dict(dp_clip=-1.0), "dp_clip"),
    (dict(dp_clip=1.0, dp_noise=-0.5), "dp_noise"), (dict(dp_noise=1.0), "dp_noise"),
    (dict(dp_clip=1.0, dp_noise=1.0, dp_delta=0.0), "dp_delta"),
    (dict(dp_clip=1.0, dp_noise=1.0, dp_delta=1.5), "dp_delta"),
    (dict(dp_clip=1.0, dp_noise=0.5, dp_epsilon=1.0), "dp_epsilon"),  # the accountant cannot get there
    (dict(dp_clip=1.0, loss="batched"), "loss"),
    (dict(dp_clip=1.0, log_noise_scale=True), "log_noise_scale"),
])
def test_bad_private_settings_are_one_line_and_write_nothing(tmp_path, change, setting):
    with pytest.raises(JaxbatchError) as err:
        train_and_evaluate(TrainConfig(out=str(tmp_path / "run"), **change))
    assert err.value.setting == setting and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_without_dp_accounting_epsilon_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import dp_accounting then raises ImportError
    with pytest.raises(JaxbatchError, match="privacy accounting needs dp-accounting: pip install") as err:
        privacy.epsilon(0.01, 1.0, 10, 1e-5)
    assert "\n" not in str(err.value)


def test_calibration_at_the_ends_of_its_range():
    # A budget the least noise already meets: the least noise, not a bisection past it.
    assert privacy.calibrate_noise(0.01, 10, 1e-5, 100.0) == privacy.MIN_NOISE
    # A budget not even the most noise meets: one line naming the setting.
    tiny = privacy.epsilon(1.0, privacy.MAX_NOISE, 10, 1e-5) / 2
    with pytest.raises(JaxbatchError, match=f"no noise multiplier up to {privacy.MAX_NOISE:g}") as err:
        privacy.calibrate_noise(1.0, 10, 1e-5, tiny)
    assert err.value.setting == "dp_epsilon"


def test_a_budget_without_a_clip_norm_is_refused(tmp_path):
    with pytest.raises(JaxbatchError, match="needs --dp-clip") as err:
        train_and_evaluate(TrainConfig(dp_epsilon=2.0, out=str(tmp_path / "run")))
    assert err.value.setting == "dp_epsilon" and not (tmp_path / "run").exists()
