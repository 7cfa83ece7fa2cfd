"""Errors that the CLI turns into one-line messages and exit codes, and the rejection a strategy raises."""

from __future__ import annotations


class HpsearchError(Exception):
    """A failure the user can act on; the message is printed as is (exit code 1)."""


class SpecError(HpsearchError):
    """Bad input: a study file, a search space or a command-line value (exit code 2)."""


class Rejected(Exception):
    """A sampled configuration that cannot train (e.g. its feature map shrinks below 1x1), raised by a strategy's
    builder; the objective stores the reason and prunes the trial (``stopping.reject``)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (driver errors run to many lines), or its type's name."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
