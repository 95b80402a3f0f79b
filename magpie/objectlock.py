"""One writer per dataset on an object store: a lock object with the holder and a heartbeat.

An object store has no `flock` and no process table, so `D/.magpie/lock` there is an object
holding the holder's pid, host, command, a random token and a heartbeat time that a thread of
the holder refreshes every `stale_after / 4` seconds. Another writer is refused while the
heartbeat is fresh; a lock whose heartbeat is older than `stale_after` (default 120 s,
`MAGPIE_LOCK_STALE_S`), or whose pid is gone on this same host, is taken over with a warning.

Where the store offers conditional writes (S3: `If-None-Match: *` to create, `If-Match: ETAG`
to take over or refresh), two writers racing for the lock cannot both win. Elsewhere the lock is
written, read back and kept only if it still holds our token, which narrows the race but cannot
close it. What no object store can give: a holder that stalls longer than `stale_after` (a paused
machine) can be taken over while it still runs. It notices at its next heartbeat and stops before
its next commit, but a commit already in flight can still land; shard contents depend only on
the configuration, so such a shard holds the same rows the new holder writes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from magpie.errors import MagpieError
from magpie.fs import RemotePath


def stale_after() -> float:
    return float(os.environ.get("MAGPIE_LOCK_STALE_S", "120"))


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def read_lock(path: RemotePath) -> tuple[str | None, dict[str, Any] | None]:
    """(ETag or None, holder or None); the tag is read first, so a put conditional on it fails
    when the object changed after the holder was read."""
    try:
        etag = path.fs.info(path.path).get("ETag")
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    if not data.strip():
        return etag or "", None
    try:
        holder = json.loads(data)
    except ValueError:
        return etag or "", {"pid": "?", "host": "?", "command": "unreadable lock object"}
    return etag or "", holder if isinstance(holder, dict) else None


def _put(path: RemotePath, holder: dict[str, Any], etag: str | None) -> None:
    """Create the lock (etag None) or replace the version we read (etag set), conditionally
    where the store can; raises FileExistsError/OSError when another writer got there first."""
    data = json.dumps(holder).encode() + b"\n"
    if not _is_s3(path.fs):
        path.write_bytes(data)
    elif etag is None:
        path.fs.pipe_file(path.path, data, mode="create")
    elif etag:
        path.fs.pipe_file(path.path, data, IfMatch=etag)
    else:
        path.fs.pipe_file(path.path, data)


def is_alive(holder: dict[str, Any], host: str) -> bool:
    """A holder whose heartbeat is fresh and whose pid (on this host) still runs."""
    from magpie.locking import _pid_alive

    pid = holder.get("pid")
    same_host = holder.get("host") == host and isinstance(pid, int)
    if same_host and (pid == os.getpid() or not _pid_alive(pid)):
        return False  # a lock this process left, or one of a dead process
    beat = holder.get("heartbeat") or holder.get("started") or 0
    limit = holder.get("stale_after", stale_after())
    return isinstance(beat, int | float) and time.time() - beat < float(limit)


def holder_of(root: RemotePath) -> dict[str, Any] | None:
    """Who holds the lock of `root` now (None when free or stale)."""
    _, holder = read_lock(root / ".magpie" / "lock")
    if holder is None or not is_alive(holder, socket.gethostname()):
        return None
    return holder


@dataclass
class ObjectLock:
    """The write lock of one dataset prefix on an object store; see `acquire`."""

    root: RemotePath
    path: RemotePath
    holder: dict[str, Any]
    depth: int = 1
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="magpie-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        every = float(self.holder["stale_after"]) / 4
        while not self._stop.wait(every):
            try:
                etag, current = read_lock(self.path)
                if self._stop.is_set():
                    return
                if current is None or current.get("token") != self.holder["token"]:
                    from magpie.locking import describe_holder

                    self.lost = describe_holder(current) if current else "nobody (deleted)"
                    return
                self.holder["heartbeat"] = time.time()
                _put(self.path, self.holder, etag)
            except Exception:  # noqa: BLE001 - a transient store error: the next beat retries
                continue

    def check(self) -> None:
        """Raise when another writer took the lock over (we stalled past `stale_after`)."""
        if self.lost is not None:
            raise MagpieError(
                f"the write lock of {self.root} was taken over by {self.lost} while this run "
                "stalled: stopping before the next commit; committed shards are kept"
            )

    def release(self) -> None:
        """Stop the heartbeat, then delete the lock object if it is still ours."""
        from magpie.locking import _HELD

        _HELD.pop(self.path, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            _, current = read_lock(self.path)
            if current is not None and current.get("token") == self.holder["token"]:
                self.path.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - a lock we cannot delete goes stale on its own
            pass


def acquire(root: RemotePath, command: str) -> ObjectLock:
    """Take the write lock of `root`, or raise a MagpieError naming the live holder."""
    from magpie.locking import _HELD, describe_holder, warn

    path = root / ".magpie" / "lock"
    held = _HELD.get(path)
    if held is not None:
        held.depth += 1
        return held  # type: ignore[return-value]
    host = socket.gethostname()
    limit = stale_after()
    for _ in range(5):
        etag, previous = read_lock(path)
        if previous is not None and is_alive(previous, host):
            age = time.time() - float(previous.get("heartbeat") or previous.get("started") or 0)
            raise MagpieError(
                f"{root} is being written by {describe_holder(previous)}, alive {age:.0f} s ago: "
                "wait for it to finish, or use another --out (a lock not refreshed for "
                f"{previous.get('stale_after', limit):.0f} s is taken over)"
            )
        now = time.time()
        holder = {
            "pid": os.getpid(),
            "host": host,
            "started": now,
            "heartbeat": now,
            "stale_after": limit,
            "command": command,
            "token": uuid.uuid4().hex,
        }
        try:
            _put(path, holder, etag)
        except (FileExistsError, OSError):
            continue  # another writer changed the lock between our read and our put
        _, current = read_lock(path)
        if current is None or current.get("token") != holder["token"]:
            continue
        if previous is not None and not (
            previous.get("pid") == os.getpid() and previous.get("host") == host
        ):
            warn(f"taking over the stale lock of {root} left by {describe_holder(previous)}")
        lock = ObjectLock(root=root, path=path, holder=holder)
        _HELD[path] = lock
        lock.start()
        return lock
    raise MagpieError(f"{root}: another writer keeps taking its write lock: rerun in a moment")
