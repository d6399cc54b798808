"""Per-example (vmap) and batched losses and gradients compute the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxbatch.precision import enable_x64

from jaxbatch import losses
from jaxbatch.models import MODELS, get_model
from test_models import SHAPES


def batch(name, b=8, dtype=jnp.float32):
    xs = jax.random.uniform(jax.random.key(1), (b,) + SHAPES[name], dtype)
    ys = jnp.arange(b) % 10
    return xs, ys


def max_rel(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_grads(model, params, xs, ys):
    g_vmap = jax.grad(lambda p: losses.vmap_loss(model.apply, p, xs, ys))(params)
    g_batched = jax.grad(lambda p: losses.batched_loss(model.apply, p, xs, ys))(params)
    g_mean_pe = losses.mean_per_example_grads(model.apply, params, xs, ys)
    return g_vmap, g_batched, g_mean_pe


@pytest.mark.parametrize("name", list(MODELS))
def test_vmap_and_batched_agree_float32(name):
    model = get_model(name)
    params = model.init(jax.random.key(0), jnp.zeros(SHAPES[name]))
    xs, ys = batch(name)
    l_vmap = losses.vmap_loss(model.apply, params, xs, ys)
    l_batched = losses.batched_loss(model.apply, params, xs, ys)
    np.testing.assert_allclose(l_vmap, l_batched, rtol=1e-5)
    g_vmap, g_batched, g_mean_pe = all_grads(model, params, xs, ys)
    assert max_rel(g_vmap, g_batched) < 1e-5
    assert max_rel(g_mean_pe, g_batched) < 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_vmap_and_batched_agree_float64(name):
    with enable_x64():
        model = get_model(name)
        params = model.init(jax.random.key(0), jnp.zeros(SHAPES[name], jnp.float64))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        xs, ys = batch(name, dtype=jnp.float64)
        g_vmap, g_batched, g_mean_pe = all_grads(model, params, xs, ys)
        assert jax.tree.leaves(g_batched)[0].dtype == jnp.float64
        assert max_rel(g_vmap, g_batched) < 1e-12
        assert max_rel(g_mean_pe, g_batched) < 1e-12


def test_per_example_grads_are_each_examples_own_gradient():
    model = get_model("mlp")
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs, ys = batch("mlp", 4)
    per_example = losses.per_example_grads(model.apply, params, xs, ys)
    for i in range(4):
        own = jax.grad(lambda p: losses.example_loss(model.apply, p, xs[i], ys[i]))(params)
        assert max_rel(jax.tree.map(lambda g: g[i], per_example), own) < 1e-6
    assert jax.tree.leaves(per_example)[0].shape[0] == 4


def test_cross_entropy_matches_log_softmax():
    z = jnp.array([1.0, -2.0, 0.5])
    assert np.isclose(losses.cross_entropy(z, 2), -jax.nn.log_softmax(z)[2], rtol=1e-6)


def test_padding_weights_leave_loss_and_gradient_of_the_real_examples():
    model = get_model("mlp")
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs, ys = batch("mlp", 6)
    padded_x = jnp.concatenate([xs, jnp.zeros((2,) + xs.shape[1:])])
    padded_y = jnp.concatenate([ys, jnp.zeros(2, ys.dtype)])
    w = jnp.array([1.0] * 6 + [0.0] * 2)
    for fn in (losses.vmap_loss, losses.batched_loss):
        g_real = jax.grad(lambda p: fn(model.apply, p, xs, ys))(params)
        g_pad = jax.grad(lambda p: fn(model.apply, p, padded_x, padded_y, w))(params)
        assert max_rel(g_pad, g_real) < 1e-5


def test_sum_reduction_is_batch_size_times_mean():
    model = get_model("mlp")
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs, ys = batch("mlp", 8)
    s = losses.vmap_loss(model.apply, params, xs, ys, reduction="sum")
    m = losses.batched_loss(model.apply, params, xs, ys)
    np.testing.assert_allclose(s, 8 * m, rtol=1e-5)


def test_mse_example_loss_for_text_b():
    model = get_model("lenet5")
    params = model.init(jax.random.key(0), jnp.zeros((32, 32, 1)))
    x = jax.random.normal(jax.random.key(1), (32, 32, 1))
    target = jax.random.normal(jax.random.key(2), (10,))
    out = model.apply(params, x)
    np.testing.assert_allclose(losses.example_loss(model.apply, params, x, target, loss_fn=losses.mse),
                               jnp.mean((out - target) ** 2), rtol=1e-6)
    xs, ts = jnp.stack([x, -x]), jnp.stack([target, target])
    np.testing.assert_allclose(losses.vmap_loss(model.apply, params, xs, ts, loss_fn=losses.mse),
                               losses.batched_loss(model.apply, params, xs, ts, loss_fn=losses.mse), rtol=1e-6)
