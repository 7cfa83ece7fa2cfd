"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class HpsearchError(Exception):
    """A failure the user can act on; the message is printed as is (exit code 1)."""


class SpecError(HpsearchError):
    """Bad input: a study file, a search space or a command-line value (exit code 2)."""
