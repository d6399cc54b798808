"""The README runs as written: each shell command is either run here (the
quick, offline ones, in README order, in a fresh folder) or listed with the
reason it is not (real data, long, the network...), and what it shows a
command print is what the command prints, numbers aside. The site's pages
have the same test, tests/test_docs.py."""

import os
import re
from pathlib import Path

from cli_helpers import run_script
from markdown_blocks import code_blocks, run_commands, shell_commands

README = Path(__file__).resolve().parents[1] / "README.md"
# What the start line adds where jaxbatch chose the host device count (a user's shell).
MLP_DEVICE_NOTE = " (one host device: no convolution to spread over cores)"

# Run here, in README order, each once, offline, in a fresh folder: a few seconds each on 2 CPU cores.
RUN = [
    "jaxbatch train",
    "jaxbatch train --loss batched",
]
PIP = "installs packages: the network, and it would change this environment"
NOT_RUN = {
    "pip install -e .": PIP,
    'pip install -e ".[test,docs]"': PIP,
    'python -m pytest -q -n auto --dist loadscope -m "not slow"': "the test suite itself",
    "python -m pytest -q -n auto --dist loadscope": "the test suite itself",
    "jaxbatch train --dp-clip 1 --dp-epsilon 3": "about half a minute on 2 CPU cores (calibrating the noise, compiling "
    "the private step); tests/test_dp_sampling.py calibrates, tests/test_privacy.py trains privately",
}


def shown_output(page: Path) -> dict[str, str]:
    """command -> the output the page shows for it: a text block right after a one-command shell block."""
    shown, blocks = {}, code_blocks(page)
    for (lang, body), (next_lang, next_body) in zip(blocks, blocks[1:]):
        commands = [c for c in body.splitlines() if c.strip()]
        if lang == "bash" and len(commands) == 1 and next_lang == "text":
            shown[commands[0].strip()] = next_body
    return shown


def shape(line: str) -> str:
    """A printed line with its numbers and its closing time, "(9.35 s, including compilation)", masked:
    what does not change from run to run or machine to machine."""
    # in s, ms or us: a first epoch whose program came from the compilation cache takes under a second
    line = re.sub(r"\s*\([^()]*\b(s|ms|us)\b[^()]*\)$", "", line.strip())
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "N", line.strip())


def test_every_readme_command_is_run_or_says_why_not():
    commands = shell_commands(README)
    unlisted = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unlisted, f"README commands neither run nor explained in tests/test_readme.py: {unlisted}"
    gone = [c for c in [*RUN, *NOT_RUN] if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"


def test_the_readmes_quick_commands_run_and_print_what_it_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone's folder: runs/ starts empty
    printed = run_commands(RUN, capsys)
    shown = shown_output(README)
    assert set(RUN) <= set(shown), "each quick command is followed by what it prints"
    for command in RUN:
        lines = {shape(line) for line in printed[command].splitlines()}
        for line in shown[command].splitlines():
            if line.strip() and line.strip() != "...":
                # The README shows a user's shell, where jaxbatch chooses the host device count and
                # says so; here JAX has started already (and conftest sets JAX_NUM_CPU_DEVICES), so the
                # start line has no such note. The note itself: test_the_start_line_says_one_device_...
                line = line.replace(MLP_DEVICE_NOTE, "")
                assert shape(line) in lines, f"{command}: the README shows {line!r}, which it no longer prints"
    assert sorted(p.name for p in (tmp_path / "runs/mlp-digits").iterdir()) == ["1", "2"]


def test_the_start_line_says_one_device_for_the_mlp_as_the_readme_shows(tmp_path):
    assert MLP_DEVICE_NOTE in shown_output(README)["jaxbatch train"]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    output = run_script("-m", "jaxbatch", "train", "--quiet", "--epochs", "1", "--max-steps", "2", "--out",
                        str(tmp_path / "run"), timeout=300, env={**env, "JAX_PLATFORMS": "cpu"})
    start = next(line for line in output.splitlines() if line.startswith("training mlp on digits"))
    assert f"1 x cpu{MLP_DEVICE_NOTE}; run folder" in start


def extras_named(text: str) -> set[str]:
    """The extras a page tells to install: each NAME in `.[NAME]` or `.[A,B]`."""
    return {name for group in re.findall(r"\.\[([\w,-]+)\]", text) for name in group.split(",")}


def test_readme_install_extras_exist():
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    # The front page's DP-SGD command runs on a plain install: the accountant is a base dependency.
    assert any(req.startswith("dp-accounting") for req in project["dependencies"])
    named = extras_named(README.read_text())
    assert {"test", "docs"} <= named
    assert named <= set(project["optional-dependencies"]), named - set(project["optional-dependencies"])
