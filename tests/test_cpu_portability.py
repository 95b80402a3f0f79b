"""CPU portability: the llama.cpp probe and fallback, the crash supervisor, `magpie doctor`.

The multi-token decode that crashed on Intel CPUs with AMX runs here in a subprocess on every
machine, so a build that crashes again fails this test instead of the user's run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from magpie.cpu import has_amx_int8
from magpie.engines import llamacpp_runtime as rt
from magpie.engines.llamacpp import bundled_model_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private probe cache, and no forced runtime from the caller's environment."""
    monkeypatch.setenv("MAGPIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(rt.ENV_RUNTIME, raising=False)
    monkeypatch.delenv(rt.ENV_SIMULATE_CRASH, raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("name", list(rt.RUNTIMES))
def test_multi_token_and_multi_sequence_decode_survives(name: str) -> None:
    """The batch shapes the engine uses, in a subprocess: it must exit 0 on this CPU."""
    result = rt.probe(bundled_model_path(), rt.RUNTIMES[name])
    assert result.ok, f"llama.cpp runtime {name} {result.detail} on {rt.cpu_facts()}"
    assert "decoded" in result.detail


def test_probe_reports_a_crash_by_its_signal(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rt.ENV_SIMULATE_CRASH, "native")
    result = rt.probe(bundled_model_path(), rt.RUNTIMES["native"])
    assert not result.ok
    assert result.detail == "crashed (SIGSEGV)"


def test_auto_falls_back_past_crashing_runtimes_and_caches(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = bundled_model_path()
    monkeypatch.setenv(rt.ENV_SIMULATE_CRASH, "native,no-repack")
    chosen = rt.select_runtime(model)
    assert chosen.name == "single-token"
    assert chosen.max_batch_tokens == 1
    assert "native: crashed (SIGSEGV)" in chosen.reason
    assert "no-repack: crashed (SIGSEGV)" in chosen.reason
    entry = json.loads(rt.cache_path().read_text())[rt.probe_key(model)]
    assert entry["runtime"] == "single-token"
    assert entry["cpu"] == rt.cpu_facts()
    # Cached: a second choice does not probe again (it would pick native without the hook).
    monkeypatch.delenv(rt.ENV_SIMULATE_CRASH)
    assert rt.select_runtime(model).name == "single-token"


def test_engine_runs_on_the_fallback_runtime(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback is a working engine: it generates the same greedy text as native."""
    from magpie.engines.base import Request, Sampling
    from magpie.engines.llamacpp import LlamaCppEngine

    request = Request(
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        Sampling(temperature=0.0, max_tokens=12),
        seed=1,
    )
    texts = {}
    for name in ("single-token", "no-repack"):
        engine = LlamaCppEngine(n_ctx=512, runtime=name)
        try:
            assert engine.runtime.name == name
            assert engine.runtime.reason == "forced by engine option runtime"
            texts[name] = engine.generate([request])[0][0].text
        finally:
            engine.close()
    assert all(text.strip() for text in texts.values())


def test_unknown_runtime_is_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rt.ENV_RUNTIME, "fast")
    with pytest.raises(rt.MagpieError, match="unknown llama.cpp runtime 'fast'"):
        rt.select_runtime(bundled_model_path())


def _crashing_child(cache: Path) -> subprocess.CompletedProcess[str]:
    """A supervised process that segfaults right after choosing its llama.cpp runtime."""
    code = (
        "import os, signal, sys\n"
        "from magpie.engines import llamacpp_runtime as rt\n"
        "from magpie.engines.llamacpp import bundled_model_path\n"
        "rt.select_runtime(bundled_model_path())\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    env = {**os.environ, "MAGPIE_CACHE_DIR": str(cache), rt.ENV_RUNTIME: "auto"}
    env.pop(rt.ENV_SIMULATE_CRASH, None)
    script = (
        "import sys, magpie.supervisor as s\n"
        f"sys.exit(s.supervise_command([sys.executable, '-c', {code!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_supervisor_turns_a_native_crash_into_one_line_and_moves_on(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = _crashing_child(cache)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("magpie: the llama.cpp engine crashed (SIGSEGV) with runtime native")
    assert "magpie now uses runtime no-repack" in lines[0]
    assert "Traceback" not in done.stderr
    entry = next(iter(json.loads((cache / "llamacpp-runtime.json").read_text()).values()))
    assert entry["results"]["native"] == "crashed in a run (SIGSEGV)"
    assert "runtime" not in entry


def test_sigterm_reaches_the_real_process(tmp_path: Path) -> None:
    """The supervisor forwards SIGTERM: the CLI inside stops and reports it, no traceback."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "magpie",
            "instructions",
            "--num",
            "200",
            "--max-tokens",
            "64",
            "--out",
            str(tmp_path / "d"),
            "-q",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MAGPIE_CACHE_DIR": str(tmp_path / "cache")},
    )
    try:
        started, deadline = time.monotonic(), 240
        while not list((tmp_path / "d").glob(".magpie/manifest.json")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() - started < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (143, 130, 2), err
    assert "Traceback" not in err


def test_doctor_reports_cpu_runtime_and_engines(tmp_path: Path) -> None:
    env_cache = {"MAGPIE_CACHE_DIR": str(tmp_path / "cache")}
    os.environ.update(env_cache)
    try:
        done = run_cli("doctor", "--json")
        version = run_cli("--version")
    finally:
        os.environ.pop("MAGPIE_CACHE_DIR")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["cpu"] == rt.cpu_facts()
    assert facts["llamacpp"]["runtime"]["name"] in rt.RUNTIMES
    # the bundled Q4_1 file runs as a Q8_0 copy where the CPU has AMX, else as F16
    weights = facts["llamacpp"]["weights"]
    assert weights["kind"] == ("q8_0" if has_amx_int8() else "f16")
    assert weights["source_type"] == "Q4_1"
    assert facts["llamacpp"]["kv_type"] == "f16"
    assert facts["engines"]["llamacpp"]["ok"] is True
    assert set(facts["engines"]) >= {"llamacpp", "vllm", "transformers", "openai", "ray"}
    for status in facts["engines"].values():
        assert status["ok"] or status["why"]
    assert version.returncode == 0
    assert "cpu:" in version.stdout
    assert f"runtime {facts['llamacpp']['runtime']['name']}" in version.stdout


def test_an_interrupt_a_ctypes_callback_swallowed_is_raised_again() -> None:
    """SIGTERM arriving while llama.cpp runs its Python log callback: ctypes prints and drops the
    handler's exception, so the decoder and executor raise it again at their next step."""
    import ctypes

    from magpie import signals

    previous = signals.install()
    try:
        signals.raise_pending()  # nothing pending yet

        def callback() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, inside the callback

        ctypes.CFUNCTYPE(None)(callback)()
        with pytest.raises(signals.Terminated):
            signals.raise_pending()
    finally:
        signals.restore(previous)
    signals.raise_pending()  # restore() forgets it


def test_an_interrupt_inside_llama_cpps_log_callback_is_kept_for_the_next_step() -> None:
    """Inside llama-cpp-python's logger (code ctypes runs as a callback) the handler only records
    the signal: raising there would print a traceback and be dropped."""
    from magpie import signals

    namespace: dict = {"signals": signals, "sys": sys}
    code = compile(
        "def log_line():\n    signals._on_sigterm(15, sys._getframe())\n",
        "/site-packages/llama_cpp/_logger.py",
        "exec",
    )
    exec(code, namespace)
    previous = signals.install()
    try:
        namespace["log_line"]()  # no exception here
        with pytest.raises(signals.Terminated):
            signals.raise_pending()
        with pytest.raises(signals.Terminated):  # elsewhere the handler raises at once
            signals._on_sigterm(15, sys._getframe())
    finally:
        signals.restore(previous)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["avx2"], ("float32", True)),
        (["avx2", "avx512f"], ("float32", False)),
        (["avx2", "avx512f", "avx512_bf16"], ("auto", False)),
        (["avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"], ("auto", False)),
    ],
)
def test_vllm_cpu_dtype_and_eager_mode_follow_the_cpu(monkeypatch, flags, expected) -> None:
    """bfloat16 only where the CPU has bf16 matmuls; torch.compile only with AVX-512; what the
    user set explicitly is kept."""
    from magpie import cpu
    from magpie.engines import vllm

    monkeypatch.setattr(cpu, "cpu_facts", lambda: {"flags": flags})
    assert vllm.cpu_settings("auto", None) == expected
    assert vllm.cpu_settings("bfloat16", False) == ("bfloat16", False)


@pytest.mark.parametrize(
    ("cores", "user", "expected"), [(2, None, "0"), (8, None, None), (2, "1", "1")]
)
def test_vllm_cpu_reserves_no_core_on_a_small_machine(monkeypatch, cores, user, expected) -> None:
    from magpie.engines import vllm

    monkeypatch.setattr(vllm.os, "cpu_count", lambda: cores)
    monkeypatch.setenv(vllm.RESERVED_CPU_ENV, "")  # so that the test's own setting is undone
    monkeypatch.delenv(vllm.RESERVED_CPU_ENV)
    if user is not None:
        monkeypatch.setenv(vllm.RESERVED_CPU_ENV, user)
    assert vllm.reserved_cpu_cores() == expected
    assert os.environ.get(vllm.RESERVED_CPU_ENV) == expected
