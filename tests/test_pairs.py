"""Chosen/rejected selection: argmax/argmin, ties, margins, invalid responses, accounting."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from magpie.errors import MagpieError
from magpie.stages.pairs import (
    ALL_TIED,
    BELOW_MIN_MARGIN,
    EMPTY_INSTRUCTION,
    REWARDS_MISMATCH,
    TOO_FEW_VALID,
    PairStats,
    make_pairs,
)


def _table(rows: list[dict]) -> pa.Table:
    """Rows with defaults for the columns the earlier stages produce."""
    full = []
    for i, row in enumerate(rows):
        n = len(row["responses"]) if row.get("responses") is not None else 0
        full.append(
            {
                "uuid": f"u{i}",
                "instruction": f"question {i}?",
                "reward_model": "test/rm",
                "response_finish_reasons": ["stop"] * n,
                "task_category": "Math",
                **row,
            }
        )
    schema = pa.schema(
        [
            ("uuid", pa.string()),
            ("instruction", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("rewards", pa.list_(pa.float64())),
            ("reward_model", pa.string()),
            ("response_finish_reasons", pa.list_(pa.string())),
            ("task_category", pa.string()),
        ]
    )
    return pa.Table.from_pylist(full, schema=schema)


def _one(row: dict, **kwargs) -> tuple[dict | None, dict | None]:
    pairs, aside = make_pairs(_table([row]), **kwargs)
    return (pairs.to_pylist() or [None])[0], (aside.to_pylist() or [None])[0]


def test_argmax_argmin_and_messages() -> None:
    pair, aside = _one({"responses": ["a", "b", "c", "d"], "rewards": [0.1, 0.9, -0.5, 0.3]})
    assert aside is None
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 2)
    assert pair["chosen_reward"] == 0.9 and pair["rejected_reward"] == -0.5
    assert math.isclose(pair["reward_margin"], 1.4)
    assert pair["chosen"] == [
        {"content": "question 0?", "role": "user"},
        {"content": "b", "role": "assistant"},
    ]
    assert pair["rejected"][1] == {"content": "c", "role": "assistant"}


def test_output_schema_keeps_inputs_and_field_order() -> None:
    table = _table([{"responses": ["a", "b"], "rewards": [1.0, 0.0]}])
    pairs, aside = make_pairs(table)
    assert pairs.column_names[: table.num_columns] == table.column_names
    assert pairs.column_names[table.num_columns :] == [
        "chosen",
        "rejected",
        "chosen_reward",
        "rejected_reward",
        "reward_margin",
        "chosen_index",
        "rejected_index",
    ]
    assert [f.name for f in pairs.schema.field("chosen").type.value_type] == ["content", "role"]
    assert aside.column_names == [*table.column_names, "set_aside_reason"]
    assert aside.num_rows == 0


def test_ties_first_max_and_last_min() -> None:
    pair, _ = _one({"responses": ["a", "b", "c", "d", "e"], "rewards": [2.0, 0.0, 2.0, 1.0, 0.0]})
    assert (pair["chosen_index"], pair["rejected_index"]) == (0, 4)


def test_all_tied_is_set_aside() -> None:
    pair, aside = _one({"responses": ["a", "b", "c"], "rewards": [0.5, 0.5, 0.5]})
    assert pair is None and aside["set_aside_reason"] == ALL_TIED


def test_min_margin() -> None:
    row = {"responses": ["a", "b"], "rewards": [0.75, 0.25]}
    pair, aside = _one(row, min_margin=0.6)
    assert pair is None and aside["set_aside_reason"] == BELOW_MIN_MARGIN
    pair, aside = _one(row, min_margin=0.5)  # inclusive: margin >= min_margin is kept
    assert aside is None and pair["chosen_index"] == 0


@pytest.mark.parametrize(
    "row",
    [
        {"responses": ["only one"], "rewards": [1.0]},
        {"responses": [], "rewards": []},
        {"responses": None, "rewards": None},
        {"responses": ["a", "b"], "rewards": [1.0, None]},
        {"responses": ["a", "b"], "rewards": None},
        {"responses": ["a", "   \n"], "rewards": [1.0, 2.0]},
        {"responses": ["a", None, ""], "rewards": [1.0, 2.0, 3.0]},
        {"responses": ["a", "b"], "rewards": [1.0, math.nan]},
    ],
)
def test_fewer_than_two_valid(row: dict) -> None:
    pair, aside = _one(row)
    assert pair is None and aside["set_aside_reason"] == TOO_FEW_VALID


def test_invalid_responses_are_skipped_not_chosen() -> None:
    row = {"responses": ["", "b", "c", "d"], "rewards": [9.0, 1.0, None, 0.0]}
    pair, _ = _one(row)
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 3)


def test_truncated_only_dropped_when_asked() -> None:
    row = {
        "responses": ["a", "b", "c"],
        "rewards": [3.0, 2.0, 1.0],
        "response_finish_reasons": ["length", "stop", "stop"],
    }
    pair, _ = _one(row)
    assert pair["chosen_index"] == 0
    pair, _ = _one(row, drop_truncated=True)
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 2)
    row["response_finish_reasons"] = ["length", "stop", "length"]
    pair, aside = _one(row, drop_truncated=True)
    assert pair is None and aside["set_aside_reason"] == TOO_FEW_VALID


def test_drop_truncated_needs_finish_reasons() -> None:
    table = _table([{"responses": ["a", "b"], "rewards": [1.0, 0.0]}])
    table = table.drop_columns(["response_finish_reasons"])
    with pytest.raises(MagpieError, match="response_finish_reasons"):
        make_pairs(table, drop_truncated=True)


def test_empty_instruction_and_length_mismatch() -> None:
    _, aside = _one({"instruction": " ", "responses": ["a", "b"], "rewards": [1.0, 0.0]})
    assert aside["set_aside_reason"] == EMPTY_INSTRUCTION
    _, aside = _one({"responses": ["a", "b"], "rewards": [1.0]})
    assert aside["set_aside_reason"] == REWARDS_MISMATCH


def test_struct_reward_column() -> None:
    table = _table([{"responses": ["a", "b", "c"], "rewards": [None, None, None]}])
    scores = pa.array(
        [[{"score": 0.2}, {"score": 0.7}, {"score": 0.1}]],
        type=pa.list_(pa.struct([("score", pa.float64())])),
    )
    table = table.append_column("rewards_armorm", scores)
    pairs, _ = make_pairs(table, reward_column="rewards_armorm")
    assert pairs.to_pylist()[0]["chosen_index"] == 1


def test_accounting_nothing_lost() -> None:
    rows = [
        {"responses": ["a", "b"], "rewards": [1.0, 0.0]},  # pair
        {"responses": ["a", "b"], "rewards": [1.0, 1.0]},  # tied
        {"responses": ["a"], "rewards": [1.0]},  # too few
        {"responses": ["a", "b"], "rewards": [1.0, 0.95]},  # below margin
        {"responses": ["a", "b", "c"], "rewards": [None, 0.0, 3.0]},  # pair
        {"responses": ["a", "b"], "rewards": [None, None]},  # too few
    ]
    table = _table(rows)
    pairs, aside = make_pairs(table, min_margin=0.1)
    stats = PairStats.from_tables(pairs, aside)
    assert stats.as_dict() == {
        "total": 6,
        "paired": 2,
        "set_aside": {TOO_FEW_VALID: 2, ALL_TIED: 1, BELOW_MIN_MARGIN: 1},
    }
    assert stats.total == stats.paired + sum(stats.set_aside.values()) == table.num_rows
    got = sorted(pairs.column("uuid").to_pylist() + aside.column("uuid").to_pylist())
    assert got == sorted(table.column("uuid").to_pylist())
    assert (stats + stats).as_dict()["set_aside"][TOO_FEW_VALID] == 4


def test_empty_table() -> None:
    pairs, aside = make_pairs(_table([]))
    assert pairs.num_rows == aside.num_rows == 0
    assert "chosen" in pairs.column_names and "set_aside_reason" in aside.column_names


def test_rerun_replaces_pair_columns() -> None:
    table = _table([{"responses": ["a", "b"], "rewards": [0.0, 1.0]}])
    once, _ = make_pairs(table)
    twice, _ = make_pairs(once)
    assert twice.column_names == once.column_names
    assert twice.to_pylist() == once.to_pylist()
