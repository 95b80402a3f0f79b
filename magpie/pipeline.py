"""One function per stage command, shared by the single-stage commands and `magpie run`.

Each opens its output store (refusing a directory made by another configuration), builds the
stage from its config, lets the runner drive it with a progress bar, and returns the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel

from magpie import __version__
from magpie.config import (
    InstructionsConfig,
    PairsConfig,
    Recipe,
    ResponsesConfig,
    ScoreConfig,
    TagConfig,
    TemplateSpec,
    config_hash,
)
from magpie.engines.base import Engine, ModelInfo, create_engine
from magpie.errors import MagpieError
from magpie.runner import ProgressView, RunSummary, run_source, run_transform
from magpie.schema import row_uuid
from magpie.stages.base import TransformOutput
from magpie.store import ShardStore, atomic_write_bytes
from magpie.templates import ChatFormat, chat_format_for


@contextmanager
def open_engine(config: InstructionsConfig | ResponsesConfig | TagConfig) -> Iterator[Engine]:
    """The engine a stage config names, closed afterwards."""
    engine = create_engine(config.engine.name, model=config.engine.model, **config.engine.options)
    try:
        yield engine
    finally:
        engine.close()


def resolve_format(info: ModelInfo, spec: TemplateSpec) -> ChatFormat:
    """The chat format of a model under the template settings of a stage."""
    chat_template = info.chat_template
    if spec.chat_template is not None:
        chat_template = Path(spec.chat_template).read_text()
    return chat_format_for(
        chat_template,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        pre_query_template=spec.pre_query_template,
        system_prompt=spec.system_prompt,
    )


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _open_store(
    out: Path, stage: str, config: BaseModel, extra: dict[str, Any], upstream: str, overwrite: bool
) -> ShardStore:
    store = ShardStore(out)
    resolved = {
        "magpie_version": __version__,
        "command": stage,
        "config": config.model_dump(mode="json"),
        **extra,
    }
    store.open_for_write(stage, resolved, _digest(config_hash(config), extra, upstream), overwrite)
    return store


# ---- input datasets ------------------------------------------------------------------------


def load_input(path: Path) -> tuple[pa.Table, str]:
    """Rows of a dataset directory (ours or any Parquet/JSONL) and a hash that identifies them."""
    if not path.exists():
        raise MagpieError(f"input {path} does not exist: pass --in with a dataset directory")
    manifest = _complete_manifest(path)
    if manifest is not None:
        table, identity = ShardStore(path).read_all(), manifest["config_hash"]
    else:
        table = _read_files(path)
        identity = hashlib.sha256(_ipc_bytes(table)).hexdigest()[:16]
    if "instruction" not in table.column_names:
        raise MagpieError(
            f"input {path} has no 'instruction' column (columns: {', '.join(table.column_names)})"
        )
    if "uuid" not in table.column_names:
        uuids = [row_uuid(t or "") for t in table.column("instruction").to_pylist()]
        table = table.append_column("uuid", pa.array(uuids, pa.string()))
    return table, identity


def _complete_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of one of our datasets (None for other data); refuses an unfinished one."""
    manifest = ShardStore(path).read_manifest() if path.is_dir() else None
    if manifest is not None and not manifest.get("complete"):
        raise MagpieError(
            f"input {path} is incomplete: rerun the command that writes it to finish it first"
        )
    return manifest


def _read_files(path: Path) -> pa.Table:
    import pyarrow.json as pj

    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in {".parquet", ".jsonl", ".json"})
    )
    if not files:
        raise MagpieError(f"input {path} holds no .parquet or .jsonl files")
    tables = [pq.read_table(f) if f.suffix == ".parquet" else pj.read_json(f) for f in files]
    return pa.concat_tables(tables, promote_options="default")


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# ---- stages ----------------------------------------------------------------------------------


def instructions(
    config: InstructionsConfig,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
) -> tuple[RunSummary, ChatFormat]:
    """Magpie instruction synthesis into `out`."""
    from magpie.stages.instructions import InstructionStage

    ShardStore(out).check_writable()
    with _engine_or(engine, config) as llm:
        fmt = resolve_format(llm.info, config.template)
        if config.turns > 1:
            fmt.require_assistant_prefix()
        extra = {"model_id": llm.info.model_id, "chat_format": fmt.to_dict()}
        store = _open_store(out, "instructions", config, extra, "", overwrite)
        stage = InstructionStage(llm, fmt, config, llm.info.model_id)
        summary = run_source(
            stage,
            store,
            config.num,
            config.shard_size,
            config.attempt_budget(),
            view.stage("instructions", config.num),
        )
    return summary, fmt


