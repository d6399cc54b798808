"""Optimisers and learning-rate schedules, from Optax only.

SGD with momentum, the way PyTorch's `torch.optim.SGD` computes it (dampening 0):
    g_t = grad_t + wd * theta_t            (weight decay as an L2 term, before momentum)
    m_t = mu * m_{t-1} + g_t
    theta_{t+1} = theta_t - lr * m_t                   (or - lr * (g_t + mu * m_t), Nesterov)
which is optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, mu, nesterov)).

Adam (Kingma & Ba, 2015) with the same coupled L2 term, as `torch.optim.Adam`;
AdamW (Loshchilov & Hutter, 2019) with decoupled decay:
    theta_{t+1} = theta_t - lr * (adam_step_t + wd * theta_t).
"""

from __future__ import annotations

import optax

from jaxbatch.errors import JaxbatchError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup", "warmup-cosine")


def make_schedule(name: str, lr: float, warmup_steps: int = 0, total_steps: int = 1):
    """constant: lr.  warmup: lr * min(1, t / warmup_steps) (Goyal et al. 2017).
    warmup-cosine: the same warm-up, then lr * (1 + cos(pi * s)) / 2 down to 0
    over the remaining steps (Loshchilov & Hutter 2017)."""
    if name not in SCHEDULES:
        raise JaxbatchError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if name != "constant" and warmup_steps <= 0:
        raise JaxbatchError(f"schedule {name!r} needs --warmup-steps of 1 or more")
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "warmup":
        return optax.linear_schedule(0.0, lr, warmup_steps)  # holds lr after the warm-up
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0)


def make_optimizer(name: str, learning_rate, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """An Optax optimiser; `learning_rate` is a float or a schedule."""
    if name not in OPTIMIZERS:
        raise JaxbatchError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if nesterov and (name != "sgd" or momentum <= 0):
        raise JaxbatchError("--nesterov needs --optimizer sgd and --momentum greater than 0")
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    # Coupled weight decay: the L2 term joins the gradient before momentum/Adam sees it.
    l2 = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "sgd":
        return optax.chain(*l2, optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*l2, optax.adam(learning_rate))
