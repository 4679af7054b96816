"""The error type for bad input: recipes print its message on one line and exit with status 2."""


class UserError(Exception):
    """Input the user can fix (a flag, a file, a folder); the message says what to fix."""


class ConfigError(UserError, ValueError):
    """A setting out of range, found while a config dataclass is built (a ``ValueError`` for library callers)."""
