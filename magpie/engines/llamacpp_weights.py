"""Which weights llama.cpp runs: the GGUF as given, or a copy in a faster type, made once.

On CPUs, llama.cpp's batched matrix kernels are much faster for some weight types than for
others, and which ones depends on the CPU. Raw decode tokens/s of SmolLM2-135M on 2 cores at
1 / 32 / 64 sequences per step (`bench/weights.py`):

| weights | AMD EPYC, AVX2 | Intel Xeon with AMX | same Xeon, no AMX (`no-repack`) |
|---|---|---|---|
| Q4_1 (the bundled file) | 96 / 170 / 177 | 97-176 / 363-596 / 649-924 | 76 / 191 / 209 |
| Q8_0 | 97 / 284 / 355 | 106-124 / 725-898 / 867-1098 | 69 / 330 / 347 |
| F16 | 64 / 394 / 438 | 32-48 / 230-269 / 221-286 | 47 / 335 / 377 |

(The Xeon's middle column: three runs of the build without AVX512-FP16, see
`scripts/llama-cpp-wheel.sh`, with the spread the machine drifts by; its last column and the AMD
one are from earlier builds.) Interleaved in one process on the Xeon (medians of nine rounds,
F16 KV cache), the Q8_0 copy against the Q4_1 file: 200-token prompts of 8 sequences 1224 vs 966
tokens/s; 32-sequence decode steps at 64 / 160 / 300 tokens of context 689 / 534 / 358 vs
615 / 446 / 320 tokens/s.

Where the CPU has AMX int8 tiles, llama.cpp repacks the quantized types its AMX kernels take
(`AMX_FTYPES`) and multiplies them there; of those, a Q4_1 file (`AMX_TO_Q8_0`) runs faster as
a Q8_0 copy, other types as given. Elsewhere a quantized file is best run as F16: 4-bit values
and their scales convert to F16 almost exactly. The model
is the same either way; only llama.cpp's kernels and their rounding change (next-token KL against
the exact F16 copy over 480 tokens on the AMX Xeon: 3.7e-3 for the file on AMX kernels, 5.4e-3
for the Q8_0 copy).

The engine option `weights` picks: `auto` (default: the choice above, for a copy of at most
`AUTO_COPY_MAX_BYTES`; else the file), `file` (the file as given), `f16` or `q8_0`. Copies are
written once to `~/.cache/magpie/models/` (atomically) and reused. The choice depends only on
the CPU's flags and the file (not on a timing, nor on the runtime the probe chose), so a dataset
resumes on the same CPU kind with the same weights, even after a crash moved it to a slower
runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from magpie.cache import cache_root
from magpie.cpu import has_amx_int8
from magpie.errors import MagpieError

WEIGHTS = ("auto", "file", "f16", "q8_0")
AUTO_COPY_MAX_BYTES = 1 << 30
"""`auto` converts only models whose copy is at most this big (F16: about 500M parameters)."""

# llama.cpp file types (enum llama_ftype) and about how many bits a weight takes in each
_FTYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1"}
_FTYPE_NAMES.update({10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S"})
_FTYPE_NAMES.update({15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 30: "IQ4_XS"})
_FTYPE_NAMES.update({32: "BF16"})
_BITS = {0: 32, 1: 16, 2: 4.5, 3: 5.0, 7: 8.5, 8: 5.5, 9: 6.0, 10: 2.6, 11: 3.4, 12: 3.9}
_BITS.update({13: 4.3, 14: 4.6, 15: 4.9, 16: 5.5, 17: 5.7, 18: 6.6, 30: 4.25, 32: 16})
_UNQUANTIZED = {0, 1, 32}
AMX_FTYPES = {2, 3, 7, 14, 15, 16, 17, 18, 30}
"""File types whose tensors llama.cpp's AMX kernels multiply (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
Q6_K, IQ4_XS)."""
AMX_TO_Q8_0 = {3}
"""Of `AMX_FTYPES`, the types measured to run faster on AMX as a Q8_0 copy (Q4_1, the bundled
model's; the others, unmeasured, run as given)."""


@dataclass(frozen=True)
class Weights:
    """The file llama.cpp loads and how it came to be."""

    path: Path
    kind: str
    """`file`, or the type of the copy (`f16`, `q8_0`)."""
    source_type: str
    reason: str

    def label(self) -> str:
        """Short text for a model id: empty when the file runs as given."""
        return "" if self.kind == "file" else f"run as {self.kind.upper()}"


def file_type(path: Path) -> int | None:
    """The GGUF's `general.file_type` (llama.cpp's ftype), read without loading tensors."""
    import contextlib
    import io

    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):
        vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        value = vocab.metadata.get("general.file_type")
    finally:
        vocab.close()
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def resolve_weights(path: Path, requested: str | None = None) -> Weights:
    """The weights to load for the GGUF at `path` (converting once when asked or when `auto`
    says so)."""
    name = (requested or os.environ.get("MAGPIE_LLAMACPP_WEIGHTS") or "auto").strip().lower()
    if name not in WEIGHTS:
        raise MagpieError(
            f"unknown engine option weights={name!r}: use one of {', '.join(WEIGHTS)}"
        )
    if name == "file":
        return Weights(path, "file", "?", "engine option weights=file")
    ftype = file_type(path)
    type_name = _FTYPE_NAMES.get(ftype, f"ftype {ftype}") if ftype is not None else "unknown"
    if name == "auto":
        if ftype is None or ftype in _UNQUANTIZED or ftype not in _BITS:
            return Weights(path, "file", type_name, f"auto: {type_name} runs as given")
        amx = ftype in AMX_FTYPES and has_amx_int8()
        if amx and ftype not in AMX_TO_Q8_0:
            why = f"auto: {type_name} runs as given on this CPU's AMX kernels (faster than F16)"
            return Weights(path, "file", type_name, why)
        name = "q8_0" if amx else "f16"
        copy_bytes = path.stat().st_size * (8.5 if amx else 16) / _BITS[ftype]
        if copy_bytes > AUTO_COPY_MAX_BYTES:
            why = f"auto: a {name.upper()} copy would be too big"
            return Weights(path, "file", type_name, why)
        reason = (
            f"auto: {type_name} runs faster as Q8_0 on this CPU's AMX kernels"
            if amx
            else f"auto: {type_name} has slow batched kernels on this CPU; F16 is faster"
        )
    else:
        reason = f"engine option weights={name}"
    return Weights(converted(path, name), name, type_name, reason)


