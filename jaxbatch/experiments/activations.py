"""Text E: why a network needs a non-linearity, and what the usual ones look like.

Two linear layers in a row are one linear layer:

    (x W_h + b_h) W_o + b_o = x (W_h W_o) + (b_h W_o + b_o) = x W + b,

so stacking them adds parameters but no expressive power. This experiment
computes W = W_h W_o and b = b_h W_o + b_o for layers of the MLP's shapes and
compares the two on a real batch; with a ReLU between the layers the
equality breaks, as it should.

It also plots ReLU, sigmoid and tanh with their derivatives, each derivative
computed by jax.vmap(jax.grad(f)) over a grid of points -- the same
per-example pattern as the losses -- and checked against the closed forms

    relu'(x) = [x > 0],  sigmoid'(x) = s(x) (1 - s(x)),  tanh'(x) = 1 - tanh(x)^2.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import data as data_lib
from jaxbatch import load
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, new_figure
from jaxbatch.precision import enable_x64, highest_precision, matmul_precision
from jaxbatch.settings import check, setting

ACTIVATIONS = {
    "relu": (jax.nn.relu, lambda x: (x > 0).astype(x.dtype)),
    "sigmoid": (jax.nn.sigmoid, lambda x: jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x))),
    "tanh": (jnp.tanh, lambda x: 1 - jnp.tanh(x) ** 2),
}


# Sizes that bound memory: the layers hold inputs x hidden + hidden x outputs
# numbers (CIFAR-10 at the largest: 92 M, 0.74 GB in float64), and result.json
# seven lists of grid_points numbers.
MAX_WIDTH, MAX_GRID = 8192, 100_001


@dataclasses.dataclass
class Config:
    dataset: str = setting("fashion_mnist", "the dataset of the batch; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    # Text E's MLP and batch: inputs -> 256 -> 10, 256 images.
    batch_size: int = setting(256, "images the two linear layers are compared on", at_least=1)
    hidden: int = setting(256, f"width of the first linear layer, at most {MAX_WIDTH}", at_least=1,
                          at_most=MAX_WIDTH)
    outputs: int = setting(10, f"width of the second, at most {MAX_WIDTH}", at_least=1, at_most=MAX_WIDTH)
    grid_points: int = setting(241, f"points in [-6, 6] the derivatives are computed at, 3 to {MAX_GRID}",
                               at_least=3, at_most=MAX_GRID)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)


QUICK = dict(dataset="digits")


def validate(config: Config) -> None:
    check(config)
    data_lib.get_spec(config.dataset)


@jax.jit
def derivatives(grid) -> dict:
    """{name: (f(x), f'(x) by jax.vmap(jax.grad(f)), closed-form f'(x))}."""
    return {name: (f(grid), jax.vmap(jax.grad(f))(grid), closed(grid))
            for name, (f, closed) in ACTIVATIONS.items()}


def collapse(w_h, b_h, w_o, b_o):
    """The one linear layer equal to two: W = W_h W_o, b = b_h W_o + b_o."""
    return w_h @ w_o, b_h @ w_o + b_o


def random_layers(key, inputs: int, hidden: int, outputs: int) -> dict:
    """W ~ N(0, 0.01^2) as text E; the biases random too, so b_h W_o is not trivially 0."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {name: np.asarray(0.01 * jax.random.normal(k, shape)) for name, k, shape in [
        ("w_h", k1, (inputs, hidden)), ("b_h", k2, (hidden,)),
        ("w_o", k3, (hidden, outputs)), ("b_o", k4, (outputs,))]}


@jax.jit
def _two_vs_one(x, layers):
    w_h, b_h, w_o, b_o = (layers[k] for k in ("w_h", "b_h", "w_o", "b_o"))
    w, b = collapse(w_h, b_h, w_o, b_o)
    two = (x @ w_h + b_h) @ w_o + b_o
    one = x @ w + b
    with_relu = jax.nn.relu(x @ w_h + b_h) @ w_o + b_o
    return jnp.max(jnp.abs(two - one)), jnp.max(jnp.abs(with_relu - one)), jnp.max(jnp.abs(two))


