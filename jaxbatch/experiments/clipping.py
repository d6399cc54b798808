"""Per-example clipping (DP-SGD): where "one example at a time" is required.

Differentiation is linear, so the mean of the per-example gradients g_i is
the batch gradient, and a framework never needs the g_i one by one (see
losses.py and the equality experiment). Differentially private SGD (Abadi
et al. 2016, "Deep Learning with Differential Privacy") breaks that: it
bounds every example's influence by clipping its gradient to norm C before
averaging,

    mean of clipped   g_bar(C) = (1/B) sum_i g_i * min(1, C / ||g_i||),

and clipping is not linear. Clipping the batch gradient instead,

    clipped mean      clip(g, C) = g * min(1, C / ||g||),  g = (1/B) sum_i g_i,

is a different vector unless no example is clipped. The two coincide exactly
when C >= max_i ||g_i||: then every factor is 1 and g_bar(C) = g; and
clip(g, C) = g as well, because ||g|| <= (1/B) sum_i ||g_i|| <= max_i ||g_i||
(the triangle inequality). For any C below the largest norm, at least that
example is scaled down and the two differ.

On one batch, in float64 (so a difference is not float32 rounding), this
experiment measures every ||g_i|| (jax.vmap(jax.grad(l)), then one norm per
example over all parameters), and for a sweep of C from a small quantile of
the norms to above the largest: the relative difference between g_bar(C) and
clip(g, C), the cosine between them, and the fraction of examples clipped.
It does so at initialisation and after the SGD run below.

Then it trains the same model three ways at equal steps (same seed, lr,
batch, epochs): SGD, clipping only (TrainConfig.dp_clip), and DP-SGD
(dp_clip and dp_noise: Gaussian noise of standard deviation sigma * C added
to the clipped sum, privacy.py), and reports the train loss, test accuracy,
fraction clipped, epoch time and DP-SGD's epsilon at dp_delta.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxbatch import (
    TrainConfig,
    batched_grad,
    clipped_mean_grad,
    get_model,
    init_key,
    init_params,
    input_numbers,
    normalize,
    per_example_norms,
    prepare_data,
    train_and_evaluate,
)
from jaxbatch import data as data_lib
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, new_figure
from jaxbatch.losses import clip_factors
from jaxbatch.precision import enable_x64, relative_difference
from jaxbatch.settings import check, setting

POINTS = ("init", "after_sgd")
RUNS = ("sgd", "clip", "dp_sgd")
RUN_LABELS = {"sgd": "SGD", "clip": "clipping only", "dp_sgd": "DP-SGD (clip + noise)"}
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
COINCIDE_TARGET = 1e-12  # float64: "equal up to rounding"
MAX_CLIP_POINTS = 200  # the sweep runs every C at once, two float64 gradients each: 0.65 GB for the mlp


@dataclasses.dataclass
class Config:
    model: str = setting("mlp", "the network")
    dataset: str = setting("mnist", "the dataset; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    # MNIST: 240 steps an epoch.
    batch_size: int = setting(250, "the one batch measured, and the training batch; 2 or more: the mean of one "
                              "gradient is that gradient", at_least=2)
    clip_points: int = setting(25, f"values of C in the sweep, 2 to {MAX_CLIP_POINTS}, geometrically spaced from "
                               "--low-quantile to --high-factor; max ||g_i|| and ||g|| are added", at_least=2,
                               at_most=MAX_CLIP_POINTS)
    low_quantile: float = setting(0.02, "the sweep's smallest C: this quantile of the batch's norms, in [0, 1)",
                                  at_least=0, below=1)
    high_factor: float = setting(2.0, "the sweep's largest C: this multiple of the largest norm, above 1", above=1)
    epochs: int = setting(3, "epochs of each of the three training runs", at_least=1)
    lr: float = setting(0.1, "their SGD learning rate", above=0)
    momentum: float = setting(0.9, "their SGD momentum", at_least=0)
    train_clip: float = setting(1.0, "C for the clipping-only and DP-SGD runs", above=0)
    train_noise: float = setting(1.0, "sigma for DP-SGD: noise of standard deviation sigma * C", above=0)
    delta: float = setting(1e-5, "the delta of DP-SGD's epsilon, between 0 and 1", above=0, below=1)
    dp_chunk: int | None = setting(None, "form every g_i, N examples at a time, as TrainConfig.dp_chunk; default: "
                                   "ghost norms and the clipped sum from one pass, jaxbatch/ghost.py, which never "
                                   "forms them", type=int, at_least=1, metavar="N")
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)


# 14 steps an epoch.
QUICK = dict(dataset="digits", batch_size=100, epochs=6)


def validate(config: Config) -> None:
    check(config)
    get_model(config.model)
    data_lib.get_spec(config.dataset)


# ---- one batch: mean of clipped against clipped mean -------------------------


def make_both_ways(apply_fn, chunk: int):
    """f(params, xs, ys, clips (K,)) -> (g_bar(C_k), clip(g, C_k), ||g_i||) for
    every C_k. g_bar comes from the per-example gradients
    (losses.clipped_mean_grad, `chunk` examples at a time), g from the batched
    gradient (one forward pass): where nothing is clipped they are the two
    ways of the equality experiment. vmap over C: the gradients do not depend
    on C and are computed once."""

    def one_clip(params, xs, ys, clip):
        mean_of_clipped, norms = clipped_mean_grad(apply_fn, params, xs, ys, clip, chunk=chunk)
        g = batched_grad(apply_fn, params, xs, ys)
        factor = clip_factors(per_example_norms(jax.tree.map(lambda a: a[None], g)), clip)[0]
        return mean_of_clipped, jax.tree.map(lambda a: a * factor, g), norms

    return jax.jit(jax.vmap(one_clip, in_axes=(None, None, None, 0), out_axes=(0, 0, None)))


def flat(tree, k=None) -> np.ndarray:
    leaves = jax.tree.leaves(tree if k is None else jax.tree.map(lambda a: a[k], tree))
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in leaves])


def clip_grid(norms: np.ndarray, g_norm: float, config: Config) -> np.ndarray:
    """clip_points values of C, geometrically spaced: three quarters from the
    low quantile of the norms up to their max, the rest from there to
    high_factor times it; plus max ||g_i|| and ||g|| exactly. Always
    clip_points + 2 values, so every call has one shape."""
    top = float(norms.max())
    low = min(max(float(np.quantile(norms, config.low_quantile)), 1e-12), top)
    above = max(1, config.clip_points // 4)
    grid = [np.geomspace(low, top, config.clip_points - above, endpoint=False),
            np.geomspace(top, config.high_factor * top, above + 1)[1:], [top, g_norm]]
    return np.sort(np.concatenate(grid))


def measure_batch(both_ways, params, xs, ys, config: Config) -> dict:
    """The sweep over C on one batch, in float64."""
    with enable_x64():
        params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        x64 = normalize(xs, input_numbers(1.0, dtype="float64"))
        # ||g_i|| and ||g|| first (no clipping at C = inf), then the grid they define.
        _, g_once, norms = jax.tree.map(np.asarray, both_ways(params64, x64, ys,
                                                               np.full(config.clip_points + 2, np.inf)))
        norms = np.asarray(norms, np.float64)
        g_norm = float(np.linalg.norm(flat(g_once, 0)))
        clips = clip_grid(norms, g_norm, config)
        mean_of_clipped, clipped_mean, _ = jax.tree.map(np.asarray, both_ways(params64, x64, ys, clips))
    max_norm = float(norms.max())
    sweep = []
    for k, c in enumerate(clips):
        a, b = flat(mean_of_clipped, k), flat(clipped_mean, k)
        sweep.append({
            "clip": float(c), "clip_over_max_norm": float(c) / max_norm,
            "clipped_fraction": float(np.mean(norms > c)),
            # the project's measure (precision.py): max|a - b| / max|b|, per parameter array
            "rel_diff": relative_difference(jax.tree.map(lambda t: t[k], mean_of_clipped),
                                            jax.tree.map(lambda t: t[k], clipped_mean)),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "norm_mean_of_clipped": float(np.linalg.norm(a)), "norm_clipped_mean": float(np.linalg.norm(b)),
        })
    at_or_above = [s["rel_diff"] for s in sweep if s["clip"] >= max_norm]
    below = [s["rel_diff"] for s in sweep if s["clip"] < max_norm]
    return {
        "norms": norms.tolist(),
        "norm_quantiles": {f"{q:g}": float(np.quantile(norms, q)) for q in QUANTILES},
        "max_norm": max_norm, "mean_grad_norm": g_norm,  # ||g|| <= max ||g_i||, by the triangle inequality
        "sweep": sweep,
        "max_rel_diff_at_or_above_max_norm": max(at_or_above),
        "min_rel_diff_below_max_norm": min(below) if below else None,
        "coincide_exactly_above_max_norm": max(at_or_above) <= COINCIDE_TARGET and (not below or min(below) > 0),
    }


# ---- training: SGD, clipping only, DP-SGD at equal steps ---------------------


def train_configs(config: Config) -> dict:
    base = TrainConfig(model=config.model, dataset=config.dataset, epochs=config.epochs,
                       batch_size=config.batch_size, optimizer="sgd", lr=config.lr, momentum=config.momentum,
                       seed=config.seed, dp_delta=config.delta)
    clip = dataclasses.replace(base, dp_clip=config.train_clip, dp_chunk=config.dp_chunk)
    # The three runs see the same batches, so that they differ by clipping and noise
    # alone: DP-SGD here takes shuffled batches (its epsilon is then Poisson's figure,
    # not a guarantee) and reports the figures a private run would keep to itself.
    dp_sgd = dataclasses.replace(clip, dp_noise=config.train_noise, dp_sampling="shuffle", dp_nonprivate_metrics=True)
    return {"sgd": base, "clip": clip, "dp_sgd": dp_sgd}


def train_run(train_config: TrainConfig, train, test, label: str, on_progress):
    def report(event):
        if event["kind"] == "epoch":
            train_loss = event.get("nonprivate", event)["train_loss"]
            on_progress(f"{label}, epoch {event['epoch']}: train loss {train_loss:.4f}, "
                        f"test accuracy {event['test_accuracy']:.4f}")

    result = train_and_evaluate(train_config, train_ds=train, test_ds=test, on_progress=report)
    keys = ("epoch", "steps", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s",
            "clipped_fraction", "mean_grad_norm", "epsilon")
    history = [{k: v for k, v in {**h, **h.get("nonprivate", {})}.items() if k in keys} for h in result.history]
    return result.params, {"history": history, "final_test_accuracy": history[-1]["test_accuracy"],
                           "final_train_loss": history[-1]["train_loss"],
                           "epsilon": history[-1].get("epsilon"),
                           "last_epoch_time_s": history[-1]["epoch_time_s"]}


def run(config: Config, on_progress=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    model = get_model(config.model)
    train, test = prepare_data(config.dataset, model, config.batch_size, config.data_dir)

    runs, params, configs = {}, {}, train_configs(config)
    for name, train_config in configs.items():
        on_progress(f"training {RUN_LABELS[name]}: {config.epochs} epochs")
        params[name], runs[name] = train_run(train_config, train, test, RUN_LABELS[name], on_progress)

    idx = np.sort(np.random.default_rng(config.seed).choice(len(train), config.batch_size, replace=False))
    xs, ys = train.images[idx], train.labels[idx]
    both_ways = make_both_ways(model.apply, config.dp_chunk)
    at = {"init": init_params(model, init_key(config.seed), train.image_shape), "after_sgd": params["sgd"]}
    batch = {}
    for point in POINTS:
        on_progress(f"one batch of {config.batch_size}, {point}: mean of clipped against clipped mean, float64")
        batch[point] = measure_batch(both_ways, at[point], xs, ys, config)
    return {
        "experiment": "clipping",
        "config": dataclasses.asdict(config),
        "batch": batch,
        "coincide_target": COINCIDE_TARGET,
        "training": {"steps": runs["sgd"]["history"][-1]["steps"], "sampling_rate": config.batch_size / len(train),
                     "runs": runs},
    }


# ---- output -----------------------------------------------------------------


def _sweep_rows(b: dict) -> list:
    """The sweep's rows worth printing: about every third C, and the marked ones."""
    sweep = b["sweep"]
    keep = set(range(0, len(sweep), 3)) | {len(sweep) - 1}
    keep |= {k for k, s in enumerate(sweep) if s["clip"] in (b["max_norm"], b["mean_grad_norm"])}
    rows = []
    for k in sorted(keep):
        s = sweep[k]
        mark = " (= max ||g_i||)" if s["clip"] == b["max_norm"] else " (= ||g||)" if s["clip"] == b[
            "mean_grad_norm"] else ""
        rows.append([f"{s['clip']:.4g}{mark}", s["clip_over_max_norm"], s["clipped_fraction"], s["rel_diff"],
                     s["cosine"], s["norm_mean_of_clipped"] / s["norm_clipped_mean"]])
    return rows


