"""Fault injection: a full disk, kills at chosen points, damaged files and two runs on one folder.

A full disk is real where the test may mount a small tmpfs (root with CAP_SYS_ADMIN); elsewhere the same tests
inject OSError(ENOSPC) at the write call (`full_disk` says which ran in its id). The commands run as
subprocesses (`python -c SCRIPT`), so that a crash in HDF5 fails the test instead of the test run, and the
point of failure is chosen through a hook on the progress callback.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cpnet.data import prep
from cpnet.data.sources import synthetic_jobs

PREP = ["prep", "synthetic", "--n", "600", "--classes", "4", "--size", "16", "--seed", "1", "--val-fraction",
        "0.25", "-q"]                      # 256-image units: train 256, 512, 600; val 150

FILL = r"""
def fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\0" * 65536
    try:
        while True:
            try:
                if os.write(fd, block) == 0:
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[:len(block) // 16 or 1]
    finally:
        os.close(fd)
"""

# Runs `cpnet ARGS...` with a hook in prep's progress callback: once SPLIT has DONE items, ACTION happens:
#   fill: fill the file system under BALLAST (a real full disk)   kill: SIGKILL this process
#   inject: from then on every HDF5 dataset write raises OSError(ENOSPC), as a full disk would
#   wait: wait (holding whatever it holds) until the file BALLAST exists
HOOKED = r"""
import errno, os, signal, sys, time
import h5py
from cpnet.cli import prep as cli_prep
from cpnet.cli.main import cli
split_at, done_at, action, ballast = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
state = {"on": False}
""" + FILL + r"""
def refuse(*a, **k):
    if state["on"]:
        raise OSError(errno.ENOSPC, "No space left on device")
    return orig_write(*a, **k)

orig_write = h5py.Dataset.write_direct
h5py.Dataset.write_direct = refuse
orig_setitem = h5py.Dataset.__setitem__
h5py.Dataset.__setitem__ = lambda self, k, v: (refuse() if state["on"] else orig_setitem(self, k, v))
orig_create = h5py.Group.create_dataset
h5py.Group.create_dataset = lambda self, *a, **k: (refuse() if state["on"] else orig_create(self, *a, **k))
orig_bar = cli_prep._Bar.__call__

def hook(self, split, done, *rest):
    if split == split_at and done >= done_at and not state["on"]:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "fill":
            fill(ballast)
            state["fill"] = True
        elif action == "inject":
            state["on"] = True
        elif action == "wait":
            for _ in range(1200):
                if os.path.exists(ballast):
                    break
                time.sleep(0.05)
    return orig_bar(self, split, done, *rest)

cli_prep._Bar.__call__ = hook
cli(sys.argv[5:], prog_name="cpnet")
"""


def cpnet(*args, hook=None, cwd=None, timeout=120):
    """Run `cpnet ARGS` (with `hook` = (split, done, action, ballast)) in a subprocess; (rc, stdout+stderr)."""
    code = HOOKED if hook else "import sys; from cpnet.cli.main import cli; cli(sys.argv[1:], prog_name='cpnet')"
    argv = [sys.executable, "-c", code] + ([str(h) for h in hook] if hook else []) + [str(a) for a in args]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def one_error_line(out):
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "Traceback" not in out and "Segmentation" not in out and "Exception ignored" not in out, out
    assert lines and lines[-1].startswith("Error: ") and len([ln for ln in lines if ln.startswith("Error")]) == 1, out
    return lines[-1]


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture(params=["real", "injected"])
def full_disk(request, tmp_path):
    """(folder, action): a folder on a 2 MB tmpfs that the hook fills ('fill'), or a plain folder where the hook
    injects ENOSPC at the write call ('inject') when no file system can be mounted."""
    d = tmp_path / "fs"
    d.mkdir()
    if request.param == "real":
        if not _mount_tmpfs(d, "2m"):
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the injected variant runs")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(d)], capture_output=True))
        return d, "fill"
    return d, "inject"


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("images", "labels", "mean", "pca/eigval", "pca/eigvec", "pca/cov")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    rc, log = cpnet(*PREP, "--out", out)
    assert rc == 0, log
    return {s: read_all(out / f"{s}.h5") for s in ("train", "val")}


def same_as(out, reference):
    for split in ("train", "val"):
        got = read_all(out / f"{split}.h5")
        for k, v in reference[split].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{split} {k}")


# ------------------------------------------------------------------------------------------------ prep, disk full

@pytest.mark.parametrize("split,done", [("train", 256), ("train", 600), ("val", 150)],
                         ids=["mid-train", "train-finish", "val-finish"])
def test_prep_disk_full_is_one_line_and_resume_is_exact(full_disk, reference, split, done):
    d, action = full_disk
    out, ballast = d / "data", d / "ballast"
    rc, log = cpnet(*PREP, "--out", out, hook=(split, done, action, ballast))
    assert rc == 1, log
    line = one_error_line(log)
    assert "no space left on the device" in line and ".h5.partial" in line and "--resume" in line, line
    assert not (out / f"{split}.h5").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    if ballast.exists():
        ballast.unlink()
    rc, log = cpnet(*PREP, "--out", out, "--resume")
    assert rc == 0, log
    assert not [p for p in os.listdir(out) if p.endswith((".partial", ".tmp"))]
    same_as(out, reference)


def test_prep_killed_at_chosen_points_resumes_exactly(tmp_path, reference):
    out = tmp_path / "data"
    for split, done in (("train", 256), ("train", 600), ("val", 150)):
        rc, log = cpnet(*PREP, "--out", out, *(["--resume"] if (out / "train.h5.partial").exists()
                                                or (out / "train.h5").exists() else []),
                        hook=(split, done, "kill", tmp_path / "none"))
        assert rc == -signal.SIGKILL, log
    rc, log = cpnet(*PREP, "--out", out, "--resume")
    assert rc == 0, log
    same_as(out, reference)


# ---------------------------------------------------------------------------------------- prep, a damaged partial

def _stop_after(units):
    class Stop(Exception):
        pass

    def progress(split, done, *rest):
        if done >= units * 256:
            raise Stop()
    return Stop, progress


def _damage_record(path):
    with h5py.File(path, "r+") as f:
        rec = f["_progress/record"][...]
        rec[10] += 50.0                     # the sums move, the counters do not: the CRC tells
        f["_progress/record"][...] = rec


def _damage_image(path):
    with h5py.File(path, "r+") as f:
        f["images"][3, 0, 0, 0] ^= 0x40     # a bit flipped in an image the record covers


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 3)


@pytest.mark.parametrize("damage,why", [(_damage_record, "checksum"), (_damage_image, "do not add up"),
                                        (_truncate, "cannot be opened|damaged")])
def test_prep_resume_starts_a_damaged_split_over(tmp_path, reference, damage, why):
    import re

    jobs = lambda: synthetic_jobs(n=600, classes=4, size=16, seed=1, val_fraction=0.25)   # noqa: E731
    Stop, progress = _stop_after(2)
    out = tmp_path / "data"
    with pytest.raises(Stop):
        prep.run(out, jobs(), progress=progress)
    damage(out / "train.h5.partial")
    notes = []
    prep.run(out, jobs(), resume=True, notice=notes.append)
    assert len(notes) == 1 and "train.h5.partial" in notes[0] and re.search(why, notes[0]) \
        and "starting train over" in notes[0], notes
    same_as(out, reference)


def test_prep_never_renames_a_file_that_does_not_read_back(tmp_path, monkeypatch):
    from cpnet.errors import CpnetError

    real = prep._image_sum
    calls = []

    def lying_sum(images, n, size, **kw):       # the read-back sees other bytes than were written
        calls.append(n)
        s = real(images, n, size, **kw)
        return s + 1 if len(calls) == 1 else s
    monkeypatch.setattr(prep, "_image_sum", lying_sum)
    with pytest.raises(CpnetError, match=r"train\.h5\.partial: its images read back differ.*--overwrite"):
        prep.run(tmp_path, synthetic_jobs(n=300, classes=4, size=16, seed=1, val_fraction=0))
    assert not (tmp_path / "train.h5").exists()


# -------------------------------------------------------------------------------------------------- prep, a lock

def test_second_prep_into_one_folder_is_refused_naming_the_first(tmp_path):
    out, go = tmp_path / "data", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HOOKED, "train", "256", "wait", str(go), *PREP, "--out",
                              str(out), "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = out / ".cpnet.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.05)
        rc, log = cpnet(*PREP, "--out", out, "--overwrite")
    finally:
        go.touch()
        first.wait(timeout=60)
    assert rc == 1, log
    line = one_error_line(log)
    assert f"{out}: in use by another process (pid {first.pid}, cpnet prep" in line, line
    assert first.returncode == 0, first.stdout.read()


# ----------------------------------------------------------------------------------- loader workers and a kill

def _children():
    """{pid: ppid} of every process, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":                   # a zombie has exited
                out[int(name)] = int(fields[1])
    return out


def _descendants(pid):
    tree, found, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in tree.items() if pp == p]
        found.update(kids)
        todo += kids
    return found


