"""Per-example (vmap) and batched losses and gradients compute the same numbers.

Every loss and gradient here runs jitted: un-jitted, JAX dispatches the
models op by op, and this file took ~75 s that way. The float32 equalities
are checked under highest_precision(): on a GPU's default TF32 products two
ways differ by ~1e-3, not by rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import losses
from jaxbatch.models import MODELS, get_model
from jaxbatch.precision import enable_x64, highest_precision, relative_difference
from test_models import SHAPES

# The library's functions, compiled; the model's apply, the one-output loss
# and the reduction are static.
STATIC = dict(static_argnums=0, static_argnames=("loss_fn", "reduction"))
example_loss = jax.jit(losses.example_loss, static_argnums=0, static_argnames="loss_fn")
vmap_loss = jax.jit(losses.vmap_loss, **STATIC)
batched_loss = jax.jit(losses.batched_loss, **STATIC)
per_example_grads = jax.jit(losses.per_example_grads, static_argnums=0, static_argnames="loss_fn")
vmap_loss_grad = jax.jit(jax.grad(losses.vmap_loss, argnums=1), **STATIC)
batched_loss_grad = jax.jit(jax.grad(losses.batched_loss, argnums=1), **STATIC)


@functools.partial(jax.jit, static_argnums=0)
def losses_and_gradients(apply_fn, params, xs, ys):
    """The batch loss two ways and the batch gradient three ways, in one program."""
    loss = {"vmap": losses.vmap_loss(apply_fn, params, xs, ys),
            "batched": losses.batched_loss(apply_fn, params, xs, ys)}
    grad = {"vmap": losses.vmap_grad(apply_fn, params, xs, ys),
            "batched": losses.batched_grad(apply_fn, params, xs, ys),
            "mean_per_example": losses.mean_per_example_grads(apply_fn, params, xs, ys)}
    return loss, grad


@functools.cache
def float32_params(name):
    # Once per model for all the tests, and jitted: eager Flax init also goes op by op.
    model = get_model(name)
    return jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros(SHAPES[name])))


def params_and_batch(name, b, dtype="float32"):
    """The model's parameters and a batch of b examples, in dtype (NumPy, so
    casting dispatches nothing; float64 only takes inside enable_x64)."""
    params = jax.tree.map(lambda p: np.asarray(p, dtype), float32_params(name))
    xs = np.random.default_rng(1).uniform(size=(b,) + SHAPES[name]).astype(dtype)
    return params, xs, np.arange(b) % 10


# Six examples: the ways then add in different orders, and dividing by 6 rounds.
@pytest.mark.parametrize("dtype, target", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("name", list(MODELS))
def test_vmap_and_batched_agree(name, dtype, target):
    model = get_model(name)
    with enable_x64() if dtype == "float64" else highest_precision():
        params, xs, ys = params_and_batch(name, 6, dtype)
        loss, grad = losses_and_gradients(model.apply, params, xs, ys)
    assert jax.tree.leaves(grad["batched"])[0].dtype == dtype  # float64 only if x64 really was on
    assert relative_difference(loss["vmap"], loss["batched"]) < target
    assert relative_difference(grad["vmap"], grad["batched"]) < target
    assert relative_difference(grad["mean_per_example"], grad["batched"]) < target


def numpy_mlp_grad(params, x, y):
    """The mlp's gradient for one example, by hand in NumPy (float64):
    h = W1^T x + b1, a = relu(h), z = W2^T a + b2, l = -log softmax(z)_y;
    dz = softmax(z) - e_y, dW2 = a dz^T, da = W2 dz, dh = da [h > 0], dW1 = x dh^T."""
    p = {layer: {k: np.asarray(v, np.float64) for k, v in arrays.items()}
         for layer, arrays in params["params"].items()}
    x = np.asarray(x, np.float64).ravel()
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    a = np.maximum(h, 0)
    z = a @ p["out"]["kernel"] + p["out"]["bias"]
    dz = np.exp(z - z.max()) / np.exp(z - z.max()).sum() - np.eye(len(z))[y]
    dh = (p["out"]["kernel"] @ dz) * (h > 0)
    return {"params": {"hidden": {"bias": dh, "kernel": np.outer(x, dh)},
                       "out": {"bias": dz, "kernel": np.outer(a, dz)}}}


def test_per_example_grads_are_each_examples_own_gradient():
    # Against the mlp's gradient written out by hand, in float64, so that "the same
    # gradient" can mean to rounding (1e-12); a mixed-up example is off by O(1).
    model = get_model("mlp")
    with enable_x64():
        params, xs, ys = params_and_batch("mlp", 4, "float64")
        per_example = per_example_grads(model.apply, params, xs, ys)
    assert jax.tree.leaves(per_example)[0].shape[0] == 4
    for i in range(4):
        own = numpy_mlp_grad(params, xs[i], ys[i])
        assert relative_difference(jax.tree.map(lambda g: g[i], per_example), own) < 1e-12


def test_cross_entropy_matches_log_softmax():
    z = jnp.array([1.0, -2.0, 0.5])
    assert np.isclose(losses.cross_entropy(z, 2), -jax.nn.log_softmax(z)[2], rtol=1e-6)


def test_padding_weights_leave_loss_and_gradient_of_the_real_examples():
    model = get_model("mlp")
    params, xs, ys = params_and_batch("mlp", 6)
    padded_x = np.concatenate([xs, np.zeros((2,) + xs.shape[1:], xs.dtype)])
    padded_y = np.concatenate([ys, np.zeros(2, ys.dtype)])
    w = np.array([1.0] * 6 + [0.0] * 2, np.float32)
    with highest_precision():
        for loss_grad in (vmap_loss_grad, batched_loss_grad):
            g_real = loss_grad(model.apply, params, xs, ys)
            g_pad = loss_grad(model.apply, params, padded_x, padded_y, w)
            assert relative_difference(g_pad, g_real) < 1e-5


def test_sum_reduction_is_batch_size_times_mean():
    model = get_model("mlp")
    params, xs, ys = params_and_batch("mlp", 6)
    with highest_precision():
        s = vmap_loss(model.apply, params, xs, ys, reduction="sum")
        m = batched_loss(model.apply, params, xs, ys)
    np.testing.assert_allclose(s, 6 * m, rtol=1e-5)


def test_an_unknown_reduction_is_an_error_not_a_silent_mean():
    logits_are_the_input = lambda params, x: x  # noqa: E731
    with pytest.raises(ValueError, match="median"):  # raised while tracing: nothing compiles
        batched_loss(logits_are_the_input, None, np.zeros((2, 3), np.float32), np.zeros(2, np.int32),
                     reduction="median")


def test_mse_example_loss_for_text_b():
    model = get_model("lenet5")
    params = float32_params("lenet5")
    x = np.random.default_rng(1).normal(size=(32, 32, 1)).astype(np.float32)
    target = np.random.default_rng(2).normal(size=10).astype(np.float32)
    xs, ts = np.stack([x, -x]), np.stack([target, target])
    with highest_precision():
        out = jax.jit(model.apply)(params, x)
        np.testing.assert_allclose(example_loss(model.apply, params, x, target, loss_fn=losses.mse),
                                   np.mean((out - target) ** 2), rtol=1e-6)
        np.testing.assert_allclose(vmap_loss(model.apply, params, xs, ts, loss_fn=losses.mse),
                                   batched_loss(model.apply, params, xs, ts, loss_fn=losses.mse), rtol=1e-6)
