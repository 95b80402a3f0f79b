"""Magpie's "unitag" row tags: difficulty, input quality, task category, safety, language, reward.

Pure stage over a slice of rows. Judge tags ask a chat model for one JSON object per row, decoded
under the tag's JSON schema (so every answer parses), validated, retried once at a higher
temperature when it still fails, and stored as null with the reason counted after that.
Embedding nearest-neighbour statistics need the whole dataset and live in `neighbors.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError

from magpie.engines.base import Completion, Engine, Request, Sampling
from magpie.errors import MagpieError
from magpie.prompts import (
    TAG_CATEGORY_PROMPT,
    TAG_DIFFICULTY_PROMPT,
    TAG_QUALITY_PROMPT,
    TAG_SAFETY_CONVERSATION_PROMPT,
    TAG_SAFETY_PROMPT,
    conversation_text,
    tag_prompt,
)
from magpie.schema import TAG_COLUMNS
from magpie.stages.base import Progress, TransformOutput
from magpie.templates import ChatFormat

Difficulty = Literal["very easy", "easy", "medium", "hard", "very hard"]
Quality = Literal["very poor", "poor", "average", "good", "excellent"]
TaskCategory = Literal[
    "Information seeking",
    "Reasoning",
    "Planning",
    "Editing",
    "Coding & Debugging",
    "Math",
    "Role playing",
    "Data analysis",
    "Creative writing",
    "Advice seeking",
    "Brainstorming",
    "Others",
]
HAZARDS = {
    "S1": "Violent crimes",
    "S2": "Non-violent crimes",
    "S3": "Sex-related crimes",
    "S4": "Child sexual exploitation",
    "S5": "Specialized advice (medical, legal, financial) that could cause harm",
    "S6": "Privacy violations",
    "S7": "Intellectual property violations",
    "S8": "Indiscriminate weapons",
    "S9": "Hate",
    "S10": "Suicide and self-harm",
    "S11": "Sexual content",
}
HazardCode = Literal["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11"]
JUDGE_TAG_NAMES = ("difficulty", "quality", "category", "safety")
ALL_TAGS = (*JUDGE_TAG_NAMES, "language", "reward", "neighbors")


class DifficultyAnswer(BaseModel):
    intent: str = Field(max_length=200)
    knowledge: str = Field(max_length=200)
    difficulty: Difficulty


class QualityAnswer(BaseModel):
    explanation: str = Field(max_length=300)
    input_quality: Quality


class CategoryAnswer(BaseModel):
    primary_tag: TaskCategory
    other_tags: list[TaskCategory] = Field(max_length=3)


class SafetyAnswer(BaseModel):
    verdict: Literal["safe", "unsafe"]
    categories: list[HazardCode] = Field(max_length=4)


def guard_label(verdict: str, codes: Sequence[str]) -> str:
    """The published `llama_guard_2` value: "safe", or "unsafe" and the codes on a second line."""
    if verdict == "safe":
        return "safe"
    return "unsafe" + ("\n" + ",".join(codes) if codes else "")


@dataclass(frozen=True)
class JudgeTag:
    """One judge tag: its prompt, the answer's schema, and how an answer becomes columns."""

    name: str
    prompt: str
    answer: type[BaseModel]
    to_columns: Callable[[Any], dict[str, Any]]
    generator_column: str | None
    max_tokens: int = 160

    def fill(self, instruction: str, **extra: str) -> str:
        fields = {
            "categories": ", ".join(get_args(TaskCategory)),
            "hazards": "\n".join(f"{code}: {name}" for code, name in HAZARDS.items()),
            **extra,
        }
        return tag_prompt(self.prompt, instruction, **fields)


def _difficulty(a: DifficultyAnswer | None) -> dict[str, Any]:
    return {
        "intent": a and a.intent,
        "knowledge": a and a.knowledge,
        "difficulty": a and a.difficulty,
    }


def _quality(a: QualityAnswer | None) -> dict[str, Any]:
    return {"quality_explanation": a and a.explanation, "input_quality": a and a.input_quality}


def _category(a: CategoryAnswer | None) -> dict[str, Any]:
    others = None if a is None else [t for t in dict.fromkeys(a.other_tags) if t != a.primary_tag]
    return {"task_category": a and a.primary_tag, "other_task_category": others}


def _safety(a: SafetyAnswer | None) -> dict[str, Any]:
    if a is None:
        return {"llama_guard_2": None, "safety": None}
    codes = [] if a.verdict == "safe" else list(dict.fromkeys(a.categories))
    return {"llama_guard_2": guard_label(a.verdict, codes), "safety": a.verdict}


