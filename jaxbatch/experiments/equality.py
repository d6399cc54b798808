"""Text A: is the batch gradient the average of the examples' gradients?

For a batch B and the mean loss L_B = (1/|B|) sum_i l(theta; x_i, y_i),
linearity of differentiation gives

    grad L_B = (1/|B|) sum_i grad l(theta; x_i, y_i),

so "one example at a time, average after the batch" (text A's option 1) and
"the whole batch at once" (option 2) are the same gradient. This experiment
computes it four ways, for every model, on one real batch:

    loop      a Python loop over the batch, one jitted single-example gradient
              at a time, summed, divided by |B| (option 1, literally)
    vmap      per-example gradients jax.vmap(jax.grad(l)), then their mean
    grad_vmap jax.grad of the mean of the vmapped one-example loss
    batched   jax.grad of the natively batched loss (option 2)

and a fifth, text D's data parallelism, once per device count K:

    data_parallel_kK  K devices, each the batched gradient of its |B|/K
                      examples, averaged across the devices (an all-reduce)

Since grad L_B = (1/K) sum_k grad L_{B_k} when the K parts are equal, K
workers with b examples each compute the gradient of one batch of K*b, and
an epoch of N examples takes N/(K*b) of their steps instead of N/b.

and reports, per parameter array and pair of ways, the largest absolute
difference max|a - b| and the relative difference max|a - b| / max|b| (the
scale is the largest entry of the array, not each entry, so entries near 0
cannot blow it up), in float32 and in float64.

The five sums differ only in the order in which floating-point additions are
done, and each rounding costs at most the unit roundoff u of the format
(u = 2^-24 ~ 6e-8 in float32, 2^-53 ~ 1.1e-16 in float64), so the ways agree
to a small multiple of u: ~1e-7 in float32, ~1e-16 in float64.

That claim needs matrix products computed in the format itself, so it is
checked under `highest_precision()`. The float32 comparison is also reported
at the backend's default precision, as training runs: the same on a CPU, but
TF32 products on an NVIDIA GPU (u = 2^-11 ~ 4.9e-4) and bfloat16 on a TPU
(2^-8 ~ 3.9e-3) round far more coarsely than float32, so there the ways are
expected to differ by ~1e-3, and that comparison is not held to the target.

Text E's point is checked too: one SGD step on the summed loss with lr/|B|
equals one step on the mean loss with lr, since grad sum_i l_i = |B| grad L_B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os

import jax
import numpy as np

from jaxbatch import (
    batched_grad,
    batched_loss,
    data_mesh,
    data_parallel_grad,
    example_grad_fn,
    get_model,
    init_key,
    init_params,
    load,
    loop_grad,
    mean_per_example_grads,
    vmap_grad,
)
from jaxbatch import data as data_lib
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, new_figure, text_name
from jaxbatch.machine import cpu_model, time_calls
from jaxbatch.models import MODELS
from jaxbatch.precision import enable_x64, highest_precision, matmul_precision, relative_difference
from jaxbatch.settings import check, setting

WAYS = ("loop", "vmap", "grad_vmap", "batched")
WAY_NAMES = {
    "loop": f"Python loop of one-example gradients, averaged (option 1 of {text_name('A')})",
    "vmap": "jax.vmap(jax.grad(l)) per-example gradients, then the mean",
    "grad_vmap": "jax.grad of the mean of the vmapped one-example loss",
    "batched": f"jax.grad of the natively batched loss (option 2 of {text_name('A')})",
    "data_parallel_kK": "K devices, each the batched gradient of its B/K examples, then averaged across the "
                        f"devices ({text_name('D')}); one way per K",
}
MAX_DEVICES = 8  # data-parallel K values stop here: enough to show the pattern, one compile per K
MAX_BATCH = 4096  # the vmap way holds all B gradients at once: 6.7 GB for the mlp on MNIST in float64
DTYPES = ("float32", "float64")
TARGETS = {"float32": 1e-5, "float64": 1e-12}  # largest relative difference allowed
# {name: (dtype, float32 matmul precision)}. The first two are the claim, held
# to TARGETS; the last is the float32 one as training computes it, reported.
COMPARISONS = {
    "float32": ("float32", "highest"),
    "float64": ("float64", "highest"),
    "float32_default": ("float32", "default"),
}
PRECISION_NOTE = (
    "float32 and float64 are compared under the highest matmul precision: every matrix product in the "
    "format itself, on every backend. float32_default is the float32 comparison at the backend's default "
    "precision, as training runs, reported and not held to the target. On a CPU it is the same float32 "
    "computation (identical numbers). On an NVIDIA GPU (Ampere and later) the default multiplies TF32 "
    "inputs (10-bit mantissa, unit roundoff 2^-11 ~ 4.9e-4) and on a TPU bfloat16 ones (8 bits, 2^-8 ~ "
    "3.9e-3), so there the ways are expected to differ by ~1e-3: the coarser rounding of the products, "
    "not float32's."
)
EXPLANATION = (
    "The four ways add the same per-example terms in different orders (a Python loop, a vmapped "
    "mean, a reduction inside the backward pass). Floating-point addition is not associative: "
    "each addition rounds to the nearest representable number, an error of at most the unit "
    "roundoff u = 2^-24 ~ 6e-8 in float32 and 2^-53 ~ 1.1e-16 in float64. So the ways agree to "
    "a few u: ~1e-7 in float32 and ~1e-16 in float64 -- the same gradient, rounded differently."
)
DATA_PARALLEL_NOTE = (
    f"Data parallelism, as in {text_name('D')}: K workers with b examples each are one batch of K*b. "
    "Each worker computes the mean gradient of its own b examples, and the average of the K means is the "
    "mean gradient of all K*b, "
    "(1/K) sum_k (1/b) sum_(i in B_k) g_i = (1/(K*b)) sum_i g_i -- the same gradient as the four ways, to "
    "rounding. So one data-parallel step consumes K*b examples, and an epoch of N examples takes N/(K*b) "
    "steps where one worker with batch b takes N/b: K-fold fewer steps for the same epoch. With the same "
    "learning rate that is K-fold fewer updates per epoch, hence text D's 'up to K times more epochs' or a "
    "larger learning rate (experiment lr-scaling)."
)


@dataclasses.dataclass
class Config:
    models: tuple = setting(tuple(MODELS), "the models whose gradients are compared", item=str, choices=MODELS,
                            kind="model")
    dataset: str = setting("mnist", "the dataset the batch is drawn from; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    # Text A's batch; not a power of 2, so dividing by it rounds.
    batch_size: int = setting(50, f"examples in the one batch, at most {MAX_BATCH}: the vmap way holds all "
                              "their gradients at once", at_least=1, at_most=MAX_BATCH)
    lr: float = setting(0.1, "learning rate of text E's summed-vs-mean SGD step", above=0)
    repeats: int = setting(3, "timing: the median of this many calls after a warm-up call", at_least=1)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)
    comparisons: tuple = setting(tuple(COMPARISONS), "which dtype and matmul precision to compare the ways in",
                                 item=str, choices=COMPARISONS, kind="comparison")


QUICK = dict(dataset="digits", repeats=1)


def validate(config: Config) -> None:
    check(config)
    data_lib.get_spec(config.dataset)


def data_parallel_ks(batch_size: int, device_count: int) -> tuple[list[int], dict]:
    """The device counts K the data-parallel way runs on: the divisors of the
    device count, up to MAX_DEVICES, over which the batch splits evenly (the
    divisors of gcd(device count, batch size)), and {K: why not} for the
    divisors it does not split over. Skipped rather than refused: text A's
    batch of 50 on 4 or 8 devices still shows K = 1 and 2."""
    divisors = [k for k in range(1, min(device_count, MAX_DEVICES) + 1) if device_count % k == 0]
    skipped = {k: f"batch size {batch_size} does not split evenly over {k} devices" for k in divisors
               if batch_size % k}
    return [k for k in divisors if k not in skipped], skipped


# ---- the five ways ---------------------------------------------------------


def data_parallel_way(k: int) -> str:
    return f"data_parallel_k{k}"


def way_functions(apply_fn, ks=()) -> dict:
    """{way: f(params, xs, ys) -> batch gradient}, each from jaxbatch.losses:
    the four ways, then the data-parallel one on the first K devices for each
    K in `ks`. The loop runs in Python over a jitted one-example gradient,
    the others are jitted whole. Call them inside the comparison's precision
    and x64 contexts: jit traces under the settings in force at the call, and
    keeps one compiled version per setting."""
    grad_one = example_grad_fn(apply_fn)
    ways = {
        "loop": lambda p, xs, ys: loop_grad(grad_one, p, xs, ys),
        "vmap": jax.jit(functools.partial(mean_per_example_grads, apply_fn)),
        "grad_vmap": jax.jit(functools.partial(vmap_grad, apply_fn)),
        "batched": jax.jit(functools.partial(batched_grad, apply_fn)),
    }
    for k in ks:
        ways[data_parallel_way(k)] = jax.jit(functools.partial(data_parallel_grad, apply_fn, mesh=data_mesh(k)))
    return ways


def way_pairs(ks) -> list[tuple[str, str]]:
    """Every pair of the four ways, then each data-parallel way against each of the four."""
    return [*itertools.combinations(WAYS, 2), *((data_parallel_way(k), w) for k in ks for w in WAYS)]


def differences(a, b) -> dict:
    """{parameter path: (max|a-b|, max|a-b| / max|b|)} for two gradient pytrees,
    the relative one `precision.relative_difference` of each array."""
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        diff = float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        out[jax.tree_util.keystr(path)] = (diff, relative_difference(x, y))
    return out


def sum_vs_mean_step(apply_fn, params, xs, ys, mean_grad, lr: float) -> float:
    """max|theta_sum - theta_mean| after one SGD step (text E): the summed loss
    at lr/|B|, `param -= lr * grad / batch_size`, against the mean loss at lr."""
    sum_grad = jax.jit(jax.grad(lambda p: batched_loss(apply_fn, p, xs, ys, reduction="sum")))(params)
    diffs = []
    for p, gs, gm in zip(*(map(np.asarray, jax.tree.leaves(t)) for t in (params, sum_grad, mean_grad))):
        lr_sum, lr_mean = p.dtype.type(lr / len(ys)), p.dtype.type(lr)
        diffs.append(np.max(np.abs((p - lr_sum * gs) - (p - lr_mean * gm))))
    return float(max(diffs))


# ---- the batch each model sees ---------------------------------------------


def model_batch(model, images: np.ndarray):
    """The batch as this model can take it, and a note when it had to change.

    LeNet-5 takes 32x32 (or 28x28, padded) images; 8x8 digits are enlarged 4x
    by repeating pixels (nearest neighbour), the same digits at LeNet's size.
    """
    try:
        model.check_image_shape(images.shape[1:])
        return images, None
    except JaxbatchError:
        h = images.shape[1]
        if 32 % h:
            raise
        k = 32 // h
        note = f"{h}x{h} images enlarged {k}x (pixels repeated) to 32x32, the size {model.name} takes"
        return images.repeat(k, axis=1).repeat(k, axis=2), note


def matmul_context(setting: str):
    """The context in which float32 matrix products run at `setting`: the
    claim's `highest_precision()`, or the backend's "default"."""
    return highest_precision() if setting == "highest" else jax.default_matmul_precision(setting)


def compare_model(model, params, pixels, labels, config: Config, comparison: str, ks, on_progress) -> dict:
    """The gradients of one model, four ways and data-parallel on K devices
    for each K in `ks`, in one of COMPARISONS (a dtype and a matmul
    precision): differences and times."""
    dtype, setting = COMPARISONS[comparison]
    # x64 and the precision must be in force while the functions are traced and run.
    with enable_x64() if dtype == "float64" else contextlib.nullcontext(), matmul_context(setting):
        params = jax.tree.map(lambda a: np.asarray(a, dtype), params)
        xs, ys = np.asarray(pixels / 255.0, dtype), labels
        grads, seconds = {}, {}
        for way, f in way_functions(model.apply, ks).items():
            on_progress(f"{model.name} {comparison}: {way}")
            # The first call compiles; its gradient is kept and the next `repeats` calls are timed.
            grads[way] = jax.block_until_ready(f(params, xs, ys))
            seconds[way] = time_calls(f, [(params, xs, ys)], jax.block_until_ready, warmup=0,
                                      min_repeats=config.repeats, max_repeats=config.repeats,
                                      min_time_s=0.0).median_s
        pairs = {}
        for a, b in way_pairs(ks):
            pairs[f"{a}~{b}"] = {path: {"max_abs": d, "max_rel": r}
                                 for path, (d, r) in differences(grads[a], grads[b]).items()}
        step_diff = sum_vs_mean_step(model.apply, params, xs, ys, grads["batched"], config.lr)
    worst = max(v["max_rel"] for per_param in pairs.values() for v in per_param.values())
    # Each K's worst difference from the four ways, for the data-parallel table.
    data_parallel = {str(k): worst_of({p: d for p, d in pairs.items() if p.startswith(data_parallel_way(k) + "~")})
                     for k in ks}
    return {"dtype": dtype, "precision": matmul_precision(setting),
            "seconds": seconds, "pairs": pairs, **worst_of(pairs), "data_parallel": data_parallel,
            "sum_vs_mean_step_max_abs": step_diff,
            # None: reported, not held to a target (the default precision).
            "within_target": bool(worst <= TARGETS[comparison]) if comparison in TARGETS else None}


def worst_of(pairs: dict) -> dict:
    """The largest relative and absolute differences over pairs of ways and their parameter arrays."""
    diffs = [d for per_param in pairs.values() for d in per_param.values()]
    return {"max_rel": max(d["max_rel"] for d in diffs), "max_abs": max(d["max_abs"] for d in diffs)}


def steps_per_epoch(examples: int, batch_size: int, ks) -> dict:
    """{K: steps per epoch of one worker with batch b = B/K, and of K workers
    with b each}: the K workers take one batch of K*b = B per step, so K-fold
    fewer steps (the last, partial batch counted, as training keeps it)."""
    return {str(k): {"per_device_batch": batch_size // k, "one_worker": -(-examples // (batch_size // k)),
                     "k_workers": -(-examples // batch_size)} for k in ks}


def run(config: Config, on_progress=None) -> dict:
    """The whole comparison; returns the JSON-able result."""
    on_progress = on_progress or (lambda text: None)
    validate(config)
    train = load(config.dataset, "train", config.data_dir)
    data_lib.check_batch_size(config.batch_size, train)
    order = np.random.default_rng(config.seed).permutation(len(train))[: config.batch_size]
    images, labels = train.images[order], train.labels[order]
    ks, skipped = data_parallel_ks(config.batch_size, jax.device_count())
    models = {}
    for name in config.models:
        model = get_model(name)
        pixels, note = model_batch(model, images)
        models[name] = {"input_shape": list(pixels.shape), "note": note}
        # Initialised once, in float32 (jitted: eager Flax init compiles every op), then cast.
        params = jax.jit(lambda: init_params(model, init_key(config.seed), pixels.shape[1:]))()
        for comparison in config.comparisons:
            models[name][comparison] = compare_model(model, params, pixels, labels, config, comparison, ks,
                                                     on_progress)
    return {
        "experiment": "equality",
        "config": dataclasses.asdict(config),
        "ways": WAY_NAMES,
        "relative_difference": "max|a - b| / max|b| over one parameter array",
        "comparisons": {name: {"dtype": COMPARISONS[name][0], "matmul_precision": COMPARISONS[name][1],
                               "target": TARGETS.get(name)} for name in config.comparisons},
        "targets": TARGETS,
        "models": models,
        "all_within_target": all(m[c]["within_target"] for m in models.values() for c in config.comparisons
                                 if c in TARGETS),
        "data_parallel": {
            "device_count": jax.device_count(), "ks": ks, "skipped": {str(k): why for k, why in skipped.items()},
            "choice": f"the divisors of the device count up to {MAX_DEVICES} that divide the batch size, "
                      "i.e. of gcd(device count, batch size); the others are skipped",
            "steps_per_epoch": {"examples": len(train), **steps_per_epoch(len(train), config.batch_size, ks)},
            "note": DATA_PARALLEL_NOTE},
        "explanation": EXPLANATION,
        "precision_note": PRECISION_NOTE,
        "default_precision_means": matmul_precision("default")["float32_matmul_means"],
        "timing_note": "seconds per batch gradient (float32 at the default matmul precision, as training "
                       "runs), median of repeats after a warm-up call, on "
                       f"{cpu_model()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on {jax.default_backend()}",
    }


# ---- output -----------------------------------------------------------------


def summary(result: dict) -> str:
    rows = []
    for name, m in result["models"].items():
        f32, f64, f32_default = (m.get(c, {}) for c in ("float32", "float64", "float32_default"))
        rows.append([name, f32.get("max_abs"), f32.get("max_rel"), f64.get("max_abs"), f64.get("max_rel"),
                     f32_default.get("max_rel"), f32.get("sum_vs_mean_step_max_abs"),
                     f64.get("sum_vs_mean_step_max_abs"), *(_ms(m, w) for w in WAYS)])
    table = format_table(
        ["model", "f32 abs", "f32 rel", "f64 abs", "f64 rel", "f32 rel default", "E-step f32", "E-step f64",
         *(f"{w} ms" for w in WAYS)], rows)
    notes = [f"{name}: {m['note']}" for name, m in result["models"].items() if m["note"]]
    verdict = ("every pair of ways agrees within the targets "
               f"(relative {TARGETS['float32']:g} in float32, {TARGETS['float64']:g} in float64)"
               if result["all_within_target"] else "SOME PAIRS EXCEED THE TARGETS (see result.json)")
    return "\n".join([
        f"Batch gradient five ways ({text_name('A')}), batch of {result['config']['batch_size']} from "
        f"{result['config']['dataset']}: "
        "largest difference over all parameter arrays and pairs of ways (data-parallel ones included)",
        "(rel = max|a-b| / max|b| per array; E-step = |one SGD step, summed loss at lr/B - mean loss at lr|;",
        " f32 and f64 under the highest matmul precision; f32 rel default: float32 at the backend's default "
        f"precision, here {result['default_precision_means']}, not held to the target)",
        table, *notes, "", *data_parallel_summary(result), "", verdict, result["explanation"],
        result["precision_note"], f"Times: {result['timing_note']}."])


def _ms(model_result: dict, way: str):
    """A way's float32 time at the default precision, in ms, or None when that comparison did not run."""
    seconds = model_result.get("float32_default", {}).get("seconds", {})
    return f"{seconds[way] * 1e3:.2f}" if way in seconds else None


