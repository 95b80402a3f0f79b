"""Step-list recipes: `magpie run RECIPE` chains any stages, each into `OUT/<step name>/`.

A recipe is `out`, recipe-level defaults (`engine`, `template`, `seed`, `num`, `executor`) and
`steps:`, an ordered list of `{name?, stage, input?, <settings of that stage>}`. `plan()` checks
the whole recipe before any work (an error names `steps[i] (name).field`), fills each step's
settings from the recipe-level defaults it does not set itself, and resolves every step's input
(default: the previous step that makes a dataset). `magpie run` then runs the plan in order,
skipping steps already complete for the same settings and input, so a rerun resumes at the first
incomplete step. The last step that makes a dataset is the run's result; `.magpie/run.json`
records it (`final`) for `--in RUN`.

The fixed DPO format of earlier versions (sections `instructions`, `responses`, `score`, `pairs`,
`export`; `magpie.config.Recipe`) is converted to the same steps with its old folder names.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from magpie.config import (
    EngineSpec,
    InstructionsConfig,
    PairsConfig,
    Recipe,
    ResponsesConfig,
    ScoreConfig,
    TagConfig,
    TemplateSpec,
    _Strict,
    did_you_mean,
)
from magpie.errors import MagpieError
from magpie.executors.base import ExecutorSpec
from magpie.fs import AnyPath, RemotePath, as_path

DATASET_STAGES = ("instructions", "responses", "score", "pairs", "tag", "filter", "extend")
STAGES = (*DATASET_STAGES, "export", "card")
SHARED = ("engine", "template", "seed", "num")
"""Recipe-level settings a step takes when its stage has the field and the step does not set it."""
STEP_KEYS = ("name", "stage", "input", "executor")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = {"plots", "recipe.yaml", "README.md", "view.html"}
RUN_RECORD = Path(".magpie") / "run.json"


def _known(kind: str, values: list[str], choices: list[str]) -> list[str]:
    """`values` when each is one of `choices`; else the first unknown one, with a suggestion."""
    for value in values:
        if value not in choices:
            raise ValueError(
                f"unknown {kind} {value!r}{did_you_mean(value, choices)} "
                f"({kind}s: {', '.join(choices)})"
            )
    return values


class FilterStep(_Strict):
    """`filter`: the conditions and selection of `magpie filter` (see magpie.filters)."""

    where: str | None = Field(None, description="SQL boolean expression over the columns")
    presets: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict, description="preset parameters")
    order_by: str | None = None
    limit: int | None = Field(None, ge=0)
    balance: str | None = Field(None, description="column whose categories share `limit`")
    seed: int = Field(0, ge=0, description="seed of random picks")
    shuffle_seed: int | None = Field(None, ge=0)
    shard_rows: int = Field(50_000, gt=0)

    @field_validator("presets")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        from magpie.filters import PRESETS

        return _known("preset", value, list(PRESETS))

    @model_validator(mode="after")
    def _something_to_do(self) -> FilterStep:
        from magpie.filters import resolve_params

        try:
            resolve_params(self.presets, self.params)
        except MagpieError as exc:
            raise ValueError(f"params: {exc}") from None
        if self.balance is not None and self.limit is None:
            raise ValueError("balance needs limit: the number of rows to share out")
        selecting = self.limit is not None or self.order_by or self.shuffle_seed is not None
        if not (self.where or self.presets or selecting):
            raise ValueError("nothing to filter by: set where, presets, or limit/order_by/balance")
        return self


class ExportStep(_Strict):
    """`export`: the input in each format, into `OUT/<step name>/<format>/`."""

    formats: list[str] = Field(default_factory=lambda: ["trl", "magpie"], min_length=1)
    all_responses: bool = False
    test_size: float | None = Field(None, gt=0, lt=1, description="share moved to a test split")
    split_seed: int = Field(0, ge=0, description="seed of the test split")
    extra_columns: bool = Field(False, description="keep our columns beyond the published layout")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `pipeline.export` beyond the defaults."""
        extra = {
            "test_size": self.test_size,
            "split_seed": self.split_seed,
            "extra_columns": self.extra_columns,
        }
        return {"all_responses": self.all_responses, **{k: v for k, v in extra.items() if v}}

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from magpie.export import FORMATS

        return list(dict.fromkeys(_known("export format", value, list(FORMATS))))


