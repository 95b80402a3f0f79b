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
from magpie.engines.base import (
    Completion,
    Engine,
    ProgressCallback,
    Request,
    Sampling,
    generate_until,
)
from magpie.errors import MagpieError
from magpie.sanitize import sanitize_instruction
from magpie.schema import REJECTED_SCHEMA, instructions_schema, row_uuid
from magpie.stages.base import Progress, TransformOutput
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
    attempts_run: int | None = None
    """Attempts generated when an aimed block stopped early (None: every attempt ran)."""


@dataclass
class _Attempt:
    number: int
    seed: int
    turns: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    first_tokens: int = 0
    raw: str = ""
    """The first user turn as generated, before `sanitize`."""


class InstructionStage:
    """Generates and checks instructions (and, for multi-turn, the replies between them).

    Its slices are blocks of attempt numbers (an `attempt` column); a block's rows depend only on
    the config and the block, so blocks run in any order on any worker. Duplicates are removed
    within a block here and across blocks by `InstructionGate` on the driver.
    """

    name = "instructions"
    required_columns = ("attempt",)

    def __init__(
        self, engine: Engine, chat_format: ChatFormat, config: InstructionsConfig, model_id: str
    ) -> None:
        self.engine = engine
        self.format = chat_format
        self.config = config
        self.model_id = model_id
        self._leak_markers = tuple(
            dict.fromkeys(
                markers(chat_format.pre_query + (chat_format.assistant_prefix or ""))
                + [s for s in chat_format.stops if s]
            )
        )
        self._target: tuple[int, set[str]] | None = None
        self._next_block: list[int] = []
        self._ahead: list[int] = []
        self._stop_at: tuple[int, set[str]] | None = None
        self._ran: int | None = None
        for text in config.first_token_ban:  # checked before any output is opened
            count = engine.count_tokens(text)
            if count != 1:
                raise MagpieError(
                    f"first_token_ban {text!r} is {count} tokens for {model_id}, not one: "
                    "list single tokens of this model (--ban-first-token)"
                )
        self._query_sampling = Sampling(
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            stop=chat_format.stops + (("\n",) if config.stop_at_newline else ()),
            first_token_ban=tuple(config.first_token_ban),
            first_token_boost=config.first_token_boost,
        )
        self._reply_sampling = Sampling(
            temperature=config.response_temperature,
            top_p=1.0,
            max_tokens=config.response_max_tokens,
            stop=chat_format.stops,
        )

    def user_text(self, completion: Completion) -> str:
        """The user message a generation gives: stripped, and sanitized when configured."""
        if self.config.sanitize:
            return sanitize_instruction(completion.text)
        return completion.text.strip()

    def rejection_reason(self, completion: Completion, text: str | None = None) -> str | None:
        """Why a generated user message (`text`, else the completion's) is unusable, or None."""
        text = completion.text.strip() if text is None else text
        if not text:
            return "empty"
        if completion.finish_reason == "length":
            return "truncated"
        if len(text) < self.config.min_chars:
            return "too_short"
        if any(m in text for m in self._leak_markers) or _ROLE_LINE.search(text):
            return "template_leak"
        return None

    def __call__(self, rows: pa.Table, progress: Progress) -> TransformOutput:
        """Run the attempts of a block (its `attempt` column); see `run`."""
        out = self.run(rows.column("attempt").to_pylist(), progress.on_done)
        return TransformOutput(
            rows=out.rows,
            rejected=out.rejected,
            tokens=out.tokens,
            rejections=dict(out.rejections),
            attempts_run=out.attempts_run,
        )

    def aim(self, needed: int, seen: set[str]) -> None:
        """For the next block only: the driver still needs `needed` rows and has the dedup keys
        `seen` (read, not copied: the block runs before the driver commits anything else).

        A single-turn block then stops generating once its attempts, taken in order, hold that
        many new rows; the attempts after them could only be trimmed away by the gate, so the
        committed rows are those of the whole block. Multi-turn blocks run whole.
        """
        self._target = (needed, seen)

    def prefetch(self, rows: pa.Table | None) -> None:
        """For the next block only: the block that runs after it (its `attempt` column), or
        None. A single-turn aimed block passes that block's queries to the engine as spare
        requests: an engine that takes them (`takes_spare`) starts them in the slots the
        block's own tail leaves free, at most as many as the rows this block cannot give (see
        `_EnoughRows.admit`), and the next block takes them over. The rows of either
        block do not change (the engine's results are batch-invariant)."""
        self._next_block = [] if rows is None else rows.column("attempt").to_pylist()

    def run(self, attempts: Sequence[int], on_done: ProgressCallback | None = None) -> ShardOutput:
        """Run `attempts` through every turn; rows are deduplicated within the block."""
        target, self._target = self._target, None
        self._ahead, self._next_block = self._next_block, []
        self._stop_at = target if self.config.turns == 1 else None
        self._ran: int | None = None
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
        rows, seen = [], set()
        for attempt in live:
            key = dedup_key(attempt.turns[0][0])
            if key in seen:
                rejected.append(_rejection(attempt.number, "duplicate", attempt.turns[0][0], 1))
                continue
            seen.add(key)
            rows.append(self._row(attempt))
        schema = instructions_schema(self.config.turns > 1)
        if self.config.sanitize:
            schema = schema.append(pa.field("raw_instruction", pa.string()))
        return ShardOutput(
            rows=pa.Table.from_pylist(rows, schema=schema),
            rejected=pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
            tokens=tokens,
            rejections=Counter(r["reason"] for r in rejected),
            attempts_run=self._ran,
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
        if self._stop_at is not None and turn == 1 and requests:
            spare = [
                Request(
                    prompt=self.format.query_prompt([]),
                    sampling=self._query_sampling,
                    seed=attempt_seed(self.config.seed, number, 1),
                )
                for number in self._ahead
            ]
            rule = _EnoughRows(self, *self._stop_at, len(requests))
            results = generate_until(self.engine, requests, on_done, rule, spare)
            if rule.enough:  # what finished after the attempts that gave the rows depends on
                # the schedule: drop it, so the block's output depends on the block alone
                results[rule.counted :] = [None] * (len(results) - rule.counted)
            ran = sum(r is not None for r in results)
            self._ran = ran if ran < len(requests) else None
        else:
            results = self.engine.generate(requests, on_done) if requests else []
        kept, used = [], 0
        for attempt, result in zip(live, results, strict=True):
            if result is None:  # not run: the block had enough rows before it
                continue
            (completion,) = result
            used += completion.completion_tokens
            text = self.user_text(completion)
            reason = self.rejection_reason(completion, text)
            if reason is not None:
                rejected.append(_rejection(attempt.number, reason, completion.text, turn))
                continue
            attempt.turns.append((text, ""))
            if turn == 1:
                attempt.first_tokens = completion.completion_tokens
                attempt.raw = completion.text
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
        if self.config.sanitize:
            row["raw_instruction"] = attempt.raw
        if self.config.turns > 1:
            row["conversations"] = [
                message
                for user, reply in attempt.turns
                for message in ({"from": "human", "value": user}, {"from": "gpt", "value": reply})
            ]
        return row


def _rejection(attempt: int, reason: str, text: str, turn: int) -> dict:
    return {"attempt": attempt, "reason": reason, "text": text, "turn": turn}


class InstructionGate:
    """Driver-side, in attempt order: drops rows seen in earlier blocks and trims to `num`.

    Blocks are committed in order through it, so the dataset equals what one process running
    every attempt in order would keep, however the blocks were scheduled.
    """

    def __init__(self, num: int) -> None:
        self.num = num
        self.rows = 0
        self.seen: set[str] = set()

    @property
    def done(self) -> bool:
        return self.rows >= self.num

    def remaining(self) -> tuple[int, set[str]]:
        """Rows still wanted and the dedup keys already taken (for `InstructionStage.aim`)."""
        return self.num - self.rows, self.seen

    def observe(self, rows: pa.Table | None) -> None:
        """Account for a block an earlier run committed."""
        if rows is not None:
            self.seen.update(dedup_key(t) for t in rows.column("instruction").to_pylist())
            self.rows += rows.num_rows

    def accept(self, out: TransformOutput) -> tuple[TransformOutput, dict]:
        """The part of a block's output to commit, and bookkeeping for its shard info."""
        keep, dropped = [], []
        attempts = out.rows.column("attempt").to_pylist()
        for i, text in enumerate(out.rows.column("instruction").to_pylist()):
            key = dedup_key(text)
            if key in self.seen:
                dropped.append(_rejection(attempts[i], "duplicate", text, 1))
            else:
                self.seen.add(key)
                keep.append(i)
        rows = out.rows.take(pa.array(keep, pa.int64()))
        kept = rows.slice(0, self.num - self.rows)
        self.rows += kept.num_rows
        rejections = Counter(out.rejections)
        rejections.update(r["reason"] for r in dropped)
        rejected = out.rejected
        if dropped:
            extra = pa.Table.from_pylist(dropped, schema=REJECTED_SCHEMA)
            rejected = extra if rejected is None else pa.concat_tables([rejected, extra])
        accepted = TransformOutput(
            rows=kept, rejected=rejected, tokens=out.tokens, rejections=dict(rejections)
        )
        return accepted, {"surplus": rows.num_rows - kept.num_rows}


ADMIT_ACCEPT_GUESS = 0.5
"""Share of the attempts in flight an aimed block counts on to become rows when it decides
whether to start another (measured acceptance of SmolLM2 at T=1: ~0.7; lower starts more)."""


class _EnoughRows:
    """An aimed block's stop rule: true once the attempts finished so far, in order from the
    first, hold `needed` rows that are new to the driver (`seen`) and to the block. It also
    holds attempts back while those in flight are likely to give the rows still needed: near a
    block's end, 32 attempts would run where a few are needed, and the rest be dropped."""

    def __init__(self, stage: InstructionStage, needed: int, seen: set[str], size: int) -> None:
        self._stage, self._needed, self._seen, self._size = stage, needed, seen, size
        self._finished: dict[int, Completion] = {}
        self._keys: set[str] = set()
        self._next = 0  # attempts before this one are counted, in order
        self._rows = 0

    @property
    def enough(self) -> bool:
        """Whether the attempts counted hold the rows needed."""
        return self._rows >= self._needed

    @property
    def counted(self) -> int:
        """Attempts counted, in order from the first."""
        return self._next

    def __call__(self, index: int, completions: list[Completion]) -> bool:
        self._finished[index] = completions[0]
        # stop counting at the attempt that gives the last row needed: an attempt after it may
        # have finished first (the schedule decides), and counting it would make the block's
        # output depend on the schedule
        while self._rows < self._needed and self._next in self._finished:
            completion = self._finished.pop(self._next)
            self._next += 1
            text = self._stage.user_text(completion)
            key = dedup_key(text)
            fresh = key not in self._seen and key not in self._keys
            if fresh and self._stage.rejection_reason(completion, text) is None:
                self._keys.add(key)
                self._rows += 1
        return self._rows >= self._needed

    def admit(self, index: int) -> bool:
        """Start attempt `index` (every earlier one started) unless the rows so far plus the
        likely rows of the attempts in flight reach those needed.

        An index past the block's attempts is one of the next block's, run ahead as a spare
        request: it starts only while the rows so far plus every other attempt started or
        left (each counted as a row) fall short of those needed, so the spares started are at
        most the rows the block cannot give."""
        in_flight = index - self._next
        if index >= self._size:
            return self._rows + in_flight < self._needed
        return self._rows + ADMIT_ACCEPT_GUESS * in_flight < self._needed
