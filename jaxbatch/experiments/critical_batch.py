"""Text D: which batch size? Steps and epochs to a target accuracy, the critical batch, and the noise scale.

Text D says a batch of B cuts the gradient's variance B-fold, and that K
workers (a batch K times larger) may need up to K times more epochs. What a
user chooses by is the trade-off between them: the optimiser steps S and the
examples E = B * S it takes to reach a target. Shallue et al. 2019
("Measuring the Effects of Data Parallelism on Neural Network Training")
measured S against B on many workloads: perfect scaling (S halves as B
doubles), then diminishing returns, then none. McCandlish et al. 2018 ("An
Empirical Model of Large-Batch Training") predicted the bend:

    (S / S_min - 1) (E / E_min - 1) = 1,   i.e.   S(B) = S_min + E_min / B,

S_min the fewest steps (a huge batch), E_min the fewest examples (a tiny
one), and the critical batch B_crit = E_min / S_min: there S = 2 S_min and
E = 2 E_min. They argue B_crit ~ B_noise ~ B_simple = tr(Sigma) / |G|^2,
the gradient noise scale jaxbatch measures while training (noise_scale.py).

The protocol (Shallue et al.'s, on a smaller scale):

- for each batch size B, the learning rate with the fewest steps to the
  target, from a log grid (`lr_grid` times `lr_ratio`^k). The search walks
  the grid from the best lr of the batch size before and stops once both
  neighbours of the best are slower (or diverge, or miss the target); a
  best lr at the grid's edge is flagged. SGD, momentum fixed, constant lr.
  Each run stops at its first evaluation that reaches the target, so a run
  slower than twice the best so far is cut there: it cannot be the best;
- the best lr then trains with `seeds` seeds; the median steps and epochs
  to target, and the seeds' range;
- the fit of S(B) = S_min + E_min / B (least squares on log S), with an
  interval for B_crit from resampling each batch size's seeds (bootstrap);
  where that interval leaves the batch sizes measured, the data do not
  determine B_crit, and the result says so;
- B_simple from a reference run at `noise_batch_size` with its best lr
  (--log-noise-scale): over the steps of the epoch that reached the target,
  and over the whole run.

With `dp_epsilon` the sweep is private: DP-SGD with Poisson batches, clip
`dp_clip`, and for each B the noise multiplier calibrated so that a run of
`max_epochs` epochs ends at that epsilon (each B's own number of steps). A
run that stops at the target has then spent less: its epsilon there is kept.

Evaluations run every ~`eval_fraction` of an epoch (a divisor of an epoch's
steps, so every chunk has the same length and each B compiles once: lr,
seed and noise are the step's arguments). Every finished run is appended to
`runs.jsonl` in the output folder, so a rerun into the same folder skips it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from jaxbatch import Diverged, TrainConfig, get_model, prepare_data, train_and_evaluate
from jaxbatch import data as data_lib
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, jsonable, new_figure
from jaxbatch.settings import check, setting

RUNS = "runs.jsonl"  # one line per finished training run, read back by a rerun


@dataclasses.dataclass
class Config:
    model: str = setting("mlp", "the network")
    dataset: str = setting("mnist", "the dataset; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    target: float = setting(0.97, "the test accuracy to reach, 0 < A <= 1", above=0, at_most=1)
    batch_sizes: tuple = setting((8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                                 "the batch sizes B, powers of 2", item=int, at_least=1, kind="batch size")
    lr_grid: tuple = setting((0.001, 1.0), "the learning-rate grid's first and last values", item=float,
                             above=0, kind="learning rate")
    lr_ratio: float = setting(2.0, "the grid's step: each lr is this times the one before", above=1)
    first_lr: float = setting(0.01, "where the smallest batch size's search starts (snapped to the grid)",
                              above=0)
    momentum: float = setting(0.9, "sgd momentum, the same for every batch size", at_least=0)
    seeds: int = setting(3, "seeds per batch size at its best lr (the search uses the first)", at_least=1)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)
    max_epochs: int = setting(30, "a run that has not reached the target after this many epochs misses it",
                              at_least=1)
    eval_fraction: float = setting(0.025, "evaluate about every this fraction of an epoch (and at least every "
                                   "step)", above=0, at_most=1)
    noise_batch_size: int | None = setting(128, "B of the reference run that measures B_simple (its best lr); "
                                           "none: not measured", type=int, at_least=1)
    dp_clip: float | None = setting(None, "DP-SGD: clip norm C (with dp_epsilon)", type=float, above=0)
    dp_epsilon: float | None = setting(None, "DP-SGD: each B's noise calibrated so max_epochs end at this epsilon",
                                       type=float, above=0)
    dp_delta: float = setting(1e-5, "DP-SGD: the delta of epsilon", above=0, below=1)
    compare: str | None = setting(None, "a non-private critical-batch result.json to draw beside this one",
                                  type=str)


QUICK = dict(dataset="digits", target=0.9, batch_sizes=(8, 16, 32, 64, 128, 256, 512), lr_grid=(0.004, 2.0),
             first_lr=0.03, max_epochs=40, eval_fraction=0.1, noise_batch_size=32, seeds=3)


def validate(config: Config) -> None:
    check(config)
    get_model(config.model)
    data_lib.get_spec(config.dataset)
    sizes = config.batch_sizes
    if any(b & (b - 1) for b in sizes):
        raise JaxbatchError(f"batch sizes must be powers of 2 (1, 2, 4, ...); got {', '.join(map(str, sizes))}: "
                            "pass {setting} e.g. 8,16,32", setting="batch_sizes")
    if len(set(sizes)) != len(sizes):
        raise JaxbatchError("{setting} lists a batch size twice", setting="batch_sizes")
    if len(config.lr_grid) != 2 or not config.lr_grid[0] < config.lr_grid[1]:
        raise JaxbatchError("{setting} is the grid's first and last learning rate, smallest first, e.g. "
                            "0.001,1", setting="lr_grid")
    if (config.dp_clip is None) != (config.dp_epsilon is None):
        raise JaxbatchError("a private sweep needs both dp_clip and dp_epsilon; pass {setting} too",
                            setting="dp_epsilon" if config.dp_epsilon is None else "dp_clip")
    if config.seed + config.seeds > SEEDS:
        raise JaxbatchError(f"the last seed, seed + seeds - 1, is past {SEEDS - 1}; pass a smaller {{setting}}",
                            setting="seed")
    if config.compare is not None and not Path(config.compare).is_file():
        raise JaxbatchError(f"{config.compare} is not a file; pass {{setting}} a critical-batch result.json",
                            setting="compare")


# ---- the fit ---------------------------------------------------------------------


def fit_steps(batch_sizes, steps) -> dict:
    """S(B) = S_min + E_min / B fitted to (B, S) by least squares on log S
    (every point weighs by its relative error). Returns s_min, e_min,
    b_crit = E_min / S_min and the residuals (log S - log fit)."""
    from scipy.optimize import least_squares

    b, s = np.asarray(batch_sizes, float), np.asarray(steps, float)
    if len(b) < 3:
        raise ValueError("fewer than 3 batch sizes reached the target")

    def residuals(p):  # positive S_min, E_min: fitted as logs
        return np.log(np.exp(p[0]) + np.exp(p[1]) / b) - np.log(s)

    start = np.log([max(s.min() / 2, 1e-3), max(np.median(s * b) / 2, 1e-3)])
    got = least_squares(residuals, start, method="lm")
    s_min, e_min = np.exp(got.x)
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(e_min / s_min),
            "residuals": [float(r) for r in residuals(got.x)]}


def fit_with_interval(per_size: dict, resamples: int = 500, seed: int = 0) -> dict:
    """The fit to each batch size's median steps, and a 95% interval for
    B_crit from resampling each size's seeds with replacement. `per_size`:
    {B: [steps of each seed that reached the target]}. `determined` says
    whether the batch sizes measured pin B_crit down: the interval lies
    within them."""
    sizes = sorted(b for b, s in per_size.items() if s)
    out = {"determined": False, "b_crit": None, "b_crit_interval": None}
    try:
        out.update(fit_steps(sizes, [np.median(per_size[b]) for b in sizes]))
    except ValueError as err:
        return {**out, "why": str(err)}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        medians = [np.median(rng.choice(per_size[b], len(per_size[b]))) for b in sizes]
        draws.append(fit_steps(sizes, medians)["b_crit"])
    low, high = np.percentile(draws, [2.5, 97.5])
    out["b_crit_interval"] = [float(low), float(high)]
    if low < sizes[0] or high > sizes[-1]:
        out["why"] = (f"B_crit's interval, {low:.3g} .. {high:.3g}, leaves the batch sizes measured "
                      f"({sizes[0]} .. {sizes[-1]}): the bend is not between them")
    else:
        out["determined"] = True
    return out


# ---- the runs ----------------------------------------------------------------------


class Sweep:
    """The runs of one sweep, each trained once: from `runs.jsonl` when an
    earlier call of the same sweep finished it there, else now (and then
    appended to it)."""

    def __init__(self, config: Config, out, train, test, on_progress):
        self.config, self.train, self.test, self.on_progress = config, train, test, on_progress
        self.path = Path(out) / RUNS if out is not None else None
        self.done = {}
        self.trained = 0
        self.started = time.perf_counter()
        if self.path is not None and self.path.exists():
            text = self.path.read_text(errors="replace")
            if text and not text.endswith("\n"):  # a torn last line: cut, so the next run starts a line
                self.path.write_text(text[:text.rfind("\n") + 1])
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    self.done[self._key(record["sweep"], record["batch_size"], record["lr"], record["seed"],
                                        record["max_steps"])] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line of a killed sweep: that run trains again

    def _key(self, sweep, b, lr, seed, max_steps) -> str:
        return json.dumps([sweep, b, round(math.log(lr), 9), seed, max_steps])

    def identity(self) -> dict:
        """What makes a run's result this sweep's: every setting but the bookkeeping."""
        return {k: v for k, v in dataclasses.asdict(self.config).items()
                if k not in ("data_dir", "compare", "seeds", "noise_batch_size", "batch_sizes")}

    def steps_per_epoch(self, b: int) -> int:
        return -(-len(self.train) // b)

    def eval_every(self, b: int) -> int:
        """The divisor of an epoch's steps nearest (in ratio) to eval_fraction of an epoch."""
        steps = self.steps_per_epoch(b)
        want = max(1.0, self.config.eval_fraction * steps)
        divisors = [d for d in range(1, steps + 1) if steps % d == 0]
        return min(divisors, key=lambda d: abs(math.log(d / want)))

    def run(self, b: int, lr: float, seed: int, cap: int | None = None, noise_scale: bool = False,
            dp_noise: float | None = None) -> dict:
        """One training run to the target: its steps, examples, seconds (None where it missed)."""
        c = self.config
        k = self.eval_every(b)
        max_steps = None if cap is None else -(-cap // k) * k  # whole chunks: one program per B
        sweep = {**self.identity(), "noise_scale": noise_scale}
        key = self._key(sweep, b, lr, seed, max_steps)
        if key in self.done:
            return self.done[key]
        train_config = TrainConfig(
            model=c.model, dataset=c.dataset, epochs=c.max_epochs, batch_size=b, optimizer="sgd", lr=lr,
            momentum=c.momentum, seed=seed, max_steps=max_steps, target_accuracy=c.target, eval_every=k,
            steps_per_chunk=k, log_noise_scale=noise_scale, dp_clip=c.dp_clip, dp_noise=dp_noise,
            dp_delta=c.dp_delta)
        record = {"sweep": sweep, "batch_size": b, "lr": lr, "seed": seed, "max_steps": max_steps,
                  "eval_every": k, "dp_noise": dp_noise, "reached": False, "diverged": False,
                  "steps": None, "examples": None, "epochs": None, "seconds": None}
        try:
            result = train_and_evaluate(train_config, train_ds=self.train, test_ds=self.test)
            t = result.target
            record.update(reached=t["reached"], steps=t["steps_to_target"], examples=t["examples_to_target"],
                          epochs=t["epochs_to_target"], seconds=t["seconds_to_target"],
                          epsilon=t.get("epsilon_to_target"),
                          best_accuracy=max(e["test_accuracy"] for e in result.evals))
            if noise_scale:
                record["noise_scale"] = noise_scale_figures(result.history)
        except Diverged as err:
            record.update(diverged=True, diverged_at=err.step)
        self.trained += 1
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(jsonable(record)) + "\n")
        self.done[key] = record
        return record