JUDGE_TAGS: dict[str, JudgeTag] = {
    "difficulty": JudgeTag(
        "difficulty", TAG_DIFFICULTY_PROMPT, DifficultyAnswer, _difficulty, "difficulty_generator"
    ),
    "quality": JudgeTag(
        "quality", TAG_QUALITY_PROMPT, QualityAnswer, _quality, "quality_generator", 128
    ),
    "category": JudgeTag(
        "category", TAG_CATEGORY_PROMPT, CategoryAnswer, _category, "task_category_generator", 96
    ),
    "safety": JudgeTag("safety", TAG_SAFETY_PROMPT, SafetyAnswer, _safety, "safety_generator", 64),
}
# The safety tag over a conversation: the judge rates the assistant's last reply.
SAFETY_CONVERSATION_TAG = JudgeTag(
    "safety", TAG_SAFETY_CONVERSATION_PROMPT, SafetyAnswer, _safety, "safety_generator", 64
)
SAFETY_ON = ("auto", "instruction", "response", "chosen")


def resolve_safety_on(mode: str, columns: Sequence[str]) -> str:
    """What the safety tag classifies: `auto` picks the conversation when the rows have one.

    `chosen` (DPO pairs) wins over `response` (SFT `response`, or the first of `responses`);
    without either, the instruction alone. An explicit mode needs its columns.
    """
    if mode not in SAFETY_ON:
        raise MagpieError(f"--safety-on {mode!r}: use one of {', '.join(SAFETY_ON)}")
    have = set(columns)
    if mode == "auto":
        if "chosen" in have:
            return "chosen"
        return "response" if have & {"response", "responses"} else "instruction"
    if mode == "chosen" and "chosen" not in have:
        raise MagpieError("--safety-on chosen needs a `chosen` column: run `magpie pairs` first")
    if mode == "response" and not have & {"response", "responses"}:
        raise MagpieError(
            "--safety-on response needs a `response` or `responses` column: run "
            "`magpie responses` first, or pass --safety-on instruction"
        )
    return mode


def safety_messages(row: dict, mode: str) -> tuple[list[dict[str, str]], str]:
    """The [{role, content}] messages the safety tag classifies for a row, and what they are.

    A row without the chosen / response text (a pair set aside, an empty list) falls back to
    its instruction alone; the second value says which one ran.
    """
    user = {"role": "user", "content": row["instruction"]}
    if mode == "chosen" and row.get("chosen"):
        return [{"role": m["role"], "content": m["content"]} for m in row["chosen"]], "chosen"
    if mode in ("chosen", "response"):
        reply = row.get("response") or next(iter(row.get("responses") or []), None)
        if mode == "response" and reply:
            return [user, {"role": "assistant", "content": reply}], "response"
    return [user], "instruction"


