"""Text E's multilayer perceptron: flatten -> Dense 256 -> ReLU -> Dense 10.

Two versions computing the same function:
  `MLP`         Flax Linen, every weight and bias N(0, 0.01) as in text E's nn version;
  `mlp_scratch` plain jax.numpy with an explicit params dict (text E "from scratch").
Both take one example (H, W, C) or a batch (B, H, W, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxbatch.models.init import flatten_example

HIDDEN = 256
NUM_CLASSES = 10
init_std = nn.initializers.normal(stddev=0.01)


class MLP(nn.Module):
    hidden: int = HIDDEN
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        x = flatten_example(x)
        x = nn.Dense(self.hidden, kernel_init=init_std, bias_init=init_std, name="hidden")(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, kernel_init=init_std, bias_init=init_std, name="out")(x)


# ---- the same network from scratch: no Flax, just arrays -------------------


def mlp_scratch_init(key, x, hidden: int = HIDDEN, num_classes: int = NUM_CLASSES):
    """W ~ N(0, 0.01^2), zero biases, as text E from scratch. `x` is one example."""
    num_inputs = x.size if x.ndim == 3 else x[0].size
    k1, k2 = jax.random.split(key)
    return {
        "W1": 0.01 * jax.random.normal(k1, (num_inputs, hidden)),
        "b1": jnp.zeros(hidden),
        "W2": 0.01 * jax.random.normal(k2, (hidden, num_classes)),
        "b2": jnp.zeros(num_classes),
    }


def mlp_scratch_apply(params, x):
    """logits = relu(x W1 + b1) W2 + b2, for one example or a batch."""
    h = jnp.maximum(flatten_example(x) @ params["W1"] + params["b1"], 0.0)
    return h @ params["W2"] + params["b2"]


def mlp_params_to_scratch(flax_params):
    """The scratch params dict holding the same numbers as a Flax `MLP`'s params."""
    p = flax_params["params"]
    return {
        "W1": p["hidden"]["kernel"], "b1": p["hidden"]["bias"],
        "W2": p["out"]["kernel"], "b2": p["out"]["bias"],
    }
