"""The `magpie` command line: parses flags into config objects and hands them to the runner."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from magpie import pipeline, signals
from magpie.config import (
    InstructionsConfig,
    PairsConfig,
    Recipe,
    ResponsesConfig,
    ScoreConfig,
    TagConfig,
    deep_merge,
    describe_validation_error,
    load_yaml,
)
from magpie.engines.base import ModelInfo, create_engine
from magpie.errors import MagpieError
from magpie.executors.base import Executor, ExecutorSpec, ProgressView, RunSummary, create_executor
from magpie.export import FORMATS
from magpie.fs import as_path
from magpie.inputs import resolve_dataset, short_note
from magpie.locking import release_all as release_all_locks
from magpie.options import (
    ApiKeyEnvOpt,
    BaseUrlOpt,
    ChatTemplateOpt,
    ConcurrencyOpt,
    EngineOpt,
    InOpt,
    JudgeEngineOpt,
    MaybeInOpt,
    ModelOpt,
    NOpt,
    NThreadsOpt,
    NumOpt,
    OutOpt,
    OverwriteOpt,
    PreQueryOpt,
    QuietOpt,
    RewardModelOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    TokenizerOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    default_out,
)
from magpie.templates import ChatFormat, cross_check

# Model loading bars of transformers / the hub would break into our own progress display.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="magpie",
    help="Synthesize SFT and DPO alignment data from aligned chat models (the Magpie method).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

FLAGS = {
    "num": "--num",
    "n": "--n",
    "repetition_penalty": "--repetition-penalty",
    "min_margin": "--min-margin",
    "reward_model": "--reward-model",
    "judge_engine.name": "--judge-engine",
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "dtype": "--dtype",
    "turns": "--turns",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "max_tokens": "--max-tokens",
    "min_chars": "--min-chars",
    "response_temperature": "--response-temperature",
    "response_max_tokens": "--response-max-tokens",
    "max_attempts": "--max-attempts",
    "seed": "--seed",
    "shard_size": "--shard-size",
    "engine.name": "--engine",
    "engine.model": "--model",
    "template.chat_template": "--chat-template",
    "template.system_prompt": "--system-prompt",
    "template.pre_query_template": "--pre-query-template",
    "tags": "--tags",
    "index": "--index",
    "neighbor_threshold": "--neighbor-threshold",
}


def friendly_errors(func: F) -> F:
    """Turn user-fixable errors into one line on stderr and exit code 2, with no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handlers = signals.install()
        try:
            return func(*args, **kwargs)
        except ValidationError as exc:
            error(describe_validation_error(exc, FLAGS))
            raise typer.Exit(2) from None
        except MagpieError as exc:
            error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # SIGINT, and SIGTERM through magpie.signals
            signals.quiet()
            err_console.print(signals.INTERRUPTED_LINE, highlight=False)
            raise typer.Exit(signals.exit_code(exc)) from None
        finally:
            release_all_locks()
            signals.restore(handlers)

    return wrapper  # type: ignore[return-value]


def error(message: str) -> None:
    """One error line on stderr; the text is printed as is (brackets included)."""
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One warning line on stderr; the text is printed as is."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str | None) -> None:
    """An informational line on stderr (e.g. which dataset an --in folder resolved to)."""
    if message:
        err_console.print(f"note: {escape(message)}", highlight=False, soft_wrap=True)


def resolve_in(source: Path) -> Path:
    """The one dataset an --in path means (see magpie.inputs), saying so when it differs."""
    dataset, message = resolve_dataset(source)
    note(message)
    short = short_note(dataset) if dataset.is_dir() else None
    if short:
        warn(short)
    return dataset


