"""Per-example gradient norms, and clipped sums, without per-example gradients.

Clipping needs ||g_i|| for every example. `jax.vmap(jax.grad(...))` forms
every g_i, B x (number of parameters) floats: for the mlp at B = 250 that
is 51M floats per step, and on 2 CPU cores the norms alone took 280 ms
against 5.8 ms for the batched gradient. But a layer's per-example gradient
is a product of two things one batched backward pass already has: the
layer's input and its output gradient.

Dense, y = x W + b (Goodfellow 2015, "Efficient Per-Example Gradient
Computations"): with x_i the layer's input and d_i = dl_i/dy_i,

    dl_i/dW = x_i^T d_i,  ||dl_i/dW||^2 = ||x_i||^2 ||d_i||^2,  ||dl_i/db||^2 = ||d_i||^2.

Convolution: unfold the input into its T output positions' patches, U_i
(T x P, P = kernel height x width x input channels), and the output gradient
into D_i (T x C). The convolution is then the product U_i W at every
position, so (Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners", ghost norms for sequences/convolutions)

    dl_i/dW = U_i^T D_i               (P x C: formed, when P C <= 2 T^2)
    ||dl_i/dW||^2 = sum_{t,s} (U_i U_i^T)_{ts} (D_i D_i^T)_{ts}   (not formed, when 2 T^2 < P C)
    ||dl_i/db||^2 = ||sum_t D_i[t]||^2

whichever is cheaper for the layer's shapes. A Dense layer is the case T = 1.

The clipped sum then needs no second backward pass either ("book-keeping",
Bu et al. 2023, "Differentially Private Optimization on Large Model at Small
Cost"): with c_i = w_i min(1, C / ||g_i||),

    sum_i c_i dl_i/dW = sum_i c_i U_i^T D_i,   sum_i c_i dl_i/db = sum_i c_i sum_t D_i[t],

one contraction per layer over the same U and D. So a model whose parameters
all sit in such layers (the mlp, fc_nobias, the cnn, LeNet-5) is clipped with
ONE forward and ONE partial backward pass (output gradients only, no kernel
gradients), whatever C is. Parameters outside such layers (the from-scratch
mlp's plain arrays) get their per-example norms the plain way, from vmapped
gradients of those parameters alone, and the clipped sum from a reweighted
backward pass.

Layers are found while the model runs, by intercepting every
`flax.linen.Dense` and `flax.linen.Conv` call (`flax.linen.intercept_methods`):
no model changes. A layer is taken only where the formulas hold: applied
once, to a batch (B, features) for Dense or (B, *spatial, channels) for
Conv, a Conv without feature groups, input dilation, mask or circular padding.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from flax.traverse_util import flatten_dict, unflatten_dict


class Layer(NamedTuple):
    key: tuple  # ("params", *module path)
    out_shape: tuple  # the layer's output, batched
    out_dtype: object
    conv: tuple | None  # None for Dense; (kernel size, strides, padding pairs, kernel dilation) for Conv


def _conv_geometry(module, x):
    """(kernel size, strides, padding pairs, kernel dilation) of a Conv call
    the formulas hold for, or None."""
    if type(module) is not nn.Conv or module.feature_group_count != 1 or module.mask is not None:
        return None
    size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    n = len(size)
    if x.ndim != n + 2:  # one batch axis, as the per-example formula needs
        return None
    every = lambda v: (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
    strides, input_dilation, dilation = every(module.strides), every(module.input_dilation), every(
        module.kernel_dilation)
    if any(d != 1 for d in input_dilation):
        return None
    padding = canonicalize_padding(module.padding, n)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID", "SAME_LOWER"):  # circular, reflect, causal: padded by hand
            return None
        dilated = [(k - 1) * d + 1 for k, d in zip(size, dilation)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    return size, strides, tuple(tuple(p) for p in padding), dilation


def _takes(module, x):
    """("dense", None) or ("conv", geometry) for a layer call the formulas
    hold for, else None."""
    if isinstance(module, nn.Dense):
        return ("dense", None) if x.ndim == 2 else None
    geometry = _conv_geometry(module, x)
    return None if geometry is None else ("conv", geometry)


def _run(apply_fn, params, xs, perturbations=None):
    """apply_fn(params, xs) with every layer call the formulas hold for
    recorded: (outputs, [(path, input, output, geometry)]), and
    perturbations[k] (zeros) added to the k-th such layer's output, so that
    their gradient is that output's gradient."""
    taps = []

    def interceptor(next_fun, args, kwargs, context):
        taken = context.method_name == "__call__" and _takes(context.module, args[0])
        if not taken:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        taps.append((context.module.path, args[0], y, taken[1]))
        return y if perturbations is None else y + perturbations[len(taps) - 1]

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, xs)
    return out, taps


