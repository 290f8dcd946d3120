"""Files that must survive faults: folder locks, write errors as one line, HDF5 files abandoned after one.

- `FolderLock(folder, what)`: an exclusive `fcntl.flock` on `folder/.cpnet.lock` for as long as it is held; a
  second holder is refused with the first one's PID and command. The kernel drops the lock when its holder
  dies, however it dies, so a killed run never leaves a stale lock behind (the file itself stays; it is only
  the lock's anchor).
- `write_error(path, e, doing)`: an OSError met while writing `path`, as a CpnetError of one line (a full disk
  says so, and what to do).
- `abandon_h5(f)`: close an h5py file after a failed write without letting HDF5 retry the writes. After an
  ENOSPC, HDF5 keeps dirty metadata it can no longer write; closing it (or the interpreter's exit) retries, fails
  again, and HDF5's cleanup has crashed the process (segmentation fault). Pointing the file's descriptor at
  /dev/null first lets the close finish; what reaches the file on disk is what was written before the failure.
"""

from __future__ import annotations

import errno
import os
import sys

from .errors import CpnetError

LOCK_NAME = ".cpnet.lock"

_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or an h5py error whose message carries the errno) means no space or quota left."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    msg = str(e)
    return any(f"errno = {n}," in msg for n in _FULL) or "No space left on device" in msg


def write_error(path, e: BaseException, doing: str = "writing", then: str = "") -> CpnetError:
    """A CpnetError of one line for an OSError met while writing `path`."""
    if is_disk_full(e):
        why = "no space left on the device"
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror[0].lower() + e.strerror[1:]
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CpnetError(f"{os.fspath(path)}: {why} while {doing}" + (f"; {then}" if then else ""))


def abandon_h5(f) -> None:
    """Close h5py file `f` after a failed write, discarding what HDF5 still holds unwritten (see module doc)."""
    try:
        fd = f.id.get_vfd_handle()
    except Exception:
        fd = None
    if isinstance(fd, int) and fd >= 0:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    try:
        f.close()
    except Exception:
        pass


class FolderLock:
    """Exclusive lock on a folder for the life of a run (`with FolderLock(out, "cpnet train"):`).

    Refused (CpnetError naming the folder and the holder's PID and command) when another process holds it.
    A folder the lock had to create is removed again on release when nothing but the lock file is in it (a run
    that failed its checks leaves no empty folder behind).
    """

    def __init__(self, folder, what: str):
        self.folder, self.what = os.fspath(folder), what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd = None
        self._made = False

    def acquire(self):
        import fcntl

        try:
            self._made = not os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.folder, e, "creating its lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise write_error(self.path, e, "locking it") from None
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            self._made = False
            raise CpnetError(f"{self.folder}: in use by another process ({holder or 'unknown'}); wait for it to "
                             f"finish or stop it (two runs must not write one folder)") from None
        try:
            os.ftruncate(fd, 0)
            argv = list(sys.argv)
            if argv and os.path.basename(argv[0]) in ("cpnet", "__main__.py"):
                argv[0] = "cpnet"
            note = f"pid {os.getpid()}, {self.what}: {' '.join(argv)}"
            os.pwrite(fd, note.encode("utf-8", "replace")[:4000] + b"\n", 0)
        except OSError:
            pass   # the lock holds without the note (a full disk may refuse it)
        self._fd = fd
        return self

    def release(self):
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            if self._made and os.listdir(self.folder) == [LOCK_NAME]:
                os.unlink(self.path)
                os.rmdir(self.folder)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
