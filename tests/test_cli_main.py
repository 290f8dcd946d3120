import subprocess
import sys

from click.testing import CliRunner

from cpnet import __version__
from cpnet.cli.main import cli


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0
    assert __version__ in r.output


def test_help_lists_group():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    assert "AlexNet" in r.output


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "cpnet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout


def test_cli_and_data_live_inside_cpnet_namespace():
    import importlib.util

    import cpnet.cli
    import cpnet.data

    assert cpnet.cli.__name__ == "cpnet.cli" and cpnet.data.__name__ == "cpnet.data"
    # no generic top-level `cli` / `data` package is importable from site-packages
    for name in ("cli", "data"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in (spec.origin or ""), spec
