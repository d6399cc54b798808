"""Text C: what multiplying the inputs by 255 does to SGD.

Text C trains a bias-free two-layer net, logits = W2 relu(W1 x), on CIFAR-10
with SGD (lr 0.02, momentum 0.9, weight decay 1e-4, batch 250). With x in
[0, 1] it reaches about 50%; with x * 255 it no longer trains. Why: the
gradient of the loss with respect to W1 is (dL/dh) x^T, linear in x, and the
curvature along W1 grows like ||x||^2, so one learning rate that was stable
for x is 255x too large in gradient and 255^2x too large in curvature for
255 x; every update overshoots and the loss explodes.

The rows, as in the text:
  (i)   inputs in [0, 1]
  (ii)  inputs x 255
  (iii) inputs x 255, lr / 255
  (iv)  inputs x 255, lr / 255, both layers' initial weights / 255
  (v)   inputs x 255, lr / 255^2
  (vi)  inputs standardised per channel (training-set mean and std)
Each row trains for the same epochs; a row whose loss turns NaN, infinite or
explodes (above `TrainConfig.max_loss`) is recorded as diverged, with the
epoch and step, and the sweep goes on. The
per-layer gradient norms ||dL/dW1||, ||dL/dW2|| over the first steps show the
mechanism: in (ii) they start hundreds of times larger than in (i) and grow.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxbatch import Diverged, TrainConfig, get_model, init_key, init_params, prepare_data, train_and_evaluate
from jaxbatch import data as data_lib
from jaxbatch.experiments import DATA_DIR, SEED, SEEDS
from jaxbatch.experiments.report import QUICK_NOTE, format_table, is_quick, new_figure, text_name
from jaxbatch.settings import check, setting

# row: (label, input scale, lr factor, initial-weight factor, standardise)
ROWS = {
    "i": ("inputs in [0, 1]", 1.0, 1.0, 1.0, False),
    "ii": ("inputs x255", 255.0, 1.0, 1.0, False),
    "iii": ("x255, lr/255", 255.0, 1 / 255, 1.0, False),
    "iv": ("x255, lr/255, initial weights/255", 255.0, 1 / 255, 1 / 255, False),
    "v": ("x255, lr/255^2", 255.0, 1 / 255**2, 1.0, False),
    "vi": ("standardised per channel", 1.0, 1.0, 1.0, True),
}


@dataclasses.dataclass
class Config:
    # Text C's run: its network, data and SGD settings.
    model: str = setting("fc_nobias", "the network; text C's has two bias-free layers")
    dataset: str = setting("cifar10", "the dataset; digits is bundled")
    data_dir: str | None = setting(None, DATA_DIR, type=str)
    epochs: int = setting(20, "epochs every row trains for", at_least=1)
    batch_size: int = setting(250, "examples per step", at_least=1)
    lr: float = setting(0.02, "row (i)'s learning rate; the other rows scale it", above=0)
    momentum: float = setting(0.9, "SGD momentum", at_least=0)
    weight_decay: float = setting(1e-4, "SGD weight decay", at_least=0)
    grad_steps: int = setting(40, "the first steps whose per-layer gradient norms are recorded", at_least=1)
    seed: int = setting(0, SEED, at_least=0, at_most=SEEDS - 1)


QUICK = dict(dataset="digits", epochs=8, batch_size=50, grad_steps=20)


def validate(config: Config) -> None:
    check(config)
    get_model(config.model)
    data_lib.get_spec(config.dataset)


def row_config(config: Config, row: str) -> TrainConfig:
    _, scale, lr_factor, _, standardize = ROWS[row]
    return TrainConfig(model=config.model, dataset=config.dataset, data_dir=config.data_dir,
                       epochs=config.epochs, batch_size=config.batch_size, optimizer="sgd",
                       lr=config.lr * lr_factor, momentum=config.momentum,
                       weight_decay=config.weight_decay, input_scale=scale,
                       standardize=standardize, seed=config.seed)


def row_params(train_config: TrainConfig, row: str, image_shape):
    """The model's initialisation, every weight times the row's factor."""
    factor = ROWS[row][3]
    params = init_params(train_config.model, init_key(train_config.seed), image_shape)
    return jax.tree.map(lambda w: w * factor, params)


def gradient_norms(train_config: TrainConfig, params, train, test, steps: int) -> dict:
    """Per-layer ||dL/dW||, the loss, and the fraction of each batch whose
    logits are all exactly 0, over the first `steps` steps of the row's run:
    the training step itself reports them (TrainConfig.record_steps), on the
    same initial weights and batches. Only NaN or inf stops this look (an
    exploding but finite loss is what it is meant to show); values from the
    first non-finite loss on are None."""
    config = dataclasses.replace(train_config, max_steps=steps, max_loss=float("inf"), record_steps=steps,
                                 epochs=max(train_config.epochs, -(-steps * train_config.batch_size // len(train))))
    try:
        recorded = train_and_evaluate(config, params=params, train_ds=train, test_ds=test).steps
    except Diverged as err:  # a NaN or inf loss: the steps before it, then None
        recorded = err.steps
    pad = [None] * (steps - len(recorded))  # steps never reached
    return {"loss": [r["loss"] for r in recorded] + pad,
            "zero_output_fraction": [r["zero_output_fraction"] for r in recorded] + pad,
            "grad_norm": {k: [r["grad_norm"][k] for r in recorded] + pad for k in recorded[0]["grad_norm"]}}


def run(config: Config, on_progress=None) -> dict:
    on_progress = on_progress or (lambda text: None)
    validate(config)
    train, test = prepare_data(config.dataset, get_model(config.model), config.batch_size, config.data_dir)
    rows = {}
    for row, (label, *_) in ROWS.items():
        train_config = row_config(config, row)
        params = row_params(train_config, row, train.image_shape)
        on_progress(f"({row}) {label}: first {config.grad_steps} steps' gradient norms")
        record = {"label": label, "lr": train_config.lr, "input_scale": train_config.input_scale,
                  "init_factor": ROWS[row][3], "standardize": train_config.standardize,
                  "first_steps": gradient_norms(train_config, params, train, test, config.grad_steps)}
        history = []

        def collect(event):
            if event["kind"] == "epoch":
                history.append(event)
                on_progress(f"({row}) epoch {event['epoch']}: test accuracy {event['test_accuracy']:.4f}")

        on_progress(f"({row}) {label}: training {config.epochs} epochs, lr {train_config.lr:.4g}")
        try:
            train_and_evaluate(train_config, params=params, train_ds=train, test_ds=test, on_progress=collect)
            record["diverged"] = None
        except Diverged as err:
            record["diverged"] = {"epoch": err.epoch, "step": err.step, "loss": err.loss,
                                  "last_good_loss": err.last_finite_loss}
            on_progress(f"({row}) diverged at epoch {err.epoch}, step {err.step}")
        record["test_accuracy"] = [h["test_accuracy"] for h in history]
        record["train_loss"] = [h["train_loss"] for h in history]
        record["final_test_accuracy"] = record["test_accuracy"][-1] if history and not record["diverged"] else None
        rows[row] = record
    return {"experiment": "input-scale", "config": dataclasses.asdict(config), "rows": rows,
            "text_c_outcome": outcome(rows)}


def outcome(rows: dict) -> dict:
    """Text C's findings, checked: (ii) diverges; (iii) trains but ends below
    (i); (iv) ends within 2 points of (i)."""
    acc = {row: r["final_test_accuracy"] for row, r in rows.items()}
    chance_plus = 0.2  # "trains": clearly above the 10% of guessing
    return {
        "ii_diverges": rows["ii"]["diverged"] is not None,
        "iii_trains_below_i": (acc["iii"] is not None and acc["i"] is not None
                               and chance_plus < acc["iii"] < acc["i"]),
        "iv_within_2_points_of_i": (acc["iv"] is not None and acc["i"] is not None
                                    and abs(acc["iv"] - acc["i"]) <= 0.02),
    }


# ---- output -----------------------------------------------------------------


def _layer(path: str) -> str:
    """'params/hidden/kernel' -> 'hidden kernel'."""
    return " ".join(p for p in path.split("/") if p != "params")


def summary(result: dict) -> str:
    rows = []
    for row, r in result["rows"].items():
        first = r["first_steps"]["grad_norm"]
        step1 = ", ".join(f"{_layer(name)} {values[0]:.3g}" for name, values in first.items()
                          if values[0] is not None)
        status = (f"diverged at epoch {r['diverged']['epoch']}, step {r['diverged']['step']}"
                  if r["diverged"] else f"{r['final_test_accuracy']:.4f}")
        zeros = [z for z in r["first_steps"]["zero_output_fraction"] if z is not None]
        rows.append([f"({row})", r["label"], f"{r['lr']:.3g}", status, step1 or "-",
                     f"{zeros[-1]:.0%}" if zeros else "-"])
    c = result["config"]
    checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in result["text_c_outcome"].items())
    # Text C's outcomes are those of 20 epochs on CIFAR-10: a quick run on digits cannot judge them.
    verdict = (f"{text_name('C')}'s outcome: {QUICK_NOTE}" if is_quick(result)
               else f"{text_name('C')}'s outcome: {checks}")
    return "\n".join([
        f"{c['model']} on {c['dataset']}, SGD momentum {c['momentum']:g}, weight decay {c['weight_decay']:g}, "
        f"batch {c['batch_size']}, {c['epochs']} epochs",
        format_table(["row", "setting", "lr", "final test accuracy", "||dL/dW|| at step 1",
                      f"all-zero outputs at step {c['grad_steps']}"], rows),
        verdict])


def figures(result: dict) -> dict:
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, (row, r) in enumerate(result["rows"].items()):
        epochs = np.arange(1, len(r["test_accuracy"]) + 1)
        label = f"({row}) {r['label']}"
        if r["diverged"]:
            label += f" - diverged, epoch {r['diverged']['epoch']}"
            ax.plot([r["diverged"]["epoch"]], [0.1], "x", ms=9, color=f"C{i}")
        ax.plot(epochs, r["test_accuracy"], "-o", ms=3, color=f"C{i}", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    c = result["config"]
    ax.set_title(f"{c['model']} on {c['dataset']}: {text_name('C')}", fontsize=10)
    ax.legend(fontsize=7)

    names = list(next(iter(result["rows"].values()))["first_steps"]["grad_norm"])
    gfig, gaxes = new_figure(ncols=len(names) + 1, width=4.6)
    panels = [(name, lambda r, name=name: r["first_steps"]["grad_norm"][name], f"||dL/dW||, {_layer(name)}")
              for name in names] + [("loss", lambda r: r["first_steps"]["loss"], "training loss (batch)")]
    stopped = []  # rows whose training stopped as diverged within the steps shown
    for ax, (_, values_of, title) in zip(gaxes[0], panels):
        smallest = np.inf  # the smallest value above 0, where a zero-including axis turns linear
        zeros = False
        for i, (row, r) in enumerate(result["rows"].items()):
            values = np.array([np.nan if v is None else v for v in values_of(r)], dtype=float)
            ax.plot(np.arange(1, len(values) + 1), values, "-", color=f"C{i}", label=f"({row}) {r['label']}")
            zeros |= bool(np.any(values == 0))
            smallest = min(smallest, np.min(values[values > 0], initial=np.inf))
            if r["diverged"] and r["diverged"]["step"] <= len(values) and r["diverged"]["epoch"] == 1:
                ax.axvline(r["diverged"]["step"], color=f"C{i}", ls=":", lw=1.5)
                stopped += [f"({row})"] if f"({row})" not in stopped else []
        if zeros and np.isfinite(smallest):
            # A log axis drops exact zeros (a dead network's gradient): log above the smallest
            # value above 0, linear below it, so 0 has a place at the bottom of the axis.
            ax.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(smallest)), linscale=0.5)
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title + (" (0 at the bottom)" if zeros else ""), fontsize=10)
    gaxes[0, -1].axhline(np.log(10), color="gray", lw=0.5)
    gaxes[0, -1].annotate("ln 10: all outputs 0", (1, np.log(10)), textcoords="offset points",
                          xytext=(2, -10), fontsize=7, color="gray")
    gaxes[0, 0].legend(fontsize=7)
    # Promise a dotted line only where one is drawn.
    where = (f" (dotted: the step where {' and '.join(stopped)} stopped as diverged)" if stopped
             else "; no run diverged within them")
    gfig.suptitle(f"The first {c['grad_steps']} steps{where}", fontsize=10)
    return {"input_scale_accuracy": fig, "input_scale_grad_norms": gfig}
