"""User-facing errors.

Anything a user can cause (a bad flag, a wrong file, a missing GPU) raises `CpnetError` with a one-line message
that names the file or flag and what was expected. The CLI prints such messages without a traceback.
"""


class CpnetError(ValueError):
    """A problem with the user's input or environment, explained in one line."""
