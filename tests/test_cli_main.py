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


def test_wheel_installs_cli_and_data_inside_cpnet_only(tmp_path):
    """Build the real wheel: cli/ and data/ land as cpnet/cli and cpnet/data, never as top-level packages."""
    import os
    import zipfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), repo],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = [p for p in tmp_path.iterdir() if p.suffix == ".whl"]
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "cpnet/cli/main.py" in names and "cpnet/data/loader.py" in names
    assert "cpnet/kernels/lrn.cu" in names and "cpnet/kernels/host_shim.h" in names
    assert not {"cli", "data", "tests"} & tops, tops
