"""The error type for bad input: recipes print its message on one line and exit with status 2."""


class UserError(Exception):
    """Input the user can fix (a flag, a file, a folder); the message says what to fix."""


class Terminated(BaseException):
    """The run was asked to stop (SIGTERM); recipes say how to resume and exit with status 143 (128 + 15).

    A BaseException, as KeyboardInterrupt is: raised from the signal handler wherever the run is, it must pass
    through library code that catches Exception (and would turn it into an error of its own).
    """


class ConfigError(UserError, ValueError):
    """A setting out of range, found while a config dataclass is built (a ``ValueError`` for library callers)."""


def path_name_error(exc: OSError) -> UserError | None:
    """A :class:`UserError` for an ``OSError`` caused by a path the file system cannot hold (a name over its limit);
    None for any other error, which is no bad input and must keep its traceback."""
    import errno

    if exc.errno != errno.ENAMETOOLONG:
        return None
    limit = "a folder or file name over the file system's limit, usually 255 bytes"
    return UserError(f"{exc.filename}: {exc.strerror} ({limit})")


def first_line(exc: BaseException) -> str:
    """``<type>: <first line of the message>`` of ``exc``, for one-line :class:`UserError` messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
