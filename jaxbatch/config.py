"""A training run's settings, each declared once (jaxbatch/settings.py): its
default, its help text and its valid values. `jaxbatch train`'s flags and
`validate` both come from these declarations.
"""

from __future__ import annotations

import dataclasses

from jaxbatch import data as data_lib
from jaxbatch import optim, privacy
from jaxbatch.errors import JaxbatchError
from jaxbatch.models import MODELS
from jaxbatch.settings import check, setting

LOSS_MODES = ("vmap", "batched")
REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "float64")
SEEDS = 2**32  # jax.random.key takes a seed of 32 bits: 0 .. 2^32 - 1

CHECKPOINTS = "checkpoints (in --out/checkpoints; see README: Checkpoints and resuming)"
TARGET = "training to a target accuracy (README: Choosing a batch size)"
PRIVACY = "per-example clipping, DP-SGD and the gradient noise scale (README: Private training)"


@dataclasses.dataclass
class TrainConfig:
    model: str = setting("mlp", "the network", choices=MODELS)
    dataset: str = setting("digits", "digits (bundled), mnist, fashion_mnist, kmnist, cifar10")
    data_dir: str | None = setting(None, "folder holding <dataset>/ files (default $JAXBATCH_DATA_DIR or "
                                   "~/.jaxbatch/data)", type=str)
    source: str = setting("auto", "where to read the dataset from", choices=data_lib.SOURCES, kind="source")
    epochs: int = setting(10, "passes over the training set", at_least=1)
    batch_size: int = setting(32, "examples per step (over all devices)", at_least=1)
    optimizer: str = setting("sgd", "the Optax optimiser", choices=optim.OPTIMIZERS, kind="optimizer")
    lr: float = setting(0.05, "learning rate (the peak, with a schedule)", above=0, kind="learning rate")
    momentum: float = setting(0.9, "sgd momentum", at_least=0)
    nesterov: bool = setting(False, "Nesterov momentum (sgd)")
    weight_decay: float = setting(0.0, "L2 added to the gradient (sgd, adam), or decoupled (adamw)", at_least=0)
    schedule: str = setting("constant", "learning-rate schedule", choices=optim.SCHEDULES, kind="schedule")
    warmup_steps: int = setting(0, "linear warm-up steps for warmup schedules", at_least=0)
    loss: str = setting("vmap", "vmap: the one-example loss under jax.vmap; batched: the whole batch at once",
                        choices=LOSS_MODES, kind="loss mode")
    # "sum" is text E's from-scratch loss (pair it with lr / batch_size).
    loss_reduction: str = setting("mean", "mean or sum over the batch", choices=REDUCTIONS, kind="loss reduction")
    input_scale: float = setting(1.0, "inputs are pixels / 255 * this", above=0)
    standardize: bool = setting(False, "per-channel standardisation with training-set statistics")
    seed: int = setting(0, f"initialisation and shuffling seed, 0 .. {SEEDS - 1}", at_least=0, at_most=SEEDS - 1)
    # A step loss above this counts as divergence, like NaN or inf. Chance-level
    # cross-entropy is ln(10) = 2.3; a loss of 1e4 means logits 1e4 apart: the
    # updates overshot. (Text C's x255 run shows it: the loss jumps to ~1e12,
    # every ReLU dies, and the loss then sits at ln(10) without ever being NaN.)
    max_loss: float = setting(1e4, "a step loss above this (or NaN/inf) stops training as diverged", above=0,
                              finite=False)
    max_steps: int | None = setting(None, "stop after this many steps in all", type=int, at_least=1)
    out: str | None = setting(None, "folder for metrics.jsonl, config.json and params.msgpack (default: a new "
                              "numbered folder runs/<recipe or model-dataset>/N; with --resume the newest)",
                              type=str)
    overwrite: bool = setting(False, "replace the run already in --out (without it, a folder holding a run is "
                              "refused)")
    checkpoint_every: int | None = setting(
        None, "save a checkpoint every N steps too (always: at the end of every epoch, and on Ctrl-C or SIGTERM)",
        type=int, at_least=1, metavar="N", group=CHECKPOINTS)
    keep: int = setting(3, "checkpoints kept, newest first", at_least=1, metavar="N", group=CHECKPOINTS)
    resume: bool = setting(False, "continue the run in --out from its newest checkpoint, exactly where it stopped",
                           group=CHECKPOINTS)
    # Per-example clipping and DP-SGD (losses.clipped_grad_sum, privacy.py); their
    # ranges and how they go together are privacy.check_settings'.
    dp_clip: float | None = setting(None, "clip every example's gradient to L2 norm C before averaging",
                                    type=float, metavar="C", group=PRIVACY)
    dp_noise: float | None = setting(None, "DP-SGD: add Gaussian noise of std SIGMA * C to the clipped sum; "
                                     "epsilon is reported", type=float, metavar="SIGMA", group=PRIVACY)
    dp_delta: float = setting(1e-5, "the delta of epsilon", metavar="DELTA", group=PRIVACY)
    dp_epsilon: float | None = setting(None, "a privacy budget: without --dp-noise, the noise multiplier is "
                                       "chosen so the run ends at this epsilon (PLD); with it, a run that would "
                                       "exceed it is refused", type=float, metavar="EPS", group=PRIVACY)
    dp_sampling: str = setting("poisson", "how DP-SGD batches are drawn: poisson (each example joins each step "
                               "with probability B/N: what epsilon is proved for) or shuffle (fixed-size shuffled "
                               "batches, for comparison: epsilon is then not a guarantee)",
                               choices=privacy.SAMPLINGS, kind="sampling", group=PRIVACY)
    dp_physical_batch: int | None = setting(None, "process each (logical) batch in microbatches of at most N "
                                            "examples, summed: memory for N, the result of the whole batch",
                                            type=int, at_least=1, metavar="N", group=PRIVACY)
    dp_nonprivate_metrics: bool = setting(False, "also log train loss and accuracy and the clipping figures of a "
                                          "DP-SGD run, computed without noise, so not covered by its epsilon "
                                          "(kept under 'nonprivate' in metrics.jsonl)", group=PRIVACY)
    dp_chunk: int | None = setting(None, "clip N examples at a time (less memory; default: the whole batch)",
                                   type=int, at_least=1, metavar="N", group=PRIVACY)
    log_noise_scale: bool = setting(False, "log the gradient noise scale B_simple every epoch", group=PRIVACY)
    # Dense-only models get every ||g_i|| from the step's own backward pass
    # (ghost.grads_and_sq_norms), so measuring costs nothing; other models take
    # an extra pass on the steps that count.
    noise_scale_every: int = setting(4, "measure it on every K-th step", at_least=1, metavar="K", group=PRIVACY)
    # Time to quality (MLPerf's measure; Shallue et al. 2019's steps to a result): the run stops the
    # first time an evaluation reaches the target, and records the steps, examples and seconds it took.
    target_accuracy: float | None = setting(None, "stop the first time the test accuracy reaches A (0 < A <= 1) "
                                            "and record the steps, examples and training seconds it took",
                                            type=float, above=0, at_most=1, metavar="A", group=TARGET)
    eval_every: int | None = setting(None, "evaluate the test accuracy every K steps of an epoch too, not only at "
                                     "its end (evals.jsonl)", type=int, at_least=1, metavar="K", group=TARGET)
    devices: int | None = setting(None, "data-parallel over the first N devices (default: every device; the "
                                  "batch size is global and must divide by N)", type=int, at_least=1)
    dtype: str = setting("float32", "parameters and inputs (float64 for checks that need more digits)",
                         choices=DTYPES, kind="dtype")
    # Library-only: what tests, experiments and benchmarks tune.
    steps_per_chunk: int | None = setting(None, "steps per lax.scan call (default: train.chunk_plan)", type=int,
                                          at_least=1, flag=False)
    unroll: bool | None = setting(None, "unroll each chunk's scan (default: train.chunk_plan)", type=bool,
                                  flag=False)
    record_steps: int = setting(0, "keep loss and per-layer gradient norms of the first N steps "
                                "(TrainResult.steps)", at_least=0, flag=False)
    eval_batch_size: int = setting(1000, "examples per evaluation batch", at_least=1, flag=False)


