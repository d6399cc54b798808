"""Training to a target accuracy (--target-accuracy, --eval-every; jaxbatch/target.py):
the run stops at exactly the first evaluation that reaches the target, records
the steps, examples and training seconds, and says so when it never gets there;
the same with DP-SGD, on two devices, and across an interruption and --resume."""

import json
import subprocess
import sys
import textwrap

import pytest

from cli_helpers import cli, one_error_line
from jaxbatch import privacy
from jaxbatch.target import eval_due, record
from jaxbatch.train import Interrupted, TrainConfig, train_and_evaluate

BASE = dict(epochs=3, batch_size=64, lr=0.1, seed=3)  # digits: 22 steps an epoch


@pytest.fixture(scope="module")
def full_history():
    """Every step's evaluation of a run with no target: the history the target stop must agree with."""
    return train_and_evaluate(TrainConfig(**BASE, eval_every=1)).evals


def first_reaching(evals, target):
    return next(e for e in evals if e["test_accuracy"] >= target)


def test_every_step_is_evaluated_once_with_its_examples(full_history):
    assert [e["step"] for e in full_history] == list(range(1, 3 * 22 + 1))
    # 1347 examples: 21 batches of 64 and a last one of 3, each epoch
    assert [e["examples"] for e in full_history[20:23]] == [21 * 64, 1347, 1347 + 64]
    seconds = [e["train_time_s"] for e in full_history]
    assert seconds == sorted(seconds) and seconds[0] > 0


@pytest.mark.parametrize("quantile", [0.3, 0.7])
def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(full_history, quantile):
    accuracies = sorted({e["test_accuracy"] for e in full_history})
    target = accuracies[int(quantile * len(accuracies))]
    first = first_reaching(full_history, target)
    run = train_and_evaluate(TrainConfig(**BASE, eval_every=1, target_accuracy=target))
    assert run.target["reached"] is True
    assert run.target["steps_to_target"] == first["step"]
    assert run.target["examples_to_target"] == first["examples"]
    assert run.target["epochs_to_target"] == pytest.approx(first["examples"] / 1347)
    assert 0 < run.target["seconds_to_target"] <= run.evals[-1]["train_time_s"] + 1e-9
    # It stopped there: the same evaluations up to that step, none after.
    assert [e["step"] for e in run.evals] == list(range(1, first["step"] + 1))
    assert [e["test_accuracy"] for e in run.evals] == [e["test_accuracy"] for e in full_history[:first["step"]]]
    assert run.history[-1]["steps"] == first["step"] and run.history[-1]["target"] == run.target


def test_a_target_never_reached_is_recorded_as_none(full_history):
    run = train_and_evaluate(TrainConfig(**{**BASE, "epochs": 1}, target_accuracy=1.0))
    assert run.target == {"target_accuracy": 1.0, "reached": False, "steps_to_target": None,
                          "examples_to_target": None, "epochs_to_target": None, "seconds_to_target": None}
    assert run.history[-1]["steps"] == 22  # it ran its whole budget
    assert [e["step"] for e in run.evals] == [22]  # without --eval-every: at the epoch's end


@pytest.mark.parametrize("unroll", [False, True])
def test_eval_every_k_evaluates_every_k_steps_of_each_epoch_and_at_its_end(unroll):
    run = train_and_evaluate(TrainConfig(**{**BASE, "epochs": 2}, eval_every=6, unroll=unroll, steps_per_chunk=4))
    # 22 steps an epoch: steps 6, 12, 18 of each, and its end
    assert [e["step"] for e in run.evals] == [6, 12, 18, 22, 28, 34, 40, 44]
    assert eval_due(5, 20) is True and eval_due(5, 22) is False and eval_due(None, 100) is False


def test_a_private_run_records_epsilon_at_the_target():
    config = TrainConfig(**{**BASE, "epochs": 2}, eval_every=2, target_accuracy=0.3, dp_clip=1.0, dp_noise=1.0)
    run = train_and_evaluate(config)
    t = run.target
    assert t["reached"], run.evals
    assert t["epsilon_to_target"] == pytest.approx(privacy.epsilons(64 / 1347, 1.0, t["steps_to_target"],
                                                                    1e-5)["epsilon"])
    assert t["epsilon_to_target"] < privacy.epsilons(64 / 1347, 1.0, 44, 1e-5)["epsilon"]


