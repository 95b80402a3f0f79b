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


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


Handlers = tuple[Any, Any]


def install() -> Handlers | None:
    """Route SIGINT and SIGTERM to exceptions (main thread only); return the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def restore(previous: Handlers | None) -> None:
    """Put back the handlers `install` replaced (for commands run inside another program)."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def quiet() -> None:
    """Ignore further SIGINT/SIGTERM while a command winds down after the first one."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (128 + the signal number, as shells report them)."""
    return getattr(exc, "exit_code", 130)
