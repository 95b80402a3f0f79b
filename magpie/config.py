"""Configuration models of every stage, YAML loading, and errors that name the field and the fix."""

from __future__ import annotations

import hashlib
import json
from difflib import get_close_matches
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from magpie.errors import MagpieError
from magpie.executors.base import ExecutorSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineSpec(_Strict):
    """Which engine runs which model."""

    name: str = "llamacpp"
    model: str | None = Field(None, description="model path or id; None = the bundled SmolLM2")
    options: dict[str, Any] = Field(default_factory=dict, description="engine-specific settings")

    @field_validator("name")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from magpie.engines.base import engine_names

        if value not in engine_names():
            raise ValueError(f"unknown engine {value!r}; choose one of {', '.join(engine_names())}")
        return value

    @field_validator("model")
    @classmethod
    def _readable_model(cls, value: str | None) -> str | None:
        if value is not None and value.endswith(".gguf") and not Path(value).is_file():
            raise ValueError(f"model file {value} does not exist; pass a readable .gguf path")
        return value


class TemplateSpec(_Strict):
    """How the pre-query template is obtained."""

    pre_query_template: str | None = Field(
        None, description="family name or literal string; None = derive from the chat template"
    )
    chat_template: str | None = Field(None, description="Jinja chat template file to derive from")
    system_prompt: str | None = Field(
        None,
        description="text, a task preset (math, code, ...), or 'none'; None = template default",
    )

    @field_validator("system_prompt")
    @classmethod
    def _near_preset(cls, value: str | None) -> str | None:
        """A one-word value one edit away from a preset name is a typo, not a system prompt."""
        from magpie.templates import NO_SYSTEM, TASK_PRESETS

        if value is None or any(c.isspace() for c in value.strip()):
            return value
        names = [*TASK_PRESETS, NO_SYSTEM]
        key = value.strip().lower()
        if key in names:
            return value
        near = [n for n in names if _edit_distance(key, n) == 1]
        if near:
            raise ValueError(
                f"{value!r} is not a preset; did you mean {near[0]!r}? (presets: "
                f"{', '.join(names)}; literal system prompt text is anything with a space)"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _readable_template(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"chat template file {value} does not exist; pass a readable file")
        return value


class InstructionsConfig(_Strict):
    """`magpie instructions`: Magpie instruction synthesis.

    Budgets (`BUDGET_FIELDS`) bound how long generation runs, not what an attempt produces: they
    stay out of the config hash, so a short run can be continued with a larger budget.
    """

    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("max_attempts", "max_tokens", "response_max_tokens")

    engine: EngineSpec = Field(default_factory=EngineSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    num: int = Field(200, gt=0, description="accepted rows to produce")
    turns: int = Field(1, ge=1, le=16, description="user turns per conversation")
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, gt=0, description="max new tokens of an instruction")
    response_temperature: float = Field(0.0, ge=0.0, le=5.0, description="multi-turn replies")
    response_max_tokens: int = Field(1024, gt=0, description="max new tokens of a reply")
    min_chars: int = Field(8, ge=0, description="shorter instructions are rejected")
    max_attempts: int | None = Field(None, gt=0, description="default: 4 x num + 16")
    seed: int = Field(0, ge=0)
    shard_size: int = Field(64, gt=0, description="attempts per committed shard")
    stop_at_newline: bool = Field(False, description="end a user turn at its first newline")
    sanitize: bool = Field(
        False, description="strip labels and trailing answers (raw text kept in raw_instruction)"
    )
    first_token_ban: list[str] = Field(
        default_factory=list,
        description="token texts a user turn may not start with; 'markdown-headers' = # to ####",
    )
    first_token_boost: float = Field(
        1.0, gt=0.0, le=5.0, description="first-token logits divided by this (1.2 in the original)"
    )

    HASH_OPTIONAL: ClassVar[tuple[str, ...]] = (
        "stop_at_newline",
        "sanitize",
        "first_token_ban",
        "first_token_boost",
    )
    """Fields added later: left out of the config hash at their defaults (older runs resume)."""

    @field_validator("first_token_ban", mode="before")
    @classmethod
    def _expand_presets(cls, value: Any) -> Any:
        from magpie.sanitize import BAN_PRESETS

        if isinstance(value, str):  # `first_token_ban: markdown-headers` in a recipe
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            return value  # the type check reports it
        expanded = [t for item in value for t in BAN_PRESETS.get(item, (item,))]
        if any(t == "" for t in expanded):
            raise ValueError("an empty first-token ban; list token texts such as '#'")
        return list(dict.fromkeys(expanded))

    def attempt_budget(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 4 * self.num + 16


class ResponsesConfig(_Strict):
    """`magpie responses`: n sampled responses per instruction with the model's chat template."""

    engine: EngineSpec = Field(default_factory=EngineSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    n: int = Field(5, ge=1, le=64, description="responses per instruction")
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0)
    max_tokens: int = Field(2048, gt=0, le=32768, description="max new tokens of a response")
    seed: int = Field(0, ge=0)
    shard_size: int = Field(16, gt=0, description="instructions per committed shard")


class ScoreConfig(_Strict):
    """`magpie score`: a reward for every response."""

    reward_model: str = Field(
        "judge", description="HF reward model path/id, or 'judge' / 'judge:<model>'"
    )
    judge_engine: EngineSpec = Field(
        default_factory=EngineSpec, description="engine of a judge (its model comes from judge:)"
    )
    trust_remote_code: bool = False
    dtype: str = "auto"
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(4096, gt=0)
    shard_size: int = Field(16, gt=0, description="rows per committed shard")


class TagConfig(_Strict):
    """`magpie tag`: Magpie's unitag tags and nearest-neighbour statistics."""

    tags: list[str] = Field(
        default_factory=lambda: ["difficulty", "quality", "category", "safety", "language"]
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="the judge of judge tags")
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    guard_model: str | None = Field(None, description="Llama-Guard-style model for safety")
    safety_on: str = Field(
        "auto",
        pattern="^(auto|instruction|response|chosen)$",
        description="what safety classifies: auto = the conversation when the rows have one",
    )
    reward_model: str | None = Field(None, description="reward model of the reward tag")
    trust_remote_code: bool = False
    embedding_model: str | None = Field(None, description="sentence-transformers model path")
    neighbor_threshold: float = Field(0.15, ge=0.0, le=4.0)
    neighbor_k: int = Field(20, gt=0, le=1000)
    index: str = Field("auto", pattern="^(auto|flat|ivf|hnsw)$")
    seed: int = Field(0, ge=0)
    shard_size: int = Field(64, gt=0, description="rows per committed shard (decoded together)")

    @field_validator("tags")
    @classmethod
    def _known_tags(cls, value: list[str]) -> list[str]:
        from magpie.stages.tags import ALL_TAGS

        unknown = [t for t in value if t not in ALL_TAGS]
        if unknown or not value:
            raise ValueError(
                f"unknown tag {unknown[0] if unknown else ''!r}; choose from {ALL_TAGS}"
            )
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _reward_needs_model(self) -> TagConfig:
        if "reward" in self.tags and not self.reward_model:
            raise ValueError("the reward tag needs --reward-model (an HF reward model or 'judge')")
        return self


class PairsConfig(_Strict):
    """`magpie pairs`: chosen = highest reward, rejected = lowest."""

    min_margin: float = Field(0.0, ge=0.0)
    drop_truncated: bool = False
    shard_size: int = Field(1000, gt=0)


class Recipe(_Strict):
    """`magpie run`: the whole DPO recipe. The defaults are the CPU demo on the bundled model.

    `instructions` and `responses` hold any field of those stage configs; `engine`, `template`,
    `num` and `seed` are shared by both unless a stage section sets its own.
    """

    out: str = "data/run"
    num: int = Field(20, gt=0, description="instructions to synthesize")
    seed: int = Field(0, ge=0)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    instructions: dict[str, Any] = Field(
        default_factory=lambda: {"max_tokens": 256, "shard_size": 16}
    )
    responses: dict[str, Any] = Field(default_factory=lambda: {"max_tokens": 256})
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    export: list[str] = Field(default_factory=lambda: ["trl", "magpie"])
    executor: ExecutorSpec = Field(
        default_factory=ExecutorSpec, description="where stages run: local or ray"
    )

    @field_validator("export")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from magpie.export import FORMATS

        unknown = [f for f in value if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown export format {unknown[0]!r}; choose from {FORMATS}")
        return value

    def _shared(self) -> dict[str, Any]:
        return {
            "engine": self.engine.model_dump(),
            "template": self.template.model_dump(),
            "seed": self.seed,
        }

    def instructions_config(self) -> InstructionsConfig:
        return _section(
            InstructionsConfig,
            "instructions",
            {**self._shared(), "num": self.num},
            self.instructions,
        )

    def responses_config(self) -> ResponsesConfig:
        return _section(ResponsesConfig, "responses", self._shared(), self.responses)


def _section(model: type[_Strict], name: str, shared: dict[str, Any], own: dict[str, Any]) -> Any:
    """Validate a recipe section; errors name the field as `section.field`."""
    try:
        return model.model_validate({**shared, **own})
    except ValidationError as exc:
        raise MagpieError(f"recipe section {name}: {describe_validation_error(exc)}") from exc


def config_hash(config: BaseModel) -> str:
    """Stable hash of a resolved configuration: equal hashes mean the same rows.

    A config's `BUDGET_FIELDS` (attempt and token budgets) are left out: raising them continues
    a dataset instead of starting another. Its `HASH_OPTIONAL` fields are left out while at
    their defaults, so a field added later does not change the hash of earlier datasets.
    """
    budgets = set(getattr(config, "BUDGET_FIELDS", ()))
    fields = type(config).model_fields
    budgets |= {  # fields added later, at their defaults: the hash older datasets were made with
        name
        for name in getattr(config, "HASH_OPTIONAL", ())
        if getattr(config, name) == fields[name].get_default(call_default_factory=True)
    }
    text = json.dumps(config.model_dump(mode="json", exclude=budgets), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with the non-None values of `overrides` set field by field (nested dicts merged)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            inner = merged.get(key)
            merged[key] = deep_merge(inner if isinstance(inner, dict) else {}, value)
            if not merged[key] and not inner:
                merged.pop(key)
        elif value is not None:
            merged[key] = value
    return merged


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (small strings only)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def did_you_mean(value: str, choices: list[str]) -> str:
    """`; did you mean 'x'?` for the nearest choice, or "" when none is close."""
    near = get_close_matches(value.lower(), choices, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def describe_validation_error(exc: ValidationError, flags: dict[str, str] | None = None) -> str:
    """One line naming the first bad field (as its CLI flag where known) and what it accepts."""
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"]) or "config"
    name = (flags or {}).get(field, field)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"invalid {name}: {message} (got {error.get('input')!r})"


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a recipe/config YAML file into a dict, with a one-line error when it is unreadable."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MagpieError(
            f"cannot read {path}: {exc.strerror}; pass an existing YAML file"
        ) from exc
    except yaml.YAMLError as exc:
        raise MagpieError(f"{path} is not valid YAML ({exc}); fix the file") from exc
    if not isinstance(data, dict):
        raise MagpieError(f"{path} must hold a mapping of fields; see recipes/ for examples")
    return data
