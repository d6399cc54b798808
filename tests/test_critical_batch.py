"""`jaxbatch experiment critical-batch`: the fit of S(B) = S_min + E_min / B,
the learning-rate search, a rerun that skips finished runs, and bad input."""

import json
import math

import numpy as np
import pytest

from cli_helpers import cli, one_error_line
from jaxbatch.experiments import critical_batch as cb
from jaxbatch.experiments import make_config, run_experiment

SIZES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def synthetic(b_crit, s_min, sizes, seeds=3, noise=0.05, seed=0):
    """Steps to target of `seeds` seeds per B: the model's S(B) times log-normal noise."""
    rng = np.random.default_rng(seed)
    return {b: list(s_min * (1 + b_crit / b) * np.exp(noise * rng.standard_normal(seeds))) for b in sizes}


@pytest.mark.parametrize("b_crit", [100.0, 600.0, 2000.0])
def test_the_fit_recovers_b_crit_within_5_percent(b_crit):
    fit = cb.fit_with_interval(synthetic(b_crit, 50.0, SIZES), resamples=200)
    assert fit["determined"], fit
    assert fit["b_crit"] == pytest.approx(b_crit, rel=0.05)
    assert fit["s_min"] == pytest.approx(50.0, rel=0.05)
    low, high = fit["b_crit_interval"]
    assert low < b_crit < high and high / low < 1.5
    assert len(fit["residuals"]) == len(SIZES) and max(map(abs, fit["residuals"])) < 0.15


def test_noise_free_data_fit_exactly():
    got = cb.fit_steps(SIZES, [40 * (1 + 300 / b) for b in SIZES])
    assert got["b_crit"] == pytest.approx(300, rel=1e-6) and got["e_min"] == pytest.approx(40 * 300, rel=1e-6)


@pytest.mark.parametrize("b_crit, sizes", [
    (1e6, SIZES[:6]),   # every size far below B_crit: perfect scaling, the bend unseen
    (2.0, SIZES[4:]),   # every size far above it: no gain at all, the bend unseen
])
def test_data_that_do_not_show_the_bend_say_so(b_crit, sizes):
    fit = cb.fit_with_interval(synthetic(b_crit, 50.0, sizes), resamples=200)
    assert fit["determined"] is False
    assert "leaves the batch sizes measured" in fit["why"]


def test_fewer_than_three_sizes_cannot_be_fitted():
    fit = cb.fit_with_interval({8: [100.0], 16: [60.0], 32: []})
    assert fit["determined"] is False and fit["b_crit"] is None
    assert fit["why"] == "fewer than 3 batch sizes reached the target"


class FakeSweep:
    """search_lr's view of a sweep: steps to target as a function of the lr's grid index."""

    def __init__(self, steps_at):
        self.steps_at, self.calls = steps_at, []
        self.config = cb.Config()
        self.trained, self.started = 0, 0.0

    def run(self, b, lr, seed, cap=None, dp_noise=None):
        i = round(math.log2(lr))
        self.calls.append((i, cap))
        steps = self.steps_at(i)
        reached = steps is not None and (cap is None or steps <= cap)
        return {"batch_size": b, "lr": lr, "seed": seed, "reached": reached, "diverged": False,
                "steps": steps if reached else None, "epochs": 1.0, "max_steps": cap, "best_accuracy": 0.5}

    def on_progress(self, text):
        pass


@pytest.mark.parametrize("best, start", [(6, 2), (1, 5), (4, 4), (0, 3), (9, 0)])
def test_the_search_finds_the_grid_minimum_of_a_unimodal_curve(best, start):
    grid = [2.0**i for i in range(10)]
    sweep = FakeSweep(lambda i: 100 * 1.5 ** abs(i - best))
    found, tried = cb.search_lr(sweep, 64, grid, start)
    assert found == best
    indexes = sorted({i for i, _ in sweep.calls})
    assert {i for i in (best - 1, best + 1) if 0 <= i < 10} <= set(indexes)  # both neighbours known
    assert len(tried) == len(indexes) <= abs(best - start) + 3


def test_a_run_is_cut_at_twice_the_best_steps_so_far():
    sweep = FakeSweep(lambda i: 100 * 2 ** abs(i - 3))
    cb.search_lr(sweep, 64, [2.0**i for i in range(8)], 3)
    assert sweep.calls[0] == (3, None) and all(cap == 200 for _, cap in sweep.calls[1:])


