import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.errors import JaxbatchError
from jaxbatch.models import MODELS, get_model
from jaxbatch.models.mlp import mlp_params_to_scratch

SHAPES = {"mlp": (28, 28, 1), "mlp_scratch": (28, 28, 1), "cnn": (28, 28, 1), "cnn_tanh": (28, 28, 1),
          "lenet5": (32, 32, 1), "fc_nobias": (32, 32, 3)}
PARAM_COUNTS = {"mlp": 203_530, "mlp_scratch": 203_530, "cnn": 28_938, "cnn_tanh": 26_010, "lenet5": 61_706, "fc_nobias": 924_600}


def init(name, shape=None):
    model = get_model(name)
    return model, model.init(jax.random.key(0), jnp.zeros(shape or SHAPES[name]))


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts_and_output_shapes(name):
    model, params = init(name)
    assert sum(p.size for p in jax.tree.leaves(params)) == PARAM_COUNTS[name]
    assert model.apply(params, jnp.zeros(SHAPES[name])).shape == (10,)
    assert model.apply(params, jnp.zeros((7,) + SHAPES[name])).shape == (7, 10)


def test_lenet5_layout_matches_text_b():
    _, params = init("lenet5")
    assert len(jax.tree.leaves(params)) == 10
    assert params["params"]["conv1"]["kernel"].shape == (5, 5, 1, 6)  # PyTorch's (6, 1, 5, 5), channels-last


def test_lenet5_pads_28_to_32_and_refuses_other_sizes():
    model, params = init("lenet5")
    x28 = jax.random.uniform(jax.random.key(1), (28, 28, 1))
    padded = jnp.pad(x28, ((2, 2), (2, 2), (0, 0)))
    np.testing.assert_allclose(model.apply(params, x28), model.apply(params, padded), rtol=1e-6)
    with pytest.raises(JaxbatchError, match="32x32"):
        model.check_image_shape((8, 8, 1))


@pytest.mark.parametrize("name", list(MODELS))
def test_single_example_and_batch_agree(name):
    model, params = init(name)
    xs = jax.random.uniform(jax.random.key(2), (5,) + SHAPES[name])
    batched = model.apply(params, xs)
    one_by_one = jnp.stack([model.apply(params, x) for x in xs])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_flatten_uses_the_example_shape_not_a_batch_size():
    # text C's reshape(250, -1) would break on any batch but 250
    model, params = init("fc_nobias")
    for b in (1, 3, 250, 251):
        assert model.apply(params, jnp.zeros((b, 32, 32, 3))).shape == (b, 10)


def test_mlp_and_mlp_scratch_agree_given_the_same_params():
    model, params = init("mlp")
    scratch = get_model("mlp_scratch")
    xs = jax.random.uniform(jax.random.key(3), (4, 28, 28, 1))
    np.testing.assert_allclose(model.apply(params, xs), scratch.apply(mlp_params_to_scratch(params), xs),
                               rtol=1e-6, atol=1e-7)


def test_mlp_init_is_normal_with_std_001():
    _, params = init("mlp")
    w = np.asarray(params["params"]["hidden"]["kernel"])
    assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005


def test_pytorch_default_init_bounds():
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    _, params = init("cnn")
    w, b = params["params"]["conv1"]["kernel"], params["params"]["conv1"]["bias"]
    bound = 1 / np.sqrt(25)
    assert float(jnp.max(jnp.abs(w))) <= bound and float(jnp.max(jnp.abs(w))) > 0.9 * bound
    assert float(jnp.max(jnp.abs(b))) <= bound


def test_unknown_model_is_one_clear_error():
    with pytest.raises(JaxbatchError, match="unknown model 'resnet'.*mlp"):
        get_model("resnet")


@pytest.mark.parametrize("shape", [(8, 8, 3), (4, 7, 9, 2), (2, 3, 6, 6, 1)])
def test_mask_max_pool_matches_flax_values_and_gradients_ties_included(shape):
    # The two pools jaxbatch/backends.py chooses between compute the same numbers.
    from jaxbatch.models.conv import flax_max_pool, mask_max_pool

    x = jax.random.normal(jax.random.key(0), shape)
    x = jnp.where(x < 0.3, 0.0, x)  # many zeros: windows whose maximum is tied, as after a ReLU
    pool_mask, pool_flax = jax.jit(mask_max_pool), jax.jit(flax_max_pool)
    np.testing.assert_array_equal(pool_mask(x), pool_flax(x))
    cotangent = jax.random.normal(jax.random.key(1), pool_mask(x).shape)
    ours = jax.jit(lambda x, c: jax.vjp(mask_max_pool, x)[1](c)[0])(x, cotangent)
    theirs = jax.jit(lambda x, c: jax.vjp(flax_max_pool, x)[1](c)[0])(x, cotangent)
    np.testing.assert_array_equal(ours, theirs)


def test_cnn_gradients_are_the_same_with_either_backends_pool(monkeypatch):
    from jaxbatch import backends, losses

    assert backends.choices("cpu").mask_max_pool and not backends.choices("gpu").mask_max_pool
    model = get_model("cnn")
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    ys = jnp.arange(4)
    real, grads = backends.choices, {}
    for backend in ("cpu", "gpu"):
        # models read the choice while being traced; a new lambda is a new trace
        monkeypatch.setattr(backends, "choices", lambda b=None, chosen=backend: real(chosen))
        grads[backend] = jax.jit(lambda p: losses.batched_grad(model.apply, p, xs, ys))(params)
    for a, b in zip(jax.tree.leaves(grads["cpu"]), jax.tree.leaves(grads["gpu"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
