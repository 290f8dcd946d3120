"""The `cpnet` click group.

Each command lives in its own module of this package and is imported only when it runs (or when --help lists
it), so `cpnet --help` stays fast and a command's heavy imports cost nothing to the others.
"""

import importlib
import importlib.util

import click
from click.exceptions import NoArgsIsHelpError

from cpnet import __version__
from cpnet.errors import CpnetError, OptionError

# command name -> module inside cpnet.cli that defines a click command called `command`
COMMANDS = {
    "prep": "prep",
    "info": "info",
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "bench": "bench",
    "show": "show",
    "ablate": "ablate",
}


class OneLineError(click.ClickException):
    """Shown as the single line `Error: ...` (click's usage errors print the usage and a hint as well)."""

    def __init__(self, message, exit_code=1):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the message held
        self.exit_code = exit_code


def _one_line(e):
    """A click usage error as one line, with where the flags are listed; any other ClickException unchanged."""
    if isinstance(e, NoArgsIsHelpError) or not isinstance(e, click.UsageError):
        return e
    msg = e.format_message().strip()
    if e.ctx is not None:
        msg = f"{msg}{'' if msg.endswith(('.', '?')) else '.'} See '{e.ctx.command_path} --help'."
    return OneLineError(msg, e.exit_code)


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; modules not present yet are not listed.

    Every error leaves as one line `Error: ...` with a non-zero status: cpnet's own (CpnetError) and click's
    usage errors (a missing or misspelt flag, a value out of range) alike.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            raise _one_line(e) from None

    def list_commands(self, ctx):
        return sorted(n for n, m in COMMANDS.items() if importlib.util.find_spec(f"{__package__}.{m}") is not None)

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None or importlib.util.find_spec(f"{__package__}.{mod}") is None:
            return None
        return importlib.import_module(f"{__package__}.{mod}").command

    def main(self, *args, **kwargs):
        """Under an MPI launcher every rank parses the same flags: rank 0 alone shows a usage error (the others
        exit with its status, silently). Errors after start-up are the commands' own (cpnet.dist names the rank);
        a rank killed outright is named by the process that waits for it (cpnet.dist.supervise)."""
        import sys

        from cpnet import dist

        try:
            rank = dist.launched_rank()
            ended = dist.supervise()  # several ranks: this process waits for its rank, which goes on below
        except CpnetError:  # a bad CPNET_MPI: the command reports it
            rank, ended = 0, None
        if ended is not None:  # the rank has ended: this process ends as it did (a signal: the same signal)
            if ended.line:
                sys.stderr.write(f"Error: {ended.line}\n")
            sys.stderr.flush()
            dist.exit_like(ended)
        if rank == 0 or kwargs.get("standalone_mode") is False:
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            raise SystemExit(e.exit_code) from None
        except click.exceptions.Abort:
            raise SystemExit(1) from None

    def invoke(self, ctx):
        # every command runs under cpnet's host BLAS thread count (train narrows it further for its loader
        # workers): the two host towers run in two threads, and oversubscribed OpenBLAS collapses
        from cpnet import backend

        try:
            with backend.host_threads(backend.default_host_threads()):
                return super().invoke(ctx)
        except OptionError as e:  # the library names the setting, the command line its flag
            raise OneLineError(str(e.flagged())) from None
        except CpnetError as e:
            raise OneLineError(str(e)) from None
        except click.ClickException as e:
            raise _one_line(e) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cpnet")
def cli():
    """cpnet: AlexNet from scratch on NumPy/CuPy arrays.

    Every layer's forward and backward pass is written by hand. Set CPNET_DEVICE=cpu|gpu|auto to choose where
    arrays live (auto: a CUDA GPU when CuPy sees one).
    """