def data_parallel_summary(result: dict) -> list[str]:
    """Text D's table: per model and K, the data-parallel gradient's largest
    difference from the four ways, and the steps an epoch takes."""
    dp = result["data_parallel"]
    steps = dp["steps_per_epoch"]
    rows = []
    for name, m in result["models"].items():
        for k in dp["ks"]:
            s = steps[str(k)]
            rows.append([name, k, s["per_device_batch"], k * s["per_device_batch"], s["one_worker"], s["k_workers"],
                         *(m[c]["data_parallel"][str(k)]["max_rel"] if c in m else None
                           for c in ("float32", "float64")), _ms(m, data_parallel_way(k))])
    table = format_table(["model", "K", "b per device", "K*b per step", "steps/epoch 1 worker x b",
                          "steps/epoch K workers x b", "f32 rel", "f64 rel", "ms"], rows)
    skipped = "; ".join(f"K = {k} skipped: {why}" for k, why in dp["skipped"].items())
    n = dp["device_count"]
    return [f"Data-parallel, as in {text_name('D')}: K = {', '.join(map(str, dp['ks']))} of the {n} "
            f"device{'s' * (n > 1)} here ({dp['choice']})" + (f"; {skipped}" if skipped else ""),
            f"(rel: largest difference from the four ways; steps per epoch of the {steps['examples']} training "
            "examples)", table, dp["note"]]


