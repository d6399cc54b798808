"""How the convolutional blocks are computed: XLA's convolution, and a max pool
whose gradient is written out as a mask.

The CNN and LeNet-5 blocks are conv -> ReLU -> 2x2 max pool. Measured on a
2-core AVX-512 CPU (jax 0.10, batch 256, MNIST shapes; docs/bench.md), the
convolutions were never the main cost of a training step: XLA's gradient of
`nn.max_pool` was. `reduce_window`'s derivative is `select_and_scatter_add`,
which XLA's CPU backend runs as a slow scalar loop: 60 ms of a 130 ms cnn step
went to the two pools' backward passes. `max_pool` below computes the same
values and the same gradient with plain elementwise operations that XLA
fuses, and the cnn step drops to about half.

The alternatives measured for the convolutions themselves, all computing the
same numbers (float32, ~1e-6 relative), were slower on CPU than XLA's own
convolution (which XLA hands to its YNNPACK library): explicit patches-times-
weights (`lax.conv_general_dilated_patches` + dot, or patches stacked from 25
slices), a sum of 25 shifted matrix products, and, for per-example kernel
gradients, 25 batched products of shifted windows. Building the 25x larger
patch array costs more than the whole convolution. So the models keep
`flax.linen.Conv` (same parameters, same init, same numbers) and use this
pool.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x, window: int = 2):
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


@max_pool.defjvp
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
