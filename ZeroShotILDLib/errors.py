"""Errors a user can act on.

Every problem with the user's input (a file, a checkpoint, a prompt, a setting) is raised as
``InputError`` with one line that names the problem and what to do. The command line prints the
message alone (no traceback) and exits non-zero; the Slicer module shows it in a dialog.
"""


class InputError(ValueError):
    """Bad input that the user can fix; the message is one line, shown as is."""


class Cancelled(RuntimeError):
    """The user cancelled a long-running step; nothing partial is kept."""
