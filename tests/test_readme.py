"""The README runs as written: its python snippets run and say what they
claim, and its shell commands are each either run here (the quick, offline
ones, in README order, in a fresh folder) or listed with the reason they are
not (real data, long, a GPU, the network, another process...)."""

import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxbatch.precision import highest_precision, relative_difference

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def shell_commands() -> list[str]:
    """Every command in the README's bash blocks, comments dropped, continued lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        command = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                command += line[:-1].strip() + " "
                continue
            commands.append(command + line)
            command = ""
    return commands


# Run here, in README order, each once, offline, in a fresh folder: a few seconds each on 2 CPU cores.
RUN = [
    "jaxbatch info",
    "jaxbatch train",
    "jaxbatch train --loss batched",
    "jaxbatch train --plot",
    "jaxbatch plot runs/mlp-digits/1 runs/mlp-digits/2 --out compare.png",
    "jaxbatch train --config runs/mlp-digits/2/config.json --seed 1",
    "jaxbatch train --dp-clip 1.0",
    "jaxbatch data list",
]
PIP = "installs packages: the network, and it would change this environment"
REAL_DATA = "needs the real datasets (tests/test_recipes_real.py runs the recipes when JAXBATCH_DATA_DIR is set)"
NOT_RUN = {
    "pip install -e .": PIP,
    'pip install -e ".[test]"': PIP,
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": PIP,
    'pip install -e ".[torch]"': PIP,
    'pip install -e ".[notebook]"': PIP,
    'pip install -e ".[cuda12]"': PIP + "; and a GPU",
    'pip install -e ".[cuda13]"': PIP + "; and a GPU",
    'pip install -e ".[tpu]"': PIP + "; and a TPU",
    "python -m pytest -q -n auto --dist loadscope": "the test suite itself",
    'python -m pytest -q -n auto --dist loadscope -m "not slow"': "the test suite itself",
    "JAXBATCH_DATA_DIR=../shared/data python -m pytest -q -n auto --dist loadscope": "the test suite itself",
    "jupyter notebook notebooks/per_example_vs_batched.ipynb": "starts a server and waits; tests/test_notebook.py "
    "runs the notebook",
    "tensorboard --logdir runs": "starts a server and waits; tests/test_run_tools.py reads the event files",
    "jaxbatch train --model cnn --optimizer adam --lr 1e-3": "long: 10 epochs of the cnn (tests/test_train.py "
    "trains it briefly)",
    "jaxbatch train --recipe mlp-fashion --data-dir $JAXBATCH_DATA_DIR": REAL_DATA,
    "jaxbatch train --recipe dp-mnist --data-dir $JAXBATCH_DATA_DIR": REAL_DATA + "; 40 DP-SGD epochs, about 20 "
                                                                      "minutes on 2 CPU cores",
    "jaxbatch train --recipe mlp-fashion --data-dir ../shared/data --seed 0": REAL_DATA,
    "jaxbatch train --recipe mlp-fashion --checkpoint-every 200": REAL_DATA + "; tests/test_resume.py resumes",
    "jaxbatch train --recipe mlp-fashion --checkpoint-every 200 --resume": REAL_DATA,
    "JAX_NUM_CPU_DEVICES=4 jaxbatch train --dtype float64 --out runs/four": "4 CPU devices in a child process: "
    "tests/test_parallel.py",
    "JAX_NUM_CPU_DEVICES=2 jaxbatch train --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 &":
    "two processes: tests/test_parallel.py",
    "JAX_NUM_CPU_DEVICES=2 jaxbatch train --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1":
    "two processes: tests/test_parallel.py",
    "jaxbatch train --distributed": "needs a cluster JAX detects (a TPU pod, SLURM)",
    "jaxbatch train --dp-clip 1.0 --dp-epsilon 3": "long: calibrating the noise takes the accountant many runs",
    "jaxbatch train --dp-clip 1.0 --dp-noise 1.1 --dp-epsilon 3": "tests/test_privacy.py covers it",
    "jaxbatch train --dp-clip 1.0 --dp-noise 1.1 --dp-sampling shuffle": "tests/test_privacy.py covers it",
    "python scripts/noise_scale.py --data-dir ../shared/data --out results/noise_scale": REAL_DATA + "; long",
    "python scripts/dp_cost.py --data-dir $JAXBATCH_DATA_DIR": REAL_DATA + "; about 25 minutes (tests/test_dp_cost.py "
    "runs a small one)",
    "jaxbatch data download mnist": "the network",
    "jaxbatch data download mnist --mirror file:///srv/data --deadline 600": "a mirror folder that is not here "
    "(tests/test_data_download.py serves one)",
    "jaxbatch data prepare mnist": "TensorFlow and the network",
    "jaxbatch data check cifar10 --data-dir ../shared/data": REAL_DATA,
    "jaxbatch bench --quick": "long: a few minutes (tests/test_bench.py runs a smaller one)",
    "JAX_NUM_CPU_DEVICES=4 jaxbatch bench --devices 1,2,4 --quick": "long, and 4 CPU devices",
    "jaxbatch bench --torch --torch-threads 1,2 --data-dir ../shared/data --out benchmarks/results":
    "long, torch and real data",
    "jaxbatch bench --models mlp,fc_nobias,cnn,lenet5 --batch-sizes 256 --methods batched,per_example,clipped "
    "--torch --torch-threads 2 --out benchmarks/results/clipped": "long, and torch",
    "scripts/gpu_wheels.sh": "the network",
    "PYTHONPATH=. python3 scripts/gpu_report.py --out runs/gpu": "a GPU",
    "JAX_PLATFORMS=cpu python scripts/gpu_report.py --tiny --out /tmp/r": "tests/test_gpu_report.py runs it",
}


def test_readme_idea_snippet_runs_and_its_gradients_agree(capsys):
    namespace = {}
    exec(python_snippets()[0], namespace)
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


def test_readme_python_api_snippets_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet that wrote files would write them here
    snippets = python_snippets()[1:]
    assert len(snippets) >= 2, "the README's Use it from Python section"
    for snippet in snippets:
        exec(snippet, {})
    printed = capsys.readouterr().out
    assert "epoch 2: test accuracy" in printed and "parameters" in printed
    difference = float(re.search(r"vmap vs batched ([0-9.e+-]+)", printed).group(1))
    assert difference <= 1e-6
    assert not list(tmp_path.iterdir())  # without out, training writes no files


def test_every_readme_command_is_run_or_says_why_not():
    commands = shell_commands()
    unlisted = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unlisted, f"README commands neither run nor explained in tests/test_readme.py: {unlisted}"
    gone = [c for c in [*RUN, *NOT_RUN] if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"


def test_the_readmes_quick_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from jaxbatch.cli import main

    monkeypatch.chdir(tmp_path)  # a fresh clone's folder: runs/ starts empty
    for command in RUN:
        words = shlex.split(command)
        assert words[0] == "jaxbatch"
        code = main(words[1:])
        out = capsys.readouterr()
        assert code == 0, f"{command}: {out.err}"
    assert (tmp_path / "compare.png").exists() and (tmp_path / "runs/mlp-digits/3/curves.png").exists()
    assert sorted(p.name for p in (tmp_path / "runs/mlp-digits").iterdir()) == ["1", "2", "3", "4", "5"]


def test_readme_install_extras_exist():
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The front page's DP-SGD command runs on a plain install: the accountant is a base dependency.
    assert any(req.startswith("dp-accounting") for req in project["dependencies"])
    text = README.read_text()
    for name in ("test", "tfds", "torch", "cuda12", "cuda13", "tpu", "notebook", "dp"):
        assert name in extras and f".[{name}]" in text, name
    assert any(req.startswith("jax[cuda12]") for req in extras["cuda12"])
    assert any(req.startswith("jax[cuda13]") for req in extras["cuda13"])
    assert any(req.startswith("jax[tpu]") for req in extras["tpu"])
    assert any(req.startswith("notebook") for req in extras["notebook"])
