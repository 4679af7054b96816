"""The error type for bad input: recipes print its message on one line and exit with status 2."""

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The ``errno`` values of a write refused for want of space: the device is full, or the user's quota is."""


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
    if exc.errno != errno.ENAMETOOLONG:
        return None
    limit = "a folder or file name over the file system's limit, usually 255 bytes"
    return UserError(f"{exc.filename}: {exc.strerror} ({limit})")


def disk_full_line(exc: BaseException) -> str | None:
    """The one line that says a write found no space (:data:`DISK_FULL`) and how to go on; None for other errors.

    No input of the user's is at fault and no traceback would help: what is needed is the file (which disk) and
    that the run resumes once there is room.
    """
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    what = "no space left on the device" if exc.errno == errno.ENOSPC else "the disk quota is used up"
    target = exc.filename2 or exc.filename  # a copy or a rename names its source first, then the file it writes
    where = f" (writing {target})" if target else ""
    return f"{what}{where}; finished work is kept: free some space and run the same command again to resume"


def first_line(exc: BaseException) -> str:
    """``<type>: <first line of the message>`` of ``exc``, for one-line :class:`UserError` messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
