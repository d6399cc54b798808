"""DP-SGD's Poisson sampling, microbatches and calibration (jaxbatch/privacy.py):
each example joins each step with probability q, drawn from (seed, step) alone;
padding never changes the clipped sum, and a chunk of steps whose batches fit
is cut to fewer slots; a batch that does not fit its slots gets more, never
cut; microbatches give the whole batch's sum; the calibrated noise ends the run
within 1% below the target epsilon."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import TrainConfig, backends, get_model, init_key, init_params, privacy, train_and_evaluate
from jaxbatch.gradients import ClippedGrad
from jaxbatch.precision import enable_x64, relative_difference


def test_poisson_inclusion_frequencies_and_counts():
    n, batch, steps = 2000, 50, 400
    q = batch / n
    slots = privacy.batch_slots(batch, n)
    idx, weights = privacy.draw_batches(3, np.arange(steps), n, slots, q)
    counts = weights.sum(axis=1).astype(float)
    # Binomial(n, q) batch sizes: mean nq, variance nq(1-q), within 4 standard errors
    assert abs(counts.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert abs(counts.var(ddof=1) / (n * q * (1 - q)) - 1) < 4 * np.sqrt(2 / (steps - 1))
    # every example joins at rate q: the per-example join counts are Binomial(steps, q)
    joined = np.zeros(n)
    for i, w in zip(idx, weights):
        joined[i[w > 0]] += 1
        assert len(set(i[w > 0])) == int(w.sum())  # no example twice in a batch
    assert abs(joined.mean() - steps * q) < 1e-9 + 4 * np.sqrt(steps * q * (1 - q) / n)
    assert abs(joined.var(ddof=1) / (steps * q * (1 - q)) - 1) < 0.2
    # (seed, step) alone decide a batch: the same draw again, another seed another draw
    again = privacy.draw_batches(3, np.arange(5, 9), n, slots, q)[0]
    assert np.array_equal(again, idx[5:9])
    other = privacy.draw_batches(4, np.arange(5, 9), n, slots, q)[0]
    assert not np.array_equal(other, idx[5:9])
    # a step's batch does not depend on which other steps are drawn with it, nor in what order
    picked = np.array([399, 7, 250, 8])
    assert np.array_equal(privacy.draw_batches(3, picked, n, slots, q)[0], idx[picked])


def test_every_pair_of_examples_joins_together_at_rate_q_squared():
    # Independent joins, not only the right marginals: a draw of exactly B
    # distinct examples, or B with replacement, has the same mean size and
    # the same per-example rate, but not Binomial sizes (above) or pair rates
    # q^2. Here n = 6 examples over 20,000 steps, each of the 15 pairs.
    n, q, steps = 6, 0.3, 20000
    idx, weights = privacy.draw_batches(11, np.arange(steps), n, 8, q)
    joins = np.zeros((steps, n))
    for row, (i, w) in enumerate(zip(idx, weights)):
        joins[row, i[w > 0]] = 1
    pairs = (joins.T @ joins) / steps
    off = pairs[~np.eye(n, dtype=bool)]
    assert np.all(np.abs(off - q * q) < 4 * np.sqrt(q * q * (1 - q * q) / steps))
    assert np.all(np.abs(np.diag(pairs) - q) < 4 * np.sqrt(q * (1 - q) / steps))
    # the empty batch occurs, at rate (1 - q)^n
    empty = np.mean(joins.sum(axis=1) == 0)
    assert abs(empty - (1 - q) ** n) < 4 * np.sqrt((1 - q) ** n / steps)


def test_a_batch_that_overflows_its_slots_gets_more_never_cut():
    n, q = 500, 0.2  # about 100 per step
    whole, weights = privacy.draw_batches(7, np.arange(6), n, slots=500, rate=q)
    few, few_weights = privacy.draw_batches(7, np.arange(6), n, slots=40, rate=q)  # every step overflows
    assert few.shape[1] >= weights.sum(axis=1).max() and few.shape[1] % 8 == 0
    for a, wa, b, wb in zip(whole, weights, few, few_weights):
        assert np.array_equal(np.sort(a[wa > 0]), np.sort(b[wb > 0]))  # the same examples, none cut


def test_a_chunk_whose_batches_fit_is_cut_to_typical_slots_and_keeps_every_joined_example():
    n, batch = 60000, 256
    slots, typical = privacy.batch_slots(batch, n), privacy.typical_slots(batch, n)
    assert (slots, typical) == (352, 296)  # B + 6 sd and B + 2.5 sd, rounded up to 8
    idx, weights = privacy.draw_batches(0, np.arange(800), n, slots, batch / n)
    sizes = []
    for start in range(0, 800, 8):
        i, w = privacy.trim(idx[start:start + 8], weights[start:start + 8], typical)
        fits = weights[start:start + 8].sum(axis=1).max() <= typical
        assert i.shape[1] == (typical if fits else slots)
        assert np.array_equal(i, idx[start:start + 8, :i.shape[1]])  # a prefix: the joined examples come first
        assert np.array_equal(w.sum(axis=1), weights[start:start + 8].sum(axis=1))  # none cut
        sizes.append(i.shape[1])
    assert 0.85 <= sizes.count(typical) / len(sizes) < 1  # P(8 batches fit) = 0.95; both sizes occur
    # a chunk that needs every slot keeps them
    over = np.ones((2, slots), np.float32)
    assert privacy.trim(np.zeros((2, slots), np.int32), over, typical)[1].shape == (2, slots)


def chunk_cut_only(monkeypatch):
    """The padding cut per chunk (privacy.trim) for every model, as for a model with a convolution on the CPU."""
    monkeypatch.setitem(backends.CHOICES, "cpu", backends.CHOICES["cpu"]._replace(padding_cut_in_step=False))


def test_trimmed_chunks_train_the_same_run_as_whole_slots(monkeypatch):
    config = TrainConfig(dtype="float64", epochs=1, batch_size=64, dp_clip=0.5, dp_noise=1.0, max_steps=12)
    chunk_cut_only(monkeypatch)
    trim, kept = privacy.trim, []
    monkeypatch.setattr(privacy, "trim", lambda *a: kept.append(trim(*a)[0].shape[1]) or trim(*a))
    trimmed = train_and_evaluate(config)
    assert kept and min(kept) < privacy.batch_slots(64, 1347)  # the run did cut its chunks
    monkeypatch.setattr(privacy, "trim", lambda idx, weights, step: (idx, weights))
    whole = train_and_evaluate(config)
    assert relative_difference(trimmed.params, whole.params) <= 1e-12


def test_padding_cut_inside_the_step_trains_the_same_run_as_whole_slots(monkeypatch):
    """The mlp on one CPU device cuts its padding inside each step (chunks.front_sum), never per chunk."""
    config = TrainConfig(dtype="float64", epochs=1, batch_size=64, dp_clip=0.5, dp_noise=1.0, max_steps=12)
    front_blocks, chosen, trimmed = privacy.front_blocks, [], []
    monkeypatch.setattr(privacy, "front_blocks", lambda *a: chosen.append(front_blocks(*a)) or chosen[-1])
    monkeypatch.setattr(privacy, "trim", lambda *a: trimmed.append(a) or a[:2])
    cut = train_and_evaluate(config)
    assert chosen == [(64, 8)] and not trimmed  # B, then blocks of 8 of the 112 slots
    chunk_cut_only(monkeypatch)
    whole = train_and_evaluate(config)  # the trim above keeps every slot
    assert trimmed and {idx.shape[1] for idx, *_ in trimmed} == {privacy.batch_slots(64, 1347)} == {112}
    assert relative_difference(cut.params, whole.params) <= 1e-12
    assert cut.history[-1]["test_loss"] == pytest.approx(whole.history[-1]["test_loss"], rel=1e-12)


def test_padding_and_microbatches_never_change_the_clipped_sum():
    with enable_x64():
        model = get_model("cnn")
        params = jax.tree.map(lambda a: a.astype(jnp.float64), init_params(model, init_key(0), (8, 8, 1)))
        x = jax.random.uniform(jax.random.key(1), (24, 8, 8, 1), jnp.float64)
        y = jnp.arange(24) % 10
        w = jnp.array([1.0] * 17 + [0.0] * 7)  # 17 real examples, 7 slots of padding
        numbers = {"dp": {"clip": jnp.float64(0.5), "batch": jnp.float64(20.0)}}

        def clipped(grad, *batch):  # jitted, as training runs it (op by op, the four took minutes)
            return jax.jit(lambda p, x, y, w: grad(p, x, y, w, 0, numbers))(params, *batch)

        real = clipped(ClippedGrad(model.apply, expected=True), x[:17], y[:17], w[:17])
        padded = clipped(ClippedGrad(model.apply, expected=True), x, y, w)
        micro = clipped(ClippedGrad(model.apply, expected=True, physical=8), x, y, w)
        # computed as far as the 17th slot only: a base of 8, blocks of 4 (or 8, in microbatches of 8)
        cuts = [clipped(ClippedGrad(model.apply, expected=True, front=front, physical=physical), x, y, w)
                for front, physical in [((8, 4), None), ((8, 8), 8), ((16, 3), None)]]
        for cut, reached in zip(cuts, [20, 24, 19]):
            assert relative_difference(cut[0], real[0]) <= 1e-13
            assert float(cut[1]) == pytest.approx(float(real[1]), rel=1e-13)
            assert cut[2].shape == padded[2].shape and not np.any(cut[2][reached:])  # zeros past the blocks run
            np.testing.assert_allclose(cut[2][:reached], padded[2][:reached], rtol=1e-13)
        shuffled = clipped(ClippedGrad(model.apply), x, y, w)
        assert relative_difference(padded[0], real[0]) <= 1e-13
        assert relative_difference(micro[0], real[0]) <= 1e-13
        # Poisson divides by the expected size B = 20; shuffled batches by their real count, 17
        assert relative_difference(jax.tree.map(lambda g: g * 17 / 20, shuffled[0]), real[0]) <= 1e-13
        assert float(padded[1]) == pytest.approx(float(real[1]), rel=1e-13)


def test_training_in_microbatches_is_the_same_run():
    config = dict(epochs=1, batch_size=64, dp_clip=1.0, dp_noise=1.0, max_steps=8)
    whole = train_and_evaluate(TrainConfig(**config))
    micro = train_and_evaluate(TrainConfig(**config, dp_physical_batch=16))
    assert relative_difference(micro.params, whole.params) < 1e-5  # float32 sums in another order
    assert micro.history[-1]["epsilon"] == whole.history[-1]["epsilon"]


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_ends_within_one_percent_below_the_target(target):
    q, steps, delta = 256 / 60000, 15 * 235, 1e-5
    sigma = privacy.calibrate_noise(q, steps, delta, target)
    eps = privacy.epsilon(q, sigma, steps, delta)
    assert 0.99 * target <= eps <= target


def test_a_calibrated_run_ends_at_its_epsilon_and_records_its_noise(tmp_path):
    import json

    result = train_and_evaluate(TrainConfig(epochs=2, dp_clip=1.0, dp_epsilon=2.0, out=str(tmp_path / "run")))
    assert 0.99 * 2.0 <= result.history[-1]["epsilon"] <= 2.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dp_sampling"] == "poisson" and 0.3 < config["dp_noise"] < 10
    assert privacy.epsilon(32 / 1347, config["dp_noise"], 86, 1e-5) == result.history[-1]["epsilon"]
    # Against dp-accounting called directly with the run's q, sigma and steps: its RDP figure
    # exactly, its PLD figure at the library's own finer discretisation (1e-4) from above,
    # within privacy.PLD_DISCRETIZATION's stated 0.1%.
    event = dp_accounting.PoissonSampledDpEvent(32 / 1347, dp_accounting.GaussianDpEvent(config["dp_noise"]))
    rdp = dp_accounting.rdp.RdpAccountant().compose(event, 86).get_epsilon(1e-5)
    pld = dp_accounting.pld.PLDAccountant().compose(event, 86).get_epsilon(1e-5)
    assert result.history[-1]["epsilon_rdp"] == rdp
    assert pld <= result.history[-1]["epsilon"] <= 1.001 * pld


def test_shuffled_batches_are_kept_for_comparison_and_say_so(tmp_path, capsys):
    from jaxbatch.cli import main

    assert main(["train", "--quiet", "--epochs", "1", "--dp-clip", "1", "--dp-noise", "1", "--dp-sampling",
                 "shuffle", "--out", str(tmp_path / "run")]) == 0
    assert "assumes Poisson sampling and is NOT a guarantee" in capsys.readouterr().out


def test_microbatches_bound_the_memory_of_a_logical_batch():
    from jaxbatch.bench.measure import compile_step

    model = get_model("cnn")
    params = init_params(model, init_key(0), (28, 28, 1))
    x, y, w = jnp.zeros((1024, 28, 28, 1)), jnp.zeros(1024, jnp.int32), jnp.ones(1024)
    numbers = {"dp": {"clip": jnp.float32(1.0), "batch": jnp.float32(1024)}}

    def peak(physical):
        grad = ClippedGrad(model.apply, expected=True, physical=physical)
        return compile_step(lambda p, x, y, w: grad(p, x, y, w, 0, numbers)[0], params, x, y, w).peak_memory_bytes

    whole, micro = peak(None), peak(128)
    if whole is None:
        pytest.skip("this backend gives no memory analysis")
    assert micro < whole / 3  # the ghost norms' unfolded inputs of 128 examples, not 1024