def responses(
    config: ResponsesConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
) -> RunSummary:
    """n responses per instruction of `source` into `out`."""
    from magpie.stages.responses import ResponseStage

    table, upstream = load_input(source)
    ShardStore(out).check_writable()
    with _engine_or(engine, config) as llm:
        fmt = resolve_format(llm.info, config.template)
        extra = {"model_id": llm.info.model_id, "chat_format": fmt.to_dict(), "input": str(source)}
        store = _open_store(out, "responses", config, extra, upstream, overwrite)
        stage = ResponseStage(llm, fmt, config, llm.info.model_id)
        return run_transform(
            "responses",
            stage,
            table,
            store,
            config.shard_size,
            view.stage("responses", table.num_rows),
        )


def extend(
    config: Any,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
) -> RunSummary:
    """Follow-up turns for the rows of `source` (an `ExtendConfig`), into `out`."""
    from magpie.stages.extend import ExtendStage, followup_template

    table, upstream = load_input(source)
    if not {"response", "conversations"} & set(table.column_names):
        raise MagpieError(
            f"input {source} has no 'response' or 'conversations' column to extend: run "
            "`magpie responses --n 1` first, or give rows with instruction and response"
        )
    ShardStore(out).check_writable()
    with _engine_or(engine, config) as llm:
        reply_format = resolve_format(llm.info, config.template)
        try:
            query_format = resolve_format(llm.info, followup_template(config))
        except MagpieError as exc:
            raise MagpieError(
                f"follow-up user turns: {exc} (for this stage: --followup-system-prompt none)"
            ) from None
        extra = {
            "model_id": llm.info.model_id,
            "chat_format": reply_format.to_dict(),
            "followup_chat_format": query_format.to_dict(),
            "input": str(source),
        }
        store = _open_store(out, "extend", config, extra, upstream, overwrite)
        stage = ExtendStage(llm, query_format, reply_format, config)
        return run_transform(
            "extend",
            stage,
            table,
            store,
            config.shard_size,
            view.stage("extend", table.num_rows),
        )


def load_scorer(config: ScoreConfig) -> Any:
    """The reward backend a score config names."""
    spec = config.reward_model
    if spec == "judge" or spec.startswith("judge:"):
        from magpie.rewards.judge import load_judge

        return load_judge(spec, config.judge_engine.name, **config.judge_engine.options)
    from magpie.rewards.classifier import ClassifierRewardModel

    return ClassifierRewardModel(
        spec,
        dtype=config.dtype,
        batch_size=config.batch_size,
        max_length=config.max_length,
        trust_remote_code=config.trust_remote_code,
    )


def score(
    config: ScoreConfig, source: Path, out: Path, view: ProgressView, overwrite: bool = False
) -> RunSummary:
    """A reward for every response of `source`, into `out`."""
    from magpie.stages.rewards import RewardStage

    table, upstream = load_input(source)
    if "responses" not in table.column_names:
        raise MagpieError(f"input {source} has no 'responses' column: run `magpie responses` first")
    ShardStore(out).check_writable()
    scorer = load_scorer(config)
    try:
        extra = {"reward_model": scorer.model_id, "input": str(source)}
        store = _open_store(out, "score", config, extra, upstream, overwrite)
        return run_transform(
            "score",
            RewardStage(scorer),
            table,
            store,
            config.shard_size,
            view.stage("score", table.num_rows),
        )
    finally:
        close = getattr(scorer, "close", None)
        if close is not None:
            close()


def pairs(
    config: PairsConfig, source: Path, out: Path, view: ProgressView, overwrite: bool = False
) -> RunSummary:
    """Chosen / rejected pairs of `source` into `out`; rows set aside are kept with a reason."""
    from magpie.stages.pairs import PairStats, make_pairs

    table, upstream = load_input(source)
    store = _open_store(out, "pairs", config, {"input": str(source)}, upstream, overwrite)

    def transform(chunk: pa.Table, progress: Any) -> TransformOutput:
        kept, set_aside = make_pairs(chunk, config.min_margin, config.drop_truncated)
        progress.on_done(chunk.num_rows, 0)
        return TransformOutput(
            rows=kept,
            rejected=set_aside,
            rejections=PairStats.from_tables(kept, set_aside).set_aside,
        )

    return run_transform(
        "pairs", transform, table, store, config.shard_size, view.stage("pairs", table.num_rows)
    )


