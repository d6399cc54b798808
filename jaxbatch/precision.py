"""float64 on demand, for checks that need more digits than float32's ~1e-7."""

import jax


def enable_x64():
    """A context manager inside which JAX computes in float64 when asked.

    `jax.enable_x64(True)` in current JAX; `jax.experimental.enable_x64()` before it.
    """
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # JAX < 0.7

    return legacy()
