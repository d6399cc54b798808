import subprocess
import sys

import pytest

from jaxbatch.cli import main


def jaxbatch(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxbatch", *args], capture_output=True, text=True, cwd=cwd)


def test_train_end_to_end_one_epoch(tmp_path):
    out = tmp_path / "run"
    proc = jaxbatch("train", "--epochs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch   1" in proc.stdout
    assert f"after 1 epoch; metrics and params in {out}/" in proc.stdout.splitlines()[-1]
    # stderr is a pipe here, not a terminal: no progress bar redrawn into it
    assert "\r" not in proc.stderr and "step/s" not in proc.stderr and "epoch 1:" not in proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "params.msgpack").stat().st_size > 0


def test_recipe_flags_are_overridden_by_explicit_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from jaxbatch.cli import build_parser
    from jaxbatch.cli.train import build_config

    args = build_parser().parse_args(["train", "--recipe", "mlp-fashion", "--epochs", "2", "--lr", "0.1"])
    config = build_config(args)
    assert (config.model, config.dataset, config.batch_size) == ("mlp", "fashion_mnist", 256)
    assert (config.epochs, config.lr) == (2, 0.1)
    assert config.out == "runs/mlp-fashion/1"  # a new numbered run folder
    # the overrides must not leak into the recipe itself
    from jaxbatch.recipes import get_recipe

    assert (get_recipe("mlp-fashion")["epochs"], get_recipe("mlp-fashion")["lr"]) == (5, 0.5)


@pytest.mark.parametrize("argv,match", [
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--recipe", "nope"], "invalid choice: 'nope'"),
    (["--batch-size", "0"], "must be 1 or more"),
    (["--lr", "-0.1"], "must be greater than 0"),
    (["--model", "lenet5", "--dataset", "digits"], "lenet5 takes 32x32 images"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    # the library names the setting (batch_size); the command line shows its flag
    (["--batch-size", "5000"], "pass a smaller --batch-size"),
    (["--schedule", "warmup"], "needs --warmup-steps of 1 or more"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs optimizer sgd"),
    (["--input-scale", "255", "--model", "fc_nobias", "--batch-size", "250"], "training diverged"),
    (["--resume"], "no checkpoint in"),
    (["--keep", "0"], "must be 1 or more"),
    (["--checkpoint-every", "0"], "must be 1 or more"),
    # nothing listens on port 1: bounded by --join-timeout, then one line
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1", "--join-timeout", "1"],
     "no coordinator answered at 127.0.0.1:1 within 1 s"),
    (["--dp-clip", "0"], "--dp-clip is the largest norm a per-example gradient keeps"),
    (["--dp-clip", "1", "--dp-noise", "-1"], "--dp-noise must be greater than 0"),
    (["--dp-noise", "1"], "pass --dp-clip C too"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"], "--dp-delta must be between 0 and 1"),
    (["--dp-clip", "1", "--dp-noise", "0.5", "--dp-epsilon", "1"], "above the budget 1; raise --dp-noise"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    try:
        code = main(["train", "--quiet", "--out", str(out), *argv])
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert match in err
    assert not (out / "params.msgpack").exists()


def test_epoch_times_keep_three_figures():
    from jaxbatch.cli.train import format_seconds

    assert [format_seconds(t) for t in (123.4, 9.412, 0.00581, 0.0000123)] == ["123 s", "9.41 s", "5.81 ms",
                                                                                 "12.3 us"]


def test_the_progress_bar_is_drawn_on_a_terminal(tmp_path, monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["train", "--epochs", "1", "--max-steps", "16", "--out", str(tmp_path / "run")]) == 0
    assert "epoch 1:" in terminal.getvalue() and "step" in terminal.getvalue()
    assert "epoch   1" in capsys.readouterr().out  # the epoch line itself goes to stdout either way