def tag(config: TagConfig, source: Path, out: Path, view: ProgressView, overwrite: bool = False):
    """Unitag tags of every row of `source` into `out` (any dataset with an `instruction`)."""
    from magpie.stages.tags import JUDGE_TAG_NAMES, JudgeTagger, TagStage, resolve_safety_on

    table, upstream = load_input(source)
    safety_on = resolve_safety_on(config.safety_on, table.column_names)
    ShardStore(out).check_writable()
    if "neighbors" in config.tags:
        table = _neighbor_columns(table, config, view)
    needs_judge = any(
        t in JUDGE_TAG_NAMES and not (t == "safety" and config.guard_model) for t in config.tags
    )
    extra: dict[str, Any] = {"input": str(source)}
    if "safety" in config.tags:
        extra["safety_on"] = safety_on
    with contextlib.ExitStack() as stack:
        judge = guard = scorer = None
        if needs_judge:
            llm = stack.enter_context(open_engine(config))
            fmt = resolve_format(llm.info, config.template)
            judge = JudgeTagger(llm, fmt, llm.info.model_id, config.seed)
            extra["judge"] = llm.info.model_id
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
            stack.callback(getattr(scorer, "close", lambda: None))
        store = _open_store(out, "tag", config, extra, upstream, overwrite)
        stage = TagStage(
            [t for t in config.tags if t != "neighbors"], judge, guard, scorer, safety_on
        )
        return run_transform(
            "tag", stage, table, store, config.shard_size, view.stage("tag", table.num_rows)
        )


def _neighbor_columns(table: pa.Table, config: TagConfig, view: ProgressView) -> pa.Table:
    """Embedding nearest-neighbour statistics over the whole dataset (not per shard)."""
    from magpie.stages.neighbors import tag_neighbors

    bar = view.stage("embeddings", table.num_rows)
    return tag_neighbors(
        table,
        model=config.embedding_model,
        embed_progress=lambda n: bar.on_done(n, 0),
        k=config.neighbor_k,
        distance_threshold=config.neighbor_threshold,
        index=config.index,
    )


def export(source: Path, out: Path, fmt: str, overwrite: bool = False) -> Any:
    """Write `source` in an export format (magpie, trl, sharegpt, openai, jsonl)."""
    from magpie.export import export_dataset

    _complete_manifest(source)  # refuses incomplete datasets with a clear message
    return export_dataset(source, out, fmt, overwrite=overwrite)


@contextmanager
def _engine_or(
    engine: Engine | None, config: InstructionsConfig | ResponsesConfig
) -> Iterator[Engine]:
    if engine is not None:
        yield engine
    else:
        with open_engine(config) as llm:
            yield llm


def run_recipe(recipe: Recipe, view: ProgressView, overwrite: bool = False) -> dict[str, Any]:
    """instructions -> responses -> score -> pairs -> export under `recipe.out`; resumable."""
    out = Path(recipe.out)
    ins_cfg, res_cfg = recipe.instructions_config(), recipe.responses_config()
    store = ShardStore(out)
    store.check_writable()
    atomic_write_bytes(
        out / "recipe.yaml",
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).encode(),
    )
    summaries: dict[str, Any] = {}
    with open_engine(ins_cfg) as llm:
        summaries["instructions"], _ = instructions(
            ins_cfg, out / "instructions", view, overwrite, engine=llm
        )
        if not summaries["instructions"].complete:
            raise MagpieError(
                "too few instructions were accepted: raise instructions.max_attempts in the recipe"
            )
        shared = llm if res_cfg.engine == ins_cfg.engine else None
        summaries["responses"] = responses(
            res_cfg, out / "instructions", out / "responses", view, overwrite, engine=shared
        )
    summaries["score"] = score(recipe.score, out / "responses", out / "scored", view, overwrite)
    summaries["pairs"] = pairs(recipe.pairs, out / "scored", out / "pairs", view, overwrite)
    summaries["export"] = [
        export(out / "pairs", out / "export" / fmt, fmt, overwrite=True) for fmt in recipe.export
    ]
    return summaries