def validate(config: TrainConfig) -> None:
    """Reject nonsensical settings before any data is loaded or compiled:
    each setting against its declaration, then the rules that tie several
    together."""
    check(config)
    if config.checkpoint_every and not config.out:
        raise JaxbatchError("checkpoints live in the output folder: pass {setting} DIR", setting="out")
    privacy.check_settings(config.dp_clip, config.dp_noise, config.dp_delta, config.dp_epsilon)
    if config.dp_clip is not None:
        if config.loss == "batched":
            raise JaxbatchError("clipping needs every example's own gradient, which the batched loss never "
                                "forms; drop {setting} batched (the default, vmap, is per-example)", setting="loss")
        if config.loss_reduction == "sum":
            raise JaxbatchError("DP-SGD averages the clipped gradients over the batch; drop {setting} sum",
                                setting="loss_reduction")
        if config.log_noise_scale:
            raise JaxbatchError("the noise scale reads unclipped per-example gradients, which a private run "
                                "must not release; drop {setting} or the --dp- flags", setting="log_noise_scale")
    if config.dp_physical_batch is not None and config.dp_clip is None:
        raise JaxbatchError("{setting} splits the per-example work of clipping; it needs --dp-clip",
                            setting="dp_physical_batch")
    optim.check_schedule(config.schedule, config.warmup_steps)
    optim.check_nesterov(config.optimizer, config.nesterov, config.momentum)
    data_lib.get_spec(config.dataset)


def is_private(config: TrainConfig) -> bool:
    """Whether the run is DP-SGD: noise given, or a budget it is calibrated to."""
    return config.dp_clip is not None and (config.dp_noise is not None or config.dp_epsilon is not None)


def poisson(config: TrainConfig) -> bool:
    """Whether the run's batches are drawn by Poisson sampling (privacy.draw_batches)."""
    return is_private(config) and config.dp_sampling == "poisson"
