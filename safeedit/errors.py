"""The one exception users see: a single line that names the problem and the fix."""


class SafeEditError(ValueError):
    """Bad input or an impossible request. The CLI prints the message alone and exits with status 2."""
