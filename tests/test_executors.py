"""The local executor on the deterministic fake engine: attempt blocks, gate, resume, checks."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, PairsConfig, ResponsesConfig
from magpie.engines.base import EnginePool, Request, Sampling
from magpie.engines.fake import FakeEngine
from magpie.errors import MagpieError
from magpie.executors.base import ProgressView
from magpie.stages.instructions import InstructionGate, dedup_key
from magpie.stages.specs import build_instructions
from magpie.store import ShardStore


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def ins_config(**kw) -> InstructionsConfig:
    base = {"engine": {"name": "fake"}, "num": 12, "max_tokens": 9, "shard_size": 5}
    return InstructionsConfig.model_validate({**base, **kw})


def res_config(**kw) -> ResponsesConfig:
    return ResponsesConfig.model_validate({"engine": {"name": "fake"}, "n": 3, **kw})


def rows(path: Path) -> list[dict]:
    return ShardStore(path).read_all().to_pylist()


def test_fake_engine_is_deterministic_and_seeded():
    engine = FakeEngine()
    sampling = Sampling(max_tokens=64)
    request = Request("<|im_start|>user\n", sampling, n=4, seed=7)
    first = [c.text for c in engine.generate([request])[0]]
    again = [c.text for c in FakeEngine().generate([request, request])[1]]
    other = [c.text for c in engine.generate([Request(request.prompt, sampling, n=4, seed=8)])[0]]
    assert first == again and first != other
    assert len(set(first)) > 1  # samples of one request differ


def test_instruction_rows_do_not_depend_on_shard_size(tmp_path):
    """Blocks of 3, 5 or 40 attempts, deduplicated and trimmed in attempt order: the same rows
    as running every attempt in one go."""
    config = ins_config()
    stage, _ = build_instructions(config, EnginePool())
    whole = stage.run(range(config.attempt_budget()))
    expected, seen = [], set()
    for row in whole.rows.to_pylist():  # run() already dropped duplicates within the one block
        if dedup_key(row["instruction"]) not in seen and len(expected) < config.num:
            seen.add(dedup_key(row["instruction"]))
            expected.append(row)
    for size in (3, 5, 40):
        out = tmp_path / f"s{size}"
        summary, _ = pipeline.instructions(ins_config(shard_size=size), out, view())
        assert summary.complete and summary.rows == config.num
        assert rows(out) == expected
        info = [ShardStore(out).shard_info(i) for i in ShardStore(out).shard_indices()]
        assert [i["attempts"] for i in info] == [
            [k * size, (k + 1) * size] for k in range(len(info))
        ]
        assert summary.rejections["duplicate"] > 0  # the stock sentences recur across blocks


def test_gate_drops_cross_block_duplicates_and_trims():
    config = ins_config()
    stage, _ = build_instructions(config, EnginePool())
    gate = InstructionGate(num=4)
    first = stage(pa.table({"attempt": list(range(0, 10))}), _Quiet())
    kept, extra = gate.accept(first)
    assert kept.rows.num_rows == 4 and gate.done and extra["surplus"] == first.rows.num_rows - 4
    gate = InstructionGate(num=100)
    gate.observe(first.rows)
    again, _ = gate.accept(first)  # the same block again: every row is a duplicate now
    assert again.rows.num_rows == 0
    assert again.rejections["duplicate"] >= first.rows.num_rows


class _Quiet:
    def on_done(self, units: int, tokens: int) -> None:
        pass


def test_transform_resumes_from_out_of_order_shards(tmp_path):
    """Shards 1 and 3 of 5 lost (as a parallel run killed mid-way leaves them): the rerun makes
    only those, and the files equal an uninterrupted run's."""
    pipeline.instructions(ins_config(num=10), tmp_path / "ins", view())
    reference = tmp_path / "ref"
    pipeline.responses(res_config(shard_size=2), tmp_path / "ins", reference, view())
    partial = tmp_path / "partial"
    shutil.copytree(reference, partial)
    for index in (1, 3):
        ShardStore(partial).shard_path(index).unlink()
    summary = pipeline.responses(res_config(shard_size=2), tmp_path / "ins", partial, view())
    assert summary.commit_order == [1, 3] and summary.resumed_shards == 3
    assert summary.complete
    for index in range(5):
        ref = ShardStore(reference).shard_path(index).read_bytes()
        assert ShardStore(partial).shard_path(index).read_bytes() == ref


def test_missing_input_column_is_one_line(tmp_path):
    pipeline.instructions(ins_config(num=4), tmp_path / "ins", view())
    with pytest.raises(MagpieError, match="no 'responses' column"):
        pipeline.pairs(PairsConfig(), tmp_path / "ins", tmp_path / "pairs", view())
    assert not (tmp_path / "pairs" / ".magpie").exists()  # refused before opening the output


def test_engine_pool_shares_engines_and_fills_defaults():
    from magpie.config import EngineSpec

    pool = EnginePool({"fake": {"delay": 0.5}})
    spec = EngineSpec(name="fake")
    engine = pool.get(spec)
    assert pool.get(EngineSpec(name="fake")) is engine and engine.delay == 0.5
    assert pool.get(EngineSpec(name="fake", options={"delay": 0.0})).delay == 0.0
    pool.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--executor", "spark"], "--executor must be local or ray (got 'spark')"),
        (["--executor", "local", "--actors", "2"], "--address and --actors need --executor ray"),
    ],
)
def test_bad_executor_flags_are_one_line(tmp_path, flags, message):
    from typer.testing import CliRunner

    from magpie.cli import app

    result = CliRunner().invoke(
        app, ["pairs", "--in", str(tmp_path), "--out", str(tmp_path / "o"), *flags]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
