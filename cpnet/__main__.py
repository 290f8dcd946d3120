"""`python -m cpnet` runs the command line."""

from cpnet.cli.main import cli

cli(prog_name="cpnet")