def noise_scale_figures(history: list) -> dict:
    """B_simple over the last epoch's steps (the one that reached the target)
    and over the whole run: sums of numerator and denominator, each epoch
    weighted by its counted steps (noise_scale.epoch_figures)."""
    epochs = [h for h in history if h.get("noise_scale_steps")]
    if not epochs:
        return {"near_target": None, "over_run": None}
    trace = sum(h["noise_scale_trace"] * h["noise_scale_steps"] for h in epochs)
    g2 = sum(h["noise_scale_g2"] * h["noise_scale_steps"] for h in epochs)
    return {"near_target": epochs[-1]["noise_scale"], "over_run": trace / g2 if g2 > 0 else None,
            "steps_counted": sum(h["noise_scale_steps"] for h in epochs)}


def _steps(record) -> float:
    return record["steps"] if record["reached"] else math.inf


def lr_grid(config: Config) -> list[float]:
    low, high = config.lr_grid
    count = int(math.floor(math.log(high / low) / math.log(config.lr_ratio) + 1e-9)) + 1
    return [low * config.lr_ratio**i for i in range(count)]


def search_lr(sweep: Sweep, b: int, grid: list, start: int, dp_noise=None) -> tuple[int, list]:
    """The grid index with the fewest steps to target at seed `config.seed`:
    from `start`, walk towards the faster neighbour until both neighbours of
    the best are slower. A run is cut at twice the best steps so far (it
    cannot win). Returns (best index, every run tried)."""
    seed = sweep.config.seed
    cap = lambda best: None if math.isinf(best) else 2 * best  # noqa: E731
    tried = {}

    def at(i):
        if i not in tried:
            best = min((_steps(r) for r in tried.values()), default=math.inf)
            tried[i] = sweep.run(b, grid[i], seed, cap(best), dp_noise=dp_noise)
            sweep.on_progress(_run_line(tried[i], sweep))
        return _steps(tried[i])

    best = start
    at(best)
    for direction in (1, -1):  # up first: larger batches want larger lrs
        i = best + direction
        while 0 <= i < len(grid) and at(i) < at(best):
            best, i = i, i + direction
        if best != start:
            break  # the walk went up: the way down from start is slower already
    # Both neighbours of the best are known and slower (or off the grid).
    for i in (best - 1, best + 1):
        if 0 <= i < len(grid):
            at(i)
    if math.isinf(at(best)):  # nothing reached the target: widen the search to the whole grid
        for i in range(len(grid)):
            at(i)
        best = min(tried, key=lambda i: _steps(tried[i]))
    return best, [tried[i] for i in sorted(tried)]


