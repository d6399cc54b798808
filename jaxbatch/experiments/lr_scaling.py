"""Text D: how should the learning rate follow the batch size?

A batch of B examples cuts the gradient's variance B-fold (see variance.py).
Three rules for the learning rate, from a reference lr_0 at batch B_0:

    constant  lr = lr_0
    linear    lr = lr_0 * B / B_0       (Goyal et al. 2017, "Accurate, Large
                                          Minibatch SGD": k times the batch, k
                                          times the lr, so k small steps ~ one big one)
    sqrt      lr = lr_0 * sqrt(B / B_0) (text D: keeps the variance of the update
                                          lr * g_B, lr^2 Var(g_1) / B, constant)

each with and without a linear warm-up from 0 over the first part of the run
(Goyal et al.'s remedy for the unstable early steps of a large lr). Two
budgets, because they answer different questions:

    fixed epochs  every run sees the same number of examples: a bigger batch
                  takes fewer steps, so a constant lr falls behind;
    fixed steps   every run takes the same number of steps: a bigger batch
                  sees more examples and a less noisy gradient per step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxbatch import Diverged, TrainConfig, get_model, prepare_data, train_and_evaluate
from jaxbatch import data as data_lib
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import format_table, new_figure
from jaxbatch.optim import OPTIMIZERS
from jaxbatch.settings import check, setting

RULES = ("constant", "linear", "sqrt")
BUDGETS = ("epochs", "steps")


def scaled_lr(rule: str, base_lr: float, base_batch: int, batch_size: int) -> float:
    k = batch_size / base_batch
    return base_lr * {"constant": 1.0, "linear": k, "sqrt": math.sqrt(k)}[rule]


@dataclasses.dataclass
class Config:
    model: str = setting("mlp", "the network")
    dataset: str = setting("fashion_mnist", "the dataset; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    batch_sizes: tuple = setting((32, 64, 128, 256, 512, 1024, 2048), "the batch sizes B", item=int, at_least=1,
                                 kind="batch size")
    # Goyal et al.: lr 0.1 at batch 256.
    base_lr: float = setting(0.1, "lr_0, the learning rate at batch size B_0; the rules scale it", above=0)
    base_batch: int = setting(256, "B_0, the batch size at which the learning rate is lr_0", at_least=1)
    optimizer: str = setting("sgd", "the Optax optimiser", choices=OPTIMIZERS, kind="optimizer")
    momentum: float = setting(0.0, "sgd momentum", at_least=0)
    epochs: int = setting(3, "the fixed-epochs budget", at_least=1)
    steps: int = setting(300, "the fixed-steps budget", at_least=1)
    warmup_fraction: float = setting(0.2, "warm-up over this fraction of a run's steps, between 0 and 1", above=0,
                                     below=1)
    seeds: int = setting(3, "each setting trains with seeds seed, seed+1, ...; the table shows the mean",
                         at_least=1)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)


QUICK = dict(dataset="digits", batch_sizes=(32, 256), base_lr=0.1, base_batch=32, epochs=4, steps=40, seeds=1)


def validate(config: Config) -> None:
    check(config)
    get_model(config.model)
    data_lib.get_spec(config.dataset)
    if config.seed + config.seeds > SEEDS:
        raise JaxbatchError(f"the last seed, seed + seeds - 1 = {config.seed + config.seeds - 1}, is past "
                            f"{SEEDS - 1}; pass a smaller {{setting}}", setting="seed")


def run_one(config: Config, train, test, batch_size: int, rule: str, warmup: bool, budget: str) -> dict:
    """One setting trained once per seed: the mean final test accuracy over
    the seeds that did not diverge, and how many did."""
    steps_per_epoch = -(-len(train) // batch_size)
    if budget == "epochs":
        epochs, total_steps = config.epochs, config.epochs * steps_per_epoch
    else:
        epochs, total_steps = -(-config.steps // steps_per_epoch), config.steps
    lr = scaled_lr(rule, config.base_lr, config.base_batch, batch_size)
    warmup_steps = max(1, round(config.warmup_fraction * total_steps)) if warmup else 0
    record = {"batch_size": batch_size, "rule": rule, "warmup": warmup, "budget": budget, "lr": lr,
              "warmup_steps": warmup_steps, "steps": total_steps, "examples": None,
              "test_accuracies": [], "divergences": []}
    for seed in range(config.seed, config.seed + config.seeds):
        train_config = TrainConfig(
            model=config.model, dataset=config.dataset, epochs=epochs, batch_size=batch_size,
            optimizer=config.optimizer, lr=lr, momentum=config.momentum,
            schedule="warmup" if warmup else "constant", warmup_steps=warmup_steps,
            max_steps=total_steps if budget == "steps" else None, seed=seed)
        try:
            history = train_and_evaluate(train_config, train_ds=train, test_ds=test).history
            record["test_accuracies"].append(history[-1]["test_accuracy"])
            record["examples"] = sum(h["examples_seen"] for h in history)
        except Diverged as err:
            record["test_accuracies"].append(None)
            record["divergences"].append({"seed": seed, "epoch": err.epoch, "step": err.step, "loss": err.loss})
    finite = [a for a in record["test_accuracies"] if a is not None]
    record["test_accuracy"] = float(np.mean(finite)) if finite else None
    record["test_accuracy_spread"] = float(np.ptp(finite)) if finite else None  # max - min over seeds
    record["diverged"] = len(record["divergences"])
    return record


def _accuracy(r: dict) -> str:
    """'0.8123', '0.8123 (1/3 diverged)' or 'diverged'."""
    if r["test_accuracy"] is None:
        return "diverged"
    seeds = len(r["test_accuracies"])
    return f"{r['test_accuracy']:.4f}" + (f" ({r['diverged']}/{seeds} diverged)" if r["diverged"] else "")


def run(config: Config, on_progress=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    train, test = prepare_data(config.dataset, get_model(config.model), max(config.batch_sizes), config.data_dir,
                               setting="batch_sizes")
    runs, done = [], {}
    for budget in BUDGETS:
        for rule in RULES:
            for warmup in (False, True):
                for b in sorted(set(config.batch_sizes)):
                    # Rules that give the same lr (all of them at B_0) share one run.
                    key = (budget, warmup, b, scaled_lr(rule, config.base_lr, config.base_batch, b))
                    if key not in done:
                        done[key] = run_one(config, train, test, b, rule, warmup, budget)
                        r = done[key]
                        on_progress(f"{budget} budget, {_variant(rule, warmup)}, B={b}, lr {r['lr']:.4g}: "
                                    f"{_accuracy(r)}")
                    runs.append({**done[key], "rule": rule})
    return {"experiment": "lr-scaling", "config": dataclasses.asdict(config), "runs": runs}


# ---- output -----------------------------------------------------------------


def _variant(rule: str, warmup: bool) -> str:
    return f"{rule} + warm-up" if warmup else rule


def table_rows(result: dict, budget: str):
    sizes = sorted(set(result["config"]["batch_sizes"]))
    by_key = {(r["rule"], r["warmup"], r["batch_size"]): r for r in result["runs"] if r["budget"] == budget}
    rows = []
    for rule in RULES:
        for warmup in (False, True):
            cells = []
            for b in sizes:
                r = by_key[(rule, warmup, b)]
                cells.append(_accuracy(r))
            rows.append([_variant(rule, warmup), *cells])
    return ["lr rule", *(f"B={b}" for b in sizes)], rows


def summary(result: dict) -> str:
    c = result["config"]
    lines = [f"Test accuracy of {c['model']} on {c['dataset']} (mean over {_seeds(c['seeds'])}), "
             f"{c['optimizer']}, lr_0 {c['base_lr']:g} at B_0 = {c['base_batch']}; warm-up: linear from 0 "
             f"over the first {c['warmup_fraction']:.0%} of each run's steps"]
    for budget, what in (("epochs", f"after {c['epochs']} epochs"), ("steps", f"after {c['steps']} steps")):
        headers, rows = table_rows(result, budget)
        lines += [what, format_table(headers, rows)]
    return "\n".join(lines)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def figures(result: dict) -> dict:
    """Test accuracy against B, one line per rule, with and without warm-up. Every point sits at
    its own batch size (no sideways offset, which made warm-up points look like other batch sizes);
    warm-up runs have open markers and dashed lines. One legend, below the two panels."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    c = result["config"]
    sizes = sorted(set(c["batch_sizes"]))
    fig, axes = new_figure(ncols=2, width=5.5)
    for ax, (budget, what) in zip(axes[0], (("epochs", f"after {c['epochs']} epochs"),
                                           ("steps", f"after {c['steps']} steps"))):
        for i, rule in enumerate(RULES):
            for warmup in (False, True):
                runs = sorted((r for r in result["runs"] if r["budget"] == budget and r["rule"] == rule
                               and r["warmup"] == warmup), key=lambda r: r["batch_size"])
                sizes_run = [r["batch_size"] for r in runs]
                acc = np.array([np.nan if r["test_accuracy"] is None else r["test_accuracy"] for r in runs])
                seeds = [[a for a in r["test_accuracies"] if a is not None] or [np.nan] for r in runs]
                spread = [acc - [min(s) for s in seeds], [max(s) for s in seeds] - acc]
                ax.errorbar(sizes_run, acc, yerr=spread if c["seeds"] > 1 else None,
                            fmt="--" if warmup else "-", marker="s" if warmup else "o", ms=6 if warmup else 5,
                            mfc="white" if warmup else f"C{i}", capsize=3, lw=1, color=f"C{i}",
                            label=_variant(rule, warmup))
                failed = [s for s, r in zip(sizes_run, runs) if r["test_accuracy"] is None]
                ax.plot(failed, [0.0] * len(failed), "x", color=f"C{i}", ms=8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))  # a label at each batch size run, and nowhere else
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
        if len(sizes) == 1:
            ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("test accuracy")
        over = (f"mean over {_seeds(c['seeds'])}, bars: min to max; x: every seed diverged" if c["seeds"] > 1
                else "one seed; x: diverged")
        ax.set_title(f"{c['model']} on {c['dataset']}, {what}\n({over})", fontsize=10)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=len(RULES) * 2,
               fontsize=8)
    return {"lr_scaling": fig}