def summary(result: dict) -> str:
    c = result["config"]
    lines = [f"{c['model']} on {c['dataset']}, one batch of {c['batch_size']} in float64: "
             "mean of clipped (1/B) sum_i clip(g_i, C) against clipped mean clip((1/B) sum_i g_i, C)"]
    for point, b in result["batch"].items():
        q = b["norm_quantiles"]
        lines += [
            f"{'at initialisation' if point == 'init' else 'after the SGD run'}: per-example ||g_i|| min "
            f"{q['0']:.3g}, 5% {q['0.05']:.3g}, median {q['0.5']:.3g}, 95% {q['0.95']:.3g}, max {q['1']:.3g}; "
            f"batch gradient ||g|| = {b['mean_grad_norm']:.3g}",
            format_table(["C", "C / max||g_i||", "clipped", "rel diff", "cosine", "||mean clip|| / ||clip mean||"],
                         _sweep_rows(b)),
            f"  C >= max||g_i||: largest rel diff {b['max_rel_diff_at_or_above_max_norm']:.2e} "
            f"(target {result['coincide_target']:g}); C < max||g_i||: smallest {b['min_rel_diff_below_max_norm']:.2e}"
            f" -> they coincide exactly when C >= max||g_i||: "
            f"{'yes' if b['coincide_exactly_above_max_norm'] else 'NO'}"]
    t = result["training"]
    rows = []
    for name, r in t["runs"].items():
        last = r["history"][-1]
        rows.append([RUN_LABELS[name], r["final_train_loss"], r["final_test_accuracy"],
                     last.get("clipped_fraction"), r["epsilon"], r["last_epoch_time_s"]])
    lines += [f"Training at equal steps ({t['steps']}): SGD lr {c['lr']:g}, momentum {c['momentum']:g}, batch "
              f"{c['batch_size']}, {c['epochs']} epochs; C = {c['train_clip']:g}, sigma = {c['train_noise']:g}, "
              f"epsilon at delta {c['delta']:g} (sampling rate {t['sampling_rate']:.3g})",
              format_table(["run", "final train loss", "test accuracy", "clipped (last epoch)", "epsilon",
                            "last epoch s"], rows)]
    return "\n".join(lines)


