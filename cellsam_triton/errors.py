"""Errors that reach the user as one line (no traceback) and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: bad input, missing file, server down, wrong checkpoint."""

    exit_code = 2


class ServerError(UserError):
    """The inference server is unreachable, not ready, or answered with an error."""

    exit_code = 3
