"""Settings declared once: the flags and the checks come from the declaration."""

import dataclasses
import subprocess
import sys

import pytest

from jaxbatch.cli import build_parser
from jaxbatch.config import TrainConfig, validate
from jaxbatch.errors import JaxbatchError
from jaxbatch.settings import declared


def test_every_training_setting_is_declared_with_help():
    fields = dataclasses.fields(TrainConfig)
    assert [f.name for f in declared(TrainConfig)] == [f.name for f in fields]
    assert all(f.metadata["help"] for f in fields)


def test_every_flag_setting_has_a_flag_and_library_only_ones_have_none():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # argparse keeps subparsers here
    flags = {option for action in train._actions for option in action.option_strings}
    for field in declared(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert (flag in flags) == field.metadata["flag"], flag


@pytest.mark.parametrize("change,flag_words,library_words", [
    (dict(batch_size=0), ["--batch-size", "0"], "batch_size must be 1 or more, got 0"),
    (dict(momentum=-1.0), ["--momentum", "-1"], "momentum must be 0 or more, got -1"),
    (dict(input_scale=0.0), ["--input-scale", "0"], "input_scale must be greater than 0, got 0"),
    (dict(seed=2**32), ["--seed", str(2**32)], "seed must be 4294967295 or less, got 4294967296"),
    (dict(seed=-1), ["--seed", "-1"], "seed must be 0 or more, got -1"),
    (dict(noise_scale_every=0), ["--noise-scale-every", "0"], "noise_scale_every must be 1 or more"),
    (dict(optimizer="lion"), ["--optimizer", "lion"], "unknown optimizer 'lion'; choose one of: sgd, adam, adamw"),
    (dict(dp_clip=float("inf")), ["--dp-clip", "inf"], "dp_clip expected a finite number, got inf"),
])
def test_library_and_flags_refuse_the_same_values(change, flag_words, library_words):
    with pytest.raises(JaxbatchError, match=library_words.split(",")[0]):
        validate(TrainConfig(**change))
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["train", *flag_words])
    assert exit.value.code == 2


def test_flag_errors_are_one_line_naming_the_flag():
    proc = subprocess.run([sys.executable, "-m", "jaxbatch", "train", "--batch-size", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("jaxbatch train: error: argument --batch-size: must be 1 or more, got 0 "
                                   "(see jaxbatch train --help)")


def test_help_quotes_the_declared_defaults():
    proc = subprocess.run([sys.executable, "-m", "jaxbatch", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    text = " ".join(proc.stdout.split())
    assert "examples per step (over all devices) (default 32)" in text
    assert "learning rate (the peak, with a schedule) (default 0.05)" in text
    assert "initialisation and shuffling seed, 0 .. 4294967295 (default 0)" in text


def test_max_loss_may_be_infinite_but_not_nan():
    validate(TrainConfig(max_loss=float("inf")))
    with pytest.raises(JaxbatchError, match="max_loss expected a finite number, got nan"):
        validate(TrainConfig(max_loss=float("nan")))
