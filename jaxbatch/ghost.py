"""Per-example gradient norms without per-example gradients ("ghost norms").

Clipping needs ||g_i|| for every example. `jax.vmap(jax.grad(...))` forms
every g_i, B x (number of parameters) floats: for the mlp at B = 250 that
is 51M floats per step, and on 2 CPU cores the norms alone took 280 ms
against 5.8 ms for the batched gradient. For a dense layer y = x W + b the
per-example gradient is an outer product, so its norm needs no g_i at all
(Goodfellow 2015, "Efficient Per-Example Gradient Computations"):

    dl_i/dW = x_i^T d_i,  ||dl_i/dW||^2 = ||x_i||^2 ||d_i||^2,  ||dl_i/db||^2 = ||d_i||^2,

with x_i the layer's input and d_i = dl_i/dy_i its output gradient, both of
which one batched backward pass gives for the whole batch. The clipped sum
is then one more batched backward pass, of the reweighted loss:

    sum_i c_i g_i = grad sum_i c_i l_i,   c_i = min(1, C / ||g_i||) held constant

("ghost clipping", Lee & Kifer 2021; Li et al. 2022). Parameters that are
not a dense layer's applied to (B, features) inputs (convolutions, the
from-scratch mlp's plain arrays) get their per-example norms the plain way,
from vmapped gradients of those parameters alone: for the cnn that is its
convolution kernels, a few thousand numbers per example.

Dense layers are found while the model runs, by intercepting every
`flax.linen.Dense` call (`flax.linen.intercept_methods`): no model changes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict


def _run(apply_fn, params, xs, perturbations=None):
    """apply_fn(params, xs) with every Dense call recorded: (outputs, [(path,
    input, has_bias)]), and perturbations[k] (zeros) added to the k-th
    Dense's output, so that their gradient is that output's gradient."""
    taps = []

    def interceptor(next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        taps.append((context.module.path, args[0], context.module.use_bias))
        return y if perturbations is None else y + perturbations[len(taps) - 1]

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, xs)
    return out, taps


def dense_layers(apply_fn, params, xs) -> list[tuple] | None:
    """The Dense layers ghost norms can take, as ("params", *path) keys, or
    None if any Dense is not applied once per example to (B, features)
    inputs (then the formula above would not be the per-example norm)."""
    found = []

    def shapes(p, x):
        out, taps = _run(apply_fn, p, x)
        found.extend((path, inp.shape, bias) for path, inp, bias in taps)
        return out

    jax.eval_shape(shapes, params, xs)
    paths = [("params", *path) for path, _, _ in found]
    if any(len(shape) != 2 for _, shape, _ in found) or len(set(paths)) != len(paths):
        return None
    return paths


def _split(params, dense: list[tuple]):
    """(dense layers' parameter leaves, the rest), as flat {key path: array} dicts."""
    flat = flatten_dict(params)
    inside = {k: v for k, v in flat.items() if k[:-1] in set(dense)}
    return inside, {k: v for k, v in flat.items() if k not in inside}


def per_example_sq_norms(apply_fn, params, xs, ys, loss_fn, dense: list[tuple]):
    """(||g_i||^2 for every example, per-example losses, outputs): dense
    layers by the outer-product formula, the other parameters by vmap.
    `dense` is what `dense_layers` found for this model and input shape."""
    layers = [_node(params, key) for key in dense]
    # One batched pass: every Dense's input, and (the gradient of zeros added
    # to its output) its output gradient, per example.
    zeros = [_zeros_like_batch(xs, layer) for layer in layers]

    def summed(z):
        out, taps = _run(apply_fn, params, xs, z)
        losses = jax.vmap(loss_fn)(out, ys)
        return jnp.sum(losses), (losses, out, [x for _, x, _ in taps])

    deltas, (losses, out, inputs) = jax.grad(summed, has_aux=True)(zeros)
    sq = _dense_sq_norms(deltas, inputs, layers)
    # The rest: per-example gradients of the non-dense parameters only.
    inside, rest = _split(params, dense)
    if rest:
        def one(r, x, y):
            return loss_fn(apply_fn(unflatten_dict({**inside, **r}), x), y)

        grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(rest, xs, ys)
        sq = sq + sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in grads.values())
    return sq, losses, out


def _dense_sq_norms(deltas, inputs, layers):
    """sum over the Dense layers of ||x_i||^2 ||d_i||^2 (+ ||d_i||^2 for a
    bias): every example's squared gradient norm in those layers."""
    sq = 0.0
    for d, x, layer in zip(deltas, inputs, layers):
        d2 = jnp.sum(d**2, axis=1)
        sq = sq + jnp.sum(x**2, axis=1) * d2 + (d2 if "bias" in layer else 0.0)
    return sq


def _zeros_like_batch(xs, layer):
    """(B, layer outputs) zeros made from xs, not from nothing: inside shard_map
    they then vary over the devices as xs does, so their gradient stays each
    device's own instead of being summed over the devices."""
    column = jnp.zeros_like(xs.reshape(xs.shape[0], -1)[:, :1], dtype=layer["kernel"].dtype)
    return jnp.broadcast_to(column, (xs.shape[0], layer["kernel"].shape[-1]))


def _node(params, key: tuple):
    """The subtree of `params` at key path ("params", "hidden")."""
    for name in key:
        params = params[name]
    return params


def all_dense(apply_fn, params, xs) -> bool:
    """Whether every parameter belongs to a Dense layer ghost norms can take
    (then one backward pass gives the gradient and every ||g_i|| at once)."""
    dense = dense_layers(apply_fn, params, xs)
    return bool(dense) and not _split(params, dense)[1]


def grads_and_sq_norms(apply_fn, params, xs, ys, weights, loss_fn, reduction="mean"):
    """For a model whose parameters are all Dense layers (`all_dense`): the
    gradient of the weighted batch loss, the loss, the outputs, and every
    example's ||g_i||^2, from ONE batched forward and backward pass: the
    zeros added to each Dense output get the output gradients w_i/n d_i (or
    w_i d_i for a summed loss), from which d_i is recovered."""
    layers = [_node(params, key) for key in dense_layers(apply_fn, params, xs)]
    zeros = [_zeros_like_batch(xs, layer) for layer in layers]
    n = jnp.sum(weights)

    def objective(p, z):
        out, taps = _run(apply_fn, p, xs, z)
        total = jnp.sum(weights * jax.vmap(loss_fn)(out, ys))
        return (total if reduction == "sum" else total / n), (out, [x for _, x, _ in taps])

    (loss, (out, inputs)), (grads, deltas) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        params, zeros)
    scale = 1.0 if reduction == "sum" else n  # d_i = delta_i / (w_i / n); padded examples (w_i = 0) stay 0
    return grads, loss, out, _dense_sq_norms([d * scale for d in deltas], inputs, layers)
