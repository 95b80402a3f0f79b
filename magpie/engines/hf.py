"""Hugging Face model directories: tokenizer facts for template derivation, and GGUF export.

(The transformers generation engine joins this module in a later change.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from magpie.engines.base import ModelInfo
from magpie.errors import MagpieError


def hf_model_info(path: str) -> ModelInfo:
    """Chat template and special tokens of a local HF model directory (no weights loaded)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MagpieError(
            f"cannot read a tokenizer from {path} ({exc.__class__.__name__}): pass a model "
            "directory with tokenizer files, or --chat-template FILE.jinja"
        ) from exc
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return ModelInfo(
        model_id=path,
        chat_template=template,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )


def export_gguf_to_hf(gguf: Path, out: Path, dtype: str | None = None) -> Path:
    """Write a GGUF model as a plain HF directory (dequantized safetensors + tokenizer) at `out`.

    The weights are dequantized by transformers; `dtype` (e.g. "bfloat16") casts them, None keeps
    the dtype transformers loads (float32). The written config carries no `quantization_config`,
    so vLLM or transformers load `out` as an ordinary model. Written to a temporary sibling and
    renamed, so `out` is either complete or absent. Returns `out`.
    """
    gguf = Path(gguf)
    out = Path(out)
    if not gguf.is_file():
        raise MagpieError(f"GGUF file {gguf} does not exist: pass a readable .gguf path")
    if out.exists():
        raise MagpieError(f"{out} already exists: pass a new directory, or remove it first")
    tokenizer, model = _load_gguf(gguf, dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_gguf(gguf: Path, dtype: str | None) -> tuple[Any, Any]:
    """Tokenizer and dequantized model of a GGUF file, with the GGUF quantizer detached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    except (OSError, ValueError, ImportError) as exc:
        raise MagpieError(
            f"transformers cannot read {gguf} ({exc}): it needs `pip install gguf accelerate` "
            "and a GGUF architecture transformers supports (llama, qwen2, mistral, ...)"
        ) from exc
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise MagpieError(
            f"{gguf} loaded with packed (still quantized) weights such as {packed[0]}: "
            "upgrade transformers or export the model with llama.cpp's convert tools"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return tokenizer, model


def _drop_quantization_config(config_json: Path) -> None:
    config = json.loads(config_json.read_text())
    if config.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