class CardStep(_Strict):
    """`card`: dataset card (README.md, plots/) and view.html of the input. For the run's result
    they go in the run folder itself (so `datasets.load_dataset(RUN)` loads it through the card),
    for another step's dataset into that dataset's folder."""

    plots: bool = True
    view: bool = True


def _extend_config() -> type[BaseModel]:
    from magpie.stages.extend import ExtendConfig

    return ExtendConfig


SETTINGS: dict[str, Any] = {
    "instructions": InstructionsConfig,
    "responses": ResponsesConfig,
    "score": ScoreConfig,
    "pairs": PairsConfig,
    "tag": TagConfig,
    "filter": FilterStep,
    "extend": _extend_config,
    "export": ExportStep,
    "card": CardStep,
}


def settings_model(stage: str) -> type[BaseModel]:
    model = SETTINGS[stage]
    return model if isinstance(model, type) else model()


class StepRecipe(_Strict):
    """A recipe with `steps:` (the step dicts are checked one by one by `plan()`)."""

    out: str = "data/run"
    num: int | None = Field(None, gt=0, description="instructions steps: rows to synthesize")
    seed: int | None = Field(None, ge=0)
    engine: EngineSpec | None = None
    template: TemplateSpec | None = None
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    steps: list[dict[str, Any]] = Field(min_length=1)


@dataclass
class Step:
    """One resolved step: its settings validated, its input named, its folder fixed."""

    index: int
    name: str
    stage: str
    settings: Any
    input: str | None
    executor: ExecutorSpec | None = None

    @property
    def label(self) -> str:
        return f"steps[{self.index}] ({self.name})"

    @property
    def makes_dataset(self) -> bool:
        return self.stage in DATASET_STAGES

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "stage": self.stage}
        if self.input is not None:
            data["input"] = self.input
        if self.executor is not None:
            data["executor"] = self.executor.model_dump(mode="json")
        return {**data, **self.settings.model_dump(mode="json")}


@dataclass
class Plan:
    """What `magpie run` does: the steps in order, where each writes, and the run's result."""

    out: AnyPath
    steps: list[Step]
    executor: ExecutorSpec
    source: dict[str, Any] = field(default_factory=dict)
    """The resolved recipe as written to RUN/recipe.yaml."""

    @property
    def final(self) -> Step:
        return [s for s in self.steps if s.makes_dataset][-1]

    def folder(self, step: Step) -> AnyPath:
        """Where a step writes: its own folder; a card beside the dataset it describes."""
        if step.stage != "card":
            return self.out / step.name
        assert step.input is not None
        return self.out if step.input == self.final.name else self.out / step.input


# ---- building a plan -----------------------------------------------------------------------


def _field_error(where: str, exc: ValidationError) -> MagpieError:
    error = exc.errors()[0]
    loc = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    got = f" (got {error['input']!r})" if "input" in error and loc else ""
    name = ".".join(p for p in (where, loc) if p) or "recipe"
    return MagpieError(f"recipe {name}: {message}{got}")


