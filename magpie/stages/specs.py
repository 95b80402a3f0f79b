"""Builders of every stage from its config, run where the stage runs (this process or an actor).

Each is a module-level function `build(config, engines) -> (stage, identity)`, referenced by a
picklable `StageSpec`; engines come from the pool of the process the stage runs in.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from magpie.config import InstructionsConfig, PairsConfig, ResponsesConfig, ScoreConfig, TagConfig
from magpie.doctor import environment
from magpie.engines.base import EnginePool
from magpie.stages.base import Progress, Stage, StageSpec, TransformOutput

Built = tuple[Stage, dict[str, Any]]

ENVIRONMENT = "environment"
"""Identity key of where the stage was built (CPU, engine runtime): recorded in the output's
manifest, never part of its configuration hash (a dataset resumes on another machine)."""


def sampler_identity(llm: Any) -> dict[str, str]:
    """The engine's own sampling algorithm, where it has one (its draws decide the texts)."""
    sampler = getattr(llm, "sampler_id", None)
    return {"sampler": sampler} if sampler else {}


def build_instructions(config: InstructionsConfig, engines: EnginePool) -> Built:
    from magpie.pipeline import resolve_format
    from magpie.stages.instructions import InstructionStage

    llm = engines.get(config.engine)
    fmt = resolve_format(llm.info, config.template)
    if config.turns > 1:
        fmt.require_assistant_prefix()
    identity = {
        "model_id": llm.info.model_id,
        **sampler_identity(llm),
        "chat_format": fmt.to_dict(),
        "shards": "attempt-blocks",
        ENVIRONMENT: environment(llm),
    }
    return InstructionStage(llm, fmt, config, llm.info.model_id), identity


def build_responses(config: ResponsesConfig, engines: EnginePool) -> Built:
    from magpie.pipeline import resolve_format
    from magpie.stages.responses import ResponseStage

    llm = engines.get(config.engine)
    fmt = resolve_format(llm.info, config.template)
    identity = {
        "model_id": llm.info.model_id,
        **sampler_identity(llm),
        "chat_format": fmt.to_dict(),
        ENVIRONMENT: environment(llm),
    }
    return ResponseStage(llm, fmt, config, llm.info.model_id), identity


def build_score(config: ScoreConfig, engines: EnginePool) -> Built:
    from magpie.pipeline import load_scorer
    from magpie.stages.rewards import RewardStage

    scorer = load_scorer(config)
    engines.on_close(getattr(scorer, "close", lambda: None))
    return RewardStage(scorer), {"reward_model": scorer.model_id}


class PairStage:
    """Chosen / rejected pairs of a slice; rows set aside are kept with their reason."""

    name = "pairs"
    required_columns = ("responses", "rewards")

    def __init__(self, config: PairsConfig) -> None:
        self.config = config

    def __call__(self, rows: pa.Table, progress: Progress) -> TransformOutput:
        from magpie.stages.pairs import PairStats, make_pairs

        kept, set_aside = make_pairs(rows, self.config.min_margin, self.config.drop_truncated)
        progress.on_done(rows.num_rows, 0)
        return TransformOutput(
            rows=kept,
            rejected=set_aside,
            rejections=PairStats.from_tables(kept, set_aside).set_aside,
        )


def build_pairs(config: PairsConfig, engines: EnginePool) -> Built:
    return PairStage(config), {}


def build_tag(config: TagConfig, engines: EnginePool) -> Built:
    """Per-row tags (neighbours are computed over the whole dataset by the driver beforehand)."""
    from magpie.pipeline import load_scorer, resolve_format
    from magpie.stages.tags import JUDGE_TAG_NAMES, JudgeTagger, TagStage

    judge = guard = scorer = None
    identity: dict[str, Any] = {}
    if any(
        t in JUDGE_TAG_NAMES and not (t == "safety" and config.guard_model) for t in config.tags
    ):
        llm = engines.get(config.engine)
        fmt = resolve_format(llm.info, config.template)
        judge = JudgeTagger(llm, fmt, llm.info.model_id, config.seed)
        identity["judge"] = llm.info.model_id
        identity[ENVIRONMENT] = environment(llm)
    if "safety" in config.tags and config.guard_model:
        from magpie.rewards.guard import GuardModel

        guard = GuardModel(config.guard_model, trust_remote_code=config.trust_remote_code)
    if "reward" in config.tags:
        scorer = load_scorer(
            ScoreConfig(
                reward_model=config.reward_model or "judge",
                trust_remote_code=config.trust_remote_code,
            )
        )
        engines.on_close(getattr(scorer, "close", lambda: None))
    safety_on = config.safety_on if config.safety_on != "auto" else "instruction"
    tags = [t for t in config.tags if t != "neighbors"]
    stage = TagStage(tags, judge, guard, scorer, safety_on)
    return stage, identity


def build_extend(config: Any, engines: EnginePool) -> Built:
    """Follow-up turns: two chat formats of one engine (follow-up user turns, replies)."""
    from magpie.errors import MagpieError
    from magpie.pipeline import resolve_format
    from magpie.stages.extend import ExtendStage, followup_template

    llm = engines.get(config.engine)
    reply_format = resolve_format(llm.info, config.template)
    try:
        query_format = resolve_format(llm.info, followup_template(config))
    except MagpieError as exc:
        raise MagpieError(
            f"follow-up user turns: {exc} (for this stage: --followup-system-prompt none)"
        ) from None
    identity = {
        "model_id": llm.info.model_id,
        **sampler_identity(llm),
        "chat_format": reply_format.to_dict(),
        "followup_chat_format": query_format.to_dict(),
        ENVIRONMENT: environment(llm),
    }
    return ExtendStage(llm, query_format, reply_format, config), identity


def spec_of(name: str, config: Any) -> StageSpec:
    """The picklable spec of the stage `name` with `config`."""
    builders = {
        "instructions": build_instructions,
        "responses": build_responses,
        "score": build_score,
        "pairs": build_pairs,
        "tag": build_tag,
        "extend": build_extend,
    }
    return StageSpec(name, builders[name], config)
