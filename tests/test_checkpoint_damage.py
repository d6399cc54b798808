"""Checkpoints that read but are wrong: each damage to the newest checkpoint
is found before anything is written, the run resumes from the one before
(saying so in one line) and ends exactly as the undamaged run; with no usable
checkpoint left, one line and nothing altered."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import serialization

from jaxbatch import TrainConfig, checkpoint, get_model, init_key, init_params, train_and_evaluate
from jaxbatch.cli import main

RUN = dict(epochs=2, batch_size=32)  # digits: 43 steps per epoch, checkpoints at steps 43 and 86
FLAGS = ["--quiet", "--epochs", "2", "--batch-size", "32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_and_evaluate(TrainConfig(**RUN, out=str(out)))
    return out


def files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def first_leaf(state):
    node, path = state, []
    while isinstance(node, dict):
        key = sorted(node)[0]
        node, path = node[key], [*path, key]
    return path


def set_at(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    if value is None:
        del tree[path[-1]]
    else:
        tree[path[-1]] = value


def reshaped(c):
    path = first_leaf(c["state"])
    leaf = c["state"]
    for key in path:
        leaf = leaf[key]
    set_at(c["state"], path, np.zeros((leaf.shape[0] + 1, *leaf.shape[1:]), leaf.dtype))


def retyped(c):
    path = first_leaf(c["state"])
    leaf = c["state"]
    for key in path:
        leaf = leaf[key]
    set_at(c["state"], path, leaf.astype(np.float64))


def another_model(c):
    params = init_params(get_model("cnn"), init_key(0), (8, 8, 1))
    c["state"]["0"] = serialization.to_state_dict(params)


def poisoned(part, value):
    """A damage: one number of the state's `part` ("0" parameters, "1" optimiser state) set to `value`."""
    def damage(c):
        path = first_leaf(c["state"][part])
        leaf = c["state"][part]
        for key in path:
            leaf = leaf[key]
        leaf = leaf.copy()
        leaf.flat[0] = value
        set_at(c["state"][part], path, leaf)
    return damage


DAMAGES = {
    "wrong shape": reshaped,
    "wrong dtype": retyped,
    "missing entry": lambda c: set_at(c["state"], first_leaf(c["state"]), None),
    "extra entry": lambda c: c["state"]["0"].update(surplus=np.zeros(3, np.float32)),
    "another model's state": another_model,
    "state not a mapping": lambda c: c.update(state=[1, 2]),
    "no settings": lambda c: c.pop("settings"),
    "string position": lambda c: c["position"].update(step="86"),
    "position past the end": lambda c: c["position"].update(step=10**6),
    "inconsistent position": lambda c: c["position"].update(epoch_step=5),
    "sums not numbers": lambda c: c["epoch_sums"].update(seen="many"),
    # A run never saves past a divergence, so non-finite numbers are damage too.
    "NaN in the parameters": poisoned("0", np.nan),
    "inf in the optimiser state": poisoned("1", np.inf),
    "NaN in the sums": lambda c: c["epoch_sums"].update(loss_sum=float("nan")),
    "another format": lambda c: c.update(format=2),
    "extra sums not a mapping": lambda c: c["epoch_sums"].update(extra=[1.0]),
    "last finite loss not a number": lambda c: c["epoch_sums"].update(last_finite="nan"),
}


def damage_newest(out, damage):
    newest = sorted((out / "checkpoints").glob("ckpt-*.msgpack"))[-1]
    if damage == "torn":
        newest.write_bytes(newest.read_bytes()[:-50])
        return newest
    c = serialization.msgpack_restore(newest.read_bytes())
    DAMAGES[damage](c)
    newest.write_bytes(serialization.msgpack_serialize(c))
    return newest


@pytest.mark.parametrize("damage", ["torn", *DAMAGES])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    newest = damage_newest(out, damage)
    capsys.readouterr()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"skipped checkpoint {newest.name}:" in err and "taking the one before" in err, err
    assert "Traceback" not in err
    # resumed from step 43: the same run to the bit
    assert (out / "params.msgpack").read_bytes() == (finished / "params.msgpack").read_bytes()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("damage", ["position past the end", "another model's state"])