def plan(data: dict[str, Any]) -> Plan:
    """Check a recipe with `steps:` and resolve it; every mistake is one line naming its field."""
    if "steps" not in data:
        return plan_legacy(data)
    old = [k for k in ("instructions", "responses", "score", "pairs", "export") if k in data]
    if old:
        raise MagpieError(
            f"recipe has both steps: and the section {old[0]}: of the fixed DPO format; move "
            f"its settings into a step with stage: {old[0]}"
        )
    try:
        recipe = StepRecipe.model_validate(data)
    except ValidationError as exc:
        raise _field_error("", exc) from None
    shared = {
        "engine": recipe.engine.model_dump(mode="json") if recipe.engine else None,
        "template": recipe.template.model_dump(mode="json") if recipe.template else None,
        "seed": recipe.seed,
        "num": recipe.num,
    }
    steps: list[Step] = []
    for index, raw in enumerate(recipe.steps):
        steps.append(_step(index, raw, shared, steps))
    made = Plan(as_path(recipe.out), steps, recipe.executor)
    _check_cards(made)
    _check_columns(made)
    made.source = {
        "out": recipe.out,
        "executor": recipe.executor.model_dump(mode="json"),
        "steps": [s.as_dict() for s in steps],
    }
    return made


def _step(index: int, raw: Any, shared: dict[str, Any], earlier: list[Step]) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, dict):
        raise MagpieError(f"recipe {where}: a step is a mapping with stage: and its settings")
    stage = raw.get("stage")
    if stage not in STAGES:
        hint = did_you_mean(str(stage), list(STAGES)) if stage else ""
        raise MagpieError(
            f"recipe {where}.stage: {'unknown stage ' + repr(stage) if stage else 'missing'}"
            f"{hint} (stages: {', '.join(STAGES)})"
        )
    name = raw.get("name") or stage
    where = f"steps[{index}] ({name})"
    if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED:
        raise MagpieError(
            f"recipe {where}.name: {name!r} is not a folder name we can use: letters, digits, "
            f"'.', '_', '-' (not {', '.join(sorted(RESERVED))})"
        )
    if name == "export" and stage != "export":  # `RUN/export/` holds export folders
        raise MagpieError(f"recipe {where}.name: 'export' is the export step's; pick another")
    for other in earlier:
        if other.name == name:
            raise MagpieError(
                f"recipe {where}.name: steps[{other.index}] is already named {name!r}; give "
                "each step of the same stage its own name:"
            )
    source = _input(where, stage, raw.get("input"), earlier)
    model = settings_model(stage)
    own = {k: v for k, v in raw.items() if k not in STEP_KEYS}
    for key in SHARED:
        if key in model.model_fields and key not in own and shared.get(key) is not None:
            own[key] = shared[key]
    try:
        settings = model.model_validate(own)
        executor = (
            None if raw.get("executor") is None else ExecutorSpec.model_validate(raw["executor"])
        )
    except ValidationError as exc:
        raise _field_error(where, exc) from None
    except MagpieError as exc:
        raise MagpieError(f"recipe {where}: {exc}") from None
    return Step(index, name, stage, settings, source, executor)


def _input(where: str, stage: str, given: Any, earlier: list[Step]) -> str | None:
    """The step whose dataset a step reads: `given`, else the last earlier dataset step."""
    datasets = [s.name for s in earlier if s.makes_dataset]
    if stage == "instructions":
        if given is not None:
            raise MagpieError(
                f"recipe {where}.input: an instructions step makes rows from the model alone; "
                "remove input:"
            )
        return None
    if given is None:
        if not datasets:
            raise MagpieError(
                f"recipe {where}: no earlier step makes a dataset for this {stage} step; put an "
                "instructions step before it"
            )
        return datasets[-1]
    if given not in datasets:
        raise MagpieError(
            f"recipe {where}.input: {given!r} is not an earlier step that makes a dataset"
            f"{did_you_mean(str(given), datasets)} (earlier: {', '.join(datasets) or 'none'})"
        )
    return str(given)


def _check_cards(made: Plan) -> None:
    seen: dict[Path, Step] = {}
    for step in made.steps:
        if step.stage != "card":
            continue
        folder = made.folder(step)
        if folder in seen:
            raise MagpieError(
                f"recipe {step.label}: {seen[folder].label} already writes the card of "
                f"{step.input}; keep one card step per dataset"
            )
        seen[folder] = step


