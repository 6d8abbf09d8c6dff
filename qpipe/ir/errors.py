"""Errors a user sees as one line (the CLI prints ``error: <message>`` and exits 2).

Anything else escaping to the CLI is a bug in qpipe and keeps its traceback.
"""
from __future__ import annotations


class QpipeError(Exception):
    """A problem with the user's input, model or pipeline, worded for the user."""


class PassFailure(QpipeError):
    """A pass raised or broke the IR contract; names the pass and what ran before."""

    def __init__(self, pass_name: str, ran_before: list[str], reason: str):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.reason = reason
        before = ", ".join(ran_before) if ran_before else "nothing"
        super().__init__(f"pass '{pass_name}' failed (after: {before}): {reason}")