def _version(value: bool) -> None:
    if value:
        from magpie.doctor import version_line

        out_console.print(version_line(), highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """magpie-synth."""


ExecutorOpt = Annotated[
    str | None,
    typer.Option(
        "--executor", help="Where stages run: local (this process) or ray (actors on a cluster)."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT); implies --executor ray. "
        "Default: start Ray on this machine.",
    ),
]
ActorsOpt = Annotated[
    int | None,
    typer.Option("--actors", help="Ray actors (engine replicas). Default: fill the CPUs."),
]


@contextmanager
def _executor(
    name: str | None, address: str | None, actors: int | None
) -> Iterator[Executor | None]:
    """The executor the flags name (None: the local default), closed afterwards."""
    if name not in (None, "local", "ray"):
        raise MagpieError(f"--executor must be local or ray (got {name!r})")
    if name in (None, "local") and address is None and actors is None:
        yield None
        return
    spec = ExecutorSpec.model_validate(
        {"name": name or "ray", "address": address, "actors": actors}
    )
    if spec.name == "local":
        raise MagpieError("--address and --actors need --executor ray")
    runner = create_executor(spec)
    try:
        yield runner
    finally:
        runner.close()


def _model_info(engine_name: str, model: str | None) -> ModelInfo:
    """Tokenizer facts of a model without loading its weights where possible."""
    if model is not None and Path(model).is_dir():
        from magpie.engines.hf import hf_model_info

        return hf_model_info(model)
    if engine_name == "llamacpp":
        engine = create_engine("llamacpp", model=model, vocab_only=True)
        try:
            return engine.info
        finally:
            engine.close()
    raise MagpieError(
        f"cannot read a chat template for engine {engine_name}: pass --chat-template FILE.jinja "
        "or --pre-query-template"
    )


