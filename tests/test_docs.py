"""The documentation site (docs/, mkdocs.yml) builds strictly and runs as
written: its python snippets run and say what they claim, every shell command
on its pages is either run here (the quick, offline ones, in one fresh folder)
or listed with the reason it is not, and no page or committed record names a
folder of the machine it was made on. tests/test_readme.py does the same for
the README."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from markdown_blocks import SHELL, code_blocks, python_snippets, run_commands, shell_commands

from jaxbatch.precision import highest_precision, relative_difference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

# Run here, in this order, each once, offline, in one fresh folder: a few seconds each on 2 CPU cores.
RUN = [
    "jaxbatch info",
    "jaxbatch train",
    "jaxbatch train --loss batched",
    "jaxbatch train --plot",
    "jaxbatch plot runs/mlp-digits/1 runs/mlp-digits/2 --out compare.png",
    "jaxbatch train --config runs/mlp-digits/2/config.json --seed 1",
    "jaxbatch train --dp-clip 1.0",
    "jaxbatch data list",
    "jaxbatch train --target-accuracy 0.95 --eval-every 5",
]
PIP = "installs packages: the network, and it would change this environment"
REAL_DATA = "needs the real datasets (tests/test_recipes_real.py and tests/test_experiments_realdata.py run " \
            "smaller ones when JAXBATCH_DATA_DIR is set)"
SUITE = "the test suite itself"
BENCH = "long: minutes to an hour (tests/test_bench.py runs a tiny one)"
NOT_RUN = {
    # getting-started.md
    "pip install -e .": PIP,
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": PIP,
    'pip install -e ".[torch]"': PIP,
    'pip install -e ".[notebook]"': PIP,
    'pip install -e ".[cuda12]"': PIP + "; and a GPU",
    'pip install -e ".[cuda13]"': PIP + "; and a GPU",
    'pip install -e ".[tpu]"': PIP + "; and a TPU",
    "jupyter notebook notebooks/per_example_vs_batched.ipynb": "starts a server and waits; tests/test_notebook.py "
    "runs the notebook",
    "tensorboard --logdir runs": "starts a server and waits; tests/test_run_tools.py reads the event files",
    "jaxbatch train --model cnn --optimizer adam --lr 1e-3": "long: 10 epochs of the cnn (tests/test_train.py "
    "trains it briefly)",
    "jaxbatch train --recipe mlp-fashion --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    # the texts' pages
    "jaxbatch experiment equality --quick": "minutes on 2 CPU cores: every model's gradient four ways, in "
    "float32 and float64 (tests/test_experiments.py runs it smaller)",
    "JAX_NUM_CPU_DEVICES=4 jaxbatch experiment equality --quick": "4 CPU devices in a child process: "
    "tests/test_equality_devices.py",
    "jaxbatch train --recipe cnn-mnist --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    "jaxbatch train --recipe lenet-mnist --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    "jaxbatch train --recipe fc-cifar10 --data-dir $JAXBATCH_DATA_DIR": REAL_DATA + "; 20 epochs",
    "jaxbatch train --recipe mlp-scratch-fashion --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    **{f"jaxbatch experiment {name} --data-dir $JAXBATCH_DATA_DIR --out results/{name}": REAL_DATA + "; long"
       for name in ("equality", "variance", "input-scale", "lr-scaling", "activations")},
    # training.md
    "jaxbatch train --recipe mlp-fashion --data-dir $JAXBATCH_DATA_DIR --seed 0": REAL_DATA,
    "JAX_NUM_CPU_DEVICES=4 jaxbatch train --dtype float64 --out runs/four": "4 CPU devices in a child process: "
    "tests/test_parallel.py",
    "JAX_NUM_CPU_DEVICES=2 jaxbatch train --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 &":
    "two processes: tests/test_parallel.py",
    "JAX_NUM_CPU_DEVICES=2 jaxbatch train --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1":
    "two processes: tests/test_parallel.py",
    "jaxbatch train --distributed": "needs a cluster JAX detects (a TPU pod, SLURM)",
    "jaxbatch train --recipe mlp-fashion --checkpoint-every 200": REAL_DATA + "; tests/test_resume.py resumes",
    "jaxbatch train --recipe mlp-fashion --checkpoint-every 200 --resume": REAL_DATA,
    # bench.md: DP-SGD against Opacus
    'pip install -e ".[opacus]"': PIP,
    "python scripts/train_speed.py --data-dir $JAXBATCH_DATA_DIR --host-devices 1 2": REAL_DATA + "; about 15 "
    "minutes; tests/test_train_speed.py runs the same path on digits",
    "python scripts/dp_cost.py --data-dir $JAXBATCH_DATA_DIR --opacus --torch-threads 1": REAL_DATA + "; and "
    "Opacus (tests/test_dp_cost.py times a small run beside the twins when it is installed)",
    # critical-batch.md
    "jaxbatch experiment critical-batch --quick": "about a minute on 2 CPU cores: 36 trainings "
    "(tests/test_critical_batch.py runs a smaller sweep and its rerun)",
    "jaxbatch experiment critical-batch --out runs/cb-mlp-mnist --lr-grid 0.0025,5.12 --max-epochs 50":
    REAL_DATA + "; an hour",
    # privacy.md
    "jaxbatch train --dp-clip 1.0 --dp-epsilon 3": "about a minute: calibrating the noise and compiling the "
    "private step (tests/test_dp_sampling.py calibrates)",
    "jaxbatch train --dp-clip 1.0 --dp-noise 1.1 --dp-epsilon 3": "tests/test_privacy.py covers it",
    "jaxbatch train --dp-clip 1.0 --dp-noise 1.1 --dp-sampling shuffle": "tests/test_privacy.py covers it",
    "python scripts/dp_cost.py --data-dir $JAXBATCH_DATA_DIR": REAL_DATA + "; about 25 minutes "
    "(tests/test_dp_cost.py runs a small one)",
    "jaxbatch train --recipe dp-mnist --data-dir $JAXBATCH_DATA_DIR": REAL_DATA + "; 40 DP-SGD epochs",
    "python scripts/noise_scale.py --data-dir $JAXBATCH_DATA_DIR --out results/noise_scale": REAL_DATA + "; long",
    # data.md
    "jaxbatch data download mnist": "the network",
    "jaxbatch data download mnist --data-dir ~/data": "the network",
    "jaxbatch data download mnist --mirror https://example.org/data --deadline 600": "a mirror that is not here "
    "(tests/test_data_download.py serves one)",
    "jaxbatch data prepare mnist": "TensorFlow and the network",
    "jaxbatch data prepare mnist --data-dir ~/data": "TensorFlow and the network",
    'pip install -e ".[tfds]"': PIP,
    "jaxbatch data check cifar10 --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    # experiments.md
    "jaxbatch experiment clipping --data-dir $JAXBATCH_DATA_DIR --out results/clipping": REAL_DATA + "; long",
    "JAX_NUM_CPU_DEVICES=4 jaxbatch experiment equality --quick --batch-size 48": "4 CPU devices in a child "
    "process: tests/test_equality_devices.py",
    "jaxbatch experiment clipping --quick": "tests/test_experiment_clipping.py runs it",
    "python scripts/experiment_clipping.py --quick": "tests/test_experiment_clipping.py runs it",
    "jaxbatch experiment clipping --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    "jaxbatch experiment clipping --data-dir $JAXBATCH_DATA_DIR --train-clip 0.5 --train-noise 1.5 --epochs 5":
    REAL_DATA,
    # bench.md
    "jaxbatch bench": BENCH,
    "jaxbatch bench --quick": BENCH,
    "jaxbatch bench --models mlp,cnn --batch-sizes 8,256 --methods batched,per_example": BENCH,
    "jaxbatch bench --torch --torch-threads 1,2 --data-dir $JAXBATCH_DATA_DIR --out benchmarks/results":
    BENCH + "; torch and real data",
    "jaxbatch bench --torch --torch-threads 1,2 --data-dir $JAXBATCH_DATA_DIR": BENCH + "; torch and real data",
    "jaxbatch bench --devices 1,2,4,8 --batch-sizes 256 --methods batched,per_example": BENCH + "; 8 devices",
    "jaxbatch bench --devices 1,2,4,8 --models mlp,cnn --batch-sizes 64,256 --methods batched,per_example "
    "--epochs none": BENCH + "; 8 devices",
    "JAX_NUM_CPU_DEVICES=4 jaxbatch bench --devices 1,2,4 --models mlp --batch-sizes 64 --quick":
    "4 CPU devices in a child process: tests/test_bench_devices.py",
    "python scripts/bench.py --torch --data-dir $JAXBATCH_DATA_DIR --out benchmarks/results":
    BENCH + "; torch and real data",
    "python scripts/bench.py --from-json benchmarks/results/cpu-amd-epyc-2core.json": "tests/test_bench.py "
    "judges a record's targets",
    "jaxbatch bench --models mlp,fc_nobias,cnn,lenet5 --batch-sizes 256 --methods batched,per_example,clipped "
    "--torch --torch-threads 2 --out benchmarks/results/clipped": BENCH + "; torch",
    "scripts/gpu_wheels.sh": "the network",
    "PYTHONPATH=. python3 scripts/gpu_report.py --out runs/gpu": "a GPU",
    "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_report.py": "a GPU",
    "JAX_PLATFORMS=cpu python scripts/gpu_report.py --tiny --out runs/gpu-dry": "tests/test_gpu_report.py runs it",
    # tests.md
    'pip install -e ".[test]"': PIP,
    'pip install -e ".[docs]"': PIP,
    'python -m pytest -q -n auto --dist loadscope -m "not slow"': SUITE,
    "python -m pytest -q -n auto --dist loadscope": SUITE,
    "JAXBATCH_DATA_DIR=~/data python -m pytest -q -n auto --dist loadscope": SUITE,
    "mkdocs build --strict": "test_site_builds_strictly below runs it",
    "mkdocs serve": "starts a server and waits",
}


def test_every_docs_command_is_run_or_says_why_not():
    commands = {c: page for page in PAGES for c in shell_commands(page)}
    unlisted = [f"{page.relative_to(ROOT)}: {c}" for c, page in commands.items() if c not in RUN and c not in NOT_RUN]
    assert not unlisted, f"commands neither run nor explained in tests/test_docs.py: {unlisted}"
    gone = [c for c in [*RUN, *NOT_RUN] if c not in commands]
    assert not gone, f"listed here but on no page: {gone}"


def test_every_code_block_names_its_language():
    """A command in an unnamed block would escape the test above; output goes in `text` blocks."""
    unnamed = [page.relative_to(ROOT) for page in PAGES for lang, _ in code_blocks(page) if not lang]
    assert not unnamed, f"code blocks without a language (bash, python, text, ...): {unnamed}"
    assert "bash" in SHELL


def test_the_docs_quick_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone's folder: runs/ starts empty
    run_commands(RUN, capsys)
    assert (tmp_path / "compare.png").exists() and (tmp_path / "runs/mlp-digits/3/curves.png").exists()
    assert sorted(p.name for p in (tmp_path / "runs/mlp-digits").iterdir()) == ["1", "2", "3", "4", "5", "6"]
    # critical-batch.md's run to a target: its evaluations, and the target on its last line
    target = json.loads((tmp_path / "runs/mlp-digits/6/metrics.jsonl").read_text().splitlines()[-1])["target"]
    assert target["reached"] and (tmp_path / "runs/mlp-digits/6/evals.jsonl").exists()


def test_home_page_idea_snippet_runs_and_its_gradients_agree(capsys):
    namespace = {}
    exec(python_snippets(DOCS / "index.md")[0], namespace)
    printed = capsys.readouterr().out
    assert printed.startswith("vmap vs batched: ")
    assert all(float(x) <= 1e-6 for x in re.findall(r": ([0-9.e+-]+)", printed))  # its two differences
    model = namespace["model"]
    params = model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    xs, ys = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1)), jnp.arange(16) % 10
    with highest_precision():  # float32 rounding is the claim, not a GPU's TF32 products
        g_vmap = jax.grad(namespace["vmap_loss"])(params, xs, ys)
        g_batched = jax.grad(namespace["batched_loss"])(params, xs, ys)
        g_mean = jax.tree.map(lambda g: g.mean(0), namespace["per_example_grads"](params, xs, ys))
    assert relative_difference(g_vmap, g_batched) <= 1e-6
    assert relative_difference(g_mean, g_batched) <= 1e-6


def test_getting_started_python_api_snippets_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet that wrote files would write them here
    snippets = python_snippets(DOCS / "getting-started.md")
    assert len(snippets) >= 2, "Getting started's Use it from Python section"
    for snippet in snippets:
        exec(snippet, {})
    printed = capsys.readouterr().out
    assert "epoch 2: test accuracy" in printed and "parameters" in printed
    difference = float(re.search(r"vmap vs batched ([0-9.e+-]+)", printed).group(1))
    assert difference <= 1e-6
    assert not list(tmp_path.iterdir())  # without out, training writes no files


def test_extras_the_pages_name_exist():
    import tomllib

    from test_readme import extras_named

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set().union(*(extras_named(page.read_text()) for page in PAGES))
    assert named <= extras, f"pages tell to install extras pyproject.toml lacks: {named - extras}"


# A folder of the machine a page or record was made on: a temporary or home
# folder, the shared data folder beside a clone, an absolute /work path.
MACHINE_PATH = re.compile(r"(?<![\w.~$])(/tmp/|/home/|/Users/|/root/|/work/|/mnt/|\.\./shared)")
RECORDS = ("results", "benchmarks/results")


def machine_paths(text: str) -> list[str]:
    return [line.strip()[:120] for line in text.splitlines() if MACHINE_PATH.search(line)]


def test_no_page_or_committed_record_names_a_machines_folder():
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", *PAGES]
    for folder in RECORDS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".json", ".jsonl", ".log", ".md", ".txt")]
    found = {str(p.relative_to(ROOT)): machine_paths(p.read_text(errors="replace")) for p in files}
    found = {name: lines for name, lines in found.items() if lines}
    assert not found, ("paths of the machine these were made on (use $JAXBATCH_DATA_DIR in commands; leave "
                       f"data_dir and out out of a committed record, or make them relative): {found}")


def test_machine_path_pattern():
    """The pattern above finds what it must and leaves the rest: it must not pass everything."""
    assert machine_paths('"data_dir": "/work/shared/data",') and machine_paths("--out /tmp/r")
    assert machine_paths("--data-dir ../shared/data") and machine_paths("in /root/.jaxbatch/data")
    assert not machine_paths("--data-dir $JAXBATCH_DATA_DIR --out results/equality")
    assert not machine_paths("~/.jaxbatch/data and runs/mlp-digits/1/ and https://example.org/data")


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing image, a page outside the nav or a
    docstring mkdocstrings cannot read fails. CI installs the docs extra (.ci/run); elsewhere
    the test skips without it."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        if os.environ.get("CI"):
            pytest.fail('CI must build the site: pip install -e ".[docs]"')
        pytest.skip('the docs extra is not installed: pip install -e ".[docs]"')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "api" / "index.html").exists()
    assert "train_and_evaluate" in (site / "api" / "index.html").read_text()  # the docstrings, rendered
    assert (site / "results/equality/equality.png").exists()  # the figures the pages show
    assert (site / "notebooks/per_example_vs_batched/index.html").exists()  # the notebook as a page
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # readable offline
