"""An instruction block stops generating once it holds the rows the run still needs: the
committed rows are those of the whole block, and fewer attempts are generated."""

from __future__ import annotations

import io

from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig
from magpie.engines.base import Request, Sampling, generate_until
from magpie.engines.fake import FakeEngine
from magpie.executors.base import ProgressView
from magpie.stages.instructions import InstructionGate, InstructionStage
from magpie.store import ShardStore
from magpie.templates import chat_format_for

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n"
)


class CountingFake(FakeEngine):
    """The fake engine, counting the requests it generates."""

    def __init__(self) -> None:
        super().__init__()
        self.generated = 0

    def generate_until(self, requests, on_done, until):  # type: ignore[no-untyped-def]
        results = super().generate_until(requests, on_done, until)
        self.generated += sum(r is not None for r in results)
        return results


def stage_of(engine: FakeEngine) -> InstructionStage:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    return InstructionStage(engine, fmt, InstructionsConfig(max_tokens=9), info.model_id)


def test_an_aimed_block_runs_fewer_attempts_and_keeps_the_gates_rows() -> None:
    attempts = list(range(40))
    whole = stage_of(CountingFake()).run(attempts)
    gate = InstructionGate(num=5)
    expected = gate.accept(whole)[0].rows.to_pylist()
    assert len(expected) == 5
    engine = CountingFake()
    aimed_stage = stage_of(engine)
    aimed_stage.aim(*InstructionGate(num=5).remaining())
    aimed = aimed_stage.run(attempts)
    assert aimed.attempts_run == engine.generated < len(attempts)
    assert InstructionGate(num=5).accept(aimed)[0].rows.to_pylist() == expected
    again = CountingFake()
    stage = stage_of(again)
    stage.run(attempts)  # the aim holds for one block only
    assert again.generated == len(attempts)


def test_rows_seen_in_earlier_blocks_do_not_count_towards_the_aim() -> None:
    first = stage_of(CountingFake()).run(list(range(20)))
    gate = InstructionGate(num=12)
    gate.accept(first)
    whole = stage_of(CountingFake()).run(list(range(20, 60)))
    expected = InstructionGate(num=12)
    expected.accept(first)
    want = expected.accept(whole)[0].rows.to_pylist()
    stage = stage_of(CountingFake())
    stage.aim(*gate.remaining())
    assert gate.accept(stage.run(list(range(20, 60))))[0].rows.to_pylist() == want


def test_local_run_equals_the_rows_of_whole_blocks(tmp_path) -> None:
    """`magpie instructions` (aimed blocks) against the gate fed whole blocks."""
    config = InstructionsConfig.model_validate(
        {"engine": {"name": "fake"}, "num": 9, "max_tokens": 9, "shard_size": 8}
    )
    view = ProgressView(Console(file=io.StringIO()), enabled=False)
    pipeline.instructions(config, tmp_path / "ins", view)
    rows = ShardStore(tmp_path / "ins").read_all().to_pylist()
    last = ShardStore(tmp_path / "ins").shard_info(1)  # the second block reached num
    assert last["attempts"] == [8, 16] and last["attempts_run"] < 8
    gate, expected, start = InstructionGate(num=9), [], 0
    while not gate.done:
        block = stage_of(FakeEngine()).run(list(range(start, start + 8)))
        expected += gate.accept(block)[0].rows.to_pylist()
        start += 8
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in expected]


def test_llamacpp_stops_mid_batch_and_the_next_call_is_unaffected(engine) -> None:
    """Request i may run 4 + 12 i tokens, so the first to end leaves others running."""
    requests = [
        Request(PROMPT, Sampling(temperature=1.0, max_tokens=4 + 12 * s, stop=()), seed=s)
        for s in range(5)
    ]
    full = engine.generate(requests)
    finished: list[int] = []
    stopped = generate_until(engine, requests, None, lambda i, c: finished.append(i) or True)
    assert 1 <= len(finished) < len(requests)
    assert sorted(i for i, r in enumerate(stopped) if r is not None) == sorted(finished)
    for i in finished:
        assert [c.text for c in stopped[i]] == [c.text for c in full[i]]
    assert [[c.text for c in r] for r in engine.generate(requests)] == [
        [c.text for c in r] for r in full
    ]


def test_an_aimed_block_holds_attempts_back_while_those_in_flight_may_suffice() -> None:
    """The stop rule's `admit`: with 0 of 3 rows, 5 attempts in flight could give them (half of
    them counted on), 6 could; each row counted lowers the need."""
    from magpie.engines.base import Completion
    from magpie.stages.instructions import _EnoughRows

    rule = _EnoughRows(stage_of(FakeEngine()), 3, set(), 12)
    assert rule.admit(0) and rule.admit(5) and not rule.admit(6)
    good = Completion("What is the boiling point of water?", "stop", 10, 9)
    assert not rule(1, [good])  # out of order: not counted until attempt 0 finishes
    assert not rule.admit(6)
    other = Completion("How do plants make their food?", "stop", 10, 7)
    assert not rule(0, [other])  # two rows now, attempts 2.. in flight
    assert not rule(3, [good])  # a duplicate: never a row
    assert rule.admit(3) and not rule.admit(4)
    assert not rule(2, [Completion("", "stop", 10, 0)])  # empty: rejected
    assert rule.admit(5) and not rule.admit(6)  # 2 rows; 4 and 5 would be in flight
    assert rule(4, [Completion("Name a prime number above 100.", "stop", 10, 8)])
    assert rule.enough and rule.counted == 5


def test_an_attempt_finished_early_after_the_last_row_needed_is_not_counted() -> None:
    """Attempt 2 finishes before attempt 1, which gives the last row needed: the rule stops at
    attempt 1, as it does when they finish in order, so the block keeps the same attempts (the
    schedule decides the order: it differed between blocks run ahead and alone on an AMD EPYC)."""
    from magpie.engines.base import Completion
    from magpie.stages.instructions import _EnoughRows

    first = Completion("What is the boiling point of water?", "stop", 10, 9)
    second = Completion("How do plants make their food?", "stop", 10, 7)
    third = Completion("Name a prime number above 100.", "stop", 10, 8)
    counts = []
    for order in ((0, 1, 2), (0, 2, 1), (2, 0, 1)):
        rule = _EnoughRows(stage_of(FakeEngine()), 2, set(), 3)
        done = [rule(i, [(first, second, third)[i]]) for i in order]
        assert done[-1] and rule.enough
        counts.append(rule.counted)
    assert counts == [2, 2, 2]


def test_the_next_blocks_attempts_start_only_for_the_rows_a_block_cannot_give() -> None:
    """Spare attempts (indices past the block's 4) count every attempt as a row: none start
    while the block's own attempts could still give the rows; one per row they cannot."""
    from magpie.engines.base import Completion
    from magpie.stages.instructions import _EnoughRows

    rule = _EnoughRows(stage_of(FakeEngine()), 4, set(), 4)
    assert not rule.admit(4)  # 4 attempts in flight could give the 4 rows
    assert not rule(0, [Completion("", "stop", 10, 0)])  # rejected: 3 rows at most now
    assert rule.admit(4) and not rule.admit(5)
    assert not rule(1, [Completion("What is the boiling point of water?", "stop", 10, 9)])
    assert rule.admit(4) and not rule.admit(5)
    assert not rule(2, [Completion("What is the boiling point of water?", "stop", 10, 9)])
    assert rule.admit(5) and not rule.admit(6)  # a duplicate: two rows short
