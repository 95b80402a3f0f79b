"""Magpie instruction synthesis: the model writes user queries from the pre-query template alone.

Pure stage: attempt numbers in, a table of accepted rows and a table of rejected attempts out.
Every attempt's seed derives from (run seed, attempt, turn), so the same attempt always gives the
same text whatever batch or shard it lands in.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from magpie.config import InstructionsConfig
from magpie.engines.base import Completion, Engine, ProgressCallback, Request, Sampling
from magpie.schema import REJECTED_SCHEMA, instructions_schema, row_uuid
from magpie.templates import ChatFormat, markers

REJECTION_REASONS = (
    "empty",
    "truncated",
    "too_short",
    "template_leak",
    "duplicate",
    "reply_empty",
    "reply_truncated",
)
_ROLE_LINE = re.compile(r"^\s*(user|assistant|system|model|human|gpt)\s*:?\s*$", re.I | re.M)


def attempt_seed(run_seed: int, attempt: int, turn: int, kind: str = "query") -> int:
    """Deterministic 31-bit seed of one generation in one attempt."""
    digest = hashlib.sha256(f"{run_seed}:{attempt}:{turn}:{kind}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def dedup_key(text: str) -> str:
    """Exact-duplicate key: the text with whitespace runs collapsed."""
    return " ".join(text.split())


@dataclass
class ShardOutput:
    """What one batch of attempts produced."""

    rows: pa.Table
    rejected: pa.Table
    tokens: int
    rejections: Counter[str] = field(default_factory=Counter)


@dataclass
class _Attempt:
    number: int
    seed: int
    turns: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    first_tokens: int = 0


class InstructionStage:
    """Generates and checks instructions (and, for multi-turn, the replies between them)."""

    def __init__(
        self, engine: Engine, chat_format: ChatFormat, config: InstructionsConfig, model_id: str
    ) -> None:
        self.engine = engine
        self.format = chat_format
        self.config = config
        self.model_id = model_id
        self.seen: set[str] = set()
        self._leak_markers = tuple(
            dict.fromkeys(
                markers(chat_format.pre_query + (chat_format.assistant_prefix or ""))
                + [s for s in chat_format.stops if s]
            )
        )
        self._query_sampling = Sampling(
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            stop=chat_format.stops,
        )
        self._reply_sampling = Sampling(
            temperature=config.response_temperature,
            top_p=1.0,
            max_tokens=config.response_max_tokens,
            stop=chat_format.stops,
        )

    def observe(self, rows: pa.Table) -> None:
        """Remember committed rows so later shards reject their duplicates."""
        self.seen.update(dedup_key(t) for t in rows.column("instruction").to_pylist())

    def rejection_reason(self, completion: Completion) -> str | None:
        """Why a generated user message is unusable, or None when it is fine."""
        text = completion.text.strip()
        if not text:
            return "empty"
        if completion.finish_reason == "length":
            return "truncated"
        if len(text) < self.config.min_chars:
            return "too_short"
        if any(m in text for m in self._leak_markers) or _ROLE_LINE.search(text):
            return "template_leak"
        return None

    def run(self, attempts: Sequence[int], on_done: ProgressCallback | None = None) -> ShardOutput:
        """Run `attempts` through every turn; accepted rows are deduplicated in attempt order."""
        live = [_Attempt(a, attempt_seed(self.config.seed, a, 1)) for a in attempts]
        rejected: list[dict] = []
        tokens = 0
        for turn in range(1, self.config.turns + 1):
            if turn > 1:
                live, used = self._reply(live, turn - 1, rejected, on_done)
                tokens += used
            live, used = self._query(live, turn, rejected, on_done)
            tokens += used
        if self.config.turns > 1:
            live, used = self._reply(live, self.config.turns, rejected, on_done)
            tokens += used
        rows = []
        for attempt in live:
            key = dedup_key(attempt.turns[0][0])
            if key in self.seen:
                rejected.append(_rejection(attempt.number, "duplicate", attempt.turns[0][0], 1))
                continue
            self.seen.add(key)
            rows.append(self._row(attempt))
        schema = instructions_schema(self.config.turns > 1)
        return ShardOutput(
            rows=pa.Table.from_pylist(rows, schema=schema),
            rejected=pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
            tokens=tokens,
            rejections=Counter(r["reason"] for r in rejected),
        )

    def _query(
        self,
        live: list[_Attempt],
        turn: int,
        rejected: list[dict],
        on_done: ProgressCallback | None,
    ) -> tuple[list[_Attempt], int]:
        requests = [
            Request(
                prompt=self.format.query_prompt(a.turns),
                sampling=self._query_sampling,
                seed=attempt_seed(self.config.seed, a.number, turn),
            )
            for a in live
        ]
        results = self.engine.generate(requests, on_done) if requests else []
        kept, used = [], 0
        for attempt, (completion,) in zip(live, results, strict=True):
            used += completion.completion_tokens
            reason = self.rejection_reason(completion)
            if reason is not None:
                rejected.append(_rejection(attempt.number, reason, completion.text, turn))
                continue
            attempt.turns.append((completion.text.strip(), ""))
            if turn == 1:
                attempt.first_tokens = completion.completion_tokens
            kept.append(attempt)
        return kept, used

    def _reply(
        self,
        live: list[_Attempt],
        turn: int,
        rejected: list[dict],
        on_done: ProgressCallback | None,
    ) -> tuple[list[_Attempt], int]:
        requests = [
            Request(
                prompt=self.format.response_prompt(a.turns[:-1], a.turns[-1][0]),
                sampling=self._reply_sampling,
                seed=attempt_seed(self.config.seed, a.number, turn, "reply"),
            )
            for a in live
        ]
        results = self.engine.generate(requests, on_done) if requests else []
        kept, used = [], 0
        for attempt, (completion,) in zip(live, results, strict=True):
            used += completion.completion_tokens
            text = completion.text.strip()
            reason = (
                "reply_empty"
                if not text
                else "reply_truncated"
                if completion.finish_reason == "length"
                else None
            )
            if reason is not None:
                rejected.append(_rejection(attempt.number, reason, completion.text, turn))
                continue
            attempt.turns[-1] = (attempt.turns[-1][0], text)
            kept.append(attempt)
        return kept, used

    def _row(self, attempt: _Attempt) -> dict:
        instruction = attempt.turns[0][0]
        row = {
            "uuid": row_uuid(instruction),
            "instruction": instruction,
            "gen_input_configs": {
                "temperature": self.config.temperature,
                "top_p": self.config.top_p,
                "input_generator": self.model_id,
                "seed": attempt.seed,
                "pre_query_template": self.format.pre_query,
            },
            "instruction_length": len(instruction),
            "instruction_tokens": attempt.first_tokens,
            "attempt": attempt.number,
        }
        if self.config.turns > 1:
            row["conversations"] = [
                message
                for user, reply in attempt.turns
                for message in ({"from": "human", "value": user}, {"from": "gpt", "value": reply})
            ]
        return row


def _rejection(attempt: int, reason: str, text: str, turn: int) -> dict:
    return {"attempt": attempt, "reason": reason, "text": text, "turn": turn}
