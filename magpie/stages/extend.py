"""Multi-turn extension of single-turn rows (`magpie extend`), as Magpie's MT sets were made.

For each follow-up turn the model first writes the next *user* message: its prompt is the
pre-query continuation of the conversation so far (system turn, earlier turns, then the user
header) under a system prompt saying the user asks follow-up questions. Then the model replies
with its normal chat template. User turns and replies have separate sampling (user turns
T=1.0 / top_p 1.0, replies greedy by default, as the original MT script).

Pure stage: a slice of rows in (each with `conversations`, or `instruction` + `response`), the
same rows with a longer `conversations` and the flat `instruction_2`, `response_2`, ... columns
out; rows whose follow-up fails (empty, truncated, template leak) are set aside with the reason.
Every generation's seed derives from (run seed, uuid, turn, kind), so a resumed shard writes the
same rows.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from magpie.config import EngineSpec, TemplateSpec
from magpie.engines.base import Completion, Engine, Request, Sampling
from magpie.errors import MagpieError
from magpie.prompts import FOLLOWUP_SYSTEM_PROMPT
from magpie.schema import SHAREGPT_MESSAGE
from magpie.stages.base import Progress, TransformOutput
from magpie.templates import ChatFormat, markers

_ROLE_LINE = re.compile(r"^\s*(user|assistant|system|model|human|gpt)\s*:?\s*$", re.I | re.M)
REASONS = ("user_empty", "user_truncated", "user_too_short", "user_leak", "reply_empty")


class ExtendConfig(BaseModel):
    """`magpie extend`: add follow-up turns to single-turn (or shorter) conversations."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: EngineSpec = Field(default_factory=EngineSpec)
    template: TemplateSpec = Field(
        default_factory=TemplateSpec, description="chat format of the replies"
    )
    followup_system_prompt: str | None = Field(
        None,
        description="system turn of the user-turn prompt: text, 'none', or None = our default",
    )
    turns: int = Field(2, ge=2, le=16, description="user turns per conversation after extension")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="user turns")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="user turns")
    max_tokens: int = Field(256, gt=0, description="max new tokens of a user turn")
    response_temperature: float = Field(0.0, ge=0.0, le=5.0, description="replies")
    response_top_p: float = Field(1.0, gt=0.0, le=1.0, description="replies")
    response_max_tokens: int = Field(1024, gt=0, description="max new tokens of a reply")
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0, description="replies")
    min_chars: int = Field(8, ge=0, description="shorter user turns set the row aside")
    seed: int = Field(0, ge=0)
    shard_size: int = Field(16, gt=0, description="rows per committed shard")


def followup_template(config: ExtendConfig) -> TemplateSpec:
    """Template settings of the user-turn prompt: the reply template with the follow-up system."""
    system = config.followup_system_prompt
    return config.template.model_copy(
        update={"system_prompt": FOLLOWUP_SYSTEM_PROMPT if system is None else system}
    )


