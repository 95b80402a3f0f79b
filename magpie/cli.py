"""The `magpie` command line: parses flags into config objects and hands them to the runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from magpie import __version__, pipeline
from magpie.config import (
    InstructionsConfig,
    PairsConfig,
    Recipe,
    ResponsesConfig,
    ScoreConfig,
    TagConfig,
    describe_validation_error,
    load_yaml,
)
from magpie.engines.base import ModelInfo, create_engine, engine_names
from magpie.errors import MagpieError
from magpie.runner import ProgressView, RunSummary
from magpie.templates import ChatFormat, cross_check

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
        try:
            return func(*args, **kwargs)
        except ValidationError as exc:
            err_console.print(f"[red]error:[/] {describe_validation_error(exc, FLAGS)}")
            raise typer.Exit(2) from None
        except MagpieError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: committed shards are kept; rerun the same command to resume"
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out_console.print(f"magpie-synth {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """magpie-synth."""


EngineOpt = Annotated[
    str, typer.Option("--engine", "-e", help=f"Engine: {', '.join(engine_names())}.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model path (.gguf for llamacpp). Default: bundled SmolLM2."
    ),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(
        "--system-prompt",
        help="System turn: text, a task preset (math, code, translation, reasoning, creative), "
        "or 'none' to strip the template's default. Default: what the template renders.",
    ),
]
PreQueryOpt = Annotated[
    str | None,
    typer.Option(
        "--pre-query-template",
        help="Override the derived template: a family name (llama-3, qwen2.5, gemma-2, phi-3, "
        "mistral, vicuna, chatml, ...) or a literal string.",
    ),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (--engine openai)."
    ),
]
ApiKeyEnvOpt = Annotated[
    str, typer.Option(help="Environment variable that holds the server's API key (never saved).")
]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight (--engine openai).")]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(help="Local HF tokenizer dir: the chat template for a server (--engine openai)."),
]
ChatTemplateOpt = Annotated[
    Path | None,
    typer.Option("--chat-template", help="Jinja chat template file to derive from."),
]


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
    table = Table(title=f"Magpie chat format of {info.model_id}", show_lines=True)
    table.add_column("part")
    table.add_column("value")
    for key, value in fmt.to_dict().items():
        table.add_row(key, repr(value) if isinstance(value, str) else str(value))
    out_console.print(table)
    if note:
        out_console.print(f"[yellow]note:[/] {note}")


@app.command()
@friendly_errors
def instructions(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")] = Path(
        "data/instructions"
    ),
    num: Annotated[int, typer.Option(help="Accepted instructions to produce.")] = 200,
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    turns: Annotated[int, typer.Option(help="User turns per conversation (multi-turn).")] = 1,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens of an instruction.")] = 256,
    response_temperature: Annotated[
        float, typer.Option(help="Temperature of the replies between turns (multi-turn).")
    ] = 0.0,
    response_max_tokens: Annotated[
        int, typer.Option(help="Max new tokens of a reply between turns (multi-turn).")
    ] = 1024,
    min_chars: Annotated[int, typer.Option(help="Reject shorter instructions.")] = 8,
    max_attempts: Annotated[
        int | None, typer.Option(help="Generation budget (default 4 x num + 16).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; row seeds derive from it.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Attempts per committed shard.")] = 64,
    n_threads: Annotated[int | None, typer.Option(help="CPU threads (llamacpp).")] = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
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
        }
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        summary, fmt = pipeline.instructions(config, out, view, overwrite)
    print_summary(summary, fmt)
    if not summary.complete:
        err_console.print(
            f"[yellow]warning:[/] only {summary.rows} of {config.num} rows after "
            f"{summary.attempts} attempts: raise --max-attempts, or loosen --min-chars"
        )
        raise typer.Exit(1)


InOpt = Annotated[Path, typer.Option("--in", "-i", help="Input dataset directory or file.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command()
@friendly_errors
def responses(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
    n: Annotated[int, typer.Option("--n", help="Responses per instruction (1 = SFT shape).")] = 5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Repetition penalty.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens of a response.")] = 2048,
    engine: EngineOpt = "llamacpp",
    model: ModelOpt = None,
    system_prompt: SystemOpt = None,
    pre_query_template: PreQueryOpt = None,
    chat_template: ChatTemplateOpt = None,
    seed: Annotated[int, typer.Option(help="Run seed; row seeds derive from it and the uuid.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Instructions per committed shard.")] = 16,
    n_threads: Annotated[int | None, typer.Option(help="CPU threads (llamacpp).")] = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    tokenizer: TokenizerOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
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
    with view.shown():
        summary = pipeline.responses(config, source, out, view, overwrite)
    print_summary(summary)


@app.command()
@friendly_errors
def score(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
    reward_model: Annotated[
        str,
        typer.Option(
            help="Reward model: a local HF directory or hub id in the local cache "
            "(sequence classification, e.g. Skywork-Reward, ArmoRM), or 'judge' / "
            "'judge:MODEL' for an LLM judge (on --judge-engine)."
        ),
    ] = "judge",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow model code shipped with the reward model (ArmoRM).")
    ] = False,
    judge_engine: Annotated[
        str, typer.Option(help="Engine of a judge: llamacpp (judge:MODEL.gguf), vllm, openai.")
    ] = "llamacpp",
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
) -> None:
    """Score every response with a reward model or an LLM judge."""
    config = ScoreConfig(
        reward_model=reward_model,
        judge_engine={
            "name": judge_engine,
            "options": _engine_options(None, base_url, api_key_env, concurrency, tokenizer),
        },
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        shard_size=shard_size,
    )
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        summary = pipeline.score(config, source, out, view, overwrite)
    print_summary(summary)


@app.command()
@friendly_errors
def pairs(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
    min_margin: Annotated[float, typer.Option(help="Set aside pairs below this margin.")] = 0.0,
    drop_truncated: Annotated[
        bool, typer.Option(help="Never pick responses cut at max tokens.")
    ] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Chosen = highest reward, rejected = lowest; other rows are set aside with a reason."""
    config = PairsConfig(min_margin=min_margin, drop_truncated=drop_truncated)
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        summary = pipeline.pairs(config, source, out, view, overwrite)
    print_summary(summary)


