"""`cpnet prep` and `cpnet info` run as commands."""
import numpy as np
from PIL import Image

from cpnet.data import H5Dataset
from conftest import invoke as run


def test_prep_synthetic_and_info(tmp_path):
    out = tmp_path / "syn"
    r = run("prep", "synthetic", "--out", out, "--n", 200, "--classes", 4, "--size", 12, "--seed", 3,
            "--val-fraction", 0.25, "--workers", 2)
    assert r.exit_code == 0, r.output
    assert f"{out}/train.h5: 200 images, 0 skipped" in r.output and "val.h5: 50 images" in r.output
    with H5Dataset(out / "train.h5") as ds:
        assert (ds.n, ds.size, ds.classes) == (200, 12, ["disc", "ring", "square", "triangle"])
    r = run("info", out / "train.h5")
    assert r.exit_code == 0
    for s in ("200 x 12x12x3", "classes     4", "disc", "mean RGB", "PCA eigval", "stats from: train"):
        assert s in r.output
    # existing output: refused, kept with --resume, replaced with --overwrite
    r = run("prep", "synthetic", "--out", out, "--n", 200, "--classes", 4, "--size", 12, "--seed", 3)
    assert r.exit_code == 1 and "Error: " in r.output and "train.h5: already exists" in r.output
    assert "Traceback" not in r.output
    r = run("prep", "synthetic", "--out", out, "--n", 200, "--classes", 4, "--size", 12, "--seed", 3,
            "--val-fraction", 0.25, "--resume")
    assert r.exit_code == 0 and "kept" in r.output


def test_prep_progress_off_a_terminal_is_one_final_line_per_split(tmp_path):
    r = run("prep", "synthetic", "--out", tmp_path / "s", "--n", 40, "--classes", 2, "--size", 12)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("train: 40/40 (100.0%)") and "took 0:" in lines[0] and "skipped 0" in lines[0]
    assert lines[1].startswith("  val: 8/8 (100.0%)")
    r = run("prep", "synthetic", "--out", tmp_path / "q", "--n", 40, "--classes", 2, "--size", 12, "-q")
    assert r.exit_code == 0 and not r.stderr.strip()


def test_prep_folder_reports_skipped(tmp_path):
    root = tmp_path / "root"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 14, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = run("prep", "folder", root, "--out", tmp_path / "o", "--size", 8, "--val-fraction", 0.34)
    assert r.exit_code == 0, r.output
    assert "1 inputs skipped" in r.output and (tmp_path / "o" / "skipped.txt").exists()
    r = run("prep", "folder", root, "--out", tmp_path / "s", "--size", 8, "--strict")
    assert r.exit_code == 1 and "broken.png" in r.output and "Traceback" not in r.output


def test_info_and_prep_errors_name_the_file(tmp_path):
    (tmp_path / "x.h5").write_text("no")
    r = run("info", tmp_path / "x.h5")
    assert r.exit_code == 1 and "Error: " in r.output and "x.h5: not an HDF5 file" in r.output
    r = run("prep", "cifar", tmp_path / "x.h5", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "x.h5: not a tar archive" in r.output
    r = run("prep", "idx", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "nowhere: no such folder" in r.output
