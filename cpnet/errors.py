"""User-facing errors.

Anything a user can cause (a bad flag, a wrong file, a missing GPU) raises `CpnetError` with a one-line message
that names the file or flag and what was expected. The CLI prints such messages without a traceback.

Code below the option checks (the model, the optimizer, the backend) does not know the CLI's flags: it raises
`OptionError`, which names the setting ("crop 3: ..."), and the part that checks a command's options (the CLI,
train.run) turns it into the flag's wording ("--crop 3: ...") with `flag_names()`.
"""

from contextlib import contextmanager


class CpnetError(ValueError):
    """A problem with the user's input or environment, explained in one line."""


class OptionError(CpnetError):
    """A bad value of the setting `option` (a parameter name such as "crop" or "weight_decay"); `value` is the
    value as the message shows it."""

    def __init__(self, option: str, value, detail: str):
        self.option, self.value, self.detail = option, value, detail
        super().__init__(f"{option} {value}: {detail}")

    def flagged(self) -> CpnetError:
        """The same message naming the CLI flag (--weight-decay for weight_decay)."""
        return CpnetError(f"--{self.option.replace('_', '-')} {self.value}: {self.detail}")


@contextmanager
def flag_names():
    """Inside a command's option checks: an OptionError from below leaves naming its flag."""
    try:
        yield
    except OptionError as e:
        raise e.flagged() from None