def figures(result: dict) -> dict:
    from matplotlib.ticker import NullFormatter

    c = result["config"]
    fig, axes = new_figure(ncols=3, nrows=len(result["batch"]), width=4.6)
    for (hist, diff, frac), (point, b) in zip(axes, result["batch"].items()):
        where = "at initialisation" if point == "init" else "after the SGD run"
        # The same marks in every panel, named once in the figure's legend; this row's values in its title.
        marks = [(b["max_norm"], "C3", "-", "max ||g_i||"),
                 (b["mean_grad_norm"], "C2", "--", "||g||, the batch gradient")]
        norms = np.array(b["norms"])
        positive = norms[norms > 0]  # a log axis: an exact 0 (a perfectly fit example) is left out
        hist.hist(positive, bins=np.geomspace(positive.min(), positive.max() * (1 + 1e-9), 30), color="C0",
                  alpha=0.8)
        hist.axvline(b["norm_quantiles"]["0.5"], color="gray", ls=":", lw=1, label="median ||g_i||")
        hist.axvline(c["train_clip"], color="k", lw=1, ls="-.", label=f"training C = {c['train_clip']:g}")
        hist.set_xlabel("per-example gradient norm ||g_i||")
        hist.set_ylabel("examples")
        hist.set_title(f"{c['model']} on {c['dataset']}, one batch of {c['batch_size']}, {where}\n"
                       f"median {b['norm_quantiles']['0.5']:.3g}, max ||g_i|| {b['max_norm']:.3g}, "
                       f"||g|| {b['mean_grad_norm']:.3g}", fontsize=10)

        clips = np.array([s["clip"] for s in b["sweep"]])
        rel = np.array([s["rel_diff"] for s in b["sweep"]])
        diff.plot(clips, np.maximum(rel, 1e-18), "o-", ms=3, color="C0", label="relative difference")
        diff.axhline(result["coincide_target"], color="gray", ls=":", lw=1,
                     label=f"{result['coincide_target']:g}: equal to rounding")
        diff.set_yscale("log")
        diff.set_ylabel("max|mean clip - clip mean| / max|clip mean|")
        diff.set_title("mean of clipped against clipped mean (float64)", fontsize=10)

        frac.plot(clips, [s["clipped_fraction"] for s in b["sweep"]], "s-", ms=3, color="C1",
                  label="fraction of examples clipped")
        frac.plot(clips, [s["cosine"] for s in b["sweep"]], "^-", ms=3, color="C4", label="cosine between the two")
        frac.set_ylim(-0.03, 1.03)
        frac.set_title("how many are clipped, and the angle", fontsize=10)
        for ax in (hist, diff, frac):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            for value, color, style, label in marks:
                ax.axvline(value, color=color, ls=style, lw=1.5, label=label)
        for ax in (diff, frac):
            ax.set_xlabel("clip norm C")
    # One legend for the six panels, below them: every line once (the first row's handles name them all).
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=4, fontsize=8)
    figs = {"clipping_batch": fig}

    t = result["training"]
    fig, axes = new_figure(ncols=2, width=5.0)
    for i, (name, r) in enumerate(t["runs"].items()):
        steps = [h["steps"] for h in r["history"]]
        label = RUN_LABELS[name] + (f", epsilon = {r['epsilon']:.3g}" if r["epsilon"] is not None else "")
        axes[0, 0].plot(steps, [h["train_loss"] for h in r["history"]], "o-", ms=4, color=f"C{i}", label=label)
        axes[0, 1].plot(steps, [h["test_accuracy"] for h in r["history"]], "o-", ms=4, color=f"C{i}", label=label)
    axes[0, 0].set_ylabel("train loss (epoch mean)")
    axes[0, 1].set_ylabel("test accuracy")
    for ax in axes[0]:
        ax.set_xlabel("steps")
        ax.legend(fontsize=8)
        ax.set_title(f"{c['model']} on {c['dataset']}: C = {c['train_clip']:g}, sigma = {c['train_noise']:g}, "
                     f"delta = {c['delta']:g}", fontsize=10)
    figs["clipping_training"] = fig
    return figs
