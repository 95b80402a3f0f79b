"""Chosen / rejected pair selection for DPO data.

Pure: a table of rows with ``responses`` and their rewards goes in; a table of pairs and a table
of rows set aside (with a ``set_aside_reason``) come out. No row is ever dropped silently:
``len(pairs) + len(set_aside) == len(table)`` always holds.

Selection rule, among the *valid* responses of a row (non-blank text, a finite reward, and, when
``drop_truncated``, a finish reason other than ``"length"``):

- chosen = the highest reward; on a tie, the **first** such index;
- rejected = the lowest reward; on a tie, the **last** such index.

So chosen and rejected are always different responses whenever the rewards are not all equal.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from magpie.errors import MagpieError
from magpie.schema import CHAT_MESSAGE

MESSAGES_TYPE = pa.list_(CHAT_MESSAGE)

# set_aside_reason values, in the order they are checked
EMPTY_INSTRUCTION = "empty_instruction"
REWARDS_MISMATCH = "responses_rewards_mismatch"
TOO_FEW_VALID = "too_few_valid"
ALL_TIED = "all_tied"
BELOW_MIN_MARGIN = "below_min_margin"
REASONS = (EMPTY_INSTRUCTION, REWARDS_MISMATCH, TOO_FEW_VALID, ALL_TIED, BELOW_MIN_MARGIN)

PAIR_COLUMNS: dict[str, pa.DataType] = {
    "chosen": MESSAGES_TYPE,
    "rejected": MESSAGES_TYPE,
    "chosen_reward": pa.float64(),
    "rejected_reward": pa.float64(),
    "reward_margin": pa.float64(),
    "chosen_index": pa.int32(),
    "rejected_index": pa.int32(),
}
TRUNCATED_FINISH_REASON = "length"


@dataclass
class PairStats:
    """Row counts of one pairing run; ``total == paired + sum(set_aside.values())``."""

    total: int = 0
    paired: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tables(cls, pairs: pa.Table, set_aside: pa.Table) -> PairStats:
        """Count the outputs of :func:`make_pairs`."""
        reasons = Counter(set_aside.column("set_aside_reason").to_pylist())
        return cls(
            total=pairs.num_rows + set_aside.num_rows,
            paired=pairs.num_rows,
            set_aside={r: reasons[r] for r in REASONS if reasons[r]},
        )

    def __add__(self, other: PairStats) -> PairStats:
        merged = Counter(self.set_aside) + Counter(other.set_aside)
        return PairStats(
            total=self.total + other.total,
            paired=self.paired + other.paired,
            set_aside={r: merged[r] for r in REASONS if merged[r]},
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the run summary."""
        return {"total": self.total, "paired": self.paired, "set_aside": dict(self.set_aside)}


@dataclass(frozen=True)
class _Choice:
    """Outcome for one row: either a pair (indices and rewards) or a reason to set it aside."""

    reason: str | None = None
    chosen: int = -1
    rejected: int = -1
    chosen_reward: float = math.nan
    rejected_reward: float = math.nan


def _as_score(value: Any) -> float | None:
    """A finite float from a reward cell (a number or a ``{"score": x}`` struct), else None."""
    if isinstance(value, dict):
        value = value.get("score")
    if value is None:
        return None
    score = float(value)
    return score if math.isfinite(score) else None


def _valid_indices(
    responses: list[str | None],
    scores: list[float | None],
    finish: list[str | None] | None,
) -> list[int]:
    """Indices of responses with non-blank text, a score, and (if given) not truncated."""
    out = []
    for i, (text, score) in enumerate(zip(responses, scores, strict=True)):
        if text is None or not text.strip() or score is None:
            continue
        if finish is not None and i < len(finish) and finish[i] == TRUNCATED_FINISH_REASON:
            continue
        out.append(i)
    return out


