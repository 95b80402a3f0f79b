"""Which llama.cpp configuration is safe, and fastest, on this CPU: found once by a probe.

Some llama.cpp builds crash in native code on some CPUs (on Intel Xeons with AMX, the AMX
matrix kernel segfaults on every decode batch of two or more tokens when its tile configuration
was compiled away; see `make llama-cpp`, which builds a patched wheel). A crash inside the
process cannot be caught, so before the first use of a (CPU, llama.cpp build, model) triple we
decode a multi-token batch and a two-sequence batch in a *subprocess* for each configuration,
fastest first, and keep the first that exits cleanly. The answer is cached in
`~/.cache/magpie/llamacpp-runtime.json`; a crash seen later in a real run (reported by the
supervisor, `magpie/supervisor.py`) marks that configuration unsafe so the next run moves on.

Configurations, fastest first:
- `native`: llama.cpp's defaults (weights repacked for AMX / AVX-512 kernels, batched prompts).
- `no-repack`: weights stay in plain CPU buffers (no AMX, no repacked kernels); batches still work.
- `single-token`: every decode call holds one token (the AMX kernel's one-row path); no batching.

`MAGPIE_LLAMACPP_RUNTIME=native|no-repack|single-token` (or the engine option `runtime`) skips
the probe and forces one; `auto` (the default) probes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from magpie.cache import cache_root
from magpie.cpu import cpu_facts
from magpie.errors import MagpieError

ENV_RUNTIME = "MAGPIE_LLAMACPP_RUNTIME"
ENV_SIMULATE_CRASH = "MAGPIE_LLAMACPP_SIMULATE_CRASH"
"""Test hook: comma-separated runtime names whose probe subprocess kills itself with SIGSEGV, so
the fallback path runs on CPUs where nothing crashes."""
ENV_CRASH_NOTE = "MAGPIE_CRASH_NOTE"
"""Set by the supervisor: a file where the process notes the native configuration it runs."""
PROBE_TIMEOUT_S = 180


@dataclass(frozen=True)
class LlamaRuntime:
    """One way to run llama.cpp: constructor kwargs, model-parameter overrides, batch limit."""

    name: str
    description: str
    llama_kwargs: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    max_batch_tokens: int = 512
    """Never put more tokens than this in one `llama_decode` (1: no multi-token batches)."""
    reason: str = ""
    """How it was chosen (probe results, forced by the environment or an engine option)."""

    def chosen(self, reason: str) -> LlamaRuntime:
        return LlamaRuntime(**{**asdict(self), "reason": reason})

    def server_args(self) -> list[str]:
        """Flags that give llama-cpp-python's server the same safety (it has no repack switch)."""
        return [] if self.name == "native" else ["--n_batch", "1"]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_batch_tokens": self.max_batch_tokens, "reason": self.reason}


RUNTIMES: dict[str, LlamaRuntime] = {
    rt.name: rt
    for rt in (
        LlamaRuntime("native", "llama.cpp defaults: repacked weights (AMX/AVX-512), batched"),
        LlamaRuntime(
            "no-repack",
            "weights in plain CPU buffers (no AMX, no repacked kernels), batched",
            model_params={"use_extra_bufts": False},
        ),
        LlamaRuntime(
            "single-token",
            "one token per decode call (no batches): slow prompts, no sequence batching",
            llama_kwargs={"n_batch": 1, "n_ubatch": 1},
            max_batch_tokens=1,
        ),
    )
}


def fixed_threads() -> int | None:
    """$MAGPIE_N_THREADS when set: the user's choice, never adapted."""
    return int(os.environ.get("MAGPIE_N_THREADS") or 0) or None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _others_running() -> int | None:
    """Threads of other processes that are runnable now: the kernel's `procs_running` less this
    process's own running threads (llama.cpp's workers spin, so they count while busy)."""
    try:
        stat = Path("/proc/stat").read_text()
        total = next(
            int(line.split()[1]) for line in stat.splitlines() if line.startswith("procs_running")
        )
        ours = 0
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                ours += state == "R"
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, total - ours)