def figures(result: dict) -> dict:
    """The largest relative difference per model in each comparison, and the
    time each way takes (float32, default precision, when it ran). Legends sit
    below the panels, where they cover no bar. Results written before the
    comparisons were recorded (float32 and float64 only, times in float32) draw too."""
    fig, axes = new_figure(ncols=2, width=6.0, height=4.4)
    names = list(result["models"])
    first = result["models"][names[0]]
    comparisons = result.get("comparisons") or {d: {"dtype": d} for d in DTYPES if d in first}
    x = np.arange(len(names))
    ax = axes[0, 0]
    width = 0.8 / len(comparisons)
    for i, (comparison, c) in enumerate(comparisons.items()):
        values = [max(result["models"][n][comparison]["max_rel"], 1e-20) for n in names]
        precision = f", {c['matmul_precision']} precision" if "matmul_precision" in c else ""
        ax.bar(x + (i - (len(comparisons) - 1) / 2) * width, values, width, label=f"{c['dtype']}{precision}")
    for i, dtype in enumerate(DTYPES):
        ax.axhline(TARGETS[dtype], ls="--", lw=1, color=f"C{i}", label=f"{dtype} target {TARGETS[dtype]:g}")
    for i, (dtype, u) in enumerate(zip(DTYPES, ("2^-24", "2^-53"))):
        ax.axhline(2.0 ** -int(u[3:]), ls=":", lw=1, color=f"C{i}", label=f"{dtype} unit roundoff {u}")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("max relative difference between ways")
    ax.set_title("The ways agree to rounding\n(dashed: targets; dotted: unit roundoff)", fontsize=10)
    ax.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax = axes[0, 1]
    timed = next((c for c in ("float32_default", "float32") if "seconds" in first.get(c, {})), None)
    if timed is None:  # the times are those of the float32_default comparison
        ax.set_axis_off()
        ax.text(0.5, 0.5, "not timed: the float32_default comparison did not run", ha="center", fontsize=9)
        return {"equality": fig}
    ways = list(first[timed]["seconds"])
    width = 0.8 / len(ways)
    for i, way in enumerate(ways):
        ax.bar(x + (i - (len(ways) - 1) / 2) * width,
               [result["models"][n][timed]["seconds"][way] * 1e3 for n in names], width,
               label=way.replace("data_parallel_k", "dp K="))
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("ms per batch gradient (float32)")
    ax.set_title(f"Time per way, batch of {result['config']['batch_size']}", fontsize=10)
    ax.legend(fontsize=7, ncols=min(len(ways), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return {"equality": fig}
