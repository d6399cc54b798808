"""Text D: a batch of B examples cuts the gradient's variance B-fold.

At fixed parameters theta, let g_i = grad l(theta; x_i, y_i) be the gradient
of example i of the N training examples, g = (1/N) sum_i g_i the full-batch
gradient, and

    tr(Sigma) = (1/N) sum_i ||g_i - g||^2

the total variance of one example's gradient. The minibatch gradient
g_B = (1/B) sum_{i in batch} g_i then has

    E||g_B - g||^2 = tr(Sigma) / B                      (B draws with replacement)
    E||g_B - g||^2 = tr(Sigma) / B * (N - B) / (N - 1)  (B distinct examples)

so on log-log axes the measurements fall on a line of slope -1. This
experiment measures E||g_B - g||^2 by drawing many batches for B = 1, 2, 4,
..., 1024, at initialisation and after one epoch of training, and fits the
slope. g is exact (all N examples); tr(Sigma) for the theory lines comes from
the per-example gradients (jax.vmap(jax.grad(l))) of all N examples, or of
`trace_examples` of them drawn at random when N is larger.

It also reports the simple gradient noise scale of McCandlish et al. (2018),
"An Empirical Model of Large-Batch Training":

    B_noise = tr(Sigma) / ||g||^2

the batch size at which the minibatch noise E||g_B - g||^2 equals the signal
||g||^2. (Their B_noise weights both by the Hessian; this is their B_simple,
the same quantity when the Hessian is a multiple of the identity.) Below
B_noise a bigger batch buys an almost proportionally better step; well above
it, the extra examples buy little.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxbatch import (
    TrainConfig,
    batched_loss,
    get_model,
    init_key,
    init_params,
    input_numbers,
    load,
    normalize,
    per_example_grads,
    train_and_evaluate,
)
from jaxbatch import data as data_lib
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, new_figure
from jaxbatch.settings import check, setting

SAMPLING = ("with_replacement", "without_replacement")
POINTS = ("init", "after_training")


# Sizes that bound memory: every B draws max(min_repeats, samples // B) batches
# of B indices; a chunk of per-example gradients is chunk x P numbers (the mlp
# on CIFAR-10 has P = 789,258: 3.2 GB at 1000).
MAX_SAMPLES, MAX_MIN_REPEATS, MAX_CHUNK = 2**20, 4096, 1000


@dataclasses.dataclass
class Config:
    model: str = setting("mlp", "the network whose gradients are measured")
    datasets: tuple = setting(("mnist", "fashion_mnist", "cifar10"), "the datasets, one plot each", item=str,
                              choices=data_lib.DATASETS, kind="dataset")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    batch_sizes: tuple = setting(tuple(2**k for k in range(11)), "the batch sizes B: at least two different ones, "
                                 "to fit the slope through", item=int, at_least=1, kind="batch size")
    samples: int = setting(16384, f"examples drawn per batch size: repeats = max(min-repeats, samples / B); "
                           f"at most {MAX_SAMPLES}", at_least=1, at_most=MAX_SAMPLES)
    min_repeats: int = setting(32, f"the fewest batches drawn per batch size, 2 to {MAX_MIN_REPEATS}: a "
                               "standard error needs two", at_least=2, at_most=MAX_MIN_REPEATS)
    train_epochs: int = setting(1, "the second point: the parameters after this many epochs", at_least=1)
    # Text C's SGD settings: stable on all three datasets.
    train_batch_size: int = setting(128, "batch size of that training", at_least=1)
    train_lr: float = setting(0.02, "SGD learning rate of that training", above=0)
    train_momentum: float = setting(0.9, "momentum of that training", at_least=0)
    chunk: int = setting(250, f"examples per pass when summing gradients, at most {MAX_CHUNK}: a pass holds "
                         "their per-example gradients", at_least=1, at_most=MAX_CHUNK)
    trace_examples: int = setting(20000, "examples whose own gradients give tr(Sigma); all of them if fewer",
                                  at_least=1)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)


QUICK = dict(datasets=("digits",), batch_sizes=(1, 4, 16, 64, 256, 1024), samples=4096, min_repeats=16)


def validate(config: Config) -> None:
    check(config)
    get_model(config.model)
    if len(set(config.batch_sizes)) < 2:
        raise JaxbatchError("give {setting} at least two different batch sizes to fit a slope",
                            setting="batch_sizes")


# ---- the full gradient and the variance of one example's gradient ----------


def make_gradient_moments(apply_fn, images, labels, chunk: int, examples: int, seed: int):
    """f(params) -> (g, tr(Sigma), m).

    g, the full-batch gradient over all N examples, as a flat float64 vector:
    gradients of the summed loss, `chunk` examples at a time.
    tr(Sigma) = (1/m) sum_i ||g_i - g||^2 over m = min(examples, N) examples
    drawn without replacement (all of them when m = N): the exact value for
    small datasets, an unbiased estimate for large ones, where every g_i of
    a chunk must exist at once (chunk x P numbers).
    """
    inputs = input_numbers(1.0)
    n = len(labels)
    images, labels = jax.device_put(images), jax.device_put(labels)

    @jax.jit
    def grad_sum(params, idx, weights):
        return jax.grad(lambda p: batched_loss(apply_fn, p, normalize(images[idx], inputs), labels[idx],
                                               weights, reduction="sum"))(params)

    @jax.jit
    def deviation_sum(params, g, idx, weights):
        grads = per_example_grads(apply_fn, params, normalize(images[idx], inputs), labels[idx])
        per_example = sum(jnp.sum((gi - gl) ** 2, axis=tuple(range(1, gi.ndim)))
                          for gi, gl in zip(jax.tree.leaves(grads), jax.tree.leaves(g)))
        return weights @ per_example

    # A dataset's sum, not a batch's: the chunks' sums are added on the host in
    # float64 (tens of thousands of gradients), so not with jaxbatch/chunks.py,
    # whose running sum stays on the device in the parameters' dtype.
    def chunks(order):
        """`order` in chunks of `chunk`; the last wraps around, its repeats weigh 0."""
        for start in range(0, len(order), chunk):
            positions = np.arange(start, start + chunk)
            yield order[positions % len(order)], (positions < len(order)).astype(np.float32)

    subset = np.sort(np.random.default_rng(seed).choice(n, min(examples, n), replace=False))

    def moments(params):
        total = None
        for idx, weights in chunks(np.arange(n)):
            s = jax.tree.map(lambda a: np.asarray(a, np.float64), grad_sum(params, idx, weights))
            total = s if total is None else jax.tree.map(np.add, total, s)
        g = jax.tree.map(lambda t: t / n, total)
        g32 = jax.tree.map(lambda t: t.astype(np.float32), g)
        deviations = sum(float(deviation_sum(params, g32, idx, w)) for idx, w in chunks(subset))
        return np.concatenate([t.ravel() for t in jax.tree.leaves(g)]), deviations / len(subset), len(subset)

    return moments


# ---- minibatch gradients drawn at random -----------------------------------


def make_squared_errors(apply_fn, images, labels):
    """f(params, g, idx (R, B)) -> ||g_B - g||^2 for each of the R batches."""
    inputs = input_numbers(1.0)
    images, labels = jax.device_put(images), jax.device_put(labels)

    def one(params, g, idx):
        grad = jax.grad(lambda p: batched_loss(apply_fn, p, normalize(images[idx], inputs), labels[idx]))(params)
        diff = ravel_pytree(grad)[0] - g
        return diff @ diff

    @jax.jit
    def squared_errors(params, g, idx):
        # About 64 examples' gradients at a time: small B vectorises over batches.
        per_call = max(1, 64 // idx.shape[1])
        return jax.lax.map(lambda i: one(params, g, i), idx, batch_size=per_call)

    return squared_errors


def draw_batches(rng, n: int, batch_size: int, repeats: int, sampling: str) -> np.ndarray:
    """(repeats, batch_size) example indices."""
    if sampling == "with_replacement":
        return rng.integers(0, n, size=(repeats, batch_size))
    return np.stack([rng.choice(n, batch_size, replace=False) for _ in range(repeats)])


def fit_slope(batch_sizes, values) -> tuple[float, float]:
    """Least-squares line through (log B, log value): (slope, intercept)."""
    slope, intercept = np.polyfit(np.log(batch_sizes), np.log(values), 1)
    return float(slope), float(intercept)


def measure_point(squared_errors, params, g, tr_sigma, n, config: Config, rng) -> dict:
    """E||g_B - g||^2 for every B, both ways of sampling, against theory."""
    g32 = jnp.asarray(g, jnp.float32)
    sizes = np.array(sorted(set(config.batch_sizes)))
    out = {"trace_sigma": tr_sigma, "grad_norm_sq": float(g @ g),
           "b_noise": tr_sigma / float(g @ g), "batch_sizes": sizes.tolist()}
    for sampling in SAMPLING:
        means, sems, repeats = [], [], []
        for b in sizes:
            r = max(config.min_repeats, config.samples // int(b))
            sq = np.asarray(squared_errors(params, g32, draw_batches(rng, n, int(b), r, sampling)), np.float64)
            means.append(sq.mean())
            sems.append(sq.std(ddof=1) / math.sqrt(r))
            repeats.append(r)
        means = np.array(means)
        theory = tr_sigma / sizes
        if sampling == "without_replacement":
            theory = theory * (n - sizes) / (n - 1)
        # Without replacement the slope is fitted after removing the finite-population factor.
        corrected = means if sampling == "with_replacement" else means * (n - 1) / (n - sizes)
        slope, _ = fit_slope(sizes, corrected)
        out[sampling] = {"measured": means.tolist(), "std_error": sems, "repeats": repeats,
                         "theory": theory.tolist(), "slope": slope,
                         "measured_over_theory": (means / theory).tolist()}
    # tr(Sigma) from the sampling alone: B * E||g_B - g||^2 is tr(Sigma) for every B.
    out["trace_sigma_from_samples"] = float(np.mean(sizes * np.array(out["with_replacement"]["measured"])))
    out["b_noise_from_samples"] = out["trace_sigma_from_samples"] / out["grad_norm_sq"]
    return out


def run_dataset(name: str, config: Config, on_progress) -> dict:
    train = load(name, "train", config.data_dir)
    test = load(name, "test", config.data_dir)
    n = len(train)
    data_lib.check_batch_size(max(config.batch_sizes), train, "batch_sizes")
    data_lib.check_batch_size(config.train_batch_size, train, "train_batch_size")
    model = get_model(config.model)
    model.check_image_shape(train.image_shape)
    train_config = TrainConfig(model=config.model, dataset=name, epochs=config.train_epochs,
                               batch_size=config.train_batch_size, lr=config.train_lr,
                               momentum=config.train_momentum, seed=config.seed)
    on_progress(f"{name}: training {config.model} for {config.train_epochs} epoch(s)")
    trained = train_and_evaluate(train_config, train_ds=train, test_ds=test)
    params = {"init": init_params(model, init_key(config.seed), train.image_shape), "after_training": trained.params}
    gradient_moments = make_gradient_moments(model.apply, train.images, train.labels, config.chunk,
                                             config.trace_examples, config.seed)
    squared_errors = make_squared_errors(model.apply, train.images, train.labels)
    rng = np.random.default_rng(config.seed)
    result = {"train_size": n, "test_accuracy_after_training": trained.history[-1]["test_accuracy"]}
    for point in POINTS:
        on_progress(f"{name}, {point}: full gradient, and tr(Sigma) from per-example gradients")
        g, tr_sigma, m = gradient_moments(params[point])
        on_progress(f"{name}, {point}: sampling minibatch gradients")
        result[point] = measure_point(squared_errors, params[point], g, tr_sigma, n, config, rng)
        result[point]["trace_sigma_examples"] = m
    result["interpretation"] = interpret(name, n, result)
    return result


def interpret(name: str, n: int, result: dict) -> str:
    """What B_noise suggests, in words, from the measured numbers."""
    init, trained = result["init"], result["after_training"]
    b0, b1 = init["b_noise"], trained["b_noise"]
    trend = (f"B_noise {'grew' if b1 > b0 else 'fell'} during training: tr(Sigma) went from "
             f"{init['trace_sigma']:.3g} to {trained['trace_sigma']:.3g} and ||g||^2 from "
             f"{init['grad_norm_sq']:.3g} to {trained['grad_norm_sq']:.3g}. It is a snapshot of the "
             "parameters where it is measured; measure it again later in training before settling on a batch size")
    return (
        f"{name} ({n} training examples): B_noise = tr(Sigma)/||g||^2 = {b0:.3g} at initialisation and "
        f"{b1:.3g} after training. In McCandlish et al.'s model a step with batch B makes "
        "1/(1 + B_noise/B) of the progress of an exact-gradient step: well below B_noise, doubling B nearly "
        "halves the steps needed (bigger batches pay off); well above it, doubling B barely cuts the steps "
        f"and the extra examples are wasted. So for {name}, batches up to about {b1:.0f} examples are "
        f"efficient, and beyond a few times that ({min(4 * b1, n):.0f}) bigger batches stop paying off. "
        f"{trend}."
    )


def run(config: Config, on_progress=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    datasets = {name: run_dataset(name, config, on_progress) for name in config.datasets}
    return {
        "experiment": "variance",
        "config": dataclasses.asdict(config),
        "quantity": "E||g_B - g||^2, the mean over repeated draws of a batch of B training examples",
        "theory": "tr(Sigma)/B with replacement; tr(Sigma)/B * (N-B)/(N-1) without",
        "slope_target": [-1.1, -0.9],
        "datasets": datasets,
    }


# ---- output -----------------------------------------------------------------


def summary(result: dict) -> str:
    rows = []
    for name, d in result["datasets"].items():
        for point in POINTS:
            p = d[point]
            rows.append([name, point, p["with_replacement"]["slope"], p["without_replacement"]["slope"],
                         p["trace_sigma"], p["trace_sigma_from_samples"], p["grad_norm_sq"], p["b_noise"]])
    table = format_table(["dataset", "parameters", "slope (with repl.)", "slope (without, corrected)",
                          "tr(Sigma)", "tr(Sigma) sampled", "||g||^2", "B_noise"], rows)
    return "\n".join([
        f"Minibatch gradient variance E||g_B - g||^2 of {result['config']['model']} against B "
        f"({', '.join(map(str, result['config']['batch_sizes']))}); theory: slope -1",
        table, *(d["interpretation"] for d in result["datasets"].values())])


def figures(result: dict) -> dict:
    figs = {}
    for name, d in result["datasets"].items():
        fig, axes = new_figure(ncols=2, width=5.5)
        for ax, point in zip(axes[0], POINTS):
            p = d[point]
            sizes = np.array(p["batch_sizes"])
            for i, (sampling, marker) in enumerate(zip(SAMPLING, "os")):
                m = p[sampling]
                label = sampling.replace("_", " ")
                ax.errorbar(sizes, m["measured"], yerr=2 * np.array(m["std_error"]), fmt=marker, ms=5,
                            mfc="none", capsize=2, color=f"C{i}",
                            label=f"measured, {label} (slope {m['slope']:.3f}; bars: 2 s.e.)")
                ax.plot(sizes, m["theory"], "-" if i == 0 else "--", lw=1, color=f"C{i}",
                        label="tr(Sigma)/B" if i == 0 else "tr(Sigma)/B (N-B)/(N-1)")
            ax.axhline(p["grad_norm_sq"], color="gray", ls=":", lw=1)
            ax.axvline(p["b_noise"], color="gray", ls=":", lw=1)
            ax.annotate(f"||g||^2; B_noise = {p['b_noise']:.3g}", (sizes[0], p["grad_norm_sq"]),
                        textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("E||g_B - g||^2")
            ax.set_title(f"{name}, {result['config']['model']}, "
                         f"{'at initialisation' if point == 'init' else 'after training'}", fontsize=10)
            ax.legend(fontsize=7)
        figs[f"variance_{name}"] = fig
    return figs
