"""One writer per dataset: a lock file with the holder's identity, plus an OS lock while held.

`D/.magpie/lock` holds one JSON line (pid, host, start time, command) while a process writes `D`,
and that process keeps an exclusive `flock` on it. A second writer is refused with the holder
named. A lock is stale when its flock is free (the holder exited or was killed: the OS dropped
the flock) or when its pid no longer lives on this host; a stale lock is taken over with a
warning. Releasing empties the file but never deletes it, so two processes can never hold
flocks on two different files of the same name.

On an object store (`s3://...`) the lock is an object with a heartbeat instead: see
magpie.objectlock.

Locks are re-entrant within a process (a resumed stage in the same process reuses the lock it
holds) and every lock still held is released when the process exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from magpie.errors import MagpieError
from magpie.fs import RemotePath, as_path

LOCK_NAME = "lock"
F = TypeVar("F", bound=Callable[..., Any])


def warn(message: str) -> None:
    """One warning line on stderr (kept out of stdout, which may be piped)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_line() -> str:
    if not sys.argv:
        return "python"
    name = Path(sys.argv[0]).name
    if name in ("__main__.py", "magpie"):  # `python -m magpie` or the console script
        name = "magpie"
    return " ".join([name, *sys.argv[1:]])[:300]


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 on host h since 14:02:11 (magpie instructions ...)'."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    command = holder.get("command") or "?"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when} ({command})"
    )


@dataclass
class DatasetLock:
    """An exclusive lock on one dataset directory; use `acquire` to get one."""

    root: Path
    path: Path
    fd: int
    holder: dict[str, Any]
    os_locked: bool
    depth: int = 1

    def check(self) -> None:
        """A local lock cannot be lost while held (the OS keeps the flock)."""

    def release(self) -> None:
        """Empty the lock file and drop the OS lock (the file itself stays)."""
        _HELD.pop(self.path, None)
        try:
            if self._still_ours():
                os.ftruncate(self.fd, 0)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                if self.os_locked:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)

    def _still_ours(self) -> bool:
        current = _read_holder(self.fd)
        return current is None or current.get("pid") == self.holder["pid"]


_HELD: dict[Any, Any] = {}  # lock path -> DatasetLock, or ObjectLock on an object store


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return {"pid": "?", "host": "?", "command": "unreadable lock file"}
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode() + b"\n")
    os.fsync(fd)


def acquire(root: Path | RemotePath | str, command: str | None = None) -> Any:
    """Lock dataset directory `root` for writing, or raise a MagpieError naming the holder."""
    root = as_path(root)
    if isinstance(root, RemotePath):
        from magpie import objectlock

        return objectlock.acquire(root, command or _command_line())
    meta = root / ".magpie"
    meta.mkdir(parents=True, exist_ok=True)
    path = (meta / LOCK_NAME).resolve()
    held = _HELD.get(path)
    if held is not None:
        held.depth += 1
        return held
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os_locked = _try_flock(fd)
        previous = _read_holder(fd)
        host = socket.gethostname()
        if not os_locked:
            dead_here = (
                previous is not None
                and previous.get("host") == host
                and isinstance(previous.get("pid"), int)
                and not _pid_alive(previous["pid"])
            )
            if not dead_here:
                who = describe_holder(previous) if previous else "another process"
                raise MagpieError(
                    f"{root} is being written by {who}: wait for it to finish, or use another "
                    f"--out (if that process is gone, delete {path})"
                )
        if previous is not None and previous.get("pid") != os.getpid():
            warn(f"taking over the stale lock of {root} left by {describe_holder(previous)}")
        holder = {
            "pid": os.getpid(),
            "host": host,
            "started": time.time(),
            "command": command or _command_line(),
        }
        _write_holder(fd, holder)
    except BaseException:
        os.close(fd)
        raise
    lock = DatasetLock(root=root, path=path, fd=fd, holder=holder, os_locked=os_locked)
    _HELD[path] = lock
    return lock


def _try_flock(fd: int) -> bool:
    """True when we now hold the OS lock; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True  # no OS locks on this filesystem: the pid/host record decides alone
        raise
    return True


def release(lock: Any) -> None:
    """Drop one hold of `lock`; the last one releases it."""
    lock.depth -= 1
    if lock.depth <= 0:
        lock.release()


def release_all() -> None:
    """Release every lock this process holds (at exit, or when a command ends)."""
    for lock in list(_HELD.values()):
        lock.release()


@contextlib.contextmanager
def locked(root: Path | RemotePath | str, command: str | None = None) -> Iterator[Any]:
    """`with locked(D): ...` holds the write lock of `D` for the block."""
    lock = acquire(root, command)
    try:
        yield lock
    finally:
        release(lock)


def holder_of(root: Path | RemotePath | str) -> dict[str, Any] | None:
    """Who holds the lock of `root` now (None when free or stale)."""
    root = as_path(root)
    if isinstance(root, RemotePath):
        from magpie import objectlock

        return objectlock.holder_of(root)
    path = root / ".magpie" / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd) or {"pid": "?", "host": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


atexit.register(release_all)


def releasing(func: F) -> F:
    """Decorator: locks taken during the call are released when it returns or raises."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return func(*args, **kwargs)
        finally:
            for path in set(_HELD) - before:
                lock = _HELD.get(path)
                if lock is not None:
                    lock.release()

    return wrapper  # type: ignore[return-value]