def _run_line(record: dict, sweep: Sweep) -> str:
    what = (f"target at step {record['steps']} ({record['epochs']:.3g} epochs)" if record["reached"] else
            "diverged" if record["diverged"] else
            f"missed (best {record.get('best_accuracy', 0):.4f} in " + (
                f"{record['max_steps']} steps, twice the best so far)" if record["max_steps"]
                else f"{sweep.config.max_epochs} epochs)"))
    elapsed = time.perf_counter() - sweep.started
    return (f"B={record['batch_size']} lr {record['lr']:.4g} seed {record['seed']}: {what}  "
            f"[{sweep.trained} trained, {_clock(elapsed)}]")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def calibrated_noise(config: Config, b: int, n: int) -> float | None:
    """DP: the noise multiplier with which max_epochs at batch b end at dp_epsilon (PLD)."""
    if config.dp_epsilon is None:
        return None
    from jaxbatch.privacy import calibrate_noise

    steps = config.max_epochs * -(-n // b)
    return calibrate_noise(b / n, steps, config.dp_delta, config.dp_epsilon)


def run(config: Config, on_progress=None, out=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    started = time.perf_counter()
    sizes = sorted(config.batch_sizes)
    train, test = prepare_data(config.dataset, get_model(config.model), sizes[-1], config.data_dir,
                               setting="batch_sizes")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    sweep = Sweep(config, out, train, test, on_progress)
    grid = lr_grid(config)
    start = int(np.argmin([abs(math.log(lr / config.first_lr)) for lr in grid]))
    points = []
    for number, b in enumerate(sizes):
        noise = calibrated_noise(config, b, len(train))
        best, tried = search_lr(sweep, b, grid, start, noise)
        seeds = [r for r in tried if r["lr"] == grid[best]]
        for seed in range(config.seed + 1, config.seed + config.seeds):
            record = sweep.run(b, grid[best], seed, dp_noise=noise)
            on_progress(_run_line(record, sweep))
            seeds.append(record)
        reached = [r for r in seeds if r["reached"]]
        points.append({
            "batch_size": b, "best_lr": grid[best], "lr_at_edge": best in (0, len(grid) - 1) and bool(reached),
            "dp_noise": noise, "lrs_tried": [{"lr": r["lr"], "steps": r["steps"], "reached": r["reached"],
                                             "diverged": r["diverged"]} for r in tried],
            "seed_steps": [r["steps"] for r in reached], "seed_epochs": [r["epochs"] for r in reached],
            "seed_seconds": [r["seconds"] for r in reached], "seed_epsilons": [r.get("epsilon") for r in reached],
            "seeds_reached": len(reached), "seeds": len(seeds),
            # The median over the seeds that reached the target, when most did.
            "steps_to_target": float(np.median([r["steps"] for r in reached])) if 2 * len(reached) > len(seeds)
            else None})
        p = points[-1]
        p["epochs_to_target"] = None if p["steps_to_target"] is None else float(np.median(p["seed_epochs"]))
        left = (time.perf_counter() - started) / (number + 1) * (len(sizes) - number - 1)
        on_progress(f"B={b}: best lr {grid[best]:.4g}, median {p['steps_to_target']} steps over "
                    f"{len(reached)}/{len(seeds)} seeds; {number + 1}/{len(sizes)} batch sizes done, "
                    f"about {_clock(left)} left")
        start = best
    per_size = {p["batch_size"]: p["seed_steps"] for p in points if p["steps_to_target"] is not None}
    fit = fit_with_interval(per_size, seed=config.seed)
    b_simple = None
    if config.noise_batch_size is not None and config.dp_epsilon is None:
        b_ref = config.noise_batch_size
        best_lr = next((p["best_lr"] for p in points if p["batch_size"] == b_ref), None)
        if best_lr is None:  # not among the sizes swept: the lr of the nearest one
            best_lr = min(points, key=lambda p: abs(math.log(p["batch_size"] / b_ref)))["best_lr"]
        ref = sweep.run(b_ref, best_lr, config.seed, noise_scale=True)
        on_progress(f"B_simple reference run: {_run_line(ref, sweep)}")
        b_simple = {"batch_size": b_ref, "lr": best_lr, **ref.get("noise_scale", {})}
    result = {"experiment": "critical-batch", "config": dataclasses.asdict(config), "train_size": len(train),
              "points": points, "batch_sizes": [p["batch_size"] for p in points],
              "steps_to_target": [p["steps_to_target"] for p in points],
              "epochs_to_target": [p["epochs_to_target"] for p in points],
              "best_lr": [p["best_lr"] for p in points], "fit": fit, "b_crit": fit["b_crit"],
              "b_crit_interval": fit["b_crit_interval"], "b_simple": b_simple,
              "runs_trained": sweep.trained, "wall_time_s": time.perf_counter() - started}
    near = (b_simple or {}).get("near_target")
    result["b_simple_over_b_crit"] = near / fit["b_crit"] if near and fit["b_crit"] else None
    if config.compare:
        result["compare"] = _read_compare(config.compare)
    return result


def _read_compare(path) -> dict:
    try:
        other = json.loads(Path(path).read_text())
        return {k: other[k] for k in ("batch_sizes", "steps_to_target", "epochs_to_target", "b_crit", "config")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JaxbatchError(f"--compare {path}: not a critical-batch result.json ({err})") from None


# ---- output -------------------------------------------------------------------------


def summary(result: dict) -> str:
    c, fit = result["config"], result["fit"]
    private = (f", DP-SGD at epsilon {c['dp_epsilon']:g} (delta {c['dp_delta']:g}, clip {c['dp_clip']:g}, "
               f"noise calibrated per B for {c['max_epochs']} epochs)" if c["dp_epsilon"] else "")
    lines = [f"text D (understanding batch size): steps to test accuracy {c['target']:g}, {c['model']} on "
             f"{c['dataset']}, sgd momentum {c['momentum']:g}, best lr per B, median of {c['seeds']} seeds"
             f"{private}"]
    rows = []
    for p in result["points"]:
        s = p["seed_steps"]
        rows.append([p["batch_size"], f"{p['best_lr']:.4g}" + (" (grid edge)" if p["lr_at_edge"] else ""),
                     p["steps_to_target"], f"{min(s)} .. {max(s)}" if s else "-", p["epochs_to_target"],
                     f"{p['seeds_reached']}/{p['seeds']}"] + ([f"{p['dp_noise']:.3g}"] if c["dp_epsilon"] else []))
    headers = ["B", "best lr", "steps", "seeds' range", "epochs", "reached"] + (["sigma"] if c["dp_epsilon"] else [])
    lines.append(format_table(headers, rows))
    if fit["b_crit"] is not None:
        low, high = fit["b_crit_interval"]
        lines.append(f"fit S = S_min + E_min / B: S_min {fit['s_min']:.4g} steps, E_min {fit['e_min']:.4g} examples "
                     f"({fit['e_min'] / result['train_size']:.3g} epochs), B_crit = E_min / S_min = "
                     f"{fit['b_crit']:.4g} (95% interval {low:.4g} .. {high:.4g}); residuals (log) "
                     f"{', '.join(f'{r:+.2f}' for r in fit['residuals'])}")
    if not fit["determined"]:
        lines.append(f"B_crit is not determined: {fit['why']}")
    b = result["b_simple"]
    if b and b.get("near_target"):
        ratio = result["b_simple_over_b_crit"]
        lines.append(f"B_simple (reference run at B={b['batch_size']}, lr {b['lr']:.4g}): {b['near_target']:.4g} "
                     f"over the epoch that reached the target, {b['over_run']:.4g} over the whole run"
                     + (f"; B_simple / B_crit = {ratio:.2g}" if ratio else ""))
    lines.append(f"{result['runs_trained']} runs trained now, {_clock(result['wall_time_s'])} in all")
    return "\n".join(lines)


def figures(result: dict) -> dict:
    """Steps to target against B (log-log) with the perfect-scaling line, the
    fit, B_crit and B_simple; epochs to target against B beside it."""
    c, fit = result["config"], result["fit"]
    n = result["train_size"]
    fig, axes = new_figure(ncols=2, width=5.2, height=4.2)
    (ax_s, ax_e) = axes[0]
    pts = [p for p in result["points"] if p["steps_to_target"] is not None]
    label = "DP-SGD" if c["dp_epsilon"] else "measured"
    if pts:
        b = np.array([p["batch_size"] for p in pts], float)
        for ax, key, seeds in ((ax_s, "steps_to_target", "seed_steps"), (ax_e, "epochs_to_target", "seed_epochs")):
            med = np.array([p[key] for p in pts])
            lo = med - [min(p[seeds]) for p in pts]
            hi = [max(p[seeds]) for p in pts] - med
            ax.errorbar(b, med, yerr=[lo, hi], fmt="o", color="C0", capsize=3,
                        label=f"{label}: median, seeds' range")
        ax_s.plot(b, pts[0]["steps_to_target"] * b[0] / b, ":", color="gray", label="perfect scaling (S ∝ 1/B)")
        ax_e.axhline(pts[0]["epochs_to_target"], ls=":", color="gray", label="perfect scaling (same epochs)")
        if fit["b_crit"] is not None:
            bb = np.geomspace(b[0], b[-1], 100)
            s_fit = fit["s_min"] + fit["e_min"] / bb
            ax_s.plot(bb, s_fit, "-", color="C0", lw=1, label="fit S_min + E_min / B")
            ax_e.plot(bb, s_fit * bb / n, "-", color="C0", lw=1, label="fit")
            for ax in (ax_s, ax_e):
                ax.axvline(fit["b_crit"], color="C3", lw=1,
                           label=f"B_crit {fit['b_crit']:.3g}" + ("" if fit["determined"] else " (not determined)"))
                lo, hi = fit["b_crit_interval"]
                ax.axvspan(max(lo, b[0] / 2), min(hi, b[-1] * 2), color="C3", alpha=0.1)
    bs = result.get("b_simple") or {}
    if bs.get("near_target"):
        for ax in (ax_s, ax_e):
            ax.axvline(bs["near_target"], color="C2", ls="--", lw=1, label=f"B_simple {bs['near_target']:.3g}")
    other = result.get("compare")
    if other:
        ob = [b for b, s in zip(other["batch_sizes"], other["steps_to_target"]) if s is not None]
        name = f"non-private, to {other['config']['target']:g}"  # the other sweep's own target
        ax_s.plot(ob, [s for s in other["steps_to_target"] if s is not None], "s--", color="C1", ms=4, label=name)
        ax_e.plot(ob, [e for e in other["epochs_to_target"] if e is not None], "s--", color="C1", ms=4, label=name)
        if other["b_crit"] is not None:
            for ax in (ax_s, ax_e):
                ax.axvline(other["b_crit"], color="C1", ls=":", lw=1.5, label=f"its B_crit {other['b_crit']:.3g}")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, StrMethodFormatter

    sizes = sorted({p["batch_size"] for p in result["points"]} | set(other["batch_sizes"] if other else []))
    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 0.3, 20, 1000: no 3e-01
    for ax, what in ((ax_s, "steps"), (ax_e, "epochs")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))  # a label at each batch size swept
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("batch size B")
        ax.set_ylabel(f"{what} to test accuracy {c['target']:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    private = f", DP-SGD epsilon {c['dp_epsilon']:g}" if c["dp_epsilon"] else ""
    ax_s.set_title(f"{c['model']} on {c['dataset']}{private}: steps to target", fontsize=10)
    ax_e.set_title("epochs to target (text D: up to K times more)", fontsize=10)
    return {"critical_batch": fig}
