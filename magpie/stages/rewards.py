"""A reward for every response: the pure scoring stage over any reward backend.

Backends (a sequence-classification reward model, an LLM judge) implement `Scorer`. Each response
is scored as the conversation [user: instruction, assistant: response] (earlier turns first for
multi-turn rows); blank responses are not scored and get a null reward.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import pyarrow as pa

from magpie.engines.base import batch_invariant
from magpie.schema import REWARD_COLUMNS, REWARD_SCORE
from magpie.stages.base import Progress, TransformOutput, dialogue

Conversation = list[dict[str, str]]


class Scorer(Protocol):
    """A reward backend: one float per conversation (NaN or None where it has no score)."""

    model_id: str
    column: str

    def score(
        self,
        conversations: Sequence[Conversation],
        progress: Callable[[int], None] | None = None,
    ) -> list[float]: ...


def conversation(history: list[tuple[str, str]], user: str, response: str) -> Conversation:
    turns = [*history, (user, response)]
    return [
        message
        for u, a in turns
        for message in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
    ]


class RewardStage:
    """Adds `rewards` (list of floats), `reward_model` and `rewards_<name>` (list of {score})."""

    name = "score"
    required_columns = ("instruction", "responses")

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def __call__(self, table: pa.Table, progress: Progress) -> TransformOutput:
        rows = table.to_pylist()
        conversations, places = [], []
        for i, row in enumerate(rows):
            history, user = dialogue(row)
            for j, response in enumerate(row["responses"] or []):
                if response and response.strip():
                    conversations.append(conversation(history, user, response))
                    places.append((i, j))
        scores = self.scorer.score(conversations, _row_progress(places, progress))
        rewards: list[list[float | None]] = [[None] * len(r["responses"] or []) for r in rows]
        for (i, j), value in zip(places, scores, strict=True):
            if value is not None and math.isfinite(value):
                rewards[i][j] = float(value)
        out = table
        for name, values, dtype in [
            ("rewards", rewards, REWARD_COLUMNS["rewards"]),
            ("reward_model", [self.scorer.model_id] * len(rows), REWARD_COLUMNS["reward_model"]),
            (
                self.scorer.column,
                [[{"score": v} for v in r] for r in rewards],
                pa.list_(REWARD_SCORE),
            ),
        ]:
            array = pa.array(values, type=dtype)
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, array)
            else:
                out = out.append_column(name, array)
        return self.account(out)

    @property
    def poolable(self) -> bool:
        """Whether several shards may be scored in one call: only by a scorer that says its
        scores do not depend on the batch (a classifier's padded batches do, and so does a
        judge that decodes inexactly)."""
        return batch_invariant(self.scorer)

    def account(self, rows: pa.Table) -> TransformOutput:
        """The output of these rows with its bookkeeping: responses left unscored."""
        unscored = sum(v is None for r in rows.column("rewards").to_pylist() for v in r)
        return TransformOutput(rows=rows, rejections={"unscored": unscored} if unscored else {})


def _row_progress(places: list[tuple[int, int]], progress: Progress) -> Callable[[int], None]:
    """Turn the scorer's 'n more conversations' into 'n more rows finished'."""
    last_of_row: dict[int, int] = {}
    for k, (i, _) in enumerate(places):
        last_of_row[i] = k
    ends = sorted(last_of_row.values())
    state = {"scored": 0, "rows": 0}

    def advance(count: int) -> None:
        state["scored"] += count
        rows = bisect.bisect_right(ends, state["scored"] - 1)
        progress.on_done(rows - state["rows"], 0)
        state["rows"] = rows

    return advance