def _choose(
    instruction: str | None,
    responses: list[str | None] | None,
    rewards: list[Any] | None,
    finish: list[str | None] | None,
    min_margin: float,
) -> _Choice:
    """Pick chosen/rejected for one row, or say why it is set aside."""
    if instruction is None or not instruction.strip():
        return _Choice(EMPTY_INSTRUCTION)
    responses = responses or []
    rewards = rewards if rewards is not None else [None] * len(responses)
    if len(rewards) != len(responses):
        return _Choice(REWARDS_MISMATCH)
    scores = [_as_score(r) for r in rewards]
    valid = _valid_indices(responses, scores, finish)
    if len(valid) < 2:
        return _Choice(TOO_FEW_VALID)
    best = max(scores[i] for i in valid)  # type: ignore[type-var]
    worst = min(scores[i] for i in valid)  # type: ignore[type-var]
    if best == worst:
        return _Choice(ALL_TIED)
    if best - worst < min_margin:
        return _Choice(BELOW_MIN_MARGIN)
    chosen = next(i for i in valid if scores[i] == best)
    rejected = next(i for i in reversed(valid) if scores[i] == worst)
    return _Choice(None, chosen, rejected, best, worst)


def _conversation(instruction: str, response: str) -> list[dict[str, str]]:
    return [
        {"content": instruction, "role": "user"},
        {"content": response, "role": "assistant"},
    ]


def _pair_columns(
    instructions: list[str], responses: list[list[str]], choices: list[_Choice]
) -> dict[str, pa.Array]:
    """The new columns for the paired rows, in :data:`PAIR_COLUMNS` order."""
    values: dict[str, list[Any]] = {name: [] for name in PAIR_COLUMNS}
    for instruction, texts, c in zip(instructions, responses, choices, strict=True):
        values["chosen"].append(_conversation(instruction, texts[c.chosen]))
        values["rejected"].append(_conversation(instruction, texts[c.rejected]))
        values["chosen_reward"].append(c.chosen_reward)
        values["rejected_reward"].append(c.rejected_reward)
        values["reward_margin"].append(c.chosen_reward - c.rejected_reward)
        values["chosen_index"].append(c.chosen)
        values["rejected_index"].append(c.rejected)
    return {name: pa.array(values[name], type=t) for name, t in PAIR_COLUMNS.items()}


def _with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Append (or replace, keeping position) each named column."""
    for name, array in columns.items():
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, array) if idx >= 0 else table.append_column(name, array)
    return table


def _require(table: pa.Table, *names: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise MagpieError(f"pairs: input lacks column(s) {missing}; run the earlier stages first")


def make_pairs(
    table: pa.Table,
    min_margin: float = 0.0,
    drop_truncated: bool = False,
    reward_column: str = "rewards",
) -> tuple[pa.Table, pa.Table]:
    """Split ``table`` into (pairs, set_aside).

    ``pairs`` keeps every input column and adds ``chosen``/``rejected`` (``[user, assistant]``
    message lists), ``chosen_reward``, ``rejected_reward``, ``reward_margin``, ``chosen_index``
    and ``rejected_index``. ``set_aside`` keeps every input column and adds ``set_aside_reason``
    (one of :data:`REASONS`). ``reward_column`` may hold ``list<double>`` or
    ``list<struct<score: double>>`` (e.g. ``rewards_armorm``). Use :meth:`PairStats.from_tables`
    for the counts.
    """
    _require(table, "instruction", "responses", reward_column)
    if drop_truncated:
        _require(table, "response_finish_reasons")
    instructions = table.column("instruction").to_pylist()
    responses = table.column("responses").to_pylist()
    rewards = table.column(reward_column).to_pylist()
    finishes = (
        table.column("response_finish_reasons").to_pylist()
        if drop_truncated
        else [None] * table.num_rows
    )
    choices = [
        _choose(ins, resp, rew, fin, min_margin)
        for ins, resp, rew, fin in zip(instructions, responses, rewards, finishes, strict=True)
    ]
    keep = [i for i, c in enumerate(choices) if c.reason is None]
    drop = [i for i, c in enumerate(choices) if c.reason is not None]

    pairs = table.take(pa.array(keep, type=pa.int64()))
    if "set_aside_reason" in pairs.column_names:  # a re-run over earlier set-aside rows
        pairs = pairs.drop_columns(["set_aside_reason"])
    pairs = _with_columns(
        pairs,
        _pair_columns(
            [instructions[i] for i in keep],
            [responses[i] for i in keep],
            [choices[i] for i in keep],
        ),
    )
    set_aside = table.take(pa.array(drop, type=pa.int64()))
    reasons = pa.array([choices[i].reason for i in drop], type=pa.string())
    set_aside = _with_columns(set_aside, {"set_aside_reason": reasons})
    return pairs, set_aside
