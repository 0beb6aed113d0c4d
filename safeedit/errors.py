"""The one exception users see: a single line that names the problem and the fix."""


from __future__ import annotations

import pydantic


class SafeEditError(ValueError):
    """Bad input or an impossible request. The CLI prints the message alone and exits with status 2."""


def first_problem(error: pydantic.ValidationError) -> str:
    """The first problem pydantic found, as 'where.in.the.input: what is wrong' (one line)."""
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else problem["msg"]