@app.command()
@friendly_errors
def template(
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the pre-query template, multi-turn append template and stops derived for a model."""
    config = InstructionsConfig.model_validate(
        {
            "engine": {"name": engine, "model": model},
            "template": {
                "chat_template": str(chat_template) if chat_template else None,
                "system_prompt": system_prompt,
                "pre_query_template": pre_query_template,
            },
        }
    )
    spec = config.template
    if chat_template is not None and model is None:
        info = ModelInfo(model_id=str(chat_template))  # no tokenizer: BOS/EOS unknown
    else:
        info = _model_info(engine, model)
    fmt = pipeline.resolve_format(info, spec)
    note = cross_check(fmt)
    if as_json:
        out_console.print_json(json.dumps({**fmt.to_dict(), "model": info.model_id, "note": note}))
        return
    table = Table(title=Text(f"Magpie chat format of {info.model_id}"), show_lines=True)
    table.add_column("part")
    table.add_column("value")
    for key, value in fmt.to_dict().items():
        table.add_row(key, Text(repr(value) if isinstance(value, str) else str(value)))
    out_console.print(table)
    if note:
        out_console.print(f"[yellow]note:[/] {escape(note)}")


@app.command()
@friendly_errors
def instructions(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output dataset directory.", parser=as_path)
    ] = Path("data/instructions"),
    num: NumOpt = 200,
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    turns: Annotated[int, typer.Option(help="User turns per conversation (multi-turn).")] = 1,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    max_tokens: Annotated[
        int, typer.Option(help="Max new tokens of an instruction (a budget: may grow on resume).")
    ] = 256,
    response_temperature: Annotated[
        float, typer.Option(help="Temperature of the replies between turns (multi-turn).")
    ] = 0.0,
    response_max_tokens: Annotated[
        int,
        typer.Option(
            help="Max new tokens of a reply between turns (a budget: may grow on resume)."
        ),
    ] = 1024,
    min_chars: Annotated[int, typer.Option(help="Reject shorter instructions.")] = 8,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help="Generation budget (default 4 x num + 16); raise it and rerun to continue."
        ),
    ] = None,
    seed: SeedOpt = 0,
    shard_size: Annotated[int, typer.Option(help="Attempts per committed shard.")] = 64,
    stop_at_newline: Annotated[
        bool, typer.Option(help="End each user turn at its first newline (single-line queries).")
    ] = False,
    sanitize: Annotated[
        bool,
        typer.Option(
            help="Strip labels and trailing answers as the original scripts do; the raw text "
            "stays in raw_instruction."
        ),
    ] = False,
    ban_first_token: Annotated[
        list[str] | None,
        typer.Option(
            help="A token the user turn may not start with (repeatable); 'markdown-headers' "
            "bans #, ##, ### and ####."
        ),
    ] = None,
    first_token_boost: Annotated[
        float,
        typer.Option(help="Divide the first token's logits by this (the original's 1.2)."),
    ] = 1.0,
    n_threads: NThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Synthesize instructions: the model writes user queries from its pre-query template.

    Rerun the same command after an interruption to resume where it stopped.
    """
    options = _engine_options(n_threads, base_url, api_key_env, concurrency, tokenizer)
    config = InstructionsConfig.model_validate(
        {
            "engine": {"name": engine, "model": model, "options": options},
            "template": {
                "chat_template": str(chat_template) if chat_template else None,
                "system_prompt": system_prompt,
                "pre_query_template": pre_query_template,
            },
            "num": num,
            "turns": turns,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "response_temperature": response_temperature,
            "response_max_tokens": response_max_tokens,
            "min_chars": min_chars,
            "max_attempts": max_attempts,
            "seed": seed,
            "shard_size": shard_size,
            "stop_at_newline": stop_at_newline,
            "sanitize": sanitize,
            "first_token_ban": ban_first_token or [],
            "first_token_boost": first_token_boost,
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown(), _executor(executor, address, actors) as runner:
        summary, fmt = pipeline.instructions(config, out, view, overwrite, executor=runner)
    print_summary(summary, fmt)
    if config.sanitize:
        from magpie.sanitize import count_sanitized

        changed, rows = count_sanitized(out)
        out_console.print(f"sanitized: {changed} of {rows} instructions changed (raw_instruction)")
    if not summary.complete:
        warn(
            f"only {summary.rows} of {config.num} rows after {summary.attempts} attempts "
            f"(budget spent); {pipeline.binding_setting(summary, config)}. The short dataset is "
            "usable as it is."
        )
        raise typer.Exit(1)


@app.command()
@friendly_errors
def responses(
    source: InOpt,
    out: OutOpt = None,
    n: NOpt = 5,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Repetition penalty.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens of a response.")] = 2048,
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    seed: SeedOpt = 0,
    shard_size: Annotated[int, typer.Option(help="Instructions per committed shard.")] = 16,
    n_threads: NThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Sample n responses per instruction with the model's chat template."""
    config = ResponsesConfig.model_validate(
        {
            "engine": {
                "name": engine,
                "model": model,
                "options": _engine_options(
                    n_threads, base_url, api_key_env, concurrency, tokenizer
                ),
            },
            "template": _template(chat_template, system_prompt, pre_query_template),
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "max_tokens": max_tokens,
            "seed": seed,
            "shard_size": shard_size,
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown(), _executor(executor, address, actors) as runner:
        summary = pipeline.responses(
            config,
            resolve_in(source),
            out or default_out(source, "responses"),
            view,
            overwrite,
            executor=runner,
        )
    print_summary(summary)


@app.command()
@friendly_errors
def score(
    source: InOpt,
    out: OutOpt = None,
    reward_model: RewardModelOpt = "judge",
    trust_remote_code: TrustRemoteCodeOpt = False,
    judge_engine: JudgeEngineOpt = "llamacpp",
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Conversations per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate inputs to this many tokens.")] = 4096,
    shard_size: Annotated[int, typer.Option(help="Rows per committed shard.")] = 16,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Score every response with a reward model or an LLM judge."""
    config = ScoreConfig.model_validate(
        {
            "reward_model": reward_model,
            "judge_engine": {
                "name": judge_engine,
                "options": _engine_options(None, base_url, api_key_env, concurrency, tokenizer),
            },
            "trust_remote_code": trust_remote_code,
            "dtype": dtype,
            "batch_size": batch_size,
            "max_length": max_length,
            "shard_size": shard_size,
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown(), _executor(executor, address, actors) as runner:
        summary = pipeline.score(
            config,
            resolve_in(source),
            out or default_out(source, "scored"),
            view,
            overwrite,
            executor=runner,
        )
    print_summary(summary)


@app.command()
@friendly_errors
def pairs(
    source: InOpt,
    out: OutOpt = None,
    min_margin: Annotated[float, typer.Option(help="Set aside pairs below this margin.")] = 0.0,
    drop_truncated: Annotated[
        bool, typer.Option(help="Never pick responses cut at max tokens.")
    ] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Chosen = highest reward, rejected = lowest; other rows are set aside with a reason."""
    config = PairsConfig.model_validate(
        {"min_margin": min_margin, "drop_truncated": drop_truncated}
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown(), _executor(executor, address, actors) as runner:
        summary = pipeline.pairs(
            config,
            resolve_in(source),
            out or default_out(source, "pairs"),
            view,
            overwrite,
            executor=runner,
        )
    print_summary(summary)


@app.command()
@friendly_errors
def extend(
    source: InOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output dataset directory.", parser=as_path)
    ],
    turns: Annotated[int, typer.Option(help="User turns per conversation after extension.")] = 2,
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    system_prompt: SystemOpt = None,
    followup_system_prompt: Annotated[
        str | None,
        typer.Option(
            help="System turn of the prompt that writes the next user message "
            "(text or 'none'). Default: ours, saying the user asks follow-up questions."
        ),
    ] = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    temperature: Annotated[float, typer.Option(help="Temperature of the user turns.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling of the user turns.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens of a user turn.")] = 256,
    response_temperature: Annotated[
        float, typer.Option(help="Temperature of the replies (0 = greedy).")
    ] = 0.0,
    response_top_p: Annotated[float, typer.Option(help="Nucleus sampling of the replies.")] = 1.0,
    response_max_tokens: Annotated[int, typer.Option(help="Max new tokens of a reply.")] = 1024,
    repetition_penalty: Annotated[float, typer.Option(help="Repetition penalty (replies).")] = 1.0,
    min_chars: Annotated[int, typer.Option(help="Set aside rows whose user turn is shorter.")] = 8,
    seed: Annotated[int, typer.Option(help="Run seed; row seeds derive from it and the uuid.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Rows per committed shard.")] = 16,
    n_threads: Annotated[int | None, typer.Option(help="CPU threads (llamacpp).")] = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extend single-turn rows (instruction + response) to multi-turn conversations.

    Writes `conversations` and the flat instruction_2, response_2, ... columns. Rerun the same
    command after an interruption to resume.
    """
    from magpie.stages.extend import ExtendConfig

    config = ExtendConfig.model_validate(
        {
            "engine": {
                "name": engine,
                "model": model,
                "options": _engine_options(
                    n_threads, base_url, api_key_env, concurrency, tokenizer
                ),
            },
            "template": _template(chat_template, system_prompt, pre_query_template),
            "followup_system_prompt": followup_system_prompt,
            "turns": turns,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "response_temperature": response_temperature,
            "response_top_p": response_top_p,
            "response_max_tokens": response_max_tokens,
            "repetition_penalty": repetition_penalty,
            "min_chars": min_chars,
            "seed": seed,
            "shard_size": shard_size,
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        summary = pipeline.extend(config, source, out, view, overwrite)
    print_summary(summary)


@app.command()
@friendly_errors
def export(
    source: InOpt,
    out: OutOpt = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", "-f", help=f"{', '.join(FORMATS)} (see the README for what each keeps)."
        ),
    ] = "trl",
    all_responses: Annotated[
        bool,
        typer.Option(
            help="openai/sharegpt: one row per response instead of the first (SFT data), and "
            "OpenAI preference rows (input, preferred_output, non_preferred_output) for DPO data."
        ),
    ] = False,
    extra_columns: Annotated[
        bool,
        typer.Option(help="magpie: keep our columns beyond the published layout, after it."),
    ] = False,
    test_size: Annotated[
        float | None,
        typer.Option(help="Move this share of the rows (e.g. 0.02) to a `test` split."),
    ] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the --test-size draw.")] = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a dataset in the published Magpie schema, TRL, ShareGPT, OpenAI or JSONL format.

    Prints what the format keeps and counts anything it leaves out.
    """
    out = out or default_out(source, fmt)
    report = pipeline.export(
        resolve_in(source),
        out,
        fmt,
        overwrite,
        all_responses=all_responses,
        test_size=test_size,
        split_seed=split_seed,
        extra_columns=extra_columns,
    )
    out_console.print(Text(report.summary()))
    if not quiet:
        for line in report.notes():
            out_console.print(Text(f"  {line}"))


@app.command()
@friendly_errors
def tag(
    source: InOpt,
    out: OutOpt = None,
    tags: Annotated[
        str,
        typer.Option(
            help="Comma list of difficulty, quality, category, safety, language, reward, neighbors."
        ),
    ] = "difficulty,quality,category,safety,language",
    engine: EngineOpt = "llamacpp",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Judge model. Default: bundled SmolLM2.")
    ] = None,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    guard_model: Annotated[
        str | None, typer.Option(help="Llama-Guard-style model for the safety tag (else judge).")
    ] = None,
    safety_on: Annotated[
        str,
        typer.Option(
            help="What the safety tag classifies: auto (the conversation when rows have one: "
            "chosen, else response), instruction, response or chosen."
        ),
    ] = "auto",
    reward_model: Annotated[
        str | None, typer.Option(help="Reward model of the reward tag (HF path or 'judge').")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    embedding_model: Annotated[
        str | None, typer.Option(help="sentence-transformers model. Default: all-MiniLM-L6-v2.")
    ] = None,
    neighbor_threshold: Annotated[
        float, typer.Option(help="Squared L2 distance under which rows count as repeats.")
    ] = 0.15,
    neighbor_k: Annotated[
        int, typer.Option("--k", "--neighbor-k", help="Neighbours searched per row.")
    ] = 20,
    index: Annotated[str, typer.Option(help="k-NN index: auto, flat, ivf or hnsw.")] = "auto",
    seed: SeedOpt = 0,
    shard_size: Annotated[
        int, typer.Option(help="Rows per committed shard (a judge tag decodes them together).")
    ] = 64,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Tag rows like Magpie's unitag: difficulty, quality, task category, safety, language,
    instruction reward, and embedding nearest-neighbour repeats."""
    config = TagConfig.model_validate(
        {
            "tags": [t.strip() for t in tags.split(",") if t.strip()],
            "engine": {
                "name": engine,
                "model": model,
                "options": _engine_options(None, base_url, api_key_env, concurrency, tokenizer),
            },
            "template": _template(chat_template, system_prompt, pre_query_template),
            "guard_model": guard_model,
            "safety_on": safety_on,
            "reward_model": reward_model,
            "trust_remote_code": trust_remote_code,
            "embedding_model": embedding_model,
            "neighbor_threshold": neighbor_threshold,
            "neighbor_k": neighbor_k,
            "index": index,
            "seed": seed,
            "shard_size": shard_size,
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown(), _executor(executor, address, actors) as runner:
        summary = pipeline.tag(
            config,
            resolve_in(source),
            out or default_out(source, "tagged"),
            view,
            overwrite,
            executor=runner,
        )
    print_summary(summary)


@app.command("filter")
@friendly_errors
def filter_rows(
    source: InOpt,
    out: OutOpt = None,
    where: Annotated[
        str | None, typer.Option(help="SQL boolean expression over the columns (DuckDB).")
    ] = None,
    preset: Annotated[
        list[str] | None,
        typer.Option(
            help="Named preset: magpie-filtered, magpie-dpo-selection, instruction-length, "
            "dpo-margin, english, no-duplicates, safe."
        ),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Preset parameter KEY=VALUE (e.g. min_margin=0.1).")
    ] = None,
    order_by: Annotated[
        str | None,
        typer.Option(help="Keep the top rows by this SQL expression, e.g. 'response_length desc'."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Rows to keep after the conditions.")] = None,
    balance: Annotated[
        str | None,
        typer.Option(help="Column whose categories share --limit equally (e.g. task_category)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of random picks (--balance, --limit).")] = 0,
    shuffle_seed: Annotated[
        int | None, typer.Option(help="Shuffle the kept rows with this seed.")
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep the rows that match --where and every --preset; print what each condition removed."""
    from magpie.filters import filter_dataset, render_filter_report

    params = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MagpieError(f"--param {item!r} is not KEY=VALUE: write e.g. min_margin=0.1")
        params[key.strip()] = value.strip()
    from magpie.selection import Selection

    out = out or default_out(source, "filtered")
    selection = Selection(balance, limit, order_by, seed, shuffle_seed)
    report = filter_dataset(
        resolve_in(source), out, where, preset or [], params, overwrite, selection=selection
    )
    if not quiet:
        render_filter_report(report, out_console)
    else:
        out_console.print(Text(report.summary()))


@app.command()
@friendly_errors
def stats(
    path: Annotated[
        Path | None, typer.Argument(help="Dataset (same as --in).", show_default=False)
    ] = None,
    source: MaybeInOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Distributions of a dataset's tags, lengths and rewards."""
    from magpie.stats import dataset_stats, render_stats

    result = dataset_stats(resolve_in(_one_dataset("stats", path, source)))
    if as_json:
        out_console.print_json(json.dumps(result.as_dict(), default=str))
    else:
        render_stats(result, out_console)


@app.command()
@friendly_errors
def doctor(
    model: ModelOpt = None,
    probe: Annotated[
        bool, typer.Option(help="Probe llama.cpp configurations now (else show the cached choice).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What this machine runs: CPU, the llama.cpp configuration chosen for it, engines."""
    from magpie.doctor import report

    facts = report(Path(model) if model else None, probe=probe)
    if as_json:
        out_console.print_json(json.dumps(facts))
        return
    cpu, llama = facts["cpu"], facts["llamacpp"]
    table = Table(show_header=False, box=None)
    row = lambda key, value: table.add_row(Text(key), Text(value))  # noqa: E731 - text, no markup
    row("magpie", f"{facts['magpie']} (python {facts['python']}, {facts['platform']})")
    row("cpu", f"{cpu['model']}, {cpu['cores']} cores, {', '.join(cpu['flags'])}")
    if "error" in llama:
        row("llama.cpp", llama["error"])
    else:
        chosen = llama["runtime"]
        row("llama.cpp", f"{llama['llama_cpp']}: {llama['system_info']}")
        row("runtime", f"{chosen['name']} ({chosen.get('reason', '')})")
        if "weights" in llama:
            weights = llama["weights"]
            row("weights", f"{weights['kind']} ({weights['reason']})")
            row("kv cache", f"{llama['kv_type']} (auto for this CPU; engine option kv_type)")
    for name, status in facts["engines"].items():
        state = f"ok {status['version'] or ''}".strip() if status["ok"] else "missing"
        row(f"engine {name}", f"{state}  {status['why']}".rstrip())
    row("cache", facts["cache"])
    out_console.print(table, markup=False, highlight=False)


@app.command()
@friendly_errors
def card(
    path: Annotated[
        Path | None,
        typer.Argument(help="Dataset or run folder (same as --in).", show_default=False),
    ] = None,
    source: MaybeInOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Card file. Default: DATASET/README.md.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Draw PNG plots into plots/ beside the card.")] = True,
) -> None:
    """Write a Hugging Face dataset card: YAML header, how it was made, distributions, plots."""
    given = _one_dataset("card", path, source)
    out_console.print(Text(pipeline.card(given, out, plots=plots).summary()))


@app.command("view")
@friendly_errors
def view_rows(
    path: Annotated[
        Path | None,
        typer.Argument(help="Dataset or run folder (same as --in).", show_default=False),
    ] = None,
    source: MaybeInOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file. Default: DATASET/view.html.")
    ] = None,
) -> None:
    """Write one self-contained HTML page to browse, filter and search the rows offline."""
    given = _one_dataset("view", path, source)
    out_console.print(Text(pipeline.view(given, out).summary()))


def _one_dataset(command: str, path: Path | None, source: Path | None) -> Path:
    """The dataset a command got as its argument or --in (not both), with its resolution noted."""
    if (path is None) == (source is None):
        raise MagpieError(f"{command} needs one dataset: pass --in DIR (or DIR as the argument)")
    given = path or source
    assert given is not None
    if given.exists():
        resolve_in(given)
    return given


@app.command()
@friendly_errors
def verify(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (or a `magpie run` output).")],
    repair: Annotated[
        bool, typer.Option(help="Move broken shards into .magpie/broken/ so a rerun redoes them.")
    ] = False,
) -> None:
    """Check every shard against its recorded rows, shard number and config, and the manifest."""
    from magpie.verify import render_report, verify_path

    report = verify_path(dataset, repair_it=repair)
    render_report(report, out_console)
    if not report.ok:
        raise typer.Exit(1)


model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("export-hf")
@friendly_errors
def export_hf(
    gguf: Annotated[Path, typer.Argument(help="GGUF model file.")],
    out: Annotated[Path, typer.Argument(help="New HF model directory.")],
    dtype: Annotated[str | None, typer.Option(help="bfloat16 or float32.")] = None,
) -> None:
    """Re-save a GGUF model as a Hugging Face model directory (for vLLM and transformers)."""
    from magpie.engines.hf import export_gguf_to_hf

    out_console.print(str(export_gguf_to_hf(gguf, out, dtype=dtype)))


@app.command("run")
@friendly_errors
def run_recipe(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe YAML (see recipes/). Default: the CPU demo.")
    ] = None,
    num: Annotated[int | None, typer.Option(help="Instructions to synthesize.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory.", parser=as_path)
    ] = None,
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="Engine name.")] = None,
    model: ModelOpt = None,
    system_prompt: SystemOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Responses per instruction.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature of the responses.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens of a response.")] = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model or 'judge'.")] = None,
    trust_remote_code: Annotated[
        bool | None,
        typer.Option(
            "--trust-remote-code/--no-trust-remote-code",
            help="Allow model code shipped with the reward model (ArmoRM).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed; row seeds derive from it.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Set one field: STEP.FIELD=VALUE (a step's name, e.g. responses.max_tokens=64) "
            "or a recipe field (num=50). Repeatable.",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the recipe and print the resolved plan (steps, inputs, outputs, models "
            "and whether this machine has them); run nothing.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Run a recipe: its steps in order, each into OUT/<step name>/ (see recipes/).

    With no arguments it builds a small DPO dataset on the bundled model (a few CPU minutes).
    Flags override single fields of the recipe (--n, --temperature and --max-tokens every
    responses step, --reward-model every score step); the rest of it is kept. Rerun the same
    command after an interruption to resume at the first incomplete step.
    """
    from magpie import recipe as recipes

    data = load_yaml(recipe) if recipe is not None else {}
    top = {
        "num": num,
        "out": str(out) if out else None,
        "seed": seed,
        "engine": {"name": engine, "model": model},
        "template": {"system_prompt": system_prompt},
        "executor": {
            "name": executor or ("ray" if address or actors else None),
            "address": address,
            "actors": actors,
        },
    }
    stages = {
        "responses": {"n": n, "temperature": temperature, "max_tokens": max_tokens},
        "score": {"reward_model": reward_model, "trust_remote_code": trust_remote_code},
    }
    sets_parsed = recipes.parse_sets(sets or [])
    if "steps" in data:
        data = recipes.apply_sets(deep_merge(data, top), sets_parsed)
        for stage, fields in stages.items():
            recipes.override_stages(data, stage, fields)
        made = recipes.plan(data)
    else:
        resolved = Recipe.model_validate(data)
        merged = deep_merge(resolved.model_dump(mode="json"), {**top, **stages})
        resolved = Recipe.model_validate(recipes.apply_sets(merged, sets_parsed))
        made = recipes.plan_legacy(resolved)
    if check:
        for line in recipes.describe(made):
            out_console.print(Text(line), soft_wrap=True)
        return
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        results = pipeline.run_recipe(made, view, overwrite)
    for result in results:
        if result.skipped:
            out_console.print(Text(f"{result.step.label}: complete, skipped"))
        for output in result.outputs:
            if isinstance(output, RunSummary):
                print_summary(output)
            else:
                out_console.print(Text(output.summary()))
    for result in results:
        ins = next(iter(result.outputs), None)
        if result.step.stage == "instructions" and isinstance(ins, RunSummary) and not ins.complete:
            warn(
                f"only {ins.rows} of {result.step.settings.num} instructions (budget spent); the "
                "later steps used them. "
                + pipeline.binding_setting(ins, result.step.settings)
                .replace("--", f"{result.step.name}.")
                .replace("-", "_")
                + " (in the recipe, or --set)"
            )


def _engine_options(
    n_threads: int | None = None,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Engine-specific settings from the flags that were given (only what differs from defaults)."""
    options: dict[str, Any] = {"n_threads": n_threads, "base_url": base_url, "tokenizer": tokenizer}
    if api_key_env != "OPENAI_API_KEY":
        options["api_key_env"] = api_key_env
    if concurrency != 8:
        options["concurrency"] = concurrency
    return {k: v for k, v in options.items() if v is not None}


def _template(
    chat_template: Path | None, system_prompt: str | None, pre_query_template: str | None
) -> dict[str, Any]:
    return {
        "chat_template": str(chat_template) if chat_template else None,
        "system_prompt": system_prompt,
        "pre_query_template": pre_query_template,
    }


def print_summary(summary: RunSummary, fmt: ChatFormat | None = None) -> None:
    """The one-screen summary at the end of a run (paths and texts printed as they are)."""
    table = Table(title=Text(f"{summary.stage} → {summary.out}"), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("rows", f"{summary.rows} ({summary.new_rows} new, {summary.shards} shards)")
    if summary.resumed_shards:
        table.add_row("resumed", f"{summary.resumed_shards} shards were already committed")
    if summary.stage == "instructions":
        table.add_row("attempts", str(summary.attempts))
        label = "rejected"
    else:
        table.add_row("input rows", str(summary.input_rows))
        label = "set aside / flagged"
    counts = {k: v for k, v in sorted(summary.rejections.items()) if v}
    detail = ", ".join(f"{k} {v}" for k, v in counts.items())
    if counts or summary.stage == "instructions":
        table.add_row(label, Text(f"{sum(counts.values())}" + (f" ({detail})" if detail else "")))
    if summary.tokens:
        table.add_row("tokens generated", str(summary.tokens))
    seconds = max(summary.seconds, 1e-9)
    speed = f"{summary.new_rows / seconds:.2f} rows/s, "
    if summary.new_tokens:
        speed += f"{summary.new_tokens / seconds:.0f} tokens/s, "
    table.add_row("speed (this run)", f"{speed}{summary.seconds:.1f} s")
    if fmt is not None:
        table.add_row("pre-query template", Text(repr(fmt.pre_query)))
    out_console.print(table)
