"""The DP-SGD twins scripts/dp_cost.py times against jaxbatch: Opacus, in
hooks and in ghost mode, on the same weights and the same batch, steps with
jaxbatch's clipped gradient (divided by the expected batch size), and adds
noise of its scale sigma C / B. Skipped where Opacus is not installed (it is
not among the test extra's packages)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxbatch import get_model, init_key, init_params  # noqa: E402
from jaxbatch.bench import torch_twins as tt  # noqa: E402
from jaxbatch.gradients import ClippedGrad  # noqa: E402
from jaxbatch.precision import relative_difference  # noqa: E402

SHAPE = (28, 28, 1)
EXPECTED_B, CLIP = 32, 0.5


def one_step(name, mode, noise, real=30, slots=40):
    """(the twin's gradient after one Opacus step, in the JAX layout; jaxbatch's
    clipped mean of the same examples, padded with weight-0 slots as a
    Poisson batch is)."""
    params = init_params(get_model(name), init_key(0), SHAPE)
    rng = np.random.default_rng(0)
    x, y = rng.random((slots, *SHAPE), np.float32), rng.integers(0, 10, slots)
    w = (np.arange(slots) < real).astype(np.float32)
    numbers = {"dp": {"clip": jnp.float32(CLIP), "batch": jnp.float32(EXPECTED_B)}}
    ours = ClippedGrad(get_model(name).apply, expected=True)(params, x, y, w, 0, numbers)[0]
    model, optimizer, criterion = tt.opacus_twin(tt.torch_twin(name, params, SHAPE, torch.device("cpu")), mode,
                                                 lr=0.1, clip=CLIP, noise=noise, batch_size=EXPECTED_B)
    tt.train_step(model, optimizer, criterion, *tt.to_torch_batch(x[:real], y[:real], "cpu"))
    inner = model._module  # Opacus wraps the twin
    theirs = tt.grads_to_jax_layout(name, inner, [p.grad for p in inner.parameters()], SHAPE)
    return {"params": theirs}, ours


@pytest.mark.parametrize("mode", tt.OPACUS_MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_opacus_clips_as_jaxbatch_does(name, mode):
    theirs, ours = one_step(name, mode, noise=0.0)
    # Opacus divides C by ||g_i|| + 1e-6: a few parts in a million apart
    assert relative_difference(theirs, ours) <= 1e-5


@pytest.mark.parametrize("mode", tt.OPACUS_MODES)
def test_opacus_noise_is_sigma_c_over_b(mode):
    theirs, ours = one_step("mlp", mode, noise=1.0)
    noise = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                            zip(jax.tree.leaves(theirs), jax.tree.leaves(ours))])
    assert noise.std() == pytest.approx(CLIP / EXPECTED_B, rel=0.02)  # 203,530 draws: 0.2% sd


def test_an_unknown_mode_is_one_clear_error():
    from jaxbatch.errors import JaxbatchError

    with pytest.raises(JaxbatchError, match="unknown Opacus mode 'fast'; choose from: hooks, ghost"):
        tt.opacus_twin(None, "fast", 0.1, 1.0, 1.0, 8)
