"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class HpsearchError(Exception):
    """A failure the user can act on; the message is printed as is (exit code 1)."""


class SpecError(HpsearchError):
    """Bad input: a study file, a search space or a command-line value (exit code 2)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (driver errors run to many lines), or its type's name."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
