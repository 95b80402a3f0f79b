"""Interrupts: Ctrl-C (SIGINT) and SIGTERM stop a command cleanly, with one line and exit 130/143.

Both signals raise an exception in the main thread, so the shard in flight is abandoned: its temp
file is removed on the way out (see `magpie.store`), committed shards stay, locks are released,
and running the same command again resumes after the last commit. SIGTERM is what schedulers,
`kill` and Ray send; it becomes `Terminated`, a KeyboardInterrupt, so every cleanup path that
handles Ctrl-C handles it too.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

INTERRUPTED_LINE = "interrupted: resume with the same command (committed shards are kept)"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (exit status 143)."""

    exit_code = 143


_pending: list[type[KeyboardInterrupt]] = []
"""Interrupts that arrived. One raised inside a ctypes callback would be printed and dropped by
ctypes, so there it is only recorded, and `raise_pending` raises it at the next safe point."""
CALLBACK_FILES = ("llama_cpp/_logger.py",)
"""Python code llama.cpp calls back into while it works (llama-cpp-python's log callback)."""


def _in_callback(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith(CALLBACK_FILES):
            return True
        frame = frame.f_back
    return False


def _interrupt(kind: type[KeyboardInterrupt], frame: FrameType | None) -> None:
    _pending.append(kind)
    if not _in_callback(frame):
        raise kind()


def _on_sigint(_signum: int, frame: FrameType | None) -> None:
    _interrupt(KeyboardInterrupt, frame)


def _on_sigterm(_signum: int, frame: FrameType | None) -> None:
    _interrupt(Terminated, frame)


def raise_pending() -> None:
    """Raise the interrupt that arrived, if any: long loops call this at safe points, so a
    signal that came during a callback (or whose raise a callback swallowed) stops the command."""
    if _pending:
        raise _pending[0]()


Handlers = tuple[Any, Any]


def install() -> Handlers | None:
    """Route SIGINT and SIGTERM to exceptions (main thread only); return the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    _pending.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def restore(previous: Handlers | None) -> None:
    """Put back the handlers `install` replaced (for commands run inside another program)."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        _pending.clear()


def quiet() -> None:
    """Ignore further SIGINT/SIGTERM while a command winds down after the first one."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (128 + the signal number, as shells report them)."""
    return getattr(exc, "exit_code", 130)
