"""`jaxbatch experiment`: bad input ends in one line and nothing written; the
scripts under scripts/ are the same command."""

import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbatch.cli import main
from jaxbatch.experiments import EXPERIMENTS, get_experiment, make_config
from jaxbatch.experiments.report import write_results
from jaxbatch.errors import JaxbatchError
from jaxbatch.settings import check, declared

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv) -> str:
    """Run the command; it must exit 2 with one line on stderr (argparse raises
    SystemExit, the library's errors come back as the return code)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["experiment", "nope", "--quick"], "invalid choice: 'nope'"),
    (["experiment", "equality", "--quick", "--models", "mlp,resnet"], "unknown model 'resnet'"),
    (["experiment", "variance", "--quick", "--model", "resnet"], "unknown model 'resnet'"),
    (["experiment", "lr-scaling", "--quick", "--batch-sizes", "32,5000"],
     "batch size 5000 is larger than the 1347 training examples of digits"),
    (["experiment", "equality", "--quick", "--batch-size", "2000"],
     "batch size 2000 is larger than the 1347 training examples"),
    (["experiment", "variance", "--quick", "--batch-sizes", "1,2048"], "batch size 2048 is larger"),
    (["experiment", "input-scale", "--quick", "--batch-size", "1348"], "batch size 1348 is larger"),
    (["experiment", "activations", "--quick", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["experiment", "variance", "--quick", "--batch-sizes", "1,x"], "expected comma-separated int values"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    err = one_line_error(capsys, [*argv, "--out", str(out)])
    assert message in err
    assert not out.exists()


def test_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    err = one_line_error(capsys, ["experiment", "activations", "--quick", "--out", str(target)])
    assert "is a file" in err and err.startswith("jaxbatch experiment activations: error:")  # names what failed
    assert target.read_text() == "not a folder"
    err = one_line_error(capsys, ["experiment", "activations", "--quick", "--out", str(target / "below")])
    assert "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failing_plot_leaves_nothing_behind(tmp_path):
    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_results(tmp_path, {"x": 1.0}, {"broken": Broken()})
    assert list(tmp_path.iterdir()) == []
    # All or nothing: an earlier run's result.json is not replaced by half of a new run.
    write_results(tmp_path, {"x": 1.0}, {})
    with pytest.raises(RuntimeError):
        write_results(tmp_path, {"x": 2.0}, {"broken": Broken()})
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert json.loads((tmp_path / "result.json").read_text()) == {"x": 1.0}


def test_result_json_has_no_nan(tmp_path):
    write_results(tmp_path, {"loss": float("nan"), "values": [1.0, float("inf")]}, {})
    assert json.loads((tmp_path / "result.json").read_text()) == {"loss": None, "values": [1.0, None]}


def test_quick_run_prints_a_table_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "act"
    assert main(["experiment", "activations", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max|two - one|" in printed and "float64" in printed
    assert sorted(p.name for p in out.iterdir()) == ["activations.png", "result.json"]
    assert json.loads((out / "result.json").read_text())["config"]["dataset"] == "digits"


def test_flags_override_the_quick_preset():
    config = make_config("lr-scaling", quick=True, batch_sizes=(16, 64), epochs=None)
    assert config.dataset == "digits" and config.batch_sizes == (16, 64) and config.epochs == 4
    assert make_config("lr-scaling").dataset == "fashion_mnist"
    with pytest.raises(JaxbatchError, match="no setting 'batch'"):
        make_config("lr-scaling", batch=3)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_has_a_script(name, monkeypatch, capsys):
    script = ROOT / "scripts" / f"experiment_{name.replace('-', '_')}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert f"jaxbatch experiment {name}" in capsys.readouterr().out


def test_script_runs_as_a_program(tmp_path):
    out = tmp_path / "act"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiment_activations.py"),
                           "--quick", "--quiet", "--out", str(out), "--grid-points", "11"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["config"]["grid_points"] == 11


# ---- flags from the settings' declarations (jaxbatch/settings.py) -----------


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_setting_is_declared_with_help_and_is_valid_by_default(name):
    module = get_experiment(name)
    assert [f.name for f in declared(module.Config)] == [f.name for f in dataclasses.fields(module.Config)]
    check(module.Config())
    check(make_config(name, quick=True))


@pytest.mark.parametrize("argv, message", [
    # a tuple flag: each item against the declaration, at least one item
    (["variance", "--batch-sizes", "1,0"], "argument --batch-sizes: must be 1 or more, got 0"),
    (["lr-scaling", "--batch-sizes", ","], "argument --batch-sizes: must list at least one batch size"),
    (["variance", "--datasets", "digits,imagenet"], "argument --datasets: unknown dataset 'imagenet'; choose one of: "),
    (["equality", "--comparisons", "float64,float16"],
     "argument --comparisons: unknown comparison 'float16'; choose one of: float32, float64, float32_default"),
    # sizes bounded where a huge value would exhaust memory
    (["activations", "--grid-points", "100002"], "argument --grid-points: must be 100001 or less, got 100002"),
    (["activations", "--hidden", "1000000"], "argument --hidden: must be 8192 or less, got 1000000"),
    (["variance", "--chunk", "5000"], "argument --chunk: must be 1000 or less, got 5000"),
    (["clipping", "--clip-points", "1"], "argument --clip-points: must be 2 or more, got 1"),
    # ranges and numbers
    (["clipping", "--low-quantile", "1"], "argument --low-quantile: must be less than 1, got 1"),
    (["lr-scaling", "--warmup-fraction", "0"], "argument --warmup-fraction: must be greater than 0, got 0"),
    (["input-scale", "--lr", "nan"], "argument --lr: expected a finite number, got nan"),
    (["equality", "--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    # rules that tie settings together name the flag too
    (["variance", "--batch-sizes", "4,4"], "give --batch-sizes at least two different batch sizes to fit a slope"),
    (["lr-scaling", "--seed", "4294967295", "--seeds", "2"], "pass a smaller --seed"),
])
def test_a_bad_flag_is_one_line_naming_it(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    err = one_line_error(capsys, ["experiment", argv[0], "--quick", *argv[1:], "--out", str(out)])
    assert message in err
    assert not out.exists()


def test_the_library_refuses_with_the_same_words():
    with pytest.raises(JaxbatchError, match="^batch_sizes must be 1 or more, got 0$"):
        check(make_config("variance", batch_sizes=(1, 0)))
    with pytest.raises(JaxbatchError, match="^grid_points must be 100001 or less, got 100002$"):
        check(make_config("activations", grid_points=100002))
    with pytest.raises(JaxbatchError, match="^datasets must be a tuple, got 'mnist'$"):
        check(make_config("variance", datasets="mnist"))


def help_text(capsys, name) -> str:
    # argparse wraps lines at the terminal's width, and breaks words at hyphens
    # ("comma-" / "separated") at some widths: a width that wraps nothing.
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_:
        patch.setenv("COLUMNS", "1000")
        main(["experiment", name, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_each_default_and_the_quick_value_where_it_differs(capsys):
    text = help_text(capsys, "variance")
    assert "--samples SAMPLES examples drawn per batch size" in text
    assert "(default 16384; --quick: 4096)" in text
    assert "(comma-separated; default 1,2,4,8,16,32,64,128,256,512,1024; --quick: 1,4,16,64,256,1024)" in text
    assert "at most 1000: a pass holds their per-example gradients (default 250)" in text
    text = help_text(capsys, "lr-scaling")
    assert "the rules scale it (default 0.1)" in text  # QUICK's base_lr is the default: not repeated
    assert "--optimizer {sgd,adam,adamw}" in text
    assert "points in [-6, 6] the derivatives are computed at, 3 to 100001 (default 241)" in help_text(
        capsys, "activations")
