"""Hugging Face model directories: tokenizer facts for template derivation.

(The transformers generation engine joins this module in a later change.)
"""

from __future__ import annotations

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
