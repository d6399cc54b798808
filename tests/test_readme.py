"""The README's ten-line idea runs as printed and says what it claims."""

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxbatch.precision import highest_precision, relative_difference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_idea_snippet_runs_and_its_gradients_agree():
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    namespace = {}
    exec(text[start:text.index("```", start)], namespace)
    model = namespace["model"]
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs, ys = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1)), jnp.arange(16) % 10
    with highest_precision():  # float32 rounding is the claim, not a GPU's TF32 products
        g_vmap = jax.grad(namespace["vmap_loss"])(params, xs, ys)
        g_batched = jax.grad(namespace["batched_loss"])(params, xs, ys)
        g_mean = jax.tree.map(lambda g: g.mean(0), namespace["per_example_grads"](params, xs, ys))
    assert relative_difference(g_vmap, g_batched) <= 1e-6
    assert relative_difference(g_mean, g_batched) <= 1e-6


def test_readme_install_extras_exist():
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = README.read_text()
    for name in ("test", "tfds", "torch", "cuda12", "tpu"):
        assert name in extras and f".[{name}]" in text, name
    assert any(req.startswith("jax[cuda12]") for req in extras["cuda12"])
    assert any(req.startswith("jax[tpu]") for req in extras["tpu"])
