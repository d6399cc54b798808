"""A batch summed a chunk of examples at a time, inside one compiled step.

Per-example work holds one result per example: B gradients of P numbers each
when every g_i is formed. Taking the batch `chunk` examples at a time and
adding the chunks' sums as they come holds `chunk` of them and one running
sum instead: gradient accumulation, over examples. This is the one helper for
it; DP-SGD's clipped sum with `--dp-chunk` (losses.clipped_grad_sum) and the
benchmark's `per_example_chunked` (bench/methods.py) both call it.

    chunked_sum(fn, chunk, arrays, weights)
        = sum over chunks c of fn(arrays[c], weights[c])[0],
          with fn(...)[1], the per-example results, laid end to end.

The batch is padded to whole chunks with weight-0 examples (fn must drop
them by their weight), so every chunk has one shape and compiles once. The
chunks run in one `lax.scan`; how it runs comes from jaxbatch/backends.py:
rolled, except where the backend runs convolutions badly inside a loop body
(XLA:CPU), where a body with a convolution is unrolled.

`front_sum` is its companion for a batch padded at the end (a Poisson
batch, privacy.draw_batches): fn on a base of examples, then block by block
only as far as the last example of weight > 0, so the padding past it costs
nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbatch import backends


def pad_rows(a, count: int):
    """`a` with `count` rows of zeros after its own (weight-0 examples, or results never computed)."""
    return jnp.concatenate([a, jnp.zeros((count, *a.shape[1:]), a.dtype)]) if count else a


def chunked_sum(fn, chunk: int, arrays: tuple, weights, unroll: bool | None = None):
    """(summed pytree, per-example pytree) of fn(arrays, weights) over the batch,
    `chunk` examples per call; `arrays` are the batch's arrays (leading axis
    B), `weights` their (B,) weights. To be called inside jit.

    `unroll`: None takes backends.py's choice (speed). A caller that chunks to
    bound memory passes False: unrolled, XLA:CPU did not reuse the chunks'
    buffers (the cnn's clipped sum at a logical batch of 4096: 2.4 GB whole,
    2.3 GB in unrolled chunks of 256, 163 MB in a rolled scan)."""
    b = weights.shape[0]
    if chunk >= b:
        return fn(arrays, weights)
    pad = -b % chunk  # weight-0 examples that fill the last chunk

    def split(a):
        return pad_rows(a, pad).reshape(-1, chunk, *a.shape[1:])

    parts = (tuple(split(a) for a in arrays), split(weights))
    first = jax.tree.map(lambda a: a[0], parts)
    total_shape, _ = jax.eval_shape(fn, *first)

    def add(total, part):
        s, per_example = fn(*part)
        return jax.tree.map(jnp.add, total, s), per_example

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), total_shape)
    if unroll is None:
        unroll = backends.unroll_loop(fn, *first)
    total, per_example = jax.lax.scan(add, zeros, parts, unroll=unroll)
    return total, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:b], per_example)


def front_sum(fn, front, arrays: tuple, weights):
    """fn(arrays, weights) over the batch's examples up to its last one of
    weight > 0, and no further: `front` = (base, block), fn on the first
    `base` examples, then on each following `block` of them while one of
    weight > 0 is left (a `lax.fori_loop` whose length each call counts).
    Returns (the sum, the per-example results laid end to end, zeros past
    the blocks that ran). To be called inside jit; `front` None or () is fn
    on the whole batch.

    The same sum as fn on the whole batch (fn must drop weight-0 examples),
    for any weights; it saves work when the real examples come first, as in
    privacy.draw_batches' Poisson batches: at B = 256 of MNIST every batch
    is padded to 352 slots for its worst case, and a step computes 256 plus
    its overflow in blocks of 8, 264 slots on average. Two shapes compile,
    the base and the block, whatever the batch."""
    if not front or front[0] >= weights.shape[0]:
        return fn(arrays, weights)
    base, block = front
    b = weights.shape[0]
    pad = -(b - base) % block  # weight-0 examples that fill the last block
    arrays, weights = tuple(pad_rows(a, pad) for a in arrays), pad_rows(weights, pad)
    total, first = fn(tuple(a[:base] for a in arrays), weights[:base])
    per_example = jax.tree.map(lambda a: pad_rows(a, b + pad - base), first)

    def add(j, carry):
        total, per_example = carry
        start = base + j * block
        part = lambda a: jax.lax.dynamic_slice_in_dim(a, start, block)  # noqa: E731
        s, results = fn(tuple(map(part, arrays)), part(weights))
        per_example = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, start, 0),
                                   per_example, results)
        return jax.tree.map(jnp.add, total, s), per_example

    # One past the last example that counts: the blocks must reach it.
    needed = jnp.max(jnp.where(weights > 0, jnp.arange(1, b + pad + 1), 0))
    blocks = (jnp.maximum(needed - base, 0) + block - 1) // block
    total, per_example = jax.lax.fori_loop(0, blocks, add, (total, per_example))
    return total, jax.tree.map(lambda a: a[:b], per_example)