def layers(apply_fn, params, xs) -> list[Layer] | None:
    """The layers whose per-example norms come from the formulas above, or
    None if there are none or one of them is applied more than once (its
    gradient is then a sum over calls, which the formulas do not cover)."""
    found = []

    def shapes(p, x):
        out, taps = _run(apply_fn, p, x)
        found.extend(taps)
        return out

    jax.eval_shape(shapes, params, xs)
    keys = [("params", *path) for path, _, _, _ in found]
    if not found or len(set(keys)) != len(keys):
        return None
    return [Layer(key, y.shape, y.dtype, geometry) for key, (_, _, y, geometry) in zip(keys, found)]


def _split(params, taken: list[Layer]):
    """(the taken layers' parameter leaves, the rest), as flat {key path: array} dicts."""
    keys = {layer.key for layer in taken}
    flat = flatten_dict(params)
    inside = {k: v for k, v in flat.items() if k[:-1] in keys}
    return inside, {k: v for k, v in flat.items() if k not in inside}


def covers_all(apply_fn, params, xs, dense_only=False) -> bool:
    """Whether every parameter sits in a layer the formulas take (then one
    backward pass gives every ||g_i|| and any clipped sum); with
    `dense_only`, in Dense layers only."""
    taken = layers(apply_fn, params, xs)
    return bool(taken) and not _split(params, taken)[1] and not (
        dense_only and any(layer.conv for layer in taken))


def _windows(x, geometry):
    """The convolution's input seen through each kernel position: one
    (B, *output spatial, in channels) slice per position, in the kernel's
    own order, so that the convolution is sum_k window_k W[k]. Strided
    slices: data movement only."""
    size, strides, padding, dilation = geometry
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    out = [(x.shape[1 + j] - (k - 1) * d - 1) // s + 1 for j, (k, s, d) in enumerate(zip(size, strides, dilation))]
    for offset in itertools.product(*(range(k) for k in size)):
        start = [o * d for o, d in zip(offset, dilation)]
        limit = [s0 + (n - 1) * s + 1 for s0, n, s in zip(start, out, strides)]
        yield jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))


def _conv_sq_norms(x, d, geometry):
    """||dl_i/dW||^2 of a convolution for every example. Few output
    positions (2 T^2 < P C): the ghost formula, from the T x T Gram matrices
    of the unfolded input U_i (T x P) and of D_i. Otherwise the per-example
    kernel gradient itself, one kernel position at a time,
    dl_i/dW[k] = window_k(x_i)^T D_i, so the unfolded input (P times the
    input) is never built: on XLA:CPU, for the cnn at B = 256, 56 ms against
    124 ms for U_i^T D_i from U and 86 ms for vmapped convolution gradients."""
    b, c = d.shape[0], d.shape[-1]
    dm = d.reshape(b, -1, c)
    t, p = dm.shape[1], x.shape[-1] * math.prod(geometry[0])
    if 2 * t * t < p * c:
        u = jnp.stack(list(_windows(x, geometry)), axis=-2).reshape(b, t, p)
        return jnp.sum(jnp.einsum("btp,bsp->bts", u, u) * jnp.einsum("btc,bsc->bts", dm, dm), axis=(1, 2))
    sq = 0.0
    for w in _windows(x, geometry):
        sq = sq + jnp.sum(jnp.einsum("btp,btc->bpc", w.reshape(b, t, -1), dm) ** 2, axis=(1, 2))
    return sq


def _sq_norms(layer: Layer, x, d, bias: bool):
    """||dl_i/dW||^2 (+ ||dl_i/db||^2) of one layer for every example."""
    if layer.conv is None:
        sq = jnp.sum(x**2, axis=1) * jnp.sum(d**2, axis=1)
    else:
        sq = _conv_sq_norms(x, d, layer.conv)
    d_sum = d.reshape(d.shape[0], -1, d.shape[-1]).sum(axis=1)
    return sq + (jnp.sum(d_sum**2, axis=1) if bias else 0.0)


def _kernel_grad_sum(layer: Layer, x, cd, kernel):
    """sum_i dl_i/dW for output gradients cd (already scaled by c_i): for a
    convolution, the gradient XLA derives for its kernel (the backward-filter
    convolution: 27 ms for the cnn at B = 256 on XLA:CPU, against 113 ms as a
    product of unfolded inputs)."""
    if layer.conv is None:
        return x.T @ cd
    size, strides, padding, dilation = layer.conv
    n = len(size)
    spatial = tuple(range(1, n + 1))
    numbers = jax.lax.ConvDimensionNumbers(lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)),
                                           out_spec=(0, n + 1, *spatial))

    def conv(k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers)

    return jax.vjp(conv, kernel)[1](cd.astype(x.dtype))[0]


