"""Checkpoints in one process: stop anywhere, resume, get the same run; keep
the newest N; refuse a resume that would not be the same run. (Killed
processes: tests/test_resume.py.)"""

import json

import pytest
from flax import serialization

from jaxbatch import checkpoint
from jaxbatch.cli import main
from jaxbatch.errors import JaxbatchError
from jaxbatch.train import Interrupted, TrainConfig, train_and_evaluate

# digits, batch 16: 85 steps per epoch in chunks of 9 (the last of 4).
BASE = dict(epochs=2, batch_size=16, steps_per_chunk=9)


def stop_after(calls: int):
    """A stop_requested that asks to stop after `calls` chunks: training asks
    once before its first file is written, then once per chunk."""
    asked = []

    def requested():
        asked.append(1)
        return "SIGINT" if len(asked) == calls + 1 else None

    return requested


def lines(out):
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train_and_evaluate(TrainConfig(**BASE, out=str(out)))
    return (out / "params.msgpack").read_bytes(), lines(out)


def test_a_stop_before_training_begins_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stop:
        train_and_evaluate(TrainConfig(**BASE, out=str(out)), stop_requested=stop_after(0))
    assert not stop.value.started and stop.value.checkpoint is None
    assert "before training began; nothing was written" in str(stop.value)
    assert not out.exists()


# Stops: the first chunk, mid-epoch 1, its last chunk (the epoch's sums carried
# over, its evaluation still to do), the first chunk of epoch 2.
@pytest.mark.parametrize("calls", [1, 5, 10, 11])
def test_stop_anywhere_and_resume_is_the_same_run(tmp_path, uninterrupted, calls):
    config = TrainConfig(**BASE, out=str(tmp_path))
    with pytest.raises(Interrupted) as stop:
        train_and_evaluate(config, stop_requested=stop_after(calls))
    assert stop.value.checkpoint.exists() and not (tmp_path / "params.msgpack").exists()
    # A kill after the checkpoint can leave later lines in metrics.jsonl: the resume drops them.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "written": "after the checkpoint"}) + "\n")
    events = []
    train_and_evaluate(TrainConfig(**BASE, out=str(tmp_path), resume=True), on_progress=events.append)
    assert events[0]["resumed_from"]["step"] == min(calls * 9, 85) + (calls > 10) * 9
    params, history = uninterrupted
    assert (tmp_path / "params.msgpack").read_bytes() == params
    assert lines(tmp_path) == history


def test_checkpoint_holds_the_position_sums_settings_and_state(tmp_path):
    train_and_evaluate(TrainConfig(**BASE, out=str(tmp_path), checkpoint_every=20, keep=2))
    names = [p.name for p in checkpoint.paths(tmp_path)]
    assert names == ["ckpt-000000166.msgpack", "ckpt-000000170.msgpack"]  # the newest 2 of 10
    saved = serialization.msgpack_restore((tmp_path / "checkpoints" / names[-1]).read_bytes())
    assert saved["format"] == checkpoint.FORMAT
    assert saved["position"] == {"step": 170, "epoch": 3, "epoch_step": 0, "epochs_done": 2}
    assert set(saved["epoch_sums"]) == {"loss_sum", "correct", "seen", "last_finite", "extra",
                                        "train_time_s", "examples_before"}  # target.py: the run so far
    assert saved["settings"]["batch_size"] == 16 and "out" not in saved["settings"]
    params, opt_state = saved["state"]["0"], saved["state"]["1"]
    assert set(params["params"]) == {"hidden", "out"} and opt_state is not None


def test_a_resume_with_other_settings_is_refused_naming_the_difference(tmp_path, uninterrupted):
    with pytest.raises(Interrupted):
        train_and_evaluate(TrainConfig(**BASE, out=str(tmp_path)), stop_requested=stop_after(5))
    for change, setting in ((dict(batch_size=32), "batch_size"), (dict(model="mlp_scratch"), "model"),
                            (dict(seed=1), "seed"),
                            # another model's run differs in more: the model is named first, the rest after
                            (dict(model="mlp_scratch", max_steps=40, lr=0.1), "model")):
        with pytest.raises(JaxbatchError, match=f"made with {setting} ") as err:
            train_and_evaluate(TrainConfig(**{**BASE, **change}, out=str(tmp_path), resume=True))
        assert err.value.setting == setting
    assert "(lr, max_steps differ too)" in str(err.value)
    # Settings that do not change the numbers may change, and the numbers are the uninterrupted run's.
    train_and_evaluate(TrainConfig(**{**BASE, "steps_per_chunk": 5}, out=str(tmp_path), resume=True, keep=1))
    params, history = uninterrupted
    assert (tmp_path / "params.msgpack").read_bytes() == params
    # Every figure the same but the train loss, summed chunk by chunk on the device:
    # chunks of 5 steps add it in another order, so it may differ in its last float32 bits.
    for got, want in zip(lines(tmp_path), history, strict=True):
        assert got.pop("train_loss") == pytest.approx(want["train_loss"], rel=1e-6)
        assert got == {k: v for k, v in want.items() if k != "train_loss"}


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    train_and_evaluate(TrainConfig(epochs=2, out=str(tmp_path)))
    first, second = checkpoint.paths(tmp_path)
    second.write_bytes(second.read_bytes()[:100])
    assert checkpoint.latest(tmp_path, TrainConfig(epochs=2, out=str(tmp_path)))["path"] == first
    first.write_bytes(b"not msgpack at all")
    with pytest.raises(JaxbatchError, match="no usable checkpoint"):
        checkpoint.latest(tmp_path, TrainConfig(epochs=2, out=str(tmp_path)))


def test_an_overwriting_run_clears_the_previous_runs_checkpoints(tmp_path):
    train_and_evaluate(TrainConfig(epochs=2, out=str(tmp_path)))
    (tmp_path / "checkpoints" / ".ckpt-000000001.msgpack.123.tmp").write_bytes(b"half")  # a killed save
    train_and_evaluate(TrainConfig(epochs=1, out=str(tmp_path), overwrite=True))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt-000000043.msgpack"]


def test_cli_mismatch_names_the_flag(tmp_path, capsys):
    assert main(["train", "--quiet", "--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["train", "--quiet", "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "made with batch_size 32 and this run has 16; resume with the checkpoint's --batch-size" in err


def test_resume_without_an_output_folder_is_refused():
    with pytest.raises(JaxbatchError, match="needs an output folder: pass --out DIR") as err:
        train_and_evaluate(TrainConfig(epochs=1, resume=True))
    assert err.value.setting == "resume"
