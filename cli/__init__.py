"""The `cpnet` command line (installed as cpnet.cli): a click group, one module per command."""
