"""Errors a user can cause and fix: the CLI prints them on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix (path, architecture, ratio, data...).

    The message names the problem and, where there is one, the fix. It speaks of the library's own settings and
    arguments (``ratio``, ``calib_samples``); ``argument`` names those it mentions, and the command line, which
    knows their flags, shows ``--ratio`` and ``--calib-samples`` instead.
    """

    exit_code = 2

    def __init__(self, message: str, *, argument: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.arguments: tuple[str, ...] = (argument,) if isinstance(argument, str) else tuple(argument or ())