def free_cores(samples: int = 3, gap_s: float = 0.005) -> int:
    """Cores not taken by other processes now (median of a few samples; all of them where the
    kernel does not say)."""
    cores = usable_cores()
    seen = []
    for i in range(samples):
        if i:
            time.sleep(gap_s)
        others = _others_running()
        if others is None:
            return cores
        seen.append(others)
    return max(1, cores - sorted(seen)[len(seen) // 2])


def default_threads() -> int:
    """Threads for llama.cpp: $MAGPIE_N_THREADS, else the cores other processes leave free.
    On a busy machine fewer threads than cores is much faster: llama.cpp's threads spin-wait
    for each other, so one that is descheduled stalls the rest."""
    return fixed_threads() or free_cores()


class ThreadGovernor:
    """Re-fits a llama.cpp context's thread count to the free cores while it decodes.

    Checked at most every `period_s`; a change needs two checks in a row that agree, so a
    short burst of other work does not make it flap. The text does not depend on the thread
    count (each output row is computed by one thread), so this changes speed only.
    """

    def __init__(self, ctx: Any, threads: int, period_s: float = 1.0) -> None:
        self._ctx, self.threads, self._period = ctx, threads, period_s
        self._next = time.monotonic() + period_s
        self._pending: int | None = None
        self.changes = 0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._period
        wanted = free_cores(samples=1)
        if wanted == self.threads:
            self._pending = None
        elif wanted != self._pending:
            self._pending = wanted
        else:
            import llama_cpp

            llama_cpp.llama_set_n_threads(self._ctx, wanted, wanted)
            self.threads, self._pending = wanted, None
            self.changes += 1


# ---- facts --------------------------------------------------------------------------------
def build_facts() -> dict[str, Any]:
    """llama-cpp-python's version, where its native libraries are, and what they were built with."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted(lib_dir.glob("*.so*")) if lib_dir.is_dir() else []
    stamp = [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in libs]
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {"llama_cpp": llama_cpp.__version__, "libs": stamp, "system_info": info}


def blockwise_attention() -> bool:
    """Whether this llama.cpp build computes flash-attention rows with our blockwise kernel
    (`scripts/fa_rows.cpp`: a wheel labelled `+magpie...fa`, on an x86 CPU with AVX2). With it,
    exact decoding (prompts fed in chunks of under 64 tokens) is as fast as llama.cpp's tiled
    kernel for long prompts; without it, about 25-45% slower."""
    import llama_cpp

    labels = llama_cpp.__version__.partition("+")[2].split(".")
    return "fa" in labels and "avx2" in cpu_facts()["flags"]


def probe_key(model_path: Path) -> str:
    """Identity of (CPU, llama.cpp build, model): a new one of any of them is probed again."""
    stat = model_path.stat()
    parts = [cpu_facts(), build_facts(), str(model_path.resolve()), stat.st_size]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# ---- cache --------------------------------------------------------------------------------
def cache_path() -> Path:
    return cache_root() / "llamacpp-runtime.json"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cached_choice() -> dict[str, Any] | None:
    """The most recent probe entry for this CPU (for `magpie --version`), without probing."""
    entries = [e for e in _read_cache().values() if e.get("cpu") == cpu_facts()]
    return max(entries, key=lambda e: e.get("checked_at", 0), default=None)


def record_crash(key: str, runtime: str, how: str) -> str | None:
    """Mark `runtime` unsafe for `key` after a crash in a real run; return the next runtime."""
    cache = _read_cache()
    entry = cache.setdefault(key, {"results": {}})
    entry.setdefault("results", {})[runtime] = f"crashed in a run ({how})"
    entry.pop("runtime", None)
    _write_cache(cache)
    names = list(RUNTIMES)
    later = names[names.index(runtime) + 1 :] if runtime in names else []
    return later[0] if later else None


# ---- probing ------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


def probe(model_path: Path, runtime: LlamaRuntime, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the batch shapes the engine uses under `runtime` in a subprocess; did it survive?"""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "magpie.engines.llamacpp_runtime", runtime.name, str(model_path)]
    env = {k: v for k, v in os.environ.items() if k != ENV_CRASH_NOTE}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"hung for {timeout:.0f} s", time.monotonic() - started)
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return ProbeResult(True, done.stdout.strip().splitlines()[-1], seconds)
    if done.returncode < 0:
        return ProbeResult(False, f"crashed ({signal_name(-done.returncode)})", seconds)
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return ProbeResult(False, f"failed (exit {done.returncode}: {last})", seconds)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _probe_child(name: str, model_path: str) -> None:
    """Inside the probe subprocess: the batch shapes the engine uses, then print a summary."""
    if name in os.environ.get(ENV_SIMULATE_CRASH, "").split(","):
        os.kill(os.getpid(), signal.SIGSEGV)
    runtime = RUNTIMES[name]
    apply_model_params(runtime)
    import llama_cpp

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        model_path.encode(), llama_cpp.llama_model_default_params()
    )
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    params = llama_cpp.llama_context_default_params()
    sequences = 2 if runtime.max_batch_tokens > 1 else 1  # one-token batches hold one sequence
    params.n_ctx, params.n_seq_max = 256, sequences
    params.n_batch = params.n_ubatch = runtime.llama_kwargs.get("n_batch", 64)
    params.n_threads = params.n_threads_batch = default_threads()
    ctx = llama_cpp.llama_init_from_model(model, params)
    text = b"The quick brown fox jumps over the lazy dog while the cat sleeps in the sun."
    buffer = (llama_cpp.llama_token * 64)()
    vocab = llama_cpp.llama_model_get_vocab(model)
    count = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, 64, True, True)
    tokens = list(buffer[:count])
    step = max(1, runtime.max_batch_tokens)
    batch = llama_cpp.llama_batch_init(max(len(tokens), 2), 0, sequences)

    def decode(items: list[tuple[int, int, int]]) -> None:
        """Decode (token, position, sequence) items in one batch, logits for every item."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, True
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit(f"llama_decode failed on a batch of {len(items)} tokens")

    started = time.monotonic()
    prompt = [(t, p, 0) for p, t in enumerate(tokens)]
    for i in range(0, len(prompt), step):
        decode(prompt[i : i + step])
    if sequences > 1:
        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(ctx), 0, 1, -1, -1)
    pos, generated = len(tokens), 0
    for _ in range(8):
        items = [(tokens[-1 - seq], pos, seq) for seq in range(sequences)]
        for i in range(0, len(items), step):
            decode(items[i : i + step])
        pos, generated = pos + 1, generated + sequences
    seconds = time.monotonic() - started
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    print(f"prompt {len(tokens)} tokens + {generated} decoded in {seconds:.2f} s")


# ---- choosing -----------------------------------------------------------------------------
def apply_model_params(runtime: LlamaRuntime) -> None:
    """Make llama-cpp-python load models with `runtime.model_params` (process-wide).

    `Llama(...)` takes no argument for some model parameters (`use_extra_bufts`), so its call
    of `llama_model_default_params` is wrapped; the runtime is a fact of the CPU, so one choice
    holds for the whole process.
    """
    import llama_cpp.llama_cpp as lib

    original = getattr(lib, "_magpie_default_params", lib.llama_model_default_params)
    lib._magpie_default_params = original
    if not runtime.model_params:
        lib.llama_model_default_params = original
        return

    def with_overrides() -> Any:
        params = original()
        for key, value in runtime.model_params.items():
            setattr(params, key, value)
        return params

    lib.llama_model_default_params = with_overrides


def resolve_name(requested: str | None) -> str:
    """The runtime asked for by the engine option, else the environment, else `auto`."""
    name = (requested or os.environ.get(ENV_RUNTIME) or "auto").strip().lower()
    if name != "auto" and name not in RUNTIMES:
        raise MagpieError(
            f"unknown llama.cpp runtime {name!r} (engine option runtime / {ENV_RUNTIME}): "
            f"use auto, {', '.join(RUNTIMES)}"
        )
    return name


def select_runtime(model_path: Path, requested: str | None = None) -> LlamaRuntime:
    """The configuration to load `model_path` with on this CPU; probes on first use."""
    name = resolve_name(requested)
    if name != "auto":
        source = "engine option runtime" if requested else ENV_RUNTIME
        runtime = RUNTIMES[name].chosen(f"forced by {source}")
    else:
        runtime = _probed(model_path)
    apply_model_params(runtime)
    _note_for_supervisor(model_path, runtime)
    return runtime


def _probed(model_path: Path) -> LlamaRuntime:
    key = probe_key(model_path)
    cache = _read_cache()
    entry = cache.get(key, {})
    if entry.get("runtime") in RUNTIMES:
        return RUNTIMES[entry["runtime"]].chosen(entry.get("reason", "probed earlier"))
    results: dict[str, str] = dict(entry.get("results", {}))
    chosen = None
    for name, runtime in RUNTIMES.items():
        if results.get(name, "").startswith("crashed in a run"):
            continue
        result = probe(model_path, runtime)
        results[name] = result.detail if not result.ok else f"ok ({result.detail})"
        if result.detail.startswith("failed"):  # an error, not a crash: no other runtime helps
            raise MagpieError(f"llama.cpp probe of {model_path} {result.detail}")
        if result.ok:
            chosen = runtime
            break
    if chosen is None:
        raise MagpieError(
            f"llama.cpp crashes on this CPU in every configuration ({results}): rebuild it with "
            "`make llama-cpp`, or use --engine vllm/openai"
        )
    failed = [f"{n}: {r}" for n, r in results.items() if not r.startswith("ok")]
    reason = "probed: " + ("; ".join(failed) + f"; chose {chosen.name}" if failed else "native ok")
    cache[key] = {
        "runtime": chosen.name,
        "reason": reason,
        "results": results,
        "cpu": cpu_facts(),
        "model": str(model_path),
        "checked_at": time.time(),
        **{k: v for k, v in build_facts().items() if k != "libs"},
    }
    _write_cache(cache)
    return chosen.chosen(reason)


def _note_for_supervisor(model_path: Path, runtime: LlamaRuntime) -> None:
    """Tell the supervisor which native configuration this process runs, should it crash."""
    note = os.environ.get(ENV_CRASH_NOTE)
    if not note:
        return
    entry = {"engine": "llamacpp", "runtime": runtime.name, "model": str(model_path)}
    if not runtime.reason.startswith("forced"):
        entry["key"] = probe_key(model_path)
    try:
        with open(note, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    except OSError:
        pass


if __name__ == "__main__":  # the probe subprocess: python -m magpie.engines.llamacpp_runtime
    _probe_child(sys.argv[1], sys.argv[2])
