"""How llama.cpp should run on this CPU (placeholder until the CPU-portability work lands).

`select_runtime` is called once per engine; the engine passes `llama_kwargs` to `llama_cpp.Llama`
and never puts more than `max_batch_tokens` tokens in one `llama_decode` (1 turns sequence
batching off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaRuntime:
    """The llama.cpp settings chosen for a model on this machine."""

    name: str
    llama_kwargs: dict[str, Any] = field(default_factory=dict)
    max_batch_tokens: int = 512


def select_runtime(model_path: Path) -> LlamaRuntime:
    """The runtime for `model_path`: llama.cpp's native CPU build, batches of up to 512 tokens."""
    del model_path
    return LlamaRuntime(name="native", llama_kwargs={}, max_batch_tokens=512)
