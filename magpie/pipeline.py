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
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel

from magpie import __version__, locking
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
from magpie.doctor import environment
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
from magpie.fs import as_path, is_remote, read_table
from magpie.schema import row_uuid
from magpie.stages.specs import ENVIRONMENT, spec_of
from magpie.store import ShardStore
from magpie.templates import ChatFormat, chat_format_for

if TYPE_CHECKING:
    from magpie.recipe import Plan, StepResult


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
    if "input" in extra:
        refuse_overlap(as_path(extra["input"]), out)
    extra = dict(extra)
    built_on = extra.pop(ENVIRONMENT, None) or environment()
    store = ShardStore(out)
    resolved = {
        "magpie_version": __version__,
        "command": stage,
        "config": config.model_dump(mode="json"),
        **extra,
    }
    store.open_for_write(stage, resolved, _digest(config_hash(config), extra, upstream), overwrite)
    if (store.read_manifest() or {}).get("environment") != built_on:
        store.update_manifest(environment=built_on)
    return store


# ---- input datasets ------------------------------------------------------------------------


def refuse_overlap(source: Path, out: Path) -> None:
    """An --out that is the --in (or inside it, or around it) would overwrite the input."""
    src, dst = source.resolve(), out.resolve()
    if is_remote(src) != is_remote(dst):
        return  # one local, one in an object store: they cannot overlap
    if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise MagpieError(f"--out {out} overlaps --in {source}: pick an --out outside the input")


# which command makes a column, for "missing column" errors
MADE_BY = {
    "instruction": "magpie instructions",
    "responses": "magpie responses",
    "rewards": "magpie score",
}


def require_columns(table: pa.Table, path: Path, columns: list[str]) -> None:
    """One line naming the first missing column and the command that makes it."""
    for column in columns:
        if column not in table.column_names:
            maker = MADE_BY.get(column)
            fix = f"run `{maker}` first" if maker else f"pass data with a '{column}' column"
            have = ", ".join(table.column_names) or "none"
            raise MagpieError(f"input {path} has no '{column}' column (columns: {have}): {fix}")


def refuse_damaged(path: Path) -> None:
    """An input dataset of ours with a broken, foreign or missing shard is not read."""
    problems = ShardStore(path).check()
    if problems:
        first = problems[0]
        raise MagpieError(
            f"input {first.path} {first.what}: run `magpie verify {path} --repair`, then rerun "
            "the command that wrote it"
        )


def load_input(path: Path) -> tuple[pa.Table, str]:
    """Rows of a dataset directory (ours or any Parquet/JSONL) and a hash that identifies them."""
    if not path.exists():
        raise MagpieError(f"input {path} does not exist: pass --in with a dataset directory")
    manifest = _complete_manifest(path)
    if manifest is not None:
        refuse_damaged(path)
        table, identity = ShardStore(path).read_all(), manifest["config_hash"]
        if manifest.get("short"):  # a short dataset can grow: its rows are part of its identity
            identity = f"{identity}+{table.num_rows}"
    else:
        table = _read_files(path)
        identity = hashlib.sha256(_ipc_bytes(table)).hexdigest()[:16]
    if table.num_rows == 0:
        raise MagpieError(f"input {path} holds no rows: pass --in with a non-empty dataset")
    require_columns(table, path, ["instruction"])
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
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in {".parquet", ".jsonl", ".json"})
    )
    if not files:
        raise MagpieError(f"input {path} holds no .parquet or .jsonl files")
    tables = [_read_parquet(f) if f.suffix == ".parquet" else _read_jsonl(f) for f in files]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise MagpieError(
            f"the files of input {path} do not share columns ({str(exc).splitlines()[0]}): "
            "pass files with one schema"
        ) from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        return read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise MagpieError(
            f"input {path} is not readable Parquet ({str(exc).splitlines()[0]}): pass a valid "
            "Parquet or JSONL file"
        ) from None


