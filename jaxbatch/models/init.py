"""Initialisers shared by the models.

The texts are PyTorch programs, and some of their outcomes hinge on
PyTorch's default initialisation (text C's divergence at inputs x255, for
one). `nn.Linear` and `nn.Conv2d` draw weights and biases from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); for weights that is exactly
variance_scaling(1/3, "fan_in", "uniform"): limit = sqrt(3 * (1/3) / fan_in).
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); needs the layer's fan-in."""
    bound = 1.0 / jnp.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def flatten_example(x, example_ndim: int = 3):
    """Flatten each example's own (H, W, C) axes, keeping any leading batch axes.

    Never reshape by a hard-coded batch size (text C's `x.reshape(250, -1)`
    silently breaks on the last, smaller batch and on a single example).
    """
    return x.reshape(x.shape[: x.ndim - example_ndim] + (-1,))
