"""The one exception type users see.

Anything the user can fix (a bad flag, a corrupt file, a missing dataset)
raises `JaxbatchError` with a single line saying what is wrong and how to fix
it. The command line prints that line and exits non-zero; tracebacks are kept
for real bugs.
"""


class JaxbatchError(Exception):
    """A problem with the user's input or environment, stated in one line."""
