"""jaxbatch.chunks: a batch summed a chunk at a time equals it summed whole,
rolled or unrolled, with a padded last chunk, and keeps its per-example results."""

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
