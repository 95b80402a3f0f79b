"""One function per stage command, shared by the single-stage commands and `magpie run`.

Each describes its stage as a picklable spec and hands it to an executor (local or Ray), which
builds the stage where it runs, opens the output store (refusing a directory made by another
configuration), drives the shards with a progress bar, and returns the summary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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
from magpie.engines.base import Engine, EnginePool, ModelInfo
from magpie.errors import MagpieError
from magpie.executors.base import (
    Executor,
    ExecutorSpec,
    Gate,
    Job,
    ProgressView,
    RunSummary,
    StageProgress,
    attempt_blocks,
    create_executor,
)
from magpie.schema import row_uuid
from magpie.stages.specs import spec_of
from magpie.store import ShardStore, atomic_write_bytes
from magpie.templates import ChatFormat, chat_format_for


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


def _execute(
    name: str,
    config: BaseModel,
    source: pa.Table,
    shard_size: int,
    open_store: Callable[[dict[str, Any]], ShardStore],
    progress: StageProgress,
    executor: Executor | None,
    gate: Gate | None = None,
    engine: Engine | None = None,
) -> RunSummary:
    """Run stage `name` over `source` on `executor` (default: a local one made for this call)."""
    own = executor is None
    if executor is None:
        pool = EnginePool()
        if engine is not None:
            pool.add(config.engine, engine)  # type: ignore[attr-defined]
        executor = create_executor(None, pool)
    try:
        job = Job(spec_of(name, config), source, shard_size, open_store, progress, gate)
        return executor.run(job)
    finally:
        if own:
            executor.close()


def instructions(
    config: InstructionsConfig,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
    executor: Executor | None = None,
) -> tuple[RunSummary, ChatFormat]:
    """Magpie instruction synthesis into `out`: fixed blocks of `shard_size` attempts, kept in
    attempt order until `num` rows are accepted."""
    from magpie.stages.instructions import InstructionGate

    ShardStore(out).check_writable()
    made: dict[str, Any] = {}

    def open_store(identity: dict[str, Any]) -> ShardStore:
        made.update(identity)
        return _open_store(out, "instructions", config, identity, "", overwrite)

    summary = _execute(
        "instructions",
        config,
        attempt_blocks(config.attempt_budget()),
        config.shard_size,
        open_store,
        view.stage("instructions", config.num),
        executor,
        gate=InstructionGate(config.num),
        engine=engine,
    )
    fmt = made["chat_format"]
    return summary, ChatFormat(**{**fmt, "stops": tuple(fmt["stops"])})


def responses(
    config: ResponsesConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
    executor: Executor | None = None,
) -> RunSummary:
    """n responses per instruction of `source` into `out`."""
    table, upstream = load_input(source)
    ShardStore(out).check_writable()

    def open_store(identity: dict[str, Any]) -> ShardStore:
        extra = {**identity, "input": str(source)}
        return _open_store(out, "responses", config, extra, upstream, overwrite)

    return _execute(
        "responses",
        config,
        table,
        config.shard_size,
        open_store,
        view.stage("responses", table.num_rows),
        executor,
        engine=engine,
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
    config: ScoreConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """A reward for every response of `source`, into `out`."""
    table, upstream = load_input(source)
    if "responses" not in table.column_names:
        raise MagpieError(f"input {source} has no 'responses' column: run `magpie responses` first")
    ShardStore(out).check_writable()

    def open_store(identity: dict[str, Any]) -> ShardStore:
        extra = {**identity, "input": str(source)}
        return _open_store(out, "score", config, extra, upstream, overwrite)

    return _execute(
        "score",
        config,
        table,
        config.shard_size,
        open_store,
        view.stage("score", table.num_rows),
        executor,
    )


def pairs(
    config: PairsConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """Chosen / rejected pairs of `source` into `out`; rows set aside are kept with a reason."""
    table, upstream = load_input(source)

    def open_store(identity: dict[str, Any]) -> ShardStore:
        return _open_store(out, "pairs", config, {"input": str(source)}, upstream, overwrite)

    return _execute(
        "pairs",
        config,
        table,
        config.shard_size,
        open_store,
        view.stage("pairs", table.num_rows),
        executor,
    )


def tag(
    config: TagConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """Unitag tags of every row of `source` into `out` (any dataset with an `instruction`)."""
    table, upstream = load_input(source)
    ShardStore(out).check_writable()
    if "neighbors" in config.tags:
        table = _neighbor_columns(table, config, view)

    def open_store(identity: dict[str, Any]) -> ShardStore:
        extra = {"input": str(source), **identity}
        return _open_store(out, "tag", config, extra, upstream, overwrite)

    return _execute(
        "tag",
        config,
        table,
        config.shard_size,
        open_store,
        view.stage("tag", table.num_rows),
        executor,
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


def run_recipe(
    recipe: Recipe,
    view: ProgressView,
    overwrite: bool = False,
    executor: ExecutorSpec | None = None,
) -> dict[str, Any]:
    """instructions -> responses -> score -> pairs -> export under `recipe.out`; resumable.

    Every stage runs on one executor (`executor`, else the recipe's `executor:`), so a local run
    loads a model once for the stages that share it.
    """
    out = Path(recipe.out)
    ins_cfg, res_cfg = recipe.instructions_config(), recipe.responses_config()
    store = ShardStore(out)
    store.check_writable()
    atomic_write_bytes(
        out / "recipe.yaml",
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).encode(),
    )
    summaries: dict[str, Any] = {}
    runner = create_executor(executor or recipe.executor)
    try:
        summaries["instructions"], _ = instructions(
            ins_cfg, out / "instructions", view, overwrite, executor=runner
        )
        if not summaries["instructions"].complete:
            raise MagpieError(
                "too few instructions were accepted: raise instructions.max_attempts in the recipe"
            )
        summaries["responses"] = responses(
            res_cfg, out / "instructions", out / "responses", view, overwrite, executor=runner
        )
        summaries["score"] = score(
            recipe.score, out / "responses", out / "scored", view, overwrite, executor=runner
        )
        summaries["pairs"] = pairs(
            recipe.pairs, out / "scored", out / "pairs", view, overwrite, executor=runner
        )
    finally:
        runner.close()
    summaries["export"] = [
        export(out / "pairs", out / "export" / fmt, fmt, overwrite=True) for fmt in recipe.export
    ]
    return summaries