def turn_seed(run_seed: int, uuid: str, turn: int, kind: str) -> int:
    """Deterministic 31-bit seed of one generation of one row."""
    digest = hashlib.sha256(f"{run_seed}:{uuid}:{turn}:{kind}:extend".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def row_turns(row: dict) -> list[tuple[str, str]]:
    """The (user, assistant) turns of a row: its `conversations`, else instruction + response."""
    messages = row.get("conversations") or []
    if messages:
        users = [m["value"] for m in messages if m["from"] in ("human", "user")]
        replies = [m["value"] for m in messages if m["from"] in ("gpt", "assistant")]
        if len(users) != len(replies):
            raise MagpieError(
                f"row {row.get('uuid')}: its conversation does not end with an assistant reply; "
                "run `magpie responses --n 1` first"
            )
        return list(zip(users, replies, strict=True))
    response = row.get("response")
    if response is None:
        raise MagpieError(
            f"row {row.get('uuid')} has no response to extend: run `magpie responses --n 1` first "
            "(or give rows with `instruction` and `response`)"
        )
    return [(row["instruction"], response)]


def flat_column_names(turns: int) -> list[str]:
    """`instruction_2`, `response_2`, ... up to `turns`."""
    return [f"{kind}_{t}" for t in range(2, turns + 1) for kind in ("instruction", "response")]


@dataclass
class _Row:
    index: int
    uuid: str
    turns: list[tuple[str, str]]
    failed: str | None = None
    failed_text: str = ""
    failed_turn: int = 0
    truncated: int = 0


@dataclass
class ExtendStage:
    """Adds follow-up turns to a slice of rows (see the module docstring)."""

    name: ClassVar[str] = "extend"
    required_columns: ClassVar[tuple[str, ...]] = ("instruction", "uuid")

    engine: Engine
    query_format: ChatFormat
    """Chat format with the follow-up system turn: its pre-query continuation asks for the user."""
    reply_format: ChatFormat
    config: ExtendConfig
    _leaks: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.query_format.require_assistant_prefix()
        self.reply_format.require_assistant_prefix()
        if self.query_format.turn_append is None:
            self.query_format.query_prompt([("x", "y")])  # raises the one-line fix
        text = self.query_format.pre_query + (self.query_format.assistant_prefix or "")
        self._leaks = tuple(
            dict.fromkeys(markers(text) + [s for s in self.query_format.stops if s])
        )

    @property
    def user_sampling(self) -> Sampling:
        c = self.config
        return Sampling(c.temperature, c.top_p, c.max_tokens, stop=self.query_format.stops)

    @property
    def reply_sampling(self) -> Sampling:
        c = self.config
        return Sampling(
            c.response_temperature,
            c.response_top_p,
            c.response_max_tokens,
            repetition_penalty=c.repetition_penalty,
            stop=self.reply_format.stops,
        )

    def user_problem(self, completion: Completion) -> str | None:
        """Why a generated follow-up user message is unusable, or None."""
        text = completion.text.strip()
        if not text:
            return "user_empty"
        if completion.finish_reason == "length":
            return "user_truncated"
        if len(text) < self.config.min_chars:
            return "user_too_short"
        if any(m in text for m in self._leaks) or _ROLE_LINE.search(text):
            return "user_leak"
        return None

    def __call__(self, table: pa.Table, progress: Progress) -> TransformOutput:
        rows = [_Row(i, r["uuid"], row_turns(r)) for i, r in enumerate(table.to_pylist())]
        tokens = 0
        for turn in range(2, self.config.turns + 1):
            live = [r for r in rows if r.failed is None and len(r.turns) < turn]
            tokens += self._users(live, turn, progress)
            live = [r for r in live if r.failed is None]
            tokens += self._replies(live, turn, progress)
        progress.on_done(len(rows), 0)
        kept = [r.index for r in rows if r.failed is None]
        out = _with_turns(table.take(pa.array(kept, pa.int64())), [rows[i] for i in kept])
        out = _flatten(out, [rows[i] for i in kept], self.config.turns)
        failed = [r for r in rows if r.failed is not None]
        rejected = None
        if failed:
            rejected = table.take(pa.array([r.index for r in failed], pa.int64()))
            rejected = rejected.append_column("reason", pa.array([r.failed for r in failed]))
            rejected = rejected.append_column("text", pa.array([r.failed_text for r in failed]))
            rejected = rejected.append_column(
                "turn", pa.array([r.failed_turn for r in failed], pa.int32())
            )
        return TransformOutput(
            rows=out,
            rejected=rejected,
            tokens=tokens,
            rejections={
                **Counter(r.failed for r in failed),
                "reply_truncated_kept": sum(r.truncated for r in rows if r.failed is None),
            },
        )

    def _users(self, live: list[_Row], turn: int, progress: Progress) -> int:
        requests = [
            Request(
                self.query_format.query_prompt(r.turns),
                self.user_sampling,
                seed=turn_seed(self.config.seed, r.uuid, turn, "user"),
            )
            for r in live
        ]
        results = self.engine.generate(requests, lambda _n, t: progress.on_done(0, t))
        used = 0
        for row, (completion,) in zip(live, results, strict=True):
            used += completion.completion_tokens
            problem = self.user_problem(completion)
            if problem is not None:
                row.failed, row.failed_text, row.failed_turn = problem, completion.text, turn
            else:
                row.turns.append((completion.text.strip(), ""))
        return used

    def _replies(self, live: list[_Row], turn: int, progress: Progress) -> int:
        requests = [
            Request(
                self.reply_format.response_prompt(r.turns[:-1], r.turns[-1][0]),
                self.reply_sampling,
                seed=turn_seed(self.config.seed, r.uuid, turn, "reply"),
            )
            for r in live
        ]
        results = self.engine.generate(requests, lambda _n, t: progress.on_done(0, t))
        used = 0
        for row, (completion,) in zip(live, results, strict=True):
            used += completion.completion_tokens
            text = completion.text.strip()
            if not text:
                row.failed, row.failed_text, row.failed_turn = "reply_empty", completion.text, turn
            else:
                # a reply cut at max tokens is kept (and counted), as the responses stage does
                row.turns[-1] = (row.turns[-1][0], text)
                row.truncated += completion.finish_reason == "length"
        return used


def _with_turns(table: pa.Table, rows: list[_Row]) -> pa.Table:
    conversations = [
        [
            message
            for user, reply in r.turns
            for message in ({"from": "human", "value": user}, {"from": "gpt", "value": reply})
        ]
        for r in rows
    ]
    values = pa.array(conversations, type=pa.list_(SHAREGPT_MESSAGE))
    return _set(table, "conversations", values)


def _flatten(table: pa.Table, rows: list[_Row], turns: int) -> pa.Table:
    for t in range(2, turns + 1):
        for kind, part in (("instruction", 0), ("response", 1)):
            values = [r.turns[t - 1][part] if len(r.turns) >= t else None for r in rows]
            table = _set(table, f"{kind}_{t}", pa.array(values, pa.string()))
    return table


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