def test_divergence_everywhere_but_one_lr_still_finds_it():
    sweep = FakeSweep(lambda i: 500 if i == 7 else None)
    found, _ = cb.search_lr(sweep, 64, [2.0**i for i in range(9)], 2)
    assert found == 7


def test_eval_every_divides_an_epoch():
    class Train:
        def __len__(self):
            return 60000

    sweep = cb.Sweep(cb.Config(eval_fraction=0.025), None, Train(), None, None)
    for b in (8, 256, 8192):
        steps = -(-60000 // b)
        k = sweep.eval_every(b)
        assert steps % k == 0 and 0.4 < k / max(1, 0.025 * steps) < 2.5 or k == 1


SMALL = dict(batch_sizes=(64, 128, 256), lr_grid=(0.2, 1.6), first_lr=0.4, seeds=2, max_epochs=8, target=0.8,
             eval_fraction=0.2, noise_batch_size=128)


def without_seconds(points):
    return [{k: v for k, v in p.items() if k != "seed_seconds"} for p in points]


def test_a_rerun_skips_finished_runs_and_trains_only_the_missing_ones(tmp_path):
    out = tmp_path / "sweep"
    config = make_config("critical-batch", quick=True, **SMALL)
    first, paths = run_experiment("critical-batch", config, out)
    assert {p.name for p in paths} == {"result.json", "critical_batch.png"}
    lines = (out / cb.RUNS).read_text().splitlines()
    assert first["runs_trained"] == len(lines) >= 3 * 3 + 1  # >= 2 lrs + 1 more seed per size, + B_simple's
    again, _ = run_experiment("critical-batch", config, out)
    assert again["runs_trained"] == 0
    assert again["points"] == first["points"] and again["b_simple"] == first["b_simple"]
    # A sweep killed mid-write: two runs lost, the last line torn. The rerun trains just those two.
    (out / cb.RUNS).write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:40])
    third, _ = run_experiment("critical-batch", config, out)
    assert third["runs_trained"] == 2
    # the same runs to the step (a run's seconds are its own)
    assert without_seconds(third["points"]) == without_seconds(first["points"])
    assert len((out / cb.RUNS).read_text().splitlines()) == len(lines)  # the torn line dropped, two added
    result = json.loads((out / "result.json").read_text())
    for key in ("batch_sizes", "steps_to_target", "epochs_to_target", "best_lr", "b_crit", "b_crit_interval",
                "b_simple", "fit"):
        assert key in result
    assert result["batch_sizes"] == [64, 128, 256]
    assert result["b_simple"]["near_target"] > 0 and result["b_simple"]["over_run"] > 0


def test_a_private_sweep_calibrates_each_batch_size_and_keeps_epsilon(tmp_path):
    config = make_config("critical-batch", quick=True, **{**SMALL, "batch_sizes": (128, 256), "seeds": 1,
                                                          "target": 0.6, "lr_grid": (0.4, 1.6)},
                         dp_clip=1.0, dp_epsilon=8.0)
    result, _ = run_experiment("critical-batch", config, tmp_path / "dp")
    noises = [p["dp_noise"] for p in result["points"]]
    assert noises[0] < noises[1]  # a bigger batch: fewer steps, each may be noisier for the same epsilon
    for p in result["points"]:
        steps = 8 * -(-1347 // p["batch_size"])
        from jaxbatch import privacy
        assert privacy.epsilon(p["batch_size"] / 1347, p["dp_noise"], steps, 1e-5) <= 8.0
        assert all(e is not None and e <= 8.0 for e in p["seed_epsilons"])
    assert result["b_simple"] is None  # the noise scale reads unclipped gradients: not in a private sweep


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", ""], "batch"),
    (["--batch-sizes", "8,12"], "batch sizes must be powers of 2"),
    (["--batch-sizes", "8,8"], "lists a batch size twice"),
    (["--target", "0"], "--target: must be greater than 0"),
    (["--target", "1.5"], "--target: must be 1 or less"),
    (["--lr-grid", "1,0.1"], "smallest first"),
    (["--dp-clip", "1"], "needs both dp_clip and dp_epsilon; pass --dp-epsilon"),
    (["--compare", "no-such-file.json"], "is not a file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert cli("experiment", "critical-batch", "--quick", *flags, "--out", str(out)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()
