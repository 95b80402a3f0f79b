"""Shards pooled into one engine call (llama.cpp's exact requests do not depend on the batch): the
same shards, byte for byte, as one call per shard; classifiers and inexact judges are not pooled."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, ResponsesConfig, ScoreConfig
from magpie.engines.base import EnginePool
from magpie.executors.base import ExecutorSpec, ProgressView
from magpie.executors.local import LocalExecutor, _pools
from magpie.stages.rewards import RewardStage
from magpie.store import ShardStore


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def shards(path: Path) -> list[tuple[list[dict], dict]]:
    """Each shard's rows and bookkeeping, less the config hash (it names the input's path)."""
    store = ShardStore(path)
    out = []
    for index in store.shard_indices():
        info = store.shard_info(index)
        del info["config_hash"]
        out.append((store.read_shard(index).to_pylist(), info))
    return out


def files(path: Path) -> list[bytes]:
    store = ShardStore(path)
    return [store.shard_path(index).read_bytes() for index in store.shard_indices()]


def test_pools_are_runs_of_consecutive_pending_shards() -> None:
    assert list(_pools([0, 1, 2, 3, 4], 2)) == [[0, 1], [2, 3], [4]]
    assert list(_pools([1, 3, 4, 5, 9], 4)) == [[1], [3, 4, 5], [9]]
    assert list(_pools([0, 1], 1)) == [[0], [1]]
    assert ExecutorSpec().pool_shards == 4


@pytest.mark.slow  # ~40 s: kept out of the fast tier's 10 minutes
def test_pooled_responses_equal_one_call_per_shard(tmp_path: Path) -> None:
    """7 instructions in shards of 2: responses made 4 shards per call (the last pool short) and
    one shard per call give identical shard files and bookkeeping, and so do the judge's scores
    of them (pooled too where the judge decodes exactly: llama.cpp with our attention kernel)."""
    engine = {"name": "llamacpp", "options": {"n_ctx": 1024}}
    instructions = InstructionsConfig.model_validate(
        {"engine": engine, "num": 7, "max_tokens": 40, "shard_size": 16}
    )
    pipeline.instructions(instructions, tmp_path / "ins", view())
    responses = ResponsesConfig.model_validate(
        {"engine": engine, "n": 3, "max_tokens": 24, "temperature": 0.8, "shard_size": 2}
    )
    score = ScoreConfig(shard_size=2, judge_engine=engine)
    runs = {}
    engines = EnginePool()
    try:
        for pool in (1, 4):
            executor = LocalExecutor(engines, pool_shards=pool)
            out = tmp_path / f"pool{pool}"
            pipeline.responses(responses, tmp_path / "ins", out / "res", view(), executor=executor)
            summary = pipeline.score(score, out / "res", out / "scored", view(), executor=executor)
            assert summary.complete and summary.shards == 4
            runs[pool] = (shards(out / "res"), shards(out / "scored"), files(out / "res"))
    finally:
        engines.close()
    assert runs[1] == runs[4]  # the responses' files byte for byte (same input, same hash)
    res_shards = runs[4][0]
    assert [info["input_rows"] for _, info in res_shards] == [2, 2, 2, 1]
    assert all(info["tokens"] > 0 for _, info in res_shards)


def test_inexact_judges_and_classifiers_are_not_pooled(tmp_path: Path) -> None:
    from magpie.engines.fake import FakeEngine
    from magpie.rewards.judge import JudgeRewardModel
    from magpie.templates import chat_format_for

    class Classifier:
        model_id, column = "rm", "rewards_rm"

    class Invariant(Classifier):
        batch_invariant = True

    engine = FakeEngine()
    fmt = chat_format_for(engine.info.chat_template, eos_token=engine.info.eos_token)
    judge = JudgeRewardModel(engine, fmt, engine.info.model_id)
    assert not RewardStage(judge).poolable and not RewardStage(Classifier()).poolable
    assert RewardStage(Invariant()).poolable
    # a judge that decodes exactly on a batch-invariant engine is pooled
    assert RewardStage(JudgeRewardModel(engine, fmt, engine.info.model_id, exact=True)).poolable
    engine.exact_prompts_cheap = True  # what llama.cpp with our attention kernel says
    assert RewardStage(JudgeRewardModel(engine, fmt, engine.info.model_id)).poolable


def test_instruction_blocks_started_ahead_give_the_same_shards(tmp_path: Path, monkeypatch) -> None:
    """An aimed block hands the next block's attempts to llama.cpp as spare requests, which the
    next block takes over: every shard (rows, rejections, attempts run) is what it is when each
    block runs alone."""
    from magpie.engines.llamacpp_batch import BatchDecoder
    from magpie.stages.instructions import InstructionStage

    config = InstructionsConfig.model_validate(
        {
            "engine": {"name": "llamacpp", "options": {"n_ctx": 1024}},
            "num": 14,
            "max_tokens": 48,
            "shard_size": 8,
        }
    )
    taken: list[int] = []
    take = BatchDecoder._take_kept

    def counting(self, every):  # type: ignore[no-untyped-def]
        running, finished = take(self, every)
        taken.append(len(running) + len(finished))
        return running, finished

    monkeypatch.setattr(BatchDecoder, "_take_kept", counting)
    pipeline.instructions(config, tmp_path / "ahead", view())
    assert sum(taken) > 0  # later blocks took over attempts started in earlier ones
    monkeypatch.setattr(InstructionStage, "prefetch", lambda self, rows: None)
    taken.clear()
    pipeline.instructions(config, tmp_path / "alone", view())
    assert sum(taken) == 0
    ahead, alone = shards(tmp_path / "ahead"), shards(tmp_path / "alone")
    assert len(ahead) >= 2 and ahead == alone
    rejected = [
        [ShardStore(tmp_path / run).rejected_path(i).read_bytes() for i in range(len(ahead))]
        for run in ("ahead", "alone")
    ]
    assert rejected[0] == rejected[1]
    assert [r["instruction"] for rows, _ in ahead for r in rows] == [
        r["instruction"] for rows, _ in alone for r in rows
    ]