def _read_jsonl(path: Path) -> pa.Table:
    """JSON Lines (one object per line) or a JSON array of objects, checked line by line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MagpieError(
            f"input {path} is not UTF-8 text (line {line}, byte {exc.start}): pass JSONL "
            "encoded as UTF-8"
        ) from None
    rows: list[Any] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise MagpieError(f"input {path} is not valid JSON ({exc}): fix the file") from None
        where = "item"
    else:
        where = "line"
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise MagpieError(
                    f"input {path} line {number} is not JSON ({exc.msg}): pass JSON Lines, "
                    "one object per line"
                ) from None
            if not isinstance(rows[-1], dict):
                raise MagpieError(
                    f"input {path} line {number} is a JSON {type(rows[-1]).__name__}, not an "
                    'object: write one object per line, e.g. {"instruction": "..."}'
                )
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise MagpieError(
                f"input {path} {where} {number} is not a JSON object: write one object per row"
            )
    if not rows:
        raise MagpieError(f"input {path} holds no rows: pass a non-empty JSONL file")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise MagpieError(
            f"input {path}: rows disagree on a column's type ({str(exc).splitlines()[0]}): "
            "give each column one type"
        ) from None


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


def _transform(
    name: str,
    config: Any,
    source: Path,
    read: tuple[pa.Table, str],
    out: Path,
    view: ProgressView,
    overwrite: bool,
    executor: Executor | None,
    engine: Engine | None = None,
    recorded: dict[str, Any] | None = None,
    stage_config: BaseModel | None = None,
) -> RunSummary:
    """Run stage `name` over the rows of `source` (`read`: its table and upstream digest) into
    `out`. The output records `config`, the input's path, the stage's identity and `recorded`;
    the stage runs with `stage_config` (default: `config`)."""
    table, upstream = read

    def open_store(identity: dict[str, Any]) -> ShardStore:
        extra = {**identity, "input": str(source), **(recorded or {})}
        return _open_store(out, name, config, extra, upstream, overwrite)

    return _execute(
        name,
        stage_config or config,
        table,
        config.shard_size,
        open_store,
        view.stage(name, table.num_rows),
        executor,
        engine=engine,
    )


@locking.releasing
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
    _check_budgets(out, config, overwrite)
    made: dict[str, Any] = {}

    def open_store(identity: dict[str, Any]) -> ShardStore:
        made.update(identity)
        store = _open_store(out, "instructions", config, identity, "", overwrite)
        if (store.read_manifest() or {}).get("short"):  # growing again: not usable until done
            store.update_manifest(complete=False)
        return store

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
    _mark_short(ShardStore(out), summary, config)
    fmt = made["chat_format"]
    return summary, ChatFormat(**{**fmt, "stops": tuple(fmt["stops"])})


# The setting that binds when most rejections have this reason (flag, config field).
_BINDING = {
    "truncated": ("--max-tokens", "max_tokens"),
    "reply_truncated": ("--response-max-tokens", "response_max_tokens"),
    "reply_empty": ("--response-max-tokens", "response_max_tokens"),
    "too_short": ("--min-chars", "min_chars"),
}


def binding_setting(summary: RunSummary, config: InstructionsConfig) -> str:
    """What to change when a budget ran out: the setting behind most rejections, named."""
    common = summary.rejections.most_common(1)
    total = sum(summary.rejections.values())
    if common and common[0][0] in _BINDING and common[0][1] * 2 >= total:
        reason, count = common[0]
        flag, name = _BINDING[reason]
        verb = "lower" if name == "min_chars" else "raise"
        return (
            f"{count} of {total} rejections were {reason}: {verb} {flag} "
            f"(now {getattr(config, name)}) or --max-attempts, and rerun to continue"
        )
    return f"raise --max-attempts (now {config.attempt_budget()}) and rerun to continue"


def _mark_short(store: ShardStore, summary: RunSummary, config: InstructionsConfig) -> None:
    """A run that spent its budget is a finished, short dataset: usable downstream, resumable."""
    caps = {"max_tokens": config.max_tokens, "response_max_tokens": config.response_max_tokens}
    if summary.complete:
        store.update_manifest(short=None, token_caps=caps)
        return
    store.update_manifest(
        token_caps=caps,
        complete=True,
        short={"rows": summary.rows, "wanted": config.num, "fix": binding_setting(summary, config)},
    )


def _check_budgets(out: Path, config: InstructionsConfig, overwrite: bool) -> None:
    """Token caps may grow on resume (accepted rows stay valid), never shrink."""
    manifest = None if overwrite else ShardStore(out).read_manifest()
    manifest = manifest or {}
    earlier = manifest.get("token_caps") or manifest.get("config", {}).get("config") or {}
    for name in ("max_tokens", "response_max_tokens"):
        before = earlier.get(name)
        if before is not None and getattr(config, name) < before:
            raise MagpieError(
                f"{out} was made with {name.replace('_', '-')} {before}: a lower cap would change "
                "its committed rows; use the same or a higher value, another --out, or --overwrite"
            )


@locking.releasing
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
    read = load_input(source)
    ShardStore(out).check_writable()
    return _transform(
        "responses", config, source, read, out, view, overwrite, executor, engine=engine
    )


@locking.releasing
def extend(
    config: Any,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    engine: Engine | None = None,
    executor: Executor | None = None,
) -> RunSummary:
    """Follow-up turns for the rows of `source` (an `ExtendConfig`), into `out`."""
    read = load_input(source)
    if not {"response", "conversations"} & set(read[0].column_names):
        raise MagpieError(
            f"input {source} has no 'response' or 'conversations' column to extend: run "
            "`magpie responses --n 1` first, or give rows with instruction and response"
        )
    ShardStore(out).check_writable()
    return _transform("extend", config, source, read, out, view, overwrite, executor, engine=engine)


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


@locking.releasing
def score(
    config: ScoreConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """A reward for every response of `source`, into `out`."""
    read = load_input(source)
    require_columns(read[0], source, ["responses"])
    ShardStore(out).check_writable()
    spec = config.reward_model
    if spec != "judge" and not spec.startswith("judge:"):  # a bad name fails before any work
        from magpie.rewards.classifier import resolve_source

        resolve_source(spec)
    return _transform("score", config, source, read, out, view, overwrite, executor)


@locking.releasing
def pairs(
    config: PairsConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """Chosen / rejected pairs of `source` into `out`; rows set aside are kept with a reason."""
    read = load_input(source)
    require_columns(read[0], source, ["responses", "rewards"])
    return _transform("pairs", config, source, read, out, view, overwrite, executor)


@locking.releasing
def tag(
    config: TagConfig,
    source: Path,
    out: Path,
    view: ProgressView,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    """Unitag tags of every row of `source` into `out` (any dataset with an `instruction`)."""
    from magpie.stages.tags import resolve_safety_on

    table, upstream = load_input(source)
    safety_on = resolve_safety_on(config.safety_on, table.column_names)
    ShardStore(out).check_writable()
    if "neighbors" in config.tags:
        table = _neighbor_columns(table, config, view)
    # The stage is built where it runs: its copy of the config carries the resolved mode, while
    # the output records the configuration as given (and the mode in `safety_on`).
    return _transform(
        "tag",
        config,
        source,
        (table, upstream),
        out,
        view,
        overwrite,
        executor,
        recorded={"safety_on": safety_on} if "safety" in config.tags else None,
        stage_config=config.model_copy(update={"safety_on": safety_on}),
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


@locking.releasing
def export(
    source: Path,
    out: Path,
    fmt: str,
    overwrite: bool = False,
    all_responses: bool = False,
    *,
    test_size: float | None = None,
    split_seed: int = 0,
    extra_columns: bool = False,
) -> Any:
    """Write `source` in an export format (see magpie.export.FORMATS); `test_size` adds a
    seeded `test` split, `extra_columns` keeps our columns beyond the published layout."""
    from magpie.export import export_dataset

    refuse_overlap(source, out)
    if _complete_manifest(source) is not None:  # refuses incomplete datasets
        refuse_damaged(source)
    return export_dataset(
        source,
        out,
        fmt,
        overwrite=overwrite,
        all_responses=all_responses,
        test_size=test_size,
        split_seed=split_seed,
        extra_columns=extra_columns,
    )


@locking.releasing
def run_recipe(
    recipe: Recipe | Plan,
    view: ProgressView,
    overwrite: bool = False,
    executor: ExecutorSpec | None = None,
) -> list[StepResult]:
    """Run a recipe's steps under its `out` folder (see magpie.recipe); resumable.

    A `Recipe` (the fixed DPO format) runs as instructions -> responses -> scored -> pairs ->
    export/<format>, with the card and viewer of pairs/ in the run folder.
    """
    from magpie.recipe import plan_legacy, run_plan

    made = plan_legacy(recipe) if isinstance(recipe, Recipe) else recipe
    return run_plan(made, view, overwrite, executor)


# ---- card and viewer -------------------------------------------------------------------------


def report_dataset(path: Path) -> Path:
    """The dataset directory `magpie card` / `magpie view` read from the path they were given."""
    from magpie.inputs import resolve_dataset

    return resolve_dataset(path)[0]


def _beside(source: Path, name: str) -> Path:
    """Default output of card/view: inside the directory the user named (beside a file)."""
    return source / name if source.is_dir() else source.parent / name


def card(source: Path, out: Path | None = None, plots: bool = True) -> Any:
    """Write the dataset card of `source` (default `source/README.md`) and its PNG plots."""
    from magpie.card import CARD_NAME, write_card

    target = out or _beside(source, CARD_NAME)
    report = write_card(report_dataset(source), target, plots=plots)
    _record_ours(target)
    return report


def view(source: Path, out: Path | None = None) -> Any:
    """Write the self-contained HTML viewer of `source` (default `source/view.html`)."""
    from magpie.view import DEFAULT_NAME, write_view

    if not source.exists():
        raise MagpieError(f"{source} does not exist: pass `magpie view` a dataset directory")
    table, _ = load_input(report_dataset(source))
    target = out or _beside(source, DEFAULT_NAME)
    report = write_view(table, target, title=source.resolve().name)
    _record_ours(target)
    return report


def reports(
    run_dir: Path, dataset: Path | None = None, plots: bool = True, view: bool = True
) -> list[Any]:
    """The card, plots and viewer of a run's result (default: its final dataset), written in
    `run_dir` beside it so the shard directory itself holds only Parquet."""
    from magpie.card import CARD_NAME, VIEW_NAME, write_card
    from magpie.inputs import resolve_dataset
    from magpie.view import write_view

    dataset = dataset if dataset is not None else resolve_dataset(run_dir)[0]
    written = [write_card(dataset, run_dir / CARD_NAME, plots=plots)]
    if view and any(dataset.glob("part-*.parquet")):
        table, _ = load_input(dataset)
        written.append(write_view(table, run_dir / VIEW_NAME, title=run_dir.resolve().name))
    _record_ours(run_dir / CARD_NAME, run_dir / VIEW_NAME)
    return written


def _record_ours(*paths: Path) -> None:
    """Note report files written into one of our dataset or run folders as ours, so that
    --overwrite may replace them (they are never recorded in a folder we do not own)."""
    from magpie.card import PLOTS_DIR
    from magpie.store import classify

    for path in paths:
        folder = path.parent
        if not path.exists() or classify(folder) not in ("dataset", "run"):
            continue
        store = ShardStore(folder)
        store.record_written(path.name)
        if path.suffix == ".md" and (folder / PLOTS_DIR).is_dir():
            store.record_written(PLOTS_DIR)
