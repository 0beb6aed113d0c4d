"""The one exception users see: a single line that names the problem and the fix."""


from __future__ import annotations

import errno

import pydantic


class SafeEditError(ValueError):
    """Bad input or an impossible request. The CLI prints the message alone and exits with status 2."""


def first_problem(error: pydantic.ValidationError) -> str:
    """The first problem pydantic found, as 'where.in.the.input: what is wrong' (one line)."""
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


# What to do about an operating-system failure, by errno: the fix the one-line message names.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) allows: raise the limit or write less",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EEXIST: "it already exists: choose a new name",
    errno.EISDIR: "it is a folder: name a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def os_problem(error: OSError, path: object | None = None) -> SafeEditError:
    """An OS failure as one line naming the file and the fix (`path` when the error carries no file name)."""
    where = error.filename if error.filename is not None else path
    fix = _OS_FIXES.get(error.errno, error.strerror or type(error).__name__)
    return SafeEditError(f"{where}: {fix}" if where is not None else fix)
