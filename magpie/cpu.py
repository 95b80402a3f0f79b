"""Facts about this machine's CPU that decide which kernels and engine settings run fastest."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
"""The SIMD and AMX flags that change which kernels llama.cpp, oneDNN and torch run."""


def cpu_facts() -> dict[str, Any]:
    """Model name, machine, cores, and which of `CPU_FLAGS` this CPU has."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), "x86_64"):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model": name,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
        "amx": "amx_int8" in flags,
    }


def has_amx_int8() -> bool:
    """Whether this CPU has AMX int8 tiles (Intel Xeon since Sapphire Rapids)."""
    return bool(cpu_facts()["amx"])
