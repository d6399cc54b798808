"""Numerical precision: float64 on demand, the precision of float32 matrix
products, and the one measure of how far two gradients are apart.

On a CPU, a float32 matrix product (and convolution) is computed in float32.
On an NVIDIA GPU (Ampere and later) JAX's default lets it use TF32, whose
inputs keep 10 mantissa bits instead of 23 (unit roundoff 2^-11 ~ 5e-4); on a
TPU the default is one bfloat16 pass (8 bits, 2^-8 ~ 4e-3). So two ways of
computing the same gradient can differ by ~1e-3 relative there, not ~1e-7.
Checks that claim float32 rounding run under `highest_precision()`, which
asks for true float32 products on every backend, and record which precision
they used (`matmul_precision()`).
"""

from __future__ import annotations

import jax
import numpy as np

# What "default" float32 matrix-product precision means on each backend.
DEFAULT_MEANS = {
    "cpu": "float32",
    "gpu": "TF32 on NVIDIA Ampere and later (10-bit mantissa inputs), float32 before",
    "cuda": "TF32 on NVIDIA Ampere and later (10-bit mantissa inputs), float32 before",
    "rocm": "float32 or reduced, by the GPU's default",
    "tpu": "one bfloat16 pass (8-bit mantissa inputs)",
}


def enable_x64():
    """A context manager inside which JAX computes in float64 when asked.

    `jax.enable_x64(True)` in current JAX; `jax.experimental.enable_x64()` before it.
    """
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # JAX < 0.7

    return legacy()


def highest_precision():
    """A context manager inside which float32 matrix products and convolutions
    are computed in true float32 on every backend (no TF32, no bfloat16 passes).
    It must be active when a function is traced (jit caches per precision)."""
    return jax.default_matmul_precision("highest")


def matmul_precision(precision: str | None = None) -> dict:
    """What a result file records about precision: the float32 matmul
    precision in force (`precision`, else the current setting) and what it
    means on this backend."""
    setting = precision or jax.config.jax_default_matmul_precision or "default"
    backend = jax.default_backend()
    means = DEFAULT_MEANS.get(backend, "the backend's default") if setting in ("default", "fastest") \
        else "float32" if setting in ("highest", "float32") else setting
    return {"matmul_precision": str(setting), "backend": backend, "float32_matmul_means": means}


def relative_difference(a, b) -> float:
    """max over the arrays of two pytrees of max|a - b| / max|b|: the scale is
    each array's largest entry, not each entry, so entries near 0 cannot blow
    it up. 0 when both are 0, inf when only b is."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff, scale = float(np.max(np.abs(x - y), initial=0.0)), float(np.max(np.abs(y), initial=0.0))
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst
