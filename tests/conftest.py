"""Shared test set-up: offline hubs, the bundled model, and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `magpie ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "magpie", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


@pytest.fixture(scope="session")
def engine():
    """The bundled SmolLM2 GGUF through llama.cpp, loaded once for the session."""
    from magpie.engines.llamacpp import LlamaCppEngine

    llm = LlamaCppEngine(n_ctx=2048)
    yield llm
    llm.close()
