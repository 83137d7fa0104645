"""The exceptions moeprep raises for anything a user can fix.

Every message is one line that names the file and, where there is one, the tensor.
The CLI prints it to stderr without a traceback and exits with ``exit_code``.
"""
from __future__ import annotations


class MoeprepError(Exception):
    """Base class: a clean, user-facing refusal."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.message = message
        self.path = path
        self.tensor = tensor
        where = ""
        if path is not None:
            where = f"{path}"
            if tensor is not None:
                where += f" [{tensor}]"
            where += ": "
        elif tensor is not None:
            where = f"[{tensor}]: "
        super().__init__(" ".join(f"{where}{message}".split("\n")))


    def at(self, path: str) -> "MoeprepError":
        """The same refusal, located at ``path`` (e.g. the full path of a config file)."""
        return type(self)(self.message, path=path, tensor=self.tensor)


class BadInputError(MoeprepError):
    """The input is malformed, inconsistent or not a checkpoint."""


class UnsupportedError(BadInputError):
    """The input is well formed but uses something moeprep does not handle."""


class TargetError(MoeprepError):
    """A conversion target cannot hold a source exactly, or a layout rule is violated."""


class OutputError(MoeprepError):
    """Writing the output failed part-way (no space left, I/O error); nothing was left behind."""

    exit_code = 1


class VerifyError(MoeprepError):
    """``moeprep verify`` found a difference."""

    exit_code = 1
