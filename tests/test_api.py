"""The public API: every name jaxbatch exports resolves, and importing the
package (as the command line does first) loads no JAX."""

import subprocess
import sys

import numpy as np

import jaxbatch


def test_every_exported_name_resolves():
    for name in jaxbatch.__all__:
        assert getattr(jaxbatch, name) is not None, name


def test_importing_jaxbatch_and_its_command_line_loads_no_jax():
    code = "import sys, jaxbatch, jaxbatch.cli; print('jax' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_api_trains_and_compares_the_two_gradients():
    import jax

    train = jaxbatch.load("digits", "train")
    model = jaxbatch.get_model("mlp")
    params = jaxbatch.init_params(model, jaxbatch.init_key(0), train.image_shape)
    xs, ys = train.images[:16] / 255.0, train.labels[:16]
    vmap_g = jaxbatch.vmap_grad(model.apply, params, xs, ys)
    batched_g = jaxbatch.batched_grad(model.apply, params, xs, ys)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), vmap_g, batched_g))
    assert max(diffs) < 1e-5
    result = jaxbatch.train_and_evaluate(jaxbatch.TrainConfig(epochs=1, max_steps=5), params=params)
    assert result.history[-1]["steps"] == 5
