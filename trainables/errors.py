"""The exception types for mistakes a user can make (bad setting, missing file, ...).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is
a bug.
"""


class UserError(ValueError):
    """A setting or input the user gave is invalid; the message names it and what is allowed."""


class DataError(UserError):
    """The data a user asked for is missing or malformed (a user error, exit code 2)."""


class ConfigError(UserError):
    """A trial configuration a user wrote is invalid (exit code 2)."""


class SearchFailed(RuntimeError):
    """A search ran but produced nothing to report (no trial finished); the CLI prints one
    line and exits with code 1."""


class SearchInterrupted(RuntimeError):
    """A search stopped by Ctrl-C (SIGINT) or SIGTERM (``ray job stop``): its state is saved
    for ``--resume``; the CLI prints one line and exits with ``exit_code`` (128 + signal)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
