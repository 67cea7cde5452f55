"""Errors a user can cause and fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input that the user can fix (path, architecture, ratio, data...).

    The message names the problem and, where there is one, the fix.
    """

    exit_code = 2
