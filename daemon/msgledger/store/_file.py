"""The store's files as the writer holds them: created private, locked for one daemon, and
checked to still be the files their names lead to.

The lock is `flock` on an fd of the database file itself rather than on a `<store>.lock`
beside it: it then guards the very inode SQLite writes, and there is no second file to
create, keep private, or leave behind (a stale or deleted lock file could keep the next
daemon out, or let a second one in). Readers never take it. On Linux `flock` locks and
the POSIX record locks SQLite takes do not interact, with one caution: closing *any* fd of
a file drops every POSIX lock the process holds on it, SQLite's included, so these fds are
closed only after SQLite's connection.

Holding the fds open also pins the inodes: while they are open their numbers cannot be
given to new files, so "same device and inode as the fd" does mean "the same file".
"""

from __future__ import annotations

import fcntl
import os
import stat

PRIVATE = 0o600  # the store holds phone numbers, bodies and replayable signatures

_Identity = tuple[int, int]  # st_dev, st_ino


class StoreError(Exception):
    """The store cannot be used; says which path and why, in one line."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StoreLost(StoreError):
    """A file the writer holds no longer has the store's name (removed, or another file
    renamed over it): nothing committed to it can be read back. Raised for every batch
    from then on until a restart; `first` only the first time."""

    def __init__(self, path: str, reason: str, *, first: bool) -> None:
        super().__init__(path, reason)
        self.first = first


class HeldFiles:
    """The database file (created 0600 and locked), then the WAL beside it, each held open
    with the identity its name must keep."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fds = [fd]
        # (name, what it is in a message, the identity it must keep)
        self._names = [(path, "it", _identity(os.fstat(fd)))]

    @classmethod
    def open(cls, path: str) -> HeldFiles:
        """Open (or create, 0600 whatever the umask) and lock the file at `path`;
        StoreError if it cannot be, or another daemon holds it."""
        fd = _open_private(path)
        try:
            _lock(path, fd)
        except BaseException:
            os.close(fd)  # no SQLite connection yet: no POSIX lock to lose
            raise
        return cls(path, fd)

    def watch(self, name: str, what: str) -> None:
        """Hold `name` (`what`: SQLite's WAL, once it exists) and check it from now on."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise StoreError(self.path, f"cannot open {what}: {error.strerror}") from None
        self._fds.append(fd)
        self._names.append((name, what, _identity(os.fstat(fd))))

    def moved(self) -> str | None:
        """Why a name no longer leads to the file held, or None while every one does.
        One stat(2) per file: this runs once per committed batch."""
        for name, what, held in self._names:
            try:
                found = os.stat(name)
            except OSError as error:
                return f"{what} was removed ({error.strerror})"
            if _identity(found) != held:
                return f"{what} was replaced by another file"
        return None

    def close(self) -> None:
        """Let the files go (and the lock); call after SQLite's connection is closed."""
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()


def _identity(found: os.stat_result) -> _Identity:
    return found.st_dev, found.st_ino


def _open_private(path: str) -> int:
    """An fd of the regular file at `path`, created 0600 if missing (or empty: a new store
    too). O_CREAT's mode is only narrowed by the umask, never widened, and SQLite gives its
    -wal and -shm the mode of the database file. A store with content keeps its mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE)
    except IsADirectoryError:
        raise StoreError(path, "it is a directory, not a file") from None
    except OSError as error:
        raise StoreError(path, _cannot_open(path, error)) from None
    try:
        _check_new_or_regular(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_new_or_regular(path: str, fd: int) -> None:
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        raise StoreError(path, "not a regular file")
    if found.st_size == 0:
        try:
            os.fchmod(fd, PRIVATE)
        except OSError as error:
            raise StoreError(path, f"cannot make it private: {error.strerror}") from None


def _cannot_open(path: str, error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return f"cannot create it: no directory {os.path.dirname(os.path.abspath(path))}"
    return f"cannot open it for writing: {error.strerror}"


def _lock(path: str, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(path, "in use by another msgledger run (it holds the lock)") from None
    except OSError as error:
        raise StoreError(path, f"cannot lock it: {error.strerror}") from None
