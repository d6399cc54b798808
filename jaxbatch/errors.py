"""The one exception type users see.

Anything the user can fix (a bad flag, a corrupt file, a missing dataset)
raises `JaxbatchError` with a single line saying what is wrong and how to fix
it. The command line prints that line and exits non-zero; tracebacks are kept
for real bugs.
"""

from __future__ import annotations


class JaxbatchError(Exception):
    """A problem with the user's input or environment, stated in one line.

    When the problem is one setting's value, `setting` names it as the library
    spells it (`batch_size`, `lr`) and the message writes `{setting}` where it
    refers to it: `str(err)` shows the library's name, and the command line
    shows its flag instead (`err.render("--batch-size")`).
    """

    def __init__(self, message: str, setting: str | None = None, cluster_broken: bool = False):
        self.template, self.setting = message, setting
        # A process of a multi-process run whose peers will never reach JAX's
        # shutdown barrier: the command line then exits without waiting there.
        self.cluster_broken = cluster_broken
        super().__init__(self.render(setting))

    def render(self, name: str | None) -> str:
        return self.template.replace("{setting}", name) if self.setting else self.template