def _alive(pids):
    tree = _children()
    return {p for p in pids if p in tree}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    prep.run(d, synthetic_jobs(n=96, classes=4, size=16, seed=0, val_fraction=0.25))
    return d


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_loader_workers_exit_when_train_is_killed(tiny_data, tmp_path, sig):
    p = subprocess.Popen([sys.executable, "-m", "cpnet", "train", "--data", str(tiny_data), "--out",
                          str(tmp_path / "run"), "--model", "alexnet-tiny", "--epochs", "1000", "--batch-size", "8",
                          "--crop", "15", "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        procs, sems = set(), set()
        for _ in range(400):                       # both loaders' workers, the forkserver, the resource tracker
            procs = _descendants(p.pid)
            if len(procs) >= 6 and (tmp_path / "run" / "last.h5").exists():
                break
            time.sleep(0.05)
        assert len(procs) >= 6, (procs, p.poll(), p.stderr.read() if p.poll() is not None else "")
        with open(f"/proc/{p.pid}/maps") as fh:
            sems = {ln.split()[-1] for ln in fh if "/dev/shm/sem." in ln}
        assert sems
        p.send_signal(sig)
        p.wait(timeout=30)
        for _ in range(200):                       # "within a few seconds"
            if not _alive(procs):
                break
            time.sleep(0.05)
        assert not _alive(procs), f"still running after {sig!r}: {_alive(procs)}"
        for _ in range(100):                       # the resource tracker unlinks them as it exits
            if not any(os.path.exists(s) for s in sems):
                break
            time.sleep(0.05)
        assert not [s for s in sems if os.path.exists(s)]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------------- checkpoints

SAVE = r"""
import errno, os, sys
import numpy as np
from cpnet import checkpoint as C
from cpnet.errors import CpnetError
from cpnet.model import make_config
cfg = make_config("alexnet-tiny", 4, 15, "paper", "he", "relu", True, [3, 2], 0.5, 0)
def ck(seed):
    r = np.random.default_rng(seed)
    p = {f"w{i}": r.standard_normal(20000).astype(np.float32) for i in range(4)}
    return C.Checkpoint(config=cfg, params=p, classes=list("abcd"), mean=np.zeros((16, 16, 3), np.float32),
                        momentum={k: v * 0 for k, v in p.items()}, state={"epoch": seed})
""" + FILL + r"""
path, mode = sys.argv[1], sys.argv[2]
C.save(path, ck(1))
if mode == "fill":
    fill(path + ".ballast")
else:
    import h5py
    h5py.Group.create_dataset = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
try:
    C.save(path, ck(2))
except CpnetError as e:
    print("Error:", e)
    sys.exit(1)
"""


def test_checkpoint_disk_full_keeps_the_previous_file_and_no_temporary(full_disk):
    from cpnet import checkpoint

    d, action = full_disk
    path = d / "last.h5"
    p = subprocess.run([sys.executable, "-c", SAVE, str(path), action],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    line = one_error_line(p.stdout + p.stderr)
    assert f"{path}: no space left on the device while writing the checkpoint; {path} keeps its previous" in line
    assert checkpoint.load(path).state == {"epoch": 1}
    assert not [e for e in os.listdir(d) if e.endswith(".tmp")]


def _small_checkpoint(path):
    from cpnet import checkpoint
    from cpnet.model import make_config

    cfg = make_config("alexnet-tiny", 4, 15, "paper", "he", "relu", True, [3, 2], 0.5, 0)
    r = np.random.default_rng(0)
    params = {f"w{i}": r.standard_normal(4096).astype(np.float32) for i in range(3)}
    checkpoint.save(path, checkpoint.Checkpoint(config=cfg, params=params, classes=list("abcd"),
                                                mean=np.zeros((16, 16, 3), np.float32), state={"epoch": 1}))
    return params


def test_bit_flipped_checkpoint_is_one_line_never_wrong_weights(tmp_path):
    from cpnet import checkpoint
    from cpnet.errors import CpnetError

    path = tmp_path / "c.h5"
    params = _small_checkpoint(path)
    with h5py.File(path, "r") as f:
        at = f["params/w1"].id.get_chunk_info(0).byte_offset + 1000
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10                                 # one bit inside w1's data: the checksum catches it
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CpnetError, match=r"flipped\.h5: damaged checkpoint"):
        checkpoint.load(bad)
    rng = np.random.default_rng(1)
    raw0 = path.read_bytes()
    for k, at in enumerate(rng.choice(len(raw0), 40, replace=False)):   # anywhere: an error or the same weights
        raw = bytearray(raw0)
        raw[at] ^= 1 << int(rng.integers(8))
        bad = tmp_path / f"f{k}.h5"
        bad.write_bytes(bytes(raw))
        try:
            ck = checkpoint.load(bad)
        except CpnetError as e:
            assert str(e).startswith(str(bad)) and "\n" not in str(e)
            continue
        for name, v in params.items():
            np.testing.assert_array_equal(ck.params[name], v)


@pytest.mark.parametrize("where,name,value,message", [
    ("/", "state", "{not json", "'state' attribute is not JSON"),
    ("/", "train", "[1, 2]", "'train' attribute is not a JSON object"),
    ("/", "format_version", "one", "attribute 'format_version' is 'one', expected a number"),
    ("norm", "scale", "big", "attribute 'scale' is 'big', expected a number"),
])
def test_checkpoint_bad_attributes_are_one_line(tmp_path, where, name, value, message):
    from click.testing import CliRunner

    from cpnet import checkpoint
    from cpnet.cli.main import cli
    from cpnet.errors import CpnetError

    path = tmp_path / "c.h5"
    _small_checkpoint(path)
    with h5py.File(path, "r+") as f:
        f[where].attrs[name] = value
    with pytest.raises(CpnetError, match=message):
        checkpoint.load(path)
    r = CliRunner().invoke(cli, ["show", "filters", str(path), "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "Traceback" not in r.output and message in r.output, r.output


def test_non_finite_parameters_are_never_written_or_loaded(tmp_path):
    from cpnet import checkpoint
    from cpnet.errors import CpnetError

    path = tmp_path / "c.h5"
    params = _small_checkpoint(path)
    ck = checkpoint.load(path)
    ck.params = dict(params, w2=np.where(np.arange(4096) == 7, np.nan, params["w2"]).astype(np.float32))
    with pytest.raises(CpnetError, match=r"c\.h5: not written: parameter w2 holds NaN"):
        checkpoint.save(path, ck)
    assert checkpoint.load(path).state == {"epoch": 1} and not list(tmp_path.glob("*.tmp"))
    with h5py.File(path, "r+") as f:
        f["params/w0"][3] = np.inf
    with pytest.raises(CpnetError, match=r"c\.h5: parameter w0 holds NaN or infinite values"):
        checkpoint.load(path)


# ------------------------------------------------------------------------------------- train: lock, SIGTERM, kills

TRAIN = ["--model", "alexnet-tiny", "--batch-size", "8", "--crop", "15", "--schedule", "constant", "--scale",
         "0.015625", "--seed", "2"]


def _wait_for_lock(out, timeout=60):
    lock = out / ".cpnet.lock"
    for _ in range(int(timeout / 0.05)):
        if lock.exists() and lock.read_text().startswith("pid"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{lock} never taken")


def _cli(*args):
    from click.testing import CliRunner

    from cpnet.cli.main import cli
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_train_holds_its_folder_and_sigterm_to_the_group_saves_the_position(tiny_data, tmp_path):
    out = tmp_path / "run"
    a = subprocess.Popen([sys.executable, "-m", "cpnet", "train", "--data", str(tiny_data), "--out", str(out),
                          "--epochs", "1000", "--workers", "2", *TRAIN], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_lock(out)
        for _ in range(600):
            if (out / "last.h5").exists():
                break
            time.sleep(0.05)
        for flags in (["--epochs", "2", *TRAIN], ["--epochs", "2000", "--resume"]):
            r = _cli("train", "--data", tiny_data, "--out", out, *flags)
            assert r.exit_code == 1 and f"{out}: in use by another process (pid {a.pid}, cpnet train" in r.output, \
                r.output
        procs = _descendants(a.pid)
        os.killpg(a.pid, signal.SIGTERM)          # as Slurm or a container stop: every process of the job
        stdout, stderr = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: stopped at epoch" in stderr and "Traceback" not in stderr, stderr
    for _ in range(200):
        if not _alive(procs):
            break
        time.sleep(0.05)
    assert not _alive(procs)
    from cpnet import checkpoint
    st = checkpoint.load(out / "last.h5").state
    assert st["pos"] > 0 or st["epoch"] >= 1
    r = _cli("train", "--data", tiny_data, "--out", out, "--epochs", str(st["epoch"] + 1), "--resume",
             "--workers", "0")
    assert r.exit_code == 0, r.output


# Runs `cpnet train ARGS` and SIGKILLs itself at a chosen point of the end of epoch EPOCH:
#   after-last: last.h5 renamed, best.h5 and metrics.jsonl not yet written
#   before-rename: last.h5's temporary file complete, not renamed
KILL_IN_SAVE = r"""
import os, signal, sys
from cpnet import checkpoint
from cpnet.cli.main import cli
point, epoch = sys.argv[1], int(sys.argv[2])
real_save, real_replace = checkpoint.save, os.replace
def save(path, ck):
    hit = str(path).endswith("last.h5") and ck.state.get("epoch") == epoch and not ck.state.get("pos")
    if hit and point == "before-rename":
        def replace(src, dst):
            if str(dst).endswith("last.h5"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace
    real_save(path, ck)
    if hit and point == "after-last":
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save
cli(sys.argv[3:], prog_name="cpnet")
"""


def test_kill_inside_the_end_of_an_epoch_is_repaired_on_resume(tiny_data, tmp_path):
    from cpnet import checkpoint

    ref = tmp_path / "ref"
    assert _cli("train", "--data", tiny_data, "--out", ref, "--epochs", "2", "--workers", "0", *TRAIN).exit_code == 0
    out = tmp_path / "run"
    args = ["train", "--data", tiny_data, "--out", out, "--epochs", "2", "--workers", "0", *TRAIN]
    p = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, "after-last", "1", *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (out / "last.h5").exists() and not (out / "best.h5").exists() and not (out / "metrics.jsonl").exists()
    r = _cli("train", "--data", tiny_data, "--out", out, "--epochs", "1", "--resume", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "best.h5 rebuilt from last.h5 (epoch 1;" in r.output and "metrics.jsonl rewritten from last.h5" in r.output, \
        r.output
    assert checkpoint.read_state(out / "best.h5")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # killed with last.h5's new content complete but not renamed: the temporary is removed, epoch 2 is redone
    p = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, "before-rename", "2", *map(str, args), "--resume"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    stale = [e for e in os.listdir(out) if e.endswith(".tmp")]
    assert stale and checkpoint.read_state(out / "last.h5")["epoch"] == 1
    r = _cli("train", "--data", tiny_data, "--out", out, "--epochs", "2", "--resume", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert f"removed {out / stale[0]}" in r.output and not [e for e in os.listdir(out) if e.endswith(".tmp")]
    a, b = checkpoint.load(ref / "last.h5"), checkpoint.load(out / "last.h5")
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert (ref / "metrics.jsonl").read_text().count("\n") == (out / "metrics.jsonl").read_text().count("\n") == 2


# ------------------------------------------------------------------------------------------- train: the NaN guard

def test_non_finite_weights_stop_the_run_and_never_reach_a_file(tiny_data, tmp_path):
    from cpnet import checkpoint
    from cpnet.train import TrainConfig, TrainingDiverged, run

    cfg = dict(data=str(tiny_data), out=str(tmp_path / "r"), model="alexnet-tiny", batch_size=8, crop=15,
               schedule="constant", scale=1 / 64, workers=0)
    run(TrainConfig(epochs=1, **cfg))
    good = checkpoint.load(tmp_path / "r" / "last.h5")
    nb = good.state["iteration"]
    live = {}

    def poison(s):        # what a NaN input or gradient leaves behind, while the loss may stay finite
        if s["iteration"] == nb + 2:
            w = live["model"].params()["t0.conv1.W"]
            w.reshape(-1)[5] = np.nan

    with pytest.raises(TrainingDiverged, match=r"parameter t0\.conv1\.W became NaN or infinite by iteration "
                                               rf"{nb + 2} \(epoch 2\).*last\.h5 keeps the last good state"):
        run(TrainConfig(epochs=2, resume=True, max_iterations=nb + 2, **cfg), on_step=poison,
            on_start=lambda info: live.update(info))
    after = checkpoint.load(tmp_path / "r" / "last.h5")          # loads: every parameter finite
    assert after.state == good.state
    assert checkpoint.load(tmp_path / "r" / "best.h5").state["epoch"] == 1


# --------------------------------------------------------------------------------- train: bad --out, bad numbers

def test_out_that_cannot_be_written_fails_before_training(tiny_data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _cli("train", "--data", tiny_data, "--out", f / "run", "--epochs", "1", *TRAIN)
    assert r.exit_code == 1 and f"--out {f / 'run'}: cannot create the run folder ({f} is a file)" \
        in r.output, r.output
    ro = tmp_path / "ro"
    ro.mkdir()
    if _mount_tmpfs(ro, "1m"):                     # a read-only file system: refused even to root
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        try:
            r = _cli("train", "--data", tiny_data, "--out", ro, "--epochs", "1", *TRAIN)
        finally:
            subprocess.run(["umount", "-l", str(ro)])
    elif os.geteuid() != 0:
        ro.chmod(0o555)
        r = _cli("train", "--data", tiny_data, "--out", ro, "--epochs", "1", *TRAIN)
    else:
        pytest.skip("root without mount: no folder it cannot write")
    assert r.exit_code == 1, r.output
    assert f"Error: {ro}: " in r.output and "while checking that the run folder can be written" in r.output, r.output
    assert "epoch 1" not in r.output


def _dataset_copy(src, dst, edit):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cpnet.lock"))
    edit(dst)
    return dst


def _rewrite(path, name, data):
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data)


@pytest.mark.parametrize("flags,edit,message", [
    (["--batch-size", "100000000000"], None,
     r"--batch-size 100000000000: .*train\.h5 has 96 images, fewer than one training"),
    (["--crop", "0"], None, r"--crop 0: expected a crop size of at least 1"),
    (["--lighting", "inf"], None, r"--lighting inf: expected a standard deviation >= 0 \(finite\)"),
    ([], lambda d: os.replace(_small_prep(d.parent / "small", 13) / "val.h5", d / "val.h5"),
     r"val\.h5: images stored at 13 px, .*train\.h5 at 16 px"),
    ([], lambda d: _rewrite(d / "val.h5", "labels", np.zeros(0, np.int64)) or _rewrite(
        d / "val.h5", "images", np.zeros((0, 16, 16, 3), np.uint8)), r"val\.h5: no images"),
    ([], lambda d: _rewrite(d / "train.h5", "labels", np.full(96, 1.5)),
     r"train\.h5: 'labels' are float64, expected integers"),
    ([], lambda d: _rewrite(d / "train.h5", "mean", np.full((16, 16, 3), np.nan, np.float32)),
     r"train\.h5: 'mean' holds NaN or infinite values"),
    ([], lambda d: h5py.File(d / "train.h5", "r+").attrs.__setitem__("format_version", "one"),
     r"train\.h5: format_version is 'one', expected a number"),
], ids=["batch-1e11", "crop-0", "lighting-inf", "val-other-size", "val-empty", "float-labels", "nan-mean",
        "text-version"])
def test_train_refuses_nonsense_in_one_line(tiny_data, tmp_path, flags, edit, message):
    import re

    data = _dataset_copy(tiny_data, tmp_path / "d", edit) if edit else tiny_data
    r = _cli("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TRAIN, *flags)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert re.search(message, r.output), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def _small_prep(d, size):
    prep.run(d, synthetic_jobs(n=40, classes=4, size=size, seed=0, val_fraction=0.25))
    return d


def test_resume_with_data_at_another_size_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert _cli("train", "--data", tiny_data, "--out", out, "--epochs", "1", "--workers", "0", *TRAIN).exit_code == 0
    other = _small_prep(tmp_path / "o", 18)
    r = _cli("train", "--data", other, "--out", out, "--epochs", "2", "--resume")
    assert r.exit_code == 1 and "was trained on images stored at 16 px, --data" in r.output, r.output


# --------------------------------------------------------------------------------- prep folder: hostile file names

def _bomb(path):
    """A PNG header claiming 40000 x 40000 pixels (Pillow refuses it as a decompression bomb)."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_prep_folder_lists_every_odd_entry_one_per_line(tmp_path):
    from PIL import Image

    root = tmp_path / "root"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i + 10, np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (root / "a" / "loop1.png").symlink_to("loop2.png")
    (root / "a" / "loop2.png").symlink_to("loop1.png")
    (root / "b" / "loop").symlink_to("loop")                       # a looping entry among the files
    os.symlink("loopdir", os.path.join(root, "loopdir"))            # and among the class folders
    with open(os.path.join(os.fsencode(root / "b"), b"bad\xff\xfe.png"), "wb") as fh:
        fh.write(b"not an image")
    (root / "b" / "tab\tand\nnewline.png").write_bytes(b"not an image either")
    _bomb(root / "b" / "bomb.png")
    r = _cli("prep", "folder", root, "--out", tmp_path / "out", "--size", "8", "--val-fraction", "0", "-q")
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "out" / "skipped.txt").read_text(encoding="utf-8").splitlines()
    names = {ln.split("\t")[1]: ln.split("\t")[2] for ln in lines}
    assert all(len(ln.split("\t")) == 3 for ln in lines), lines
    assert set(names) == {f"{root}/a/dangling.png", f"{root}/a/loop1.png", f"{root}/a/loop2.png", f"{root}/b/loop",
                          f"{root}/b/bad\\xff\\xfe.png", f"{root}/b/tab\\tand\\nnewline.png", f"{root}/b/bomb.png"}
    assert "No such file" in names[f"{root}/a/dangling.png"] and "symbolic links" in names[f"{root}/a/loop1.png"]
    assert "DecompressionBomb" in names[f"{root}/b/bomb.png"]
    assert "6 images, 7 skipped" in r.output
    os.makedirs(os.path.join(os.fsencode(root), b"cl\xffass"))
    r = _cli("prep", "folder", root, "--out", tmp_path / "out2", "--size", "8")
    assert r.exit_code == 1 and "cl\\xffass: class folder name is not UTF-8" in r.output, r.output


def test_predict_on_a_decompression_bomb_is_one_line(tmp_path):
    r = _cli("predict", _small_checkpoint_for_predict(tmp_path), _bomb(tmp_path / "bomb.png"))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"{tmp_path / 'bomb.png'}: " in r.output and len(r.output.strip().splitlines()) == 1, r.output


def _small_checkpoint_for_predict(tmp_path, classes=tuple("abcd")):
    from cpnet import checkpoint
    from cpnet.model import build_model, make_config

    cfg = make_config("alexnet-tiny", 4, 15, init="he", seed=1)
    ck = checkpoint.Checkpoint(config=cfg, params=build_model(cfg).host_params(), classes=list(classes),
                               mean=np.zeros((16, 16, 3), np.float32), scale=1 / 64, stored_size=16)
    checkpoint.save(tmp_path / "ck.h5", ck)
    return tmp_path / "ck.h5"


@pytest.mark.parametrize("shape,named", [((5, 2, 7, 7), "t0.conv1.W (5, 2, 7, 7)"),
                                         ((3, 3, 3, 2), "t0.conv1.W (3, 3, 3, 2)"),
                                         ((4, 3, 3, 3), "t1.conv1.W (3, 3, 3, 3)")],
                         ids=["channels", "not-square", "towers-differ"])
def test_show_filters_refuses_misshapen_conv1_weights(tmp_path, shape, named):
    from cpnet import checkpoint

    ck = checkpoint.load(_small_checkpoint_for_predict(tmp_path))
    ck.params["t0.conv1.W"] = np.zeros(shape, np.float32)
    checkpoint.save(tmp_path / "w.h5", ck)
    r = _cli("show", "filters", tmp_path / "w.h5", "-o", tmp_path / "f.png")
    name, shown = named.split(" ", 1)
    assert r.exit_code == 1 and f"params/{name} has shape {shown}, expected (F, 3, k, k)" in r.output, r.output
    assert not (tmp_path / "f.png").exists()


def test_bit_flipped_dataset_file_is_one_line_or_reads_as_written(tiny_data, tmp_path):
    from cpnet.data import H5Dataset
    from cpnet.errors import CpnetError

    raw0 = (tiny_data / "val.h5").read_bytes()
    with H5Dataset(tiny_data / "val.h5") as ds:
        want = (ds.labels.copy(), ds.classes, ds.mean.copy())
    rng = np.random.default_rng(2)
    for k, at in enumerate(rng.choice(min(len(raw0), 6000), 40, replace=False)):   # the metadata is up front
        raw = bytearray(raw0)
        raw[at] ^= 1 << int(rng.integers(8))
        bad = tmp_path / f"v{k}.h5"
        bad.write_bytes(bytes(raw))
        try:
            with H5Dataset(bad) as ds:
                got = (ds.labels, ds.classes, ds.mean)
                ds.read(np.arange(ds.n))
        except CpnetError as e:
            assert str(e).startswith(str(bad)) and "\n" not in str(e)
            continue
        assert len(got[0]) == len(want[0])


def test_eval_on_an_empty_file_is_one_line_and_a_huge_batch_is_one_batch(tiny_data, tmp_path):
    from cpnet.data import H5Dataset

    with H5Dataset(tiny_data / "val.h5") as ds:
        ck = _small_checkpoint_for_predict(tmp_path, ds.classes)
    r = _cli("eval", ck, "--data", tiny_data / "val.h5", "--batch-size", "100000000000")
    assert r.exit_code == 0 and "24 images, centre crop: top-1 error" in r.output, r.output
    empty = _dataset_copy(tiny_data, tmp_path / "d", lambda d: _rewrite(d / "val.h5", "labels", np.zeros(0, np.int64))
                          or _rewrite(d / "val.h5", "images", np.zeros((0, 16, 16, 3), np.uint8)))
    r = _cli("eval", ck, "--data", empty / "val.h5")
    assert r.exit_code == 1 and f"{empty / 'val.h5'}: no images to evaluate" in r.output, r.output


def test_read_only_outputs_of_prep_and_show_are_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _mount_tmpfs(ro, "1m"):
        pytest.skip("cannot mount a read-only file system here")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    try:
        ck = _small_checkpoint_for_predict(tmp_path)
        for args, words in ((["prep", "synthetic", "--out", ro / "d", "--n", "50", "--size", "16", "-q"],
                             f"{ro / 'd'}: read-only file system while creating the output folder"),
                            (["prep", "synthetic", "--out", ro, "--n", "50", "--size", "16", "-q"],
                             f"{ro}: read-only file system while creating its lock file"),
                            (["show", "filters", ck, "-o", ro / "f.png"],
                             f"{ro / 'f.png'}: read-only file system while creating a temporary file")):
            r = _cli(*args)
            assert r.exit_code == 1 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    finally:
        subprocess.run(["umount", "-l", str(ro)])
