"""Optimisers and learning-rate schedules, from Optax only.

SGD with momentum, the way PyTorch's `torch.optim.SGD` computes it (dampening 0):
    g_t = grad_t + wd * theta_t            (weight decay as an L2 term, before momentum)
    m_t = mu * m_{t-1} + g_t
    theta_{t+1} = theta_t - lr * m_t                   (or - lr * (g_t + mu * m_t), Nesterov)
which is optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, mu, nesterov)).

Adam (Kingma & Ba, 2015) with the same coupled L2 term, as `torch.optim.Adam`;
AdamW (Loshchilov & Hutter, 2019) with decoupled decay:
    theta_{t+1} = theta_t - lr * (adam_step_t + wd * theta_t).

The numbers (learning rate, momentum, weight decay, warm-up and total steps)
may be traced JAX values: the training step receives them as arguments, so a
sweep over learning rates reuses one compiled program. What changes the
program's structure is decided from the name and from whether momentum and
weight decay are used at all (a Python 0 or None means not used).
"""


from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from jaxbatch.errors import JaxbatchError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup", "warmup-cosine")


def _unused(value) -> bool:
    """None or a Python zero: the term is left out of the optimiser."""
    return value is None or (isinstance(value, (int, float)) and value == 0)


def check_schedule(name: str, warmup_steps) -> None:
    if name not in SCHEDULES:
        raise JaxbatchError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}", setting="schedule")
    if name != "constant" and isinstance(warmup_steps, (int, float)) and warmup_steps <= 0:
        raise JaxbatchError(f"schedule {name!r} needs {{setting}} of 1 or more", setting="warmup_steps")


def check_warmup(schedule: str, warmup_steps: int, total_steps: int, lr: float) -> None:
    """A warm-up as long as the run would never reach `lr`: refused."""
    if schedule != "constant" and warmup_steps >= total_steps:
        raise JaxbatchError(f"{{setting}} {warmup_steps} is as long as the run ({total_steps} steps) or longer, so "
                            f"the learning rate would never reach --lr {lr:g}; pass fewer, e.g. "
                            f"{max(1, total_steps // 10)} (a tenth of the run)", setting="warmup_steps")


def check_nesterov(name: str, nesterov: bool, momentum) -> None:
    if nesterov and (name != "sgd" or _unused(momentum)):
        raise JaxbatchError("{setting} needs optimizer sgd and a momentum greater than 0", setting="nesterov")


def make_schedule(name: str, lr, warmup_steps=0, total_steps=1):
    """step t -> learning rate.
    constant: lr.  warmup: lr * min(1, t / warmup_steps) (Goyal et al. 2017).
    warmup-cosine: the same warm-up, then lr * (1 + cos(pi * s)) / 2 with s
    going from 0 to 1 over the remaining steps, down to 0 (Loshchilov & Hutter
    2017)."""
    check_schedule(name, warmup_steps)
    if name == "constant":
        return lambda t: jnp.asarray(lr)
    warm = lambda t: lr * jnp.minimum(1.0, t / warmup_steps)  # noqa: E731
    if name == "warmup":
        return warm
    decay_steps = jnp.maximum(total_steps - warmup_steps, 1)

    def warmup_cosine(t):
        s = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
        return jnp.where(t < warmup_steps, warm(t), lr * 0.5 * (1.0 + jnp.cos(jnp.pi * s)))

    return warmup_cosine


def make_optimizer(name: str, learning_rate, momentum=0.0, nesterov: bool = False,
                   weight_decay=0.0) -> optax.GradientTransformation:
    """An Optax optimiser; `learning_rate` is a number or a schedule."""
    if name not in OPTIMIZERS:
        raise JaxbatchError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}",
                            setting="optimizer")
    check_nesterov(name, nesterov, momentum)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=0.0 if _unused(weight_decay) else weight_decay)
    # Coupled weight decay: the L2 term joins the gradient before momentum/Adam sees it.
    l2 = [] if _unused(weight_decay) else [optax.add_decayed_weights(weight_decay)]
    if name == "sgd":
        return optax.chain(*l2, optax.sgd(learning_rate, momentum=None if _unused(momentum) else momentum,
                                          nesterov=nesterov))
    return optax.chain(*l2, optax.adam(learning_rate))


class Optimizer(NamedTuple):
    """What shapes an optimiser's program, made once per run by `split`;
    hashable, so the jitted step takes it as a static argument and a second
    run with the same structure compiles nothing. Its numbers (learning rate,
    momentum, ...) travel beside it as traced arrays; `transformation` puts
    the two together inside the step, as optax.inject_hyperparams does."""
    name: str
    schedule: str
    nesterov: bool
    momentum: bool  # whether SGD keeps a momentum buffer
    weight_decay: bool  # whether an L2 / decoupled decay term is applied

    def learning_rate(self, numbers: dict):
        """step -> learning rate, the schedule the step follows (numbers: the
        optimiser's own, numbers["optimizer"] in a step)."""
        return make_schedule(self.schedule, numbers["lr"], numbers["warmup_steps"], numbers["total_steps"])

    def transformation(self, numbers: dict) -> optax.GradientTransformation:
        """The Optax optimiser with the step's numbers["optimizer"] (which may be traced)."""
        numbers = numbers["optimizer"]
        return make_optimizer(self.name, self.learning_rate(numbers), numbers["momentum"] if self.momentum else None,
                              self.nesterov, numbers["weight_decay"] if self.weight_decay else None)


def split(name, lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant",
          warmup_steps=0, total_steps=1) -> tuple[Optimizer, dict]:
    """An optimiser's settings as (Optimizer, numbers): the numbers are scalar
    arrays (of JAX's default float dtype) that a jitted step takes as arguments."""
    check_schedule(schedule, warmup_steps)
    check_nesterov(name, nesterov, momentum)
    structure = Optimizer(name, schedule, bool(nesterov), momentum > 0, weight_decay > 0)
    numbers = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                   total_steps=total_steps)
    return structure, {k: jnp.asarray(float(v)) for k, v in numbers.items()}


def chain(parts, numbers: dict) -> optax.GradientTransformationExtraArgs:
    """The Optax transformation of a step: `parts` (each hashable, with
    `.transformation(numbers)`: privacy.AddNoise, then an Optimizer) chained
    in order. Extra arguments of `update` (step, count) reach the parts that
    take them. One part is returned as it is, so its state is the plain
    optimiser's."""
    transformations = [optax.with_extra_args_support(p.transformation(numbers)) for p in parts]
    return transformations[0] if len(transformations) == 1 else optax.chain(*transformations)
