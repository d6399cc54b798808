"""What tests of the command line share: an exit status, argparse's refusals
included, and the one line of an error."""

from jaxbatch.cli import main


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
