"""The code blocks of a markdown page, as tests/test_readme.py and
tests/test_docs.py read them: python snippets to run, and shell commands,
each to be run or listed with the reason it is not."""

import re
import shlex
from pathlib import Path

SHELL = ("bash", "sh", "shell", "console")


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in page order; language '' when unnamed."""
    return re.findall(r"^ *```(\w*)[^\n]*\n(.*?)^ *```", page.read_text(), re.S | re.M)


def python_snippets(page: Path) -> list[str]:
    return [body for lang, body in code_blocks(page) if lang == "python"]


def shell_commands(page: Path) -> list[str]:
    """Every command in the page's shell blocks, comments dropped, continued lines joined."""
    commands = []
    for lang, block in code_blocks(page):
        if lang not in SHELL:
            continue
        command = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                command += line[:-1].strip() + " "
                continue
            commands.append(" ".join((command + line).split()))  # spaces that align comments do not count
            command = ""
    return commands


def run_commands(commands, capsys) -> dict[str, str]:
    """Run `jaxbatch ...` commands in-process, in order, each once; what each printed (stdout and stderr)."""
    from jaxbatch.cli import main

    printed = {}
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "jaxbatch", command
        code = main(words[1:])
        out = capsys.readouterr()
        assert code == 0, f"{command}: {out.err}"
        printed[command] = out.out + out.err
    return printed
