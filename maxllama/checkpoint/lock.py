"""One process at a time per run directory: `RUN_DIR/run.lock`, taken before anything there is read or written.

The lock is an exclusive `flock` on the file, so the kernel drops it the moment its holder dies, however it
dies; the file also says who holds it (host, pid, since when) for the message a second process prints. A
released lock leaves the file empty; a file that still names a holder but can be locked belongs to a process
that died, and is taken over with a notice. Where the filesystem has no `flock` (some network mounts), the
holder's pid is checked on the same host, and a lock held from another host is left for a person to clear.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

from maxllama.base.errors import UserError
from maxllama.parallel.distributed import agree

LOCK_FILE = "run.lock"


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used (held by another process, not writable); the message says why."""


class RunLocked(RunDirError):
    """Another process holds the run directory; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


class RunLock:
    """Held from `acquire()` to `release()` (or the holder's death)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot use the run directory {self.path.parent}: {e.strerror}") from None
        try:
            holder = self._read(fd)
            if not self._flock(fd, holder):
                elsewhere = (f"; if that process is gone, delete {self.path}"
                             if holder.get("host") != socket.gethostname() else "")
                raise RunLocked(f"{self.path.parent} is in use by {_describe(holder)}: one run directory trains "
                                f"in one process at a time. Wait for it to finish or stop it, or pick another "
                                f"run.dir{elsewhere}")
            if holder:
                log(f"notice: took over the lock of {self.path.parent} from {_describe(holder)}, which is no "
                    f"longer running")
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # empty: released cleanly, nobody to take over from
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (ValueError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _flock(fd: int, holder: dict) -> bool:
        """Whether this process now holds the lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # No flock here: trust the recorded holder while it can be seen to live.
        if not holder:
            return True
        if holder.get("host") == socket.gethostname():
            return holder.get("pid") == os.getpid() or not _pid_alive(int(holder.get("pid", 0)))
        return False


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, *, primary: bool = True, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's lock for the block. In a multi-host job process 0 takes it and the others wait
    for the outcome, so every process refuses together when the directory is in use."""
    lock, refusal = RunLock(run_dir), None
    if primary:
        try:
            lock.acquire(log)
        except RunDirError as e:
            refusal = e
    (refused,) = agree(refusal is not None)
    if refused:
        raise refusal or RunLocked(f"{run_dir}: process 0 could not take the run directory's lock (see its error)")
    try:
        yield
    finally:
        lock.release()
