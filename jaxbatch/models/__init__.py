"""The five texts' networks, found by name.

Every model is used the same way, as a pure function of (params, x):
    params = model.init(key, x_example)     # one example, no batch axis
    logits = model.apply(params, x)         # x: one example (H, W, C) or a batch (B, H, W, C)
Taking ONE example is what lets `jax.vmap` run the per-example loss; taking a
batch is the natively batched twin.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jaxbatch.errors import JaxbatchError
from jaxbatch.models import cnn, cnn_tanh, fc_nobias, lenet5, mlp


class Model(NamedTuple):
    name: str
    init: Callable[..., Any]  # (key, x_example) -> params
    apply: Callable[..., Any]  # (params, x) -> logits
    check_image_shape: Callable[[tuple], None] = lambda shape: None


def _flax(name, module, check=lambda shape: None):
    return Model(name, module.init, module.apply, check)


MODELS: dict[str, Model] = {
    "mlp": _flax("mlp", mlp.MLP()),
    "mlp_scratch": Model("mlp_scratch", mlp.mlp_scratch_init, mlp.mlp_scratch_apply),
    "cnn": _flax("cnn", cnn.CNN()),
    "cnn_tanh": _flax("cnn_tanh", cnn_tanh.CNNTanh(), cnn_tanh.check_image_shape),
    "lenet5": _flax("lenet5", lenet5.LeNet5(), lenet5.check_image_shape),
    "fc_nobias": _flax("fc_nobias", fc_nobias.FCNoBias()),
}


def init_params(model: Model | str, key, example_shape):
    """The model's initial parameters, from `key`, for inputs of
    `example_shape` (one example, no batch axis). Run eagerly, not jitted:
    under jit XLA fuses the initialisers' arithmetic differently, which
    changes last bits of the weights, and the recipes' published figures come
    from these exact weights."""
    import jax.numpy as jnp

    model = get_model(model) if isinstance(model, str) else model
    return model.init(key, jnp.zeros(example_shape, jnp.float32))


def get_model(name: str) -> Model:
    if name not in MODELS:
        raise JaxbatchError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]