TAG_ADDS = {
    "difficulty": {"difficulty"},
    "quality": {"input_quality"},
    "category": {"task_category"},
    "safety": {"llama_guard_2", "safety"},
    "reward": {"instruct_reward"},
    "language": {"language"},
    "neighbors": {"min_neighbor_distance", "repeat_count", "min_similar_uuid"},
}


def _adds(step: Step) -> set[str]:
    """The columns a step adds that later steps and filter presets look for."""
    s = step.settings
    if step.stage == "instructions":
        return {"uuid", "instruction"} | ({"conversations"} if s.turns > 1 else set())
    if step.stage == "responses":
        return {"responses"} | (
            {"response", "response_length", "conversations"} if s.n == 1 else set()
        )
    if step.stage == "tag":
        return set().union(*(TAG_ADDS.get(t, set()) for t in s.tags))
    return {
        "score": {"rewards"},
        "pairs": {"chosen", "rejected", "reward_margin"},
        "extend": {"conversations"},
    }.get(step.stage, set())


def _check_columns(made: Plan) -> None:
    """What each step reads is made by an earlier step of its input chain: a stage's inputs and
    the columns of filter presets (a `where` expression is checked when it runs)."""
    from magpie.filters import FALLBACKS, PRESETS, PRODUCERS, _missing_message, resolve_params

    have: dict[str, set[str]] = {}
    for step in made.steps:
        cols = have.get(step.input, set()) if step.input else set()
        needs = {
            "score": ["responses"],
            "pairs": ["responses", "rewards"],
            "tag": ["responses"] if "reward" in getattr(step.settings, "tags", []) else [],
        }.get(step.stage, [])
        for column in needs:
            if column not in cols:
                maker = "a responses" if column == "responses" else "a score"
                raise MagpieError(
                    f"recipe {step.label}.input: {step.input} has no {column!r} column; put "
                    f"{maker} step before this {step.stage} step"
                )
        if step.stage == "extend" and not cols & {"response", "conversations"}:
            raise MagpieError(
                f"recipe {step.label}.input: {step.input} has no response to extend; put a "
                "responses step with n: 1 before it"
            )
        if step.stage == "filter":
            s = step.settings
            params = resolve_params(s.presets, s.params)
            missing: dict[str, str] = {}
            for name in s.presets:
                declared = {p.name for p in PRESETS[name].params}
                for _, template in PRESETS[name].conditions:
                    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
                    if any(params.get(f) is None for f in fields & declared):
                        continue  # a condition switched off
                    for f in sorted(fields - declared):
                        fallback = f in FALLBACKS and FALLBACKS[f][0] in cols
                        if f in PRODUCERS and f not in cols and not fallback:
                            missing.setdefault(f, name)
            if missing:
                raise MagpieError(f"recipe {step.label}.presets: {_missing_message(missing)}")
        have[step.name] = cols | _adds(step)


def plan_legacy(data: dict[str, Any] | Recipe) -> Plan:
    """The fixed DPO recipe as steps with its folder names: instructions, responses, scored,
    pairs, export/<format>, and the card and viewer of pairs/ in the run folder."""
    recipe = data if isinstance(data, Recipe) else Recipe.model_validate(data)
    steps = [
        Step(0, "instructions", "instructions", recipe.instructions_config(), None),
        Step(1, "responses", "responses", recipe.responses_config(), "instructions"),
        Step(2, "scored", "score", recipe.score, "responses"),
        Step(3, "pairs", "pairs", recipe.pairs, "scored"),
        Step(4, "export", "export", ExportStep(formats=recipe.export), "pairs"),
        Step(5, "card", "card", CardStep(), "pairs"),
    ]
    return Plan(as_path(recipe.out), steps, recipe.executor, recipe.model_dump(mode="json"))


# ---- overrides -----------------------------------------------------------------------------


