"""How the convolutional blocks are computed: XLA's convolution, and a max pool
whose gradient is written out as a mask.

The CNN and LeNet-5 blocks are conv -> ReLU -> 2x2 max pool. Measured on a
2-core AVX-512 CPU (jax 0.10; docs/bench.md), the convolutions were not the
main cost of a training step: XLA's gradient of `nn.max_pool` was.
`reduce_window`'s derivative is `select_and_scatter_add`, which XLA's CPU
backend runs as a slow scalar loop: 60 ms for the cnn's first pool alone at
batch 256. `max_pool` below computes the same values and exactly the same
gradient with elementwise operations that XLA fuses; a cnn Adam step took
75 ms instead of 149 ms at batch 256 and 9.9 ms instead of 15.2 ms at batch
50 (CPU time), LeNet-5's 38 ms instead of 69 ms.

The convolutions themselves stay `flax.linen.Conv` (same parameters, init and
numbers): XLA hands them to its YNNPACK kernels, and every alternative
measured computed the same numbers (~1e-6 relative) but more slowly on this
CPU, forward, backward and under vmap(grad): explicit patches times weights
(`lax.conv_general_dilated_patches` + dot, 25 shifted slices stacked on the
channel or on a leading axis, channels-first patches), a sum of 25 shifted
products, a custom JVP routing the kernel or input gradient through patches,
and per-example kernel gradients as 25 batched products of shifted windows.
Building the 25x larger patch array costs more than the whole convolution.
XLA's CPU options (oneDNN, XNNPACK fusions, YNNPACK off for dots) changed
the steps by less than the run-to-run noise.

Which pool a model uses is decided by the backend, in jaxbatch/backends.py:
the mask version on CPU, where it was measured, `flax.linen.max_pool`
elsewhere.

One trap remains outside this file: inside a loop body (lax.scan, lax.map, a
while loop) XLA's CPU backend leaves the convolutions that autodiff derives
in non-canonical layouts and runs them as plain loops; a cnn training step
(Adam, batch 50) took 152 ms in a scan against 8 ms jitted alone and called
from Python. Writing the backward pass out (jax.custom_vjp) fixed the loop
(14 ms) but doubled the vmap-mean step and lost forward-mode autodiff, so
the models keep autodiff; on CPU, training unrolls its step loops for models with a convolution
(jaxbatch/backends.py, docs/bench.md).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbatch import backends


def max_pool(x, window: int = 2):
    """Non-overlapping `window` x `window` max pool of (..., H, W, C): one
    example or a batch. The mask version below on backends where XLA's own
    gradient is slow (jaxbatch/backends.py), `flax.linen.max_pool` elsewhere;
    both compute the same values and gradients."""
    if backends.choices().mask_max_pool:
        return mask_max_pool(x, window)
    return flax_max_pool(x, window)


def flax_max_pool(x, window: int = 2):
    """`flax.linen.max_pool` with stride = window, for one example or a batch."""
    return nn.max_pool(x, (window, window), strides=(window, window))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def mask_max_pool(x, window: int = 2):
    """Non-overlapping `window` x `window` max pool of (..., H, W, C), any
    number of leading axes (one example or a batch):

        y[..., h, w, c] = max_{0 <= i, j < window} x[..., window*h + i, window*w + j, c].

    Rows and columns left over when H or W is not a multiple of `window` are
    dropped, as `flax.linen.max_pool(x, (k, k), strides=(k, k))` does.
    """
    return _windows(x, window).max(axis=(-4, -2))


def _windows(x, window):
    """(..., H, W, C) -> (..., H//k, k, W//k, k, C): a free reshape, no copy."""
    *lead, h, w, c = x.shape
    h, w = h // window * window, w // window * window
    x = x[..., :h, :w, :]
    return x.reshape(*lead, h // window, window, w // window, window, c)


@mask_max_pool.defjvp
def _max_pool_jvp(window, primals, tangents):
    """dy = dx at the FIRST maximum of each window (row-major order), zero
    elsewhere: the subgradient `select_and_scatter_add` picks for
    `nn.max_pool`, so gradients agree exactly, ties included (a zero
    background gives many). Written as a mask, so reverse mode is one fused
    multiply instead of a scatter."""
    (x,), (dx,) = primals, tangents
    xw = _windows(x, window)
    top = xw.max(axis=(-4, -2), keepdims=True)
    # Rank the window's positions k*k, ..., 1 in row-major order; among the
    # positions equal to the max, the highest rank is the first one.
    rank = jnp.arange(window * window, 0, -1, dtype=jnp.int32).reshape(window, 1, window, 1)
    score = jnp.where(xw == top, rank, 0)
    first = score == score.max(axis=(-4, -2), keepdims=True)
    dy = jnp.where(first, _windows(dx, window), 0).sum(axis=(-4, -2))
    return top.squeeze((-4, -2)), dy