def test_stopped_and_resumed_it_reaches_the_target_at_the_same_step(tmp_path, full_history):
    target = sorted(e["test_accuracy"] for e in full_history)[int(0.8 * len(full_history))]
    config = dict(**BASE, eval_every=2, target_accuracy=target, steps_per_chunk=2)
    whole = train_and_evaluate(TrainConfig(**config))
    asked = iter([None] * 14 + ["SIGINT"])  # stop mid-epoch 1, after 15 chunks (step 30)
    with pytest.raises(Interrupted):
        train_and_evaluate(TrainConfig(**config, out=str(tmp_path / "run")), stop_requested=lambda: next(asked))
    resumed = train_and_evaluate(TrainConfig(**config, out=str(tmp_path / "run"), resume=True))
    assert resumed.target["steps_to_target"] == whole.target["steps_to_target"]
    assert resumed.target["examples_to_target"] == whole.target["examples_to_target"]
    assert [e["test_accuracy"] for e in resumed.evals] == [e["test_accuracy"] for e in whole.evals]
    lines = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [e["step"] for e in whole.evals]  # each evaluation once
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["target"]["steps_to_target"] == whole.target["steps_to_target"]
    # the training time goes on from the checkpoint's, so it is never less than at the stop
    assert resumed.target["seconds_to_target"] >= lines[13]["train_time_s"]


def test_two_devices_stop_at_the_same_step_as_one(tmp_path):
    code = textwrap.dedent(f"""
        import json
        from jaxbatch.train import TrainConfig, train_and_evaluate
        run = train_and_evaluate(TrainConfig(**{BASE!r}, dtype="float64", eval_every=1, target_accuracy=0.9))
        print(json.dumps({{"devices": run.history[-1]["devices"], "target": run.target,
                          "acc": [e["test_accuracy"] for e in run.evals]}}))
    """)
    env = {**__import__("os").environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    one = train_and_evaluate(TrainConfig(**BASE, dtype="float64", eval_every=1, target_accuracy=0.9, devices=1))
    assert two["devices"] == 2
    assert two["target"]["steps_to_target"] == one.target["steps_to_target"]
    assert two["acc"] == pytest.approx([e["test_accuracy"] for e in one.evals], abs=1 / 450 + 1e-12)


def test_record_of_a_point():
    point = {"step": 10, "examples": 640, "train_time_s": 1.5, "epsilon": 0.7}
    assert record(0.9, point, 1280) == {"target_accuracy": 0.9, "reached": True, "steps_to_target": 10,
                                        "examples_to_target": 640, "epochs_to_target": 0.5,
                                        "seconds_to_target": 1.5, "epsilon_to_target": 0.7}
    assert record(None, point, 1280) == {}


def test_cli_prints_the_target_on_its_last_lines(tmp_path, capsys):
    assert cli("train", "--epochs", "2", "--batch-size", "64", "--lr", "0.1", "--target-accuracy", "0.5",
               "--eval-every", "3", "--quiet", "--out", str(tmp_path / "a")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("target test accuracy 0.5 reached at step ")
    assert "of training (compilation excluded)" in out[-2]
    assert (tmp_path / "a" / "evals.jsonl").exists()
    assert cli("train", "--epochs", "1", "--target-accuracy", "1", "--quiet", "--out", str(tmp_path / "b")) == 0
    assert capsys.readouterr().out.splitlines()[-2] == "target test accuracy 1 not reached in 43 steps"


@pytest.mark.parametrize("flags, message", [
    (["--target-accuracy", "0"], "--target-accuracy: must be greater than 0, got 0"),
    (["--target-accuracy", "1.01"], "--target-accuracy: must be 1 or less, got 1.01"),
    (["--target-accuracy", "-0.5"], "--target-accuracy: must be greater than 0"),
    (["--target-accuracy", "nan"], "--target-accuracy: "),
    (["--eval-every", "0"], "--eval-every: must be 1 or more, got 0"),
    (["--eval-every", "2.5"], "--eval-every: "),
])
def test_bad_target_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    assert cli("train", *flags, "--out", str(tmp_path / "run")) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
