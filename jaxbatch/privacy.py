"""Differentially private SGD: the sampling, the noise, and what they buy (epsilon).

DP-SGD (Abadi et al. 2016) changes one thing in a training step: the batch
gradient becomes

    g_tilde = (1/B) (sum_i g_i * min(1, C / ||g_i||)  +  N(0, sigma^2 C^2 I)),

every example's gradient clipped to norm C (gradients.ClippedGrad), then
Gaussian noise whose standard deviation is the noise multiplier sigma times
C, the most one example can move the sum (`AddNoise`, an Optax-style
transformation before the optimiser). The rest of the step (momentum, Adam,
weight decay) is Optax's as usual: it only ever sees g_tilde, so it adds no
privacy cost.

Sampling. The guarantee is proved for Poisson sampling: every example joins
each step's batch independently with probability q = B / N, so a batch
holds B examples on average, not exactly. `draw_batches` draws them from
(seed, step) alone and pads each batch with weight-0 examples to a fixed
number of slots (B plus six standard deviations: a batch needs more with
probability below 1e-9, and then that epoch's batches simply get more
slots), so the sampling stays exact. Most of that padding is never
computed: for a model without a convolution on the CPU a step computes B
slots, then blocks of 8 only as far as its batch reaches (`front_blocks`,
inside the step); elsewhere `trim` cuts a chunk of
steps whose batches all fit to B plus 2.5 standard deviations, and a run
compiles for two sizes (jaxbatch/backends.py says why).
The clipped sum plus noise is divided by B, the expected size (as Opacus and
jax_privacy do): the noise is calibrated for the sum. Shuffled fixed-size
batches (`--dp-sampling shuffle`) are kept for comparison; the Poisson
epsilon is not a guarantee for them, and shuffling can be much weaker
(Chua et al. 2024, "How Private are DP-SGD Implementations?").

Accounting. Each step is a Poisson-subsampled Gaussian mechanism, composed
over the run's steps. `epsilon` asks Google's dp_accounting for the epsilon
at delta, by the privacy loss distribution (PLD, the tight one; Koskela et
al. 2020, Doroshenko et al. 2022) or by Renyi DP (RDP, Mironov 2017: looser,
the figure most papers quote). A run reports both; PLD is the one budgets
and calibration use.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import numpy as np
import optax

from jaxbatch.errors import JaxbatchError

# A base dependency: missing only where jaxbatch runs uninstalled (PYTHONPATH=.), as on the GPU image.
INSTALL_HINT = "pip install dp-accounting (or pip install -e . from the clone)"
SAMPLINGS = ("poisson", "shuffle")
# The PLD's value discretisation: 1e-3 gives an upper bound within 0.1% of the
# library's finer default (1e-4; 2.2739 against 2.2720 for dp-mnist) in a tenth
# of the time, so every epoch line and the calibration can afford it.
PLD_DISCRETIZATION = 1e-3


def standard_normal(tree, key):
    """N(0, I) draws shaped like `tree`, one key per leaf split from `key`."""
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(structure, [jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


class AddNoise(NamedTuple):
    """DP-SGD's noise as an Optax transformation before the optimiser: the
    clipped mean gradient g_bar of B examples becomes

        g_tilde = g_bar + N(0, (sigma C)^2 I) / B,

    sigma = numbers["dp"]["noise"], C = numbers["dp"]["clip"]. Stateless: the
    noise of global step t comes from (seed, t) alone (`step_key`), so a
    resumed run draws what an uninterrupted one would. Its update takes the
    extra arguments `step` and `count` (the batch's real examples: the
    divisor of shuffled batches; Poisson batches divide by the expected B)."""

    expected: bool = False  # divide by the expected batch size numbers["dp"]["batch"] (Poisson), not `count`

    def transformation(self, numbers: dict) -> optax.GradientTransformationExtraArgs:
        dp = numbers["dp"]

        def update(updates, state, params=None, *, step, count, **extra):
            z = standard_normal(updates, step_key(dp["seed"], step))
            scale = dp["noise"] * dp["clip"] / (dp["batch"] if self.expected else count)
            return jax.tree.map(lambda g, z: g + scale.astype(g.dtype) * z, updates, z), state

        return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def step_key(seed, step):
    """The noise key of one global step: from (seed, step) alone, so a resumed
    run draws the same noise as an uninterrupted one."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x5EED), step)


def _accounting():
    try:
        import dp_accounting
    except ImportError:
        raise JaxbatchError(f"privacy accounting needs dp-accounting: {INSTALL_HINT}") from None
    return dp_accounting


