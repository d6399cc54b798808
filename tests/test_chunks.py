"""jaxbatch.chunks: a batch summed a chunk at a time equals it summed whole,
rolled or unrolled, with a padded last chunk, and keeps its per-example
results; a batch summed only as far as its last weighted example (front_sum)
runs the blocks that reach it and no more, and equals it summed whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import backends, chunks


def weighted(arrays, w):
    (x,) = arrays
    per_example = jnp.sum(x**2, axis=1)
    return {"sum": w @ x, "count": jnp.sum(w)}, per_example


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 50])
@pytest.mark.parametrize("unroll", [False, True])
def test_chunked_sum_is_the_whole_sum(monkeypatch, chunk, unroll):
    monkeypatch.setattr(backends, "unroll_loop", lambda body, *args: unroll)
    x = jax.random.normal(jax.random.key(0), (10, 3))
    w = jnp.array([1.0] * 8 + [0.0] * 2)
    total, per_example = jax.jit(lambda x, w: chunks.chunked_sum(weighted, chunk, (x,), w))(x, w)
    np.testing.assert_allclose(total["sum"], w @ x, rtol=1e-6)
    assert float(total["count"]) == 8.0
    np.testing.assert_allclose(per_example, jnp.sum(x**2, axis=1), rtol=1e-6)
    assert per_example.shape == (10,)


def test_unroll_loop_follows_the_backend_and_the_body():
    conv = lambda x: jax.lax.conv(x, jnp.ones((1, 1, 2, 2)), (1, 1), "SAME")
    dense = lambda x: x @ jnp.ones((4, 4))
    assert not backends.unroll_loop(dense, jnp.ones((4, 4)))
    expected = backends.choices().unrolled_conv_steps is not None
    assert backends.unroll_loop(conv, jnp.ones((1, 1, 4, 4))) == expected


def seen_size(arrays, w):
    """weighted's sum, and as its per-example result the size it was called with."""
    total, _ = weighted(arrays, w)
    return total, jnp.full(w.shape, w.shape[0], jnp.int32)


@pytest.mark.parametrize("last, blocks", [(0, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 2), (10, 3), (11, 4)])
def test_front_sum_computes_the_base_and_the_blocks_that_reach_the_last_weighted_example(last, blocks):
    """A base of 4, blocks of 2 over 11 slots (the last block padded to 2): only the blocks needed run."""
    x = jax.random.normal(jax.random.key(0), (11, 3))
    w = jnp.array([1.0] * last + [0.0] * (11 - last))
    total, per_example = jax.jit(lambda x, w: chunks.front_sum(seen_size, (4, 2), (x,), w))(x, w)
    np.testing.assert_allclose(total["sum"], w @ x, rtol=1e-6)
    assert float(total["count"]) == last
    assert per_example.shape == (11,)
    ran = [4] * 4 + [2] * (2 * blocks)
    assert list(per_example) == (ran + [0] * 11)[:11]  # zeros past the blocks that ran


def test_front_sum_reaches_a_weighted_example_after_the_padding():
    """Any weights give the whole sum: a real example in the last slot runs every block."""
    x = jax.random.normal(jax.random.key(1), (10, 3))
    w = jnp.array([1.0, 1.0] + [0.0] * 7 + [1.0])
    total, per_example = jax.jit(lambda x, w: chunks.front_sum(seen_size, (4, 3), (x,), w))(x, w)
    np.testing.assert_allclose(total["sum"], w @ x, rtol=1e-6)
    assert float(total["count"]) == 3
    assert list(per_example) == [4] * 4 + [3] * 6


def test_front_sum_without_a_front_is_the_plain_call():
    x, w = jnp.ones((6, 3)), jnp.ones(6)
    for front in [(), None, (6, 2), (8, 2)]:
        total, per_example = chunks.front_sum(seen_size, front, (x,), w)
        assert list(per_example) == [6] * 6 and float(total["count"]) == 6


def test_padding_is_cut_inside_the_step_only_for_dense_models_on_one_cpu_device():
    on_cpu = backends.choices().padding_cut_in_step
    assert backends.cut_padding_in_step(has_convolution=False, devices=1) == on_cpu
    assert not backends.cut_padding_in_step(has_convolution=True, devices=1)
    assert not backends.cut_padding_in_step(has_convolution=False, devices=2)
    with backends.presuming("cpu"):
        assert backends.cut_padding_in_step(has_convolution=False, devices=1)
    with backends.presuming("gpu"):
        assert not backends.cut_padding_in_step(has_convolution=False, devices=1)
