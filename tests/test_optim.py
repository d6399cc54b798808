"""Optax optimisers against PyTorch's update rules, computed by hand."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch.errors import JaxbatchError
from jaxbatch.optim import make_optimizer, make_schedule


def run(opt, theta, grads):
    state = opt.init(theta)
    out = []
    for g in grads:
        updates, state = opt.update(g, state, theta)
        theta = optax.apply_updates(theta, updates)
        out.append(theta)
    return out


def test_sgd_momentum_weight_decay_matches_pytorch_by_hand():
    # torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), dampening 0:
    #   d = g + wd * p;  buf = d (first step), buf = mu * buf + d;  p -= lr * buf
    lr, mu, wd = 0.1, 0.9, 0.01
    p0 = jnp.array([1.0, -2.0])
    g1, g2 = jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])
    d1 = g1 + wd * p0                      # [0.51, 0.23]
    buf1 = d1
    p1 = p0 - lr * buf1                    # [0.949, -2.023]
    d2 = g2 + wd * p1                      # [-0.99051, 1.97977]
    buf2 = mu * buf1 + d2                  # [-0.53151, 2.18677]
    p2 = p1 - lr * buf2                    # [1.002151, -2.241677]
    np.testing.assert_allclose(p1, [0.949, -2.023], rtol=1e-6)
    np.testing.assert_allclose(p2, [1.002151, -2.241677], rtol=1e-6)
    got = run(make_optimizer("sgd", lr, momentum=mu, weight_decay=wd), p0, [g1, g2])
    np.testing.assert_allclose(got[0], p1, rtol=1e-6)
    np.testing.assert_allclose(got[1], p2, rtol=1e-6)


def test_sgd_nesterov_matches_pytorch_by_hand():
    # PyTorch Nesterov: buf as above, then d = d + mu * buf;  p -= lr * d
    lr, mu = 0.1, 0.9
    p0, g1, g2 = jnp.array([1.0]), jnp.array([0.5]), jnp.array([-1.0])
    buf1 = g1
    p1 = p0 - lr * (g1 + mu * buf1)
    buf2 = mu * buf1 + g2
    p2 = p1 - lr * (g2 + mu * buf2)
    got = run(make_optimizer("sgd", lr, momentum=mu, nesterov=True), p0, [g1, g2])
    np.testing.assert_allclose(got[1], p2, rtol=1e-6)


def test_adamw_decay_is_decoupled_and_adam_decay_is_coupled():
    p0, g = jnp.array([2.0]), jnp.array([0.0])
    # With a zero gradient, AdamW still shrinks p by lr * wd * p; Adam's L2 term
    # goes through the normalisation (step = lr * sign, about lr).
    adamw = run(make_optimizer("adamw", 0.1, weight_decay=0.5), p0, [g])[0]
    np.testing.assert_allclose(adamw, 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
    adam = run(make_optimizer("adam", 0.1, weight_decay=0.5), p0, [g])[0]
    np.testing.assert_allclose(adam, 2.0 - 0.1, rtol=1e-4)


def test_schedules():
    warm = make_schedule("warmup", 1.0, warmup_steps=10)
    assert float(warm(0)) == 0.0 and np.isclose(float(warm(5)), 0.5) and float(warm(50)) == 1.0
    cos = make_schedule("warmup-cosine", 1.0, warmup_steps=10, total_steps=110)
    assert np.isclose(float(cos(10)), 1.0) and np.isclose(float(cos(60)), 0.5, atol=1e-6)
    assert float(cos(110)) < 1e-6
    assert float(make_schedule("constant", 0.3)(1000)) == pytest.approx(0.3)


def test_bad_optimizer_settings_are_clear_errors():
    with pytest.raises(JaxbatchError, match="unknown optimizer"):
        make_optimizer("rmsprop", 0.1)
    with pytest.raises(JaxbatchError, match="nesterov"):
        make_optimizer("sgd", 0.1, momentum=0.0, nesterov=True)
    with pytest.raises(JaxbatchError, match="warmup_steps"):
        make_schedule("warmup", 0.1, warmup_steps=0)