def test_no_usable_checkpoint_is_one_line_and_nothing_altered(finished, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for path in sorted((out / "checkpoints").glob("ckpt-*.msgpack")):
        c = serialization.msgpack_restore(path.read_bytes())
        DAMAGES[damage](c)
        path.write_bytes(serialization.msgpack_serialize(c))
    before = files(out)
    capsys.readouterr()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxbatch train: error: no usable checkpoint in"), err
    assert files(out) == before


def test_rotation_keeps_the_newest_good_checkpoints_and_leaves_damaged_ones(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpts = out / "checkpoints"
    (ckpts / "ckpt-000000086.msgpack").unlink()  # resume from the end of epoch 1
    newer = ckpts / "ckpt-999999999.msgpack"  # reads whole, named past every other, holds a NaN
    c = serialization.msgpack_restore((ckpts / "ckpt-000000043.msgpack").read_bytes())
    DAMAGES["NaN in the parameters"](c)
    newer.write_bytes(serialization.msgpack_serialize(c))
    older = ckpts / "ckpt-000000001.msgpack"
    older.write_bytes(b"torn")
    damaged = {p.name: p.read_bytes() for p in (newer, older)}
    assert main(["train", *FLAGS, "--out", str(out), "--resume", "--keep", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint ckpt-999999999.msgpack" in err
    assert "metrics.jsonl" not in err  # every epoch the checkpoint has done is logged: nothing to say of it
    # the one good checkpoint kept is the run's newest; the damaged files are left as they were
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000001.msgpack", "ckpt-000000086.msgpack",
                                                       "ckpt-999999999.msgpack"]
    assert {name: (ckpts / name).read_bytes() for name in damaged} == damaged
    assert (out / "params.msgpack").read_bytes() == (finished / "params.msgpack").read_bytes()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_a_checkpoint_is_not_read(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    os.remove(sorted((out / "checkpoints").glob("ckpt-*.msgpack"))[-1])
    os.mkfifo(out / "checkpoints" / "ckpt-999999999.msgpack")  # reading it would block forever
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    assert (out / "params.msgpack").read_bytes() == (finished / "params.msgpack").read_bytes()


def test_torn_and_garbage_metrics_lines_are_dropped_on_resume(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    os.remove(sorted((out / "checkpoints").glob("ckpt-*.msgpack"))[-1])  # resume from the end of epoch 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 0.5, "tes\n[1, 2]\n\x00\x01garbage\n{"epoch": "2"}\n')
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    original = (finished / "metrics.jsonl").read_text().splitlines()
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    assert len(resumed) == 2 and resumed[0] == original[0]


@pytest.mark.parametrize("loss", ["missing", "truncated"])
def test_a_resume_says_which_epochs_metrics_lost(finished, tmp_path, capsys, loss):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    os.remove(sorted((out / "checkpoints").glob("ckpt-*.msgpack"))[-1])  # resume from the end of epoch 1
    if loss == "missing":
        os.remove(out / "metrics.jsonl")
    else:
        (out / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes()[:40])
    capsys.readouterr()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "metrics.jsonl" in line]
    assert len(err) == 1 and "has no record of epoch 1 (" in err[0], err
    # the checkpoint still resumes exactly: epoch 2's line is the uninterrupted run's
    assert (out / "params.msgpack").read_bytes() == (finished / "params.msgpack").read_bytes()
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]

def test_an_unreadable_checkpoint_says_why(finished, monkeypatch):
    newest = checkpoint.paths(finished)[-1]
    read_bytes = Path.read_bytes

    def denied(path):
        if path == newest:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ValueError, match=r"^cannot read it \(Permission denied\)$"):
        checkpoint.read(newest)
    ckpt = checkpoint.latest(finished, TrainConfig(**RUN, out=str(finished), resume=True))
    assert ckpt["skipped"] == [(newest.name, "cannot read it (Permission denied)")]
