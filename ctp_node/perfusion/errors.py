"""Errors of the perfusion analysis: each message says what was wrong and what to do about it."""

from __future__ import annotations


class PerfusionError(ValueError):
    """The series cannot be analysed as given (bad shape, bad times, no bolus, ...)."""


class NoAIFError(PerfusionError):
    """No arterial input function could be found automatically."""