@app.command()
@friendly_errors
def extend(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="magpie, trl, sharegpt, openai or jsonl.")
    ] = "trl",
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a dataset in the published Magpie schema, TRL, ShareGPT, OpenAI or JSONL format."""
    report = pipeline.export(source, out, fmt, overwrite)
    out_console.print(report.summary())


@app.command()
@friendly_errors
def tag(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
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
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code.")] = False,
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
    seed: Annotated[int, typer.Option(help="Seed of the judge's retries.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Rows per committed shard.")] = 16,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
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
    with view.shown():
        summary = pipeline.tag(config, source, out, view, overwrite)
    print_summary(summary)


@app.command("filter")
@friendly_errors
def filter_rows(
    source: InOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")],
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

    selection = Selection(balance, limit, order_by, seed, shuffle_seed)
    report = filter_dataset(
        source, out, where, preset or [], params, overwrite, selection=selection
    )
    render_filter_report(report, out_console)


@app.command()
@friendly_errors
def stats(
    source: Annotated[Path, typer.Argument(help="Dataset directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Distributions of a dataset's tags, lengths and rewards."""
    from magpie.stats import dataset_stats, render_stats

    result = dataset_stats(source)
    if as_json:
        out_console.print_json(json.dumps(result.as_dict(), default=str))
    else:
        render_stats(result, out_console)


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
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="Engine name.")] = None,
    model: ModelOpt = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model or 'judge'.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Responses per instruction.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The DPO recipe end to end: instructions, responses, rewards, pairs, exports.

    With no arguments it builds a small DPO dataset on the bundled model (a few CPU minutes).
    Rerun the same command after an interruption to resume.
    """
    data = load_yaml(recipe) if recipe is not None else {}
    overrides = {"num": num, "out": str(out) if out else None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if engine is not None or model is not None:
        spec = dict(data.get("engine") or {})
        spec.update({k: v for k, v in {"name": engine, "model": model}.items() if v is not None})
        data["engine"] = spec
    if reward_model is not None:
        data["score"] = {**(data.get("score") or {}), "reward_model": reward_model}
    if n is not None:
        data["responses"] = {**(data.get("responses") or {}), "n": n}
    resolved = Recipe.model_validate(data)
    view = ProgressView(err_console, enabled=not quiet)
    with view.shown():
        summaries = pipeline.run_recipe(resolved, view, overwrite)
    for name in ("instructions", "responses", "score", "pairs"):
        print_summary(summaries[name])
    for report in summaries["export"]:
        out_console.print(report.summary())


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
    """The one-screen summary at the end of a run."""
    table = Table(title=f"{summary.stage} → {summary.out}", show_header=False)
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
    rejected = sum(summary.rejections.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(summary.rejections.items()))
    table.add_row(label, f"{rejected}" + (f" ({detail})" if detail else ""))
    table.add_row("tokens generated", str(summary.tokens))
    seconds = max(summary.seconds, 1e-9)
    table.add_row(
        "speed (this run)",
        f"{summary.new_rows / seconds:.2f} rows/s, {summary.new_tokens / seconds:.0f} tokens/s, "
        f"{summary.seconds:.1f} s",
    )
    if fmt is not None:
        table.add_row("pre-query template", repr(fmt.pre_query))
    out_console.print(table)
