"""The `magpie` entry point: runs the CLI in a child process and explains native crashes.

A segfault or illegal instruction inside llama.cpp, torch or vLLM kills the process before
Python can say anything; the user would see a bare "Segmentation fault" or a hang. The parent
process here starts the real CLI as a child, forwards the signals a user or scheduler sends
(SIGINT, SIGTERM, SIGHUP), and when the child dies of a fatal signal prints one line naming the
engine setting to change, and exits 2. Committed shards are on disk either way.

The child dies with the parent (Linux `PR_SET_PDEATHSIG`), so `kill -9` of `magpie` stops the
run as before. `MAGPIE_NO_SUPERVISOR=1` runs the CLI in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_CHILD = "MAGPIE_SUPERVISED"
ENV_DISABLE = "MAGPIE_NO_SUPERVISOR"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WAITED = (*FORWARDED, signal.SIGCHLD)
FATAL = {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}
SI_KERNEL = 0x80
"""si_code of a signal the kernel sent, e.g. Ctrl-C from the terminal to the foreground group
(the child is in that group and got it too, so it is not forwarded a second time)."""


def main() -> None:
    """Console-script entry point."""
    if (
        os.environ.get(ENV_CHILD)
        or os.environ.get(ENV_DISABLE)
        or not sys.platform.startswith("linux")
    ):
        run_in_process()
        return
    sys.exit(supervise(sys.argv[1:]))


def run_in_process() -> None:
    """The real CLI, in this process."""
    if os.environ.get(ENV_CHILD):
        _die_with_parent()
        _keep_native_crash_log()
    from magpie.cli import app

    app(prog_name="magpie")


def supervise(args: list[str]) -> int:
    """Run `magpie ARGS` as a child; return the exit code the user should see."""
    return supervise_command([sys.executable, "-m", "magpie", *args])


def supervise_command(command: list[str]) -> int:
    """Run `command` (the CLI) as a child; explain a native crash; return the exit code."""
    with tempfile.NamedTemporaryFile("r", prefix="magpie-crash-", suffix=".jsonl") as note:
        env = {**os.environ, ENV_CHILD: "1", "MAGPIE_CRASH_NOTE": note.name}
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
        child = subprocess.Popen(command, env=env)
        code = _wait(child)
        if code < 0:
            return _explain(-code, _notes(Path(note.name)))
        _crash_log_path(os.getpid()).unlink(missing_ok=True)  # nothing crashed: no log to keep
        return code


def _wait(child: subprocess.Popen[bytes]) -> int:
    """Wait for the child, forwarding signals that were sent to this process alone."""
    while True:
        info = signal.sigtimedwait(WAITED, 1.0)
        forward = info is not None and info.si_signo in FORWARDED
        if forward and not (info.si_signo == signal.SIGINT and info.si_code == SI_KERNEL):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(info.si_signo)
        code = child.poll()
        if code is not None:
            return code


def _notes(path: Path) -> list[dict[str, str]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _explain(number: int, notes: list[dict[str, str]]) -> int:
    """One line for a child killed by signal `number`; the exit code to return."""
    from magpie.engines.llamacpp_runtime import record_crash, signal_name

    name = signal_name(number)
    if number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        print(f"magpie: interrupted ({name}): rerun the same command to resume", file=sys.stderr)
        return 128 + number
    if number == signal.SIGKILL:
        print(
            "magpie: killed (SIGKILL; out of memory?): committed shards are kept; lower the "
            "engine batch size or --shard-size and rerun the same command",
            file=sys.stderr,
        )
        return 128 + number
    log = _crash_log()
    where = f" (native traceback: {log})" if log else ""
    llama = [n for n in notes if n.get("engine") == "llamacpp"]
    if number in FATAL and llama:
        last = llama[-1]
        nxt = record_crash(last["key"], last["runtime"], name) if last.get("key") else None
        if nxt:
            fix = f"rerun the same command: magpie now uses runtime {nxt}"
        else:
            fix = "set MAGPIE_LLAMACPP_RUNTIME=single-token (or engine option runtime) and rerun"
        print(
            f"magpie: the llama.cpp engine crashed ({name}) with runtime {last['runtime']}: "
            f"{fix}; committed shards are kept{where}",
            file=sys.stderr,
        )
        return 2
    print(
        f"magpie: the process crashed in native code ({name}): committed shards are kept; "
        f"check the engine settings (--engine, model, dtype) and rerun{where}",
        file=sys.stderr,
    )
    return 2


def _crash_log_path(supervisor_pid: int) -> Path:
    from magpie.cache import cache_root

    return cache_root() / "logs" / f"native-crash-{supervisor_pid}.log"


def _crash_log() -> Path | None:
    """The child's fault-handler log, if it wrote anything."""
    path = _crash_log_path(os.getpid())
    return path if path.is_file() and path.stat().st_size else None


def _keep_native_crash_log() -> None:
    """In the child: Python's fault handler writes where a native crash happened to a log file
    (named after the supervisor's pid), not to the user's terminal."""
    import faulthandler

    try:
        path = _crash_log_path(os.getppid())
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w")  # noqa: SIM115 - must stay open for the fault handler
    except OSError:
        return
    faulthandler.enable(file=handle, all_threads=True)
    _KEEP.append(handle)


_KEEP: list[object] = []


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the supervisor dies, and take signals normally again."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(137)
