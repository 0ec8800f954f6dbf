"""Advisory locks on local state that die with their process: state-directory owners, cache versions.

flock(2) locks belong to an open file, so the kernel drops them when the process holding them exits,
however it exits: kill -9 leaves a lock file behind but no lock, and nothing is ever deleted by hand.
One catch: a forked child shares its parent's open files (hivemind forks its DHT process), and a
lock stays held while any copy is open, so a child could keep a dead parent's lock alive. Every
lock's descriptor is therefore closed in forked children (`os.register_at_fork`); exec'd children
never get it (the descriptor is close-on-exec).
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

_OPEN: set[int] = set()  # this process's lock descriptors


def _close_in_child() -> None:
    for fd in _OPEN:
        try:
            os.close(fd)
        except OSError:
            pass
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FileLock:
    """One lock file, held shared or exclusive by this object until `release` (or process exit)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, exclusive: bool = True, wait: bool = True, stop: Callable[[], bool] = lambda: False,
                poll_s: float = 0.05) -> bool:
        """Take the lock; False only when `wait` is False and another process holds it.

        While waiting, `stop()` is asked between tries (InterruptedError when it says so). A held
        exclusive lock is downgraded to shared in place (nobody can take it in between); a held shared
        lock is released before an exclusive one is waited for (two processes upgrading at once
        would otherwise wait for each other). After False or an exception nothing is held.
        """
        if exclusive:
            self.release()
        fd = self._fd
        if fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            _OPEN.add(fd)
        self._fd = None
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        try:
            while True:
                try:
                    fcntl.flock(fd, op)
                    self._fd = fd
                    return True
                except BlockingIOError:
                    if not wait:
                        self._close(fd)
                        return False
                    if stop():
                        raise InterruptedError(f"stopped while waiting for the lock {self.path}") from None
                    time.sleep(poll_s)
                    poll_s = min(poll_s * 1.5, 0.5)
        except BaseException:
            self._close(fd)
            raise

    def write_note(self, text: str) -> None:
        """Replace the lock file's contents (who holds it); only while holding it exclusively."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._close(fd)

    @staticmethod
    def _close(fd: int) -> None:
        _OPEN.discard(fd)
        os.close(fd)  # closing the only descriptor of the open file drops its lock

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *_) -> None:
        self.release()


class StateDirInUse(ValueError):
    """Another live process owns the state directory (a user mistake: one line, exit 2 from the CLI)."""


STATE_LOCK = ".lock"


def hold_state_dir(directory: Path, what: str) -> FileLock:
    """Make this process the one owner of `directory` (created if missing) until it exits or releases.

    A second owner is refused at once with StateDirInUse naming the directory and the holder's pid;
    nothing in the directory is changed by a refused caller.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = FileLock(directory / STATE_LOCK)
    if not lock.acquire(exclusive=True, wait=False):
        raise StateDirInUse(f"state directory {directory} is in use by {_holder(lock.path)}; stop that process "
                            f"first, or give this {what} a state directory of its own")
    lock.write_note(f"{os.getpid()} {what}\n")
    make_private(directory)
    return lock


def make_private(directory: Path) -> None:
    """Only this user may read what is in `directory` (its held-out split, ledger and keys among it).

    The directory becomes 0700 and every file in it loses its group and other bits (0644 -> 0600),
    so a state directory made by an older version is tightened too; and this process creates files
    0600 and folders 0700 from now on (umask 077), wherever it writes them.
    """
    os.umask(0o077)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o700)
    os.chmod(directory, 0o700)


def refuse_if_held(directory: Path, what: str) -> FileLock | None:
    """For a command that writes into `directory` only if it might be a state directory: hold its lock
    for the write when the directory has one (StateDirInUse while an owner runs), else do nothing."""
    if not (Path(directory) / STATE_LOCK).is_file():
        return None
    return hold_state_dir(directory, what)


def _holder(path: Path) -> str:
    """'process <pid> (<what>)' from the lock file, which the holder writes right after locking."""
    for _ in range(20):
        try:
            note = path.read_text().split(maxsplit=1)
        except OSError:
            note = []
        if note and note[0].isdigit():
            return f"process {note[0]}" + (f" ({note[1].strip()})" if len(note) > 1 else "")
        time.sleep(0.05)  # the holder is between taking the lock and writing its pid
    return "another process"