def epsilon(sampling_rate: float, noise: float, steps: int, delta: float, accountant: str = "pld") -> float:
    """The epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps
    (rate q, noise multiplier sigma), from dp_accounting's PLD or RDP accountant."""
    if steps == 0:
        return 0.0
    dp = _accounting()
    # For small noise the RDP accountant drops the orders its series cannot
    # evaluate and says so through absl, once per order; the epsilon is still
    # its bound over the remaining orders.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        if accountant == "pld":
            counter = dp.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        else:
            counter = dp.rdp.RdpAccountant()
        counter.compose(dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise)), int(steps))
        return float(counter.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def epsilons(sampling_rate: float, noise: float, steps: int, delta: float) -> dict:
    """Both accountants' epsilon: {"epsilon": PLD's, "epsilon_rdp": RDP's}."""
    return {"epsilon": epsilon(sampling_rate, noise, steps, delta, "pld"),
            "epsilon_rdp": epsilon(sampling_rate, noise, steps, delta, "rdp")}


def calibrate_noise(sampling_rate: float, steps: int, delta: float, target_epsilon: float) -> float:
    """The noise multiplier whose run ends at PLD epsilon within 1% below
    `target_epsilon` (never above): bisection on log sigma, as Opacus's
    make_private_with_epsilon does on sigma."""
    low, high = MIN_NOISE, MAX_NOISE
    if epsilon(sampling_rate, high, steps, delta) > target_epsilon:
        raise JaxbatchError(f"no noise multiplier up to {MAX_NOISE:g} keeps this run within epsilon "
                            f"{target_epsilon:g}; train fewer steps or use a smaller batch", setting="dp_epsilon")
    if epsilon(sampling_rate, low, steps, delta) <= target_epsilon:
        return low
    for _ in range(60):
        mid = math.sqrt(low * high)
        eps = epsilon(sampling_rate, mid, steps, delta)
        if eps > target_epsilon:
            low = mid
        elif eps < 0.99 * target_epsilon:
            high = mid
        else:
            return mid
    return high  # within the range, at or below the target


# The noise multipliers the accountant and the training make sense for: outside,
# the accountant overflows or divides by zero (1e300, 1e-300), and below 0.3 the
# PLD accountant takes minutes (0.05: 6 s for 86 digits steps; 0.01: minutes).
MIN_NOISE, MAX_NOISE = 0.3, 1e4


def check_settings(clip, noise, delta, target_epsilon) -> None:
    """Reject settings that make no sense before anything runs."""
    if clip is not None and not clip > 0:
        raise JaxbatchError(f"{{setting}} is the largest norm a per-example gradient keeps; it must be greater "
                            f"than 0, got {clip:g}", setting="dp_clip")
    if noise is not None and not noise > 0:
        raise JaxbatchError(f"{{setting}} must be greater than 0, got {noise:g} (without noise there is no "
                            "privacy: clip only, with --dp-clip alone)", setting="dp_noise")
    if noise is not None and not MIN_NOISE <= noise <= MAX_NOISE:
        raise JaxbatchError(f"{{setting}} must be between {MIN_NOISE:g} and {MAX_NOISE:g}, got {noise:g}: below, "
                            "epsilon grows past any meaning (at 0.3, dp-mnist's run would have epsilon 72) and "
                            "its accounting past any reasonable time; above, the noise buries every gradient",
                            setting="dp_noise")
    if noise is not None and clip is None:
        raise JaxbatchError("{setting} scales noise to the clip norm: pass --dp-clip C too", setting="dp_noise")
    if not 0 < delta < 1:
        raise JaxbatchError(f"{{setting}} must be between 0 and 1 (e.g. 1e-5, below 1/N), got {delta:g}",
                            setting="dp_delta")
    if target_epsilon is not None and (clip is None or not target_epsilon > 0):
        raise JaxbatchError("{setting} is a privacy budget: it needs --dp-clip (and, to be checked rather than "
                            "met, --dp-noise), and must be greater than 0", setting="dp_epsilon")


def run_epsilon(sampling_rate: float, noise: float | None, steps: int, delta: float,
                budget: float | None = None) -> float | None:
    """The PLD epsilon a whole run reaches (None without noise), refused with
    `check_budget`'s error if it would exceed `budget`."""
    if noise is None:
        return None
    if budget is not None:
        return check_budget(sampling_rate, noise, steps, delta, budget)
    return epsilon(sampling_rate, noise, steps, delta)


def check_budget(sampling_rate: float, noise: float, steps: int, delta: float, target_epsilon: float) -> float:
    """The run's final epsilon; one clear error if it would exceed the budget."""
    final = epsilon(sampling_rate, noise, steps, delta)
    if final > target_epsilon:
        raise JaxbatchError(
            f"with noise multiplier {noise:g}, sampling rate {sampling_rate:.3g} and {steps} steps, epsilon "
            f"reaches {final:.3g} at delta {delta:g}, above the budget {target_epsilon:g}; raise --dp-noise, "
            "train fewer epochs or use a smaller batch", setting="dp_epsilon")
    return final


# ---- what a private run releases ----------------------------------------------

# Computed from the training data without noise: a DP-SGD run's epsilon does not
# cover them, so its epoch lines leave them out unless asked (then under "nonprivate").
NONPRIVATE = ("train_loss", "train_accuracy", "clipped_fraction", "mean_grad_norm")


def released(record: dict, private: bool, nonprivate: bool = False) -> dict:
    """The epoch record a run may release: all of it, except for a DP-SGD run
    (`private`), whose figures computed without noise go under "nonprivate"
    if `nonprivate` is asked for, and are dropped otherwise."""
    if not private:
        return record
    kept = {k: v for k, v in record.items() if k not in NONPRIVATE}
    if nonprivate:
        kept["nonprivate"] = {k: record[k] for k in NONPRIVATE if k in record}
    return kept


# ---- Poisson sampling ----------------------------------------------------------


def round_up(count: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least `count`."""
    return -(-count // multiple) * multiple


def padded_size(batch_size: int, n: int, deviations: float, multiple: int = 8) -> int:
    """B plus `deviations` standard deviations of a Poisson batch's size,
    Binomial(N, q), never above N, rounded up to `multiple`."""
    q = batch_size / n
    return round_up(min(n, math.ceil(batch_size + deviations * math.sqrt(n * q * (1 - q)))), multiple)


def batch_slots(batch_size: int, n: int, multiple: int = 8) -> int:
    """A Poisson batch's padded size: the expected B plus six standard
    deviations (more are needed with probability below 1e-9 per step),
    rounded up to `multiple` (the devices, the physical batch)."""
    return padded_size(batch_size, n, 6, multiple)


def typical_slots(batch_size: int, n: int, multiple: int = 8) -> int:
    """The padded size a chunk of Poisson batches takes when all of them fit
    (`trim`): B plus 2.5 standard deviations, rounded up to `multiple`. A
    chunk of 8 steps fits with probability 0.95."""
    return padded_size(batch_size, n, 2.5, multiple)


def front_blocks(batch_size: int, n: int, multiple: int = 8) -> tuple[int, int] | tuple[()]:
    """How a step computes a Poisson batch inside the step (chunks.front_sum):
    (base, block), the first `base` slots, B rounded up to `multiple`, then
    blocks of `multiple` slots as far as the batch reaches; () when the base
    is all the slots. At B = 256 of MNIST a step computes 264 of the 352
    slots on average, against 304 for `trim`'s chunks of 24 steps (the
    mlp's)."""
    slots, base = batch_slots(batch_size, n, multiple), round_up(batch_size, multiple)
    return (base, multiple) if base < slots else ()


def trim(idx, weights, typical: int):
    """A chunk of Poisson batches, (k, slots) each, cut to `typical` slots
    when every batch in it fits (the joined examples come first, so only
    padding is cut), else kept whole. The slots cover a batch's worst case
    (B + 6 sd), but most chunks need far fewer: padding every step to the
    worst case cost the cnn 37% more work at B = 256. Two sizes, not one per
    chunk, because each size compiles the chunk's steps once (about 7 s for
    the cnn's on the 2-core CPU): cut to each chunk's own largest batch, a
    run took 4 to 6 sizes an epoch, and a run of a few epochs paid more in
    compiling than it saved."""
    most = int(np.max(np.sum(weights, axis=1))) if len(weights) else 0
    return (idx[:, :typical], weights[:, :typical]) if most <= typical < weights.shape[1] else (idx, weights)


# Apart from every other stream of the run (the noise's is step_key's).
SAMPLE_STREAM = 0x5A3E


def members(seed: int, step: int, n: int, rate: float) -> np.ndarray:
    """The examples that join the batch of global step `step`, sorted: each
    of the n independently with probability `rate`, drawn from (seed, step)
    alone, on the host.

    Drawn as the same law in two parts: the batch's size, Binomial(n,
    rate), then that many distinct examples, every subset of that size
    equally likely (NumPy's choice without replacement). Independent joins
    give exactly this: the size of the set is Binomial, and given its size
    every set is as likely as any other. A uniform number per example and
    step costs n draws a step instead of about B: for MNIST at B = 256 an
    epoch's 235 x 60,000 threefry uniforms took 0.26 s on the 2-core CPU,
    a third of the mlp's private epoch; this draw takes about 20 ms.
    NumPy keeps a Generator's draws the same within a NumPy version (as JAX
    keeps its own within a JAX version): every process of a run, and a run
    resumed, must draw with the same NumPy to see the same batches."""
    rng = np.random.default_rng([int(seed), SAMPLE_STREAM, int(step)])
    return np.sort(rng.choice(n, rng.binomial(n, rate), replace=False))


def draw_batches(seed: int, steps, n: int, slots: int, rate: float, multiple: int = 8):
    """The Poisson batches of `steps` (`members`), as (indices, weights), (k,
    S) each: a batch's joined examples first, in order, then example 0 with
    weight 0 as padding. S = `slots`, or in the rare draw where a batch
    needs more, enough for it rounded up to `multiple`: no joined example is
    ever cut."""
    joined = [members(seed, step, n, rate) for step in steps]
    width = max([slots] + [round_up(len(m), multiple) for m in joined])
    idx, weights = np.zeros((len(joined), width), np.int32), np.zeros((len(joined), width), np.float32)
    for row, m in enumerate(joined):
        idx[row, :len(m)], weights[row, :len(m)] = m, 1.0
    return idx, weights
