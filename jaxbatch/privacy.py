"""Differentially private SGD: the noise, and what it buys (epsilon).

DP-SGD (Abadi et al. 2016) changes one thing in a training step: the batch
gradient becomes

    g_tilde = (1/B) (sum_i g_i * min(1, C / ||g_i||)  +  N(0, sigma^2 C^2 I)),

every example's gradient clipped to norm C (gradients.ClippedGrad), then
Gaussian noise whose standard deviation is the noise multiplier sigma times
C, the most one example can move the sum (`AddNoise`, an Optax-style
transformation before the optimiser). The rest of the step (momentum, Adam,
weight decay) is Optax's as usual: it only ever sees g_tilde, so it adds no
privacy cost.

Privacy accounting: each step is a subsampled Gaussian mechanism with
sampling rate q = B / N, composed over the run's steps; `epsilon` asks
Google's `dp_accounting` RDP accountant (Mironov 2017; Mironov, Talwar, Zhang
2019) for the epsilon at a given delta. That analysis assumes Poisson
sampling (every example joins each batch independently with probability q).
jaxbatch trains on shuffled fixed-size batches, as nearly every DP-SGD
implementation does; the epsilon it reports is the customary one for such
training, not a formal guarantee for shuffling, which can be weaker
(Chua et al. 2024, "How Private are DP-SGD Implementations?").
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import optax

from jaxbatch.errors import JaxbatchError

INSTALL_HINT = 'pip install -e ".[dp]" (or: pip install dp-accounting)'


def noisy_mean(clipped_sum, clip, noise, key, count):
    """(clipped_sum + N(0, (noise * clip)^2 I)) / count: one independent
    normal draw per parameter entry, from `key`."""
    return jax.tree.map(lambda s, z: (s + noise * clip * z) / count, clipped_sum, standard_normal(clipped_sum, key))


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
    extra arguments `step` and `count` (B, the batch's real examples)."""

    def transformation(self, numbers: dict) -> optax.GradientTransformationExtraArgs:
        dp = numbers["dp"]

        def update(updates, state, params=None, *, step, count, **extra):
            z = standard_normal(updates, step_key(dp["seed"], step))
            scale = dp["noise"] * dp["clip"] / count
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


def epsilon(sampling_rate: float, noise: float, steps: int, delta: float) -> float:
    """The epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps
    (rate q, noise multiplier sigma), from dp_accounting's RDP accountant."""
    if steps == 0:
        return 0.0
    dp = _accounting()
    # For small noise the accountant drops the RDP orders its series cannot
    # evaluate and says so through absl, once per order; the epsilon is still
    # its bound over the remaining orders.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = dp.rdp.RdpAccountant()
        accountant.compose(dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise)), int(steps))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


# The noise multipliers the accountant and the training make sense for (outside,
# the accountant overflows or divides by zero: 1e300, 1e-300).
MIN_NOISE, MAX_NOISE = 0.01, 1e4


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
                            "epsilon grows past any meaning (at 0.1, dp-mnist's run would have epsilon 17,000); above, "
                            "the noise buries every gradient", setting="dp_noise")
    if noise is not None and clip is None:
        raise JaxbatchError("{setting} scales noise to the clip norm: pass --dp-clip C too", setting="dp_noise")
    if not 0 < delta < 1:
        raise JaxbatchError(f"{{setting}} must be between 0 and 1 (e.g. 1e-5, below 1/N), got {delta:g}",
                            setting="dp_delta")
    if target_epsilon is not None and (noise is None or not target_epsilon > 0):
        raise JaxbatchError("{setting} is a privacy budget: it needs --dp-clip and --dp-noise, and must be "
                            "greater than 0", setting="dp_epsilon")


def run_epsilon(sampling_rate: float, noise: float | None, steps: int, delta: float,
                budget: float | None = None) -> float | None:
    """The epsilon a whole run reaches (None without noise), refused with
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
