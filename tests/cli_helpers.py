"""What tests of the command line share: an exit status, argparse's refusals
included, the one line of an error, and a script run in its own process
group, bounded in time."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from jaxbatch.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*argv) -> int:
    """`jaxbatch ARGV`'s exit status, argparse's refusals included."""
    try:
        return main(list(argv))
    except SystemExit as exit_:
        return exit_.code


def one_error_line(capsys) -> str:
    """The one line on stderr (the test fails if there are more or none)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def run_script(*argv: str, timeout: float, env: dict | None = None) -> str:
    """`python ARGV` in the repository root, its output (stdout and stderr);
    it must exit 0 within `timeout` seconds. It runs in its own process
    group, which is killed whole (the script's children too) if it does not."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    return output