def _output_zeros(xs, layer: Layer):
    """Zeros of the layer's output shape made from xs, not from nothing:
    inside shard_map they then vary over the devices as xs does, so their
    gradient stays each device's own instead of being summed over devices."""
    column = jnp.zeros_like(xs.reshape(xs.shape[0], -1)[:, :1], dtype=layer.out_dtype)
    return jnp.broadcast_to(column.reshape((-1,) + (1,) * (len(layer.out_shape) - 1)), layer.out_shape)


def _node(params, key: tuple):
    """The subtree of `params` at key path ("params", "hidden")."""
    for name in key:
        params = params[name]
    return params


def _tapped_pass(apply_fn, params, xs, ys, loss_fn, taken: list[Layer]):
    """One forward pass and the backward pass to the taken layers' outputs
    (no parameter gradients): per-example losses, outputs, every taken
    layer's input x and output gradient d (of l_i alone), and every
    example's ||g_i||^2 in the taken layers."""
    def summed(z):
        out, taps = _run(apply_fn, params, xs, z)
        losses = jax.vmap(loss_fn)(out, ys)
        return jnp.sum(losses), (losses, out, [x for _, x, _, _ in taps])

    zeros = [_output_zeros(xs, layer) for layer in taken]
    deltas, (losses, out, inputs) = jax.grad(summed, has_aux=True)(zeros)
    sq = sum(_sq_norms(layer, x, d, "bias" in _node(params, layer.key))
             for layer, x, d in zip(taken, inputs, deltas))
    return losses, out, list(zip(inputs, deltas)), sq


def per_example_sq_norms(apply_fn, params, xs, ys, loss_fn, taken: list[Layer]):
    """(||g_i||^2 for every example, per-example losses, outputs): the taken
    layers by the formulas above, the other parameters by vmap. `taken` is
    what `layers` found for this model and input shape."""
    losses, out, _, sq = _tapped_pass(apply_fn, params, xs, ys, loss_fn, taken)
    inside, rest = _split(params, taken)
    if rest:
        def one(r, x, y):
            return loss_fn(apply_fn(unflatten_dict({**inside, **r}), x), y)

        grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(rest, xs, ys)
        sq = sq + sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in grads.values())
    return sq, losses, out


def weighted_grad_sum(apply_fn, params, xs, ys, loss_fn, taken: list[Layer], coefficients):
    """For a model `covers_all` takes: (sum_i c_i g_i, ||g_i||^2, losses,
    outputs) with c = coefficients(||g_i||^2, losses) computed from the
    norms (DP-SGD: w_i min(1, C/||g_i||)), from one tapped pass: each
    layer's sum is its kernel gradient for the output gradients c_i d_i,
    no second backward pass through the network."""
    losses, out, taps, sq = _tapped_pass(apply_fn, params, xs, ys, loss_fn, taken)
    c = jax.lax.stop_gradient(coefficients(sq, losses))
    grads = {}
    for layer, (x, d) in zip(taken, taps):
        node = _node(params, layer.key)
        cd = d * c.astype(d.dtype).reshape((-1,) + (1,) * (d.ndim - 1))
        grads[(*layer.key, "kernel")] = _kernel_grad_sum(layer, x, cd, node["kernel"])
        if "bias" in node:
            grads[(*layer.key, "bias")] = jnp.sum(cd.reshape(-1, cd.shape[-1]), axis=0)
    return unflatten_dict(grads), sq, losses, out


def grads_and_sq_norms(apply_fn, params, xs, ys, weights, loss_fn, reduction="mean"):
    """For a model `covers_all` takes: the gradient of the weighted batch
    loss, the loss, the outputs, and every example's ||g_i||^2 (0 for padded
    examples, w_i = 0), from ONE forward and backward pass."""
    taken = layers(apply_fn, params, xs)
    n = jnp.sum(weights)
    scale = weights if reduction == "sum" else weights / n
    grads, sq, losses, out = weighted_grad_sum(apply_fn, params, xs, ys, loss_fn, taken,
                                               lambda sq, losses: scale.astype(losses.dtype))
    loss = jnp.sum(scale * losses)
    return grads, loss, out, jnp.where(weights != 0, sq, 0.0)