STALE_COPY_SECONDS = 24 * 3600
"""When a new copy is made, copies of the same file in the same type under other keys go once
they are this old: reinstalling the model's package gives the file a new mtime and so a new
key, and without this every fresh venv would leave one more copy behind."""


def prune_stale_copies(target: Path, stem: str, kind: str) -> None:
    """Remove the copies beside `target` of a source named `stem` in type `kind` under another
    key, last written more than STALE_COPY_SECONDS ago. (A process still using one keeps its
    mapping.)"""
    pattern = re.compile(rf"{re.escape(stem)}\.[0-9a-f]{{16}}\.{re.escape(kind)}\.gguf")
    limit = time.time() - STALE_COPY_SECONDS
    for other in target.parent.iterdir():
        if other == target or not pattern.fullmatch(other.name):
            continue
        with contextlib.suppress(OSError):
            if other.stat().st_mtime < limit:
                other.unlink()


def converted(path: Path, kind: str) -> Path:
    """The cached copy of `path` in type `kind` (`f16` or `q8_0`), made now if missing."""
    import llama_cpp

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{llama_cpp.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{path.stem}.{digest}.{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    types = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    params.ftype = types[kind]
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    from llama_cpp._utils import suppress_stdout_stderr

    try:
        with suppress_stdout_stderr(disable=False):
            code = llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.is_file():
            raise MagpieError(
                f"llama.cpp could not convert {path} to {kind.upper()} (code {code}): "
                "pass the engine option weights=file"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    prune_stale_copies(target, path.stem, kind)
    return target