def stacked_vs_single(x, layers: dict, dtype: str) -> dict:
    """max|two layers - one layer| on the batch x, without and with a ReLU
    between; relative to max|two layers' output|. The same layers (drawn in
    float32) in either dtype. Under the highest matmul precision: "equal to
    float32 rounding" needs products in float32, not a GPU's default TF32."""
    with enable_x64() if dtype == "float64" else contextlib.nullcontext(), highest_precision():
        cast = {k: np.asarray(v, dtype) for k, v in layers.items()}
        diff, relu_diff, scale = map(float, _two_vs_one(np.asarray(x, dtype), cast))
    outputs = layers["w_o"].shape[1]
    return {"precision": matmul_precision("highest"), "max_abs": diff, "max_rel": diff / scale,
            "with_relu_max_abs": relu_diff, "with_relu_max_rel": relu_diff / scale,
            "W_shape": [x.shape[1], outputs], "b_shape": [outputs]}


def run(config: Config, on_progress=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    train = load(config.dataset, "train", config.data_dir)
    data_lib.check_batch_size(config.batch_size, train)
    on_progress("activations and their derivatives")
    grid = jnp.linspace(-6.0, 6.0, config.grid_points)
    curves = derivatives(grid)
    on_progress("two linear layers against one")
    x = train.images[: config.batch_size].reshape(config.batch_size, -1) / 255.0
    layers = random_layers(jax.random.key(config.seed), x.shape[1], config.hidden, config.outputs)
    linear = {dtype: stacked_vs_single(x, layers, dtype) for dtype in ("float32", "float64")}
    return {
        "experiment": "activations",
        "config": dataclasses.asdict(config),
        "grid": np.asarray(grid).tolist(),
        "activations": {name: {"value": np.asarray(v).tolist(), "derivative": np.asarray(d).tolist(),
                               "max_abs_error_vs_closed_form": float(jnp.max(jnp.abs(d - c)))}
                        for name, (v, d, c) in curves.items()},
        "two_linear_layers": linear,
    }


# ---- output -----------------------------------------------------------------


def summary(result: dict) -> str:
    c = result["config"]
    act = format_table(["activation", "max |vmap(grad(f)) - closed form|"],
                       [[n, a["max_abs_error_vs_closed_form"]] for n, a in result["activations"].items()])
    lin = format_table(["dtype", "max|two - one|", "relative", "with a ReLU between: max|diff|", "relative"],
                       [[d, r["max_abs"], r["max_rel"], r["with_relu_max_abs"], r["with_relu_max_rel"]]
                        for d, r in result["two_linear_layers"].items()])
    shape = result["two_linear_layers"]["float32"]
    return "\n".join([
        f"Derivatives by jax.vmap(jax.grad(f)) on {c['grid_points']} points in [-6, 6]", act,
        f"Two linear layers ({shape['W_shape'][0]} -> {c['hidden']} -> {c['outputs']}) against one, "
        f"W = W_h W_o {tuple(shape['W_shape'])}, b = b_h W_o + b_o, on {c['batch_size']} "
        f"{c['dataset']} images", lin,
        "Without an activation the two layers are one linear map, equal to rounding (relative "
        "~1e-7 in float32, ~1e-16 in float64); with a ReLU between them they are not."])


def figures(result: dict) -> dict:
    fig, axes = new_figure(ncols=2, width=5.0)
    grid = np.array(result["grid"])
    for i, (name, a) in enumerate(result["activations"].items()):
        axes[0, 0].plot(grid, a["value"], color=f"C{i}", label=name)
        axes[0, 1].plot(grid, a["derivative"], color=f"C{i}", label=f"{name}'")
    axes[0, 0].set_title("activation f(x)", fontsize=10)
    axes[0, 1].set_title("derivative f'(x) = jax.vmap(jax.grad(f))(x)", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("x")
        ax.axhline(0, color="gray", lw=0.5)
        ax.legend()
    return {"activations": fig}