def parse_sets(items: list[str]) -> list[tuple[list[str], Any]]:
    """`--set NAME.FIELD=VALUE` items as (path, YAML-parsed value)."""
    import yaml

    parsed = []
    for item in items:
        key, sep, text = item.partition("=")
        path = [p for p in key.strip().split(".") if p]
        if not sep or not path:
            raise MagpieError(
                f"--set {item!r} is not STEP.FIELD=VALUE: write e.g. responses.max_tokens=64"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parsed.append((path, value))
    return parsed


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        inner = target.get(key)
        if not isinstance(inner, dict):
            inner = {}
            target[key] = inner
        target = inner
    target[path[-1]] = value


def apply_sets(data: dict[str, Any], sets: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set single fields: a recipe-level field, or `STEP.FIELD` of the step named STEP."""
    data = copy.deepcopy(data)
    steps = data.get("steps")
    for path, value in sets:
        if isinstance(steps, list) and path[0] not in StepRecipe.model_fields:
            names = [s.get("name") or s.get("stage") for s in steps if isinstance(s, dict)]
            matches = [s for s in steps if isinstance(s, dict) and _name(s) == path[0]]
            if not matches or len(path) < 2:
                raise MagpieError(
                    f"--set {'.'.join(path)}: no step named {path[0]!r}"
                    f"{did_you_mean(path[0], [str(n) for n in names])} (steps: "
                    f"{', '.join(str(n) for n in names)}); write STEP.FIELD=VALUE"
                )
            _set_path(matches[0], path[1:], value)
        else:
            _set_path(data, path, value)
    return data


def _name(step: dict[str, Any]) -> Any:
    return step.get("name") or step.get("stage")


def override_stages(data: dict[str, Any], stage: str, fields: dict[str, Any]) -> None:
    """Set `fields` (None = keep) on every step of `stage` (the CLI's per-stage flags)."""
    given = {k: v for k, v in fields.items() if v is not None}
    for step in data.get("steps") or []:
        if isinstance(step, dict) and step.get("stage") == stage:
            step.update(given)


# ---- what a plan needs -----------------------------------------------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _local_model(model: str) -> str:
    """Whether a model id/path is on this machine (a path, or in the Hugging Face cache)."""
    path = Path(model).expanduser()
    if path.exists():
        return "on disk"
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return "in the HF cache"
    except Exception:  # noqa: BLE001 - an id the hub client rejects is simply not cached
        pass
    return "NOT on this machine (download it first)"


def engine_needs(spec: EngineSpec, role: str) -> str:
    """One line: which engine and model a step uses and whether this machine has them."""
    if spec.name == "fake":
        return f"{role}: fake engine (tests only)"
    if spec.name == "llamacpp":
        model = spec.model or "bundled SmolLM2-135M-Instruct"
        where = "packaged" if spec.model is None else _local_model(spec.model)
        return f"{role}: llamacpp {model} ({where}; CPU)"
    if spec.name == "vllm":
        have = "vllm installed" if _installed("vllm") else "vllm NOT installed"
        where = _local_model(spec.model) if spec.model else "no model set"
        tp = spec.options.get("tensor_parallel_size", 1)
        return f"{role}: vllm {spec.model} ({where}; {have}; needs {tp} GPU(s))"
    if spec.name == "openai":
        url = spec.options.get("base_url", "OPENAI base URL")
        return f"{role}: openai-compatible server {url} model {spec.model} (not probed)"
    return f"{role}: {spec.name} {spec.model or ''}".rstrip()


def _classifier_needs(model: str, role: str) -> str:
    have = "transformers installed" if _installed("transformers") else "transformers NOT installed"
    return f"{role}: {model} ({_local_model(model)}; {have}; a GPU for 7B+ models)"


def step_needs(step: Step) -> list[str]:
    """The engines and models a step loads, each with whether this machine has it."""
    s = step.settings
    if step.stage in ("instructions", "responses", "extend"):
        return [engine_needs(s.engine, "generator")]
    if step.stage == "score":
        if s.reward_model == "judge" or s.reward_model.startswith("judge:"):
            model = s.reward_model.partition(":")[2] or None
            spec = s.judge_engine.model_copy(update={"model": model})
            return [engine_needs(spec, "judge") + " [rating 1-10, not a reward model]"]
        return [_classifier_needs(s.reward_model, "reward model")]
    if step.stage == "tag":
        from magpie.stages.tags import JUDGE_TAG_NAMES

        needs = []
        if any(t in JUDGE_TAG_NAMES and not (t == "safety" and s.guard_model) for t in s.tags):
            needs.append(engine_needs(s.engine, "tag judge"))
        if "safety" in s.tags and s.guard_model:
            needs.append(_classifier_needs(s.guard_model, "guard model"))
        if "reward" in s.tags:
            rm = s.reward_model
            needs.append(
                "instruct reward: judge (bundled model)"
                if rm.startswith("judge")
                else _classifier_needs(rm, "instruct reward model")
            )
        if "language" in s.tags:
            needs.append("language: lingua (CPU)")
        if "neighbors" in s.tags:
            model = s.embedding_model
            needs.append(
                f"embeddings: {model} ({_local_model(model)})"
                if model
                else "embeddings: packaged all-MiniLM-L6-v2 (CPU)"
            )
        return needs
    return []


def describe(made: Plan) -> list[str]:
    """The resolved plan, one block per step, for `magpie run --check`."""
    lines = [f"run folder {made.out} (result: {made.final.name}/, executor {made.executor.name})"]
    done = read_record(made.out).get("steps") or {}
    for step in made.steps:
        source = f" <- {step.input}" if step.input else ""
        folder = made.folder(step)
        target = f"{folder}/<format>" if step.stage == "export" else str(folder)
        state = "  [complete: a run skips it]" if is_done(made, step, done) else ""
        lines.append(f"{step.label} {step.stage}{source} -> {target}{state}")
        lines += [f"    {need}" for need in step_needs(step)]
        lines.append(f"    settings: {_short_settings(step)}")
    return lines


def _short_settings(step: Step) -> str:
    """The step's settings that differ from the stage defaults (engine/template shown above)."""
    model = type(step.settings)
    base = model.model_construct().model_dump(mode="json")
    now = step.settings.model_dump(mode="json")
    changed = {
        k: v
        for k, v in now.items()
        if k not in ("engine", "template", "judge_engine") and base.get(k) != v
    }
    return json.dumps(changed, default=str) if changed else "(stage defaults)"


# ---- running ---------------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(out: Path, **fields: Any) -> None:
    """Merge `fields` into the run record (keeping `written_files` and anything else there)."""
    from magpie.store import atomic_write_bytes

    data = {**read_record(out), **fields}
    atomic_write_bytes(out / RUN_RECORD, json.dumps(data, indent=1).encode())


def dataset_identity(path: Path) -> str | None:
    """What a step's input is: its config hash (+ rows when short); None when not complete."""
    try:
        manifest = json.loads((path / ".magpie" / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete"):
        return None
    identity = str(manifest.get("config_hash"))
    if manifest.get("short"):
        identity += f"+{manifest.get('rows')}"
    return identity


TRANSFORMS = ("instructions", "responses", "score", "pairs", "tag", "extend")


@dataclass
class StepResult:
    """What one step did: `skipped` when it was already complete for these settings and input;
    `outputs` holds RunSummary objects (stages) or reports with `.summary()` (the others)."""

    step: Step
    skipped: bool
    outputs: list[Any] = field(default_factory=list)


def run_plan(
    made: Plan, view: Any, overwrite: bool = False, executor: ExecutorSpec | None = None
) -> list[StepResult]:
    """Run the steps in order under `made.out`; a rerun skips the steps already complete.

    Every step runs on one executor (`executor`, else the recipe's) unless it names its own, so
    a local run loads a model once for the steps that share it.
    """
    import yaml

    from magpie import locking
    from magpie.executors.base import create_executor
    from magpie.store import atomic_write_bytes, classify, open_run_root

    out = made.out
    if overwrite and classify(out) == "run":
        locking.acquire(out)  # held through open_run_root (the lock is reentrant)
        _clear_step_folders(out)
    open_run_root(out, overwrite)
    atomic_write_bytes(out / "recipe.yaml", yaml.safe_dump(made.source, sort_keys=False).encode())
    done: dict[str, Any] = dict(read_record(out).get("steps") or {})
    folders = [made.folder(s).name for s in made.steps if s.stage in DATASET_STAGES + ("export",)]
    folders = list(dict.fromkeys([*(read_record(out).get("folders") or []), *folders]))
    write_record(out, final=made.final.name, steps=done, folders=folders)
    results: list[StepResult] = []
    shared = create_executor(executor or made.executor)
    try:
        for step in made.steps:
            own = create_executor(step.executor) if step.executor is not None else None
            try:
                results.append(_run_step(made, step, view, overwrite, own or shared, done))
            finally:
                if own is not None:
                    own.close()
            write_record(out, steps=done)
    finally:
        shared.close()
    return results


def step_key(made: Plan, step: Step) -> dict[str, Any]:
    """What a finished step is recorded with: digests of its settings and of its input."""
    source = made.out / step.input if step.input else None
    return {
        "stage": step.stage,
        "settings": digest(step.stage, step.settings.model_dump(mode="json")),
        "input": dataset_identity(source) if source is not None else "",
    }


def is_done(made: Plan, step: Step, done: dict[str, Any]) -> bool:
    """Whether a rerun skips `step`: recorded with the same key, and its output complete."""
    return done.get(step.name) == step_key(made, step) and _finished(step, made.folder(step))


def _clear_step_folders(out: Path) -> None:
    """--overwrite of a run: the step folders it recorded that `store.remove_ours` does not know
    by name (a dataset, or an export step's folder of format datasets). Our files go, under each
    dataset's lock; a folder that still holds someone else's files stays, and the run's own
    --overwrite then names it."""
    import shutil

    from magpie import locking
    from magpie.store import RUN_STAGE_DIRS, remove_ours

    for name in read_record(out).get("folders") or []:
        folder = out / str(name)
        if name in RUN_STAGE_DIRS or "/" in str(name) or not folder.is_dir():
            continue  # the fixed stage folders and export/ are cleared by the store itself
        meta = folder / ".magpie"
        datasets = [folder] if meta.is_dir() else [c for c in folder.iterdir() if c.is_dir()]
        for path in (d for d in datasets if (d / ".magpie").is_dir()):
            with locking.locked(path, "--overwrite of the run that holds it"):
                left = remove_ours(path)
            if not left:
                path.rmtree() if isinstance(path, RemotePath) else shutil.rmtree(path)
        if isinstance(folder, Path) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _finished(step: Step, folder: Path) -> bool:
    if step.makes_dataset:
        return dataset_identity(folder) is not None
    if step.stage == "export":
        formats = step.settings.formats
        return all((folder / f / ".magpie" / "export.json").is_file() for f in formats)
    return (folder / "README.md").is_file()


def _run_step(
    made: Plan, step: Step, view: Any, overwrite: bool, runner: Any, done: dict[str, Any]
) -> StepResult:
    source = made.out / step.input if step.input else None
    folder = made.folder(step)
    key = step_key(made, step)
    earlier = done.get(step.name)
    if earlier == key and _finished(step, folder):
        return StepResult(step, True)
    if step.stage in TRANSFORMS:  # the stage resumes, or refuses other settings, by itself
        outputs = [_transform(step, source, folder, view, overwrite, runner)]
    else:
        assert source is not None
        changed = earlier is not None and earlier.get("settings") != key["settings"]
        if step.stage == "filter" and changed and not overwrite and folder.exists():
            raise MagpieError(
                f"{folder} holds the dataset of step {step.name} made with other settings: "
                "rerun with the same recipe, pick another --out, or pass --overwrite"
            )
        run_in = _in_process_remote if isinstance(made.out, RemotePath) else _in_process
        outputs = run_in(made, step, source, folder)
    done[step.name] = key
    return StepResult(step, False, outputs)


def _transform(
    step: Step, source: Path | None, out: Path, view: Any, overwrite: bool, runner: Any
) -> Any:
    from magpie import pipeline

    cfg = step.settings
    if step.stage == "instructions":
        summary, _ = pipeline.instructions(cfg, out, view, overwrite, executor=runner)
        if summary.rows == 0:  # a short run goes on; an empty one cannot
            raise MagpieError(
                f"step {step.name}: no instruction was accepted: "
                + pipeline.binding_setting(summary, cfg)
                .replace("--", f"{step.name}.")
                .replace("-", "_")
            )
        return summary
    function = {
        "responses": pipeline.responses,
        "score": pipeline.score,
        "pairs": pipeline.pairs,
        "tag": pipeline.tag,
        "extend": pipeline.extend,
    }[step.stage]
    return function(cfg, source, out, view, overwrite, executor=runner)


def _in_process(made: Plan, step: Step, source: Path, folder: Path) -> list[Any]:
    """Filter, export and card steps: whole outputs rewritten from their input."""
    from magpie import locking, pipeline

    s = step.settings
    if step.stage == "filter":
        from magpie.filters import filter_dataset
        from magpie.selection import Selection

        selection = Selection(s.balance, s.limit, s.order_by, s.seed, s.shuffle_seed)
        report = locking.releasing(filter_dataset)(
            source, folder, s.where, s.presets, s.params, True, s.shard_rows, selection
        )
        return [report]
    if step.stage == "export":
        options = s.options()
        return [pipeline.export(source, folder / fmt, fmt, True, **options) for fmt in s.formats]
    if folder == made.out:
        return pipeline.reports(made.out, source, plots=s.plots, view=s.view)
    written = [pipeline.card(source, plots=s.plots)]
    if s.view:
        written.append(pipeline.view(source))
    return written


def _in_process_remote(made: Plan, step: Step, source: RemotePath, folder: RemotePath) -> list[Any]:
    """Filter, export and card steps of a run in an object store: made on a local copy of their
    input, then put in place (each dataset's own bookkeeping last; see `fs.upload_tree`)."""
    import tempfile

    from magpie.card import CARD_NAME, PLOTS_DIR, VIEW_NAME
    from magpie.fs import download_tree, upload_tree
    from magpie.store import ShardStore, atomic_write_bytes, clear_inner_dataset

    with tempfile.TemporaryDirectory(prefix="magpie-step-") as tmp:
        root = Path(tmp) / made.out.name
        local_in = root / step.input  # type: ignore[operator]
        download_tree(source, local_in)
        local = Plan(root, made.steps, made.executor, made.source)
        local_folder = local.folder(step)
        outputs = _in_process(local, step, local_in, local_folder)
        if step.stage == "card":  # the report files, beside the dataset they describe
            for name in (CARD_NAME, PLOTS_DIR, VIEW_NAME):
                path = local_folder / name
                if path.is_dir():
                    upload_tree(path, folder / name)
                elif path.is_file():
                    atomic_write_bytes(folder / name, path.read_bytes())
                else:
                    continue
                ShardStore(folder).record_written(name)
            return outputs
        exporting = step.stage == "export"
        targets = [folder / f for f in step.settings.formats] if exporting else [folder]
        for target in targets:
            if target.exists():
                clear_inner_dataset(target)
            upload_tree(local_folder / target.relative_to(folder).as_posix(), target)
        for report in outputs:
            if hasattr(report, "out_dir"):
                report.out_dir = folder / Path(report.out_dir).relative_to(local_folder).as_posix()
    return outputs
