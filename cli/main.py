"""The `cpnet` click group.

Each command lives in its own module of this package and is imported only when it runs (or when --help lists
it), so `cpnet --help` stays fast and a command's heavy imports cost nothing to the others.
"""

import importlib
import importlib.util

import click

from cpnet import __version__
from cpnet.errors import CpnetError

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


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; modules not present yet are not listed."""

    def list_commands(self, ctx):
        return sorted(n for n, m in COMMANDS.items() if importlib.util.find_spec(f"{__package__}.{m}") is not None)

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None or importlib.util.find_spec(f"{__package__}.{mod}") is None:
            return None
        return importlib.import_module(f"{__package__}.{mod}").command

    def invoke(self, ctx):
        # every command runs under cpnet's host BLAS thread count (train narrows it further for its loader
        # workers): the two host towers run in two threads, and oversubscribed OpenBLAS collapses
        from cpnet import backend

        try:
            with backend.host_threads(backend.default_host_threads()):
                return super().invoke(ctx)
        except CpnetError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cpnet")
def cli():
    """cpnet: AlexNet from scratch on NumPy/CuPy arrays.

    Every layer's forward and backward pass is written by hand. Set CPNET_DEVICE=cpu|gpu|auto to choose where
    arrays live (auto: a CUDA GPU when CuPy sees one).
    """