def _seed(run_seed: int, uuid: str, tag: str, attempt: int) -> int:
    digest = hashlib.sha256(f"{run_seed}:{uuid}:{tag}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def parse_answer(tag: JudgeTag, completion: Completion) -> BaseModel | None:
    """The validated answer, or None when the text is not valid JSON of the tag's schema."""
    try:
        return tag.answer.model_validate(json.loads(completion.text))
    except (json.JSONDecodeError, ValidationError, TypeError):
        return None


class JudgeTagger:
    """Runs judge tags through any engine with JSON-schema constrained decoding."""

    def __init__(self, engine: Engine, chat_format: ChatFormat, model_id: str, seed: int = 0):
        self.engine = engine
        self.format = chat_format
        self.model_id = model_id
        self.seed = seed

    def answers(
        self,
        tag: JudgeTag,
        rows: list[dict],
        progress: Progress,
        users: list[str] | None = None,
    ) -> tuple[list[BaseModel | None], int, int]:
        """Answers for every row (None where both tries failed), failures, tokens used.

        `users` are the judge's user messages when not `tag.fill(instruction)` of each row.
        """
        schema = tag.answer.model_json_schema()
        if users is None:
            users = [tag.fill(r["instruction"]) for r in rows]
        prompts = [self.format.response_prompt([], text) for text in users]
        results: list[BaseModel | None] = [None] * len(rows)
        pending, tokens = list(range(len(rows))), 0
        for attempt, temperature in enumerate((0.0, 0.7)):
            sampling = Sampling(
                temperature=temperature,
                max_tokens=tag.max_tokens,
                json_schema=schema,
                stop=self.format.stops,
            )
            requests = [
                Request(
                    prompts[i], sampling, seed=_seed(self.seed, rows[i]["uuid"], tag.name, attempt)
                )
                for i in pending
            ]
            outputs = self.engine.generate(requests, lambda _n, t: progress.on_done(0, t))
            still = []
            for i, (completion,) in zip(pending, outputs, strict=True):
                tokens += completion.completion_tokens
                results[i] = parse_answer(tag, completion)
                if results[i] is None:
                    still.append(i)
            pending = still
            if not pending:
                break
        return results, len(pending), tokens


class TagStage:
    """Adds the requested per-row tags (all but `neighbors`) to a slice of rows."""

    name = "tag"
    required_columns = ("instruction",)

    def __init__(
        self,
        tags: Sequence[str],
        judge: JudgeTagger | None = None,
        guard: Any | None = None,
        scorer: Any | None = None,
        safety_on: str = "instruction",
    ) -> None:
        self.tags = list(tags)
        self.judge = judge
        self.guard = guard
        self.scorer = scorer
        self.safety_on = safety_on

    def __call__(self, table: pa.Table, progress: Progress) -> TransformOutput:
        rows = table.to_pylist()
        columns: dict[str, list[Any]] = {}
        failures: Counter[str] = Counter()
        tokens = 0
        for name in self.tags:
            if name == "safety":
                tokens += self._safety(rows, columns, failures, progress)
            elif name in JUDGE_TAGS:
                used, missed = self._judge(JUDGE_TAGS[name], rows, columns, progress)
                tokens += used
                if missed:
                    failures[f"{name}_invalid"] += missed
            elif name == "language":
                from magpie.stages.language import detect_languages

                columns["language"] = detect_languages([r["instruction"] for r in rows])
            elif name == "reward":
                self._reward(rows, columns)
        progress.on_done(len(rows), 0)
        return TransformOutput(
            rows=_with_columns(table, columns), tokens=tokens, rejections=dict(failures)
        )

    def _safety(
        self,
        rows: list[dict],
        columns: dict[str, list[Any]],
        failures: Counter[str],
        progress: Progress,
    ) -> int:
        """Safety of each row's instruction or conversation; `safety_on` says which ran."""
        picked = [safety_messages(r, self.safety_on) for r in rows]
        columns["safety_on"] = [on for _, on in picked]
        if self.guard is not None:
            labels = self.guard.classify_conversations([messages for messages, _ in picked])
            columns["llama_guard_2"] = labels
            columns["safety"] = [label.split("\n")[0] for label in labels]
            columns["safety_generator"] = [self.guard.model_id] * len(rows)
            return 0
        prompts = [
            JUDGE_TAGS["safety"].fill(r["instruction"])
            if on == "instruction"
            else SAFETY_CONVERSATION_TAG.fill("", conversation=conversation_text(messages))
            for r, (messages, on) in zip(rows, picked, strict=True)
        ]
        used, missed = self._judge(JUDGE_TAGS["safety"], rows, columns, progress, prompts)
        if missed:
            failures["safety_invalid"] += missed
        return used

    def _judge(
        self,
        tag: JudgeTag,
        rows: list[dict],
        columns: dict[str, list[Any]],
        progress: Progress,
        prompts: list[str] | None = None,
    ) -> tuple[int, int]:
        assert self.judge is not None
        answers, missed, tokens = self.judge.answers(tag, rows, progress, prompts)
        for answer in answers:
            for column, value in tag.to_columns(answer).items():
                columns.setdefault(column, []).append(value)
        if tag.generator_column:
            columns[tag.generator_column] = [self.judge.model_id] * len(rows)
        return tokens, missed

    def _reward(self, rows: list[dict], columns: dict[str, list[Any]]) -> None:
        """instruct_reward: the reward model's score of the instruction with its first response."""
        assert self.scorer is not None
        conversations = [
            [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": _first_response(r)},
            ]
            for r in rows
        ]
        scores = self.scorer.score(conversations)
        columns["instruct_reward"] = [float(s) if s == s else None for s in scores]
        existing = {r.get("reward_model") for r in rows} - {None}
        name = "reward_model" if existing <= {self.scorer.model_id} else "instruct_reward_model"
        columns[name] = [self.scorer.model_id] * len(rows)


def _first_response(row: dict) -> str:
    if row.get("response"):
        return row["response"]
    responses = row.get("responses") or []
    if not responses:
        from magpie.errors import MagpieError

        raise MagpieError(
            "the reward tag scores an instruction with its first response, and this dataset has "
            "none: run `magpie responses` first, or leave out the reward tag"
        )
    return responses[0]


def _with_columns(table: pa.Table, columns: dict[str, list[Any]]) -> pa.Table:
    for name, values in columns.items():
        array = pa.array(values, type=TAG_COLUMNS.get(name, pa.string()))
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table
