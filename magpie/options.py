"""The command line's shared vocabulary: one typer option per concept, reused by every command.

Help texts of stage settings come from the pydantic config models' field descriptions, so a flag
means the same thing in every command and in a recipe. Commands added later should reuse these
aliases (`--in`, `--out`, `-q`, `--overwrite`, engine and server flags), not define their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from magpie.config import (
    InstructionsConfig,
    ResponsesConfig,
    ScoreConfig,
    TemplateSpec,
)
from magpie.engines.base import engine_names
from magpie.fs import as_path


def field_help(model: type[BaseModel], name: str, extra: str = "") -> str:
    """A flag's help: the config field's description (capitalised) plus `extra`."""
    text = model.model_fields[name].description or name.replace("_", " ")
    text = text[0].upper() + text[1:]
    return f"{text}. {extra}".strip() if extra else f"{text}."


def default_out(source: Path, stage: str) -> Path:
    """The output folder a command writes when --out is not given: `IN-STAGE` beside the input."""
    base = source.stem if source.is_file() else source.name
    return source.parent / f"{base}-{stage}"


_IN_HELP = (
    "Input: a dataset folder, a `magpie run` folder (its final dataset), or a .parquet/.jsonl file."
)
# parser=as_path: a local Path, or a RemotePath for s3://, gs://, memory:// ... (magpie.fs)
InOpt = Annotated[Path, typer.Option("--in", "-i", help=_IN_HELP, parser=as_path)]
MaybeInOpt = Annotated[
    Path | None,
    typer.Option("--in", "-i", help=_IN_HELP, show_default=False, parser=as_path),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output dataset directory. Default: IN-<command> beside IN.",
        parser=as_path,
    ),
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
SeedOpt = Annotated[int, typer.Option(help="Run seed; row seeds derive from it.")]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(help="Allow model code shipped with a model (ArmoRM-style reward models)."),
]
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
        help="System turn: a task preset (math, code, translation, reasoning, creative), "
        "'none' to strip the template's default, or literal text (anything with a space). "
        "Default: what the template renders.",
    ),
]
PreQueryOpt = Annotated[
    str | None,
    typer.Option(
        "--pre-query-template",
        help=field_help(
            TemplateSpec,
            "pre_query_template",
            "Families: llama-3, qwen2.5, gemma-2, phi-3, mistral, vicuna, chatml, ...",
        ),
    ),
]
ChatTemplateOpt = Annotated[
    Path | None,
    typer.Option("--chat-template", help=field_help(TemplateSpec, "chat_template")),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (when the engine, or "
        "the judge engine, is openai)."
    ),
]
ApiKeyEnvOpt = Annotated[
    str, typer.Option(help="Environment variable that holds the server's API key (never saved).")
]
ConcurrencyOpt = Annotated[
    int, typer.Option(help="Requests in flight (when the engine is openai).")
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(help="Local HF tokenizer dir: the chat template of a server (engine openai)."),
]
NThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (llamacpp).")]
NumOpt = Annotated[int, typer.Option(help=field_help(InstructionsConfig, "num"))]
NOpt = Annotated[int, typer.Option("--n", help=field_help(ResponsesConfig, "n", "1 = SFT shape."))]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling (top_p).")]
RewardModelOpt = Annotated[
    str,
    typer.Option(
        help="Reward model: a local HF directory, a hub id (cached, or online), or 'judge' / "
        "'judge:MODEL' for an LLM judge."
    ),
]
JudgeEngineOpt = Annotated[
    str,
    typer.Option(help=field_help(ScoreConfig, "judge_engine", "llamacpp, vllm or openai.")),
]

__all__ = [
    "ApiKeyEnvOpt",
    "BaseUrlOpt",
    "ChatTemplateOpt",
    "ConcurrencyOpt",
    "EngineOpt",
    "InOpt",
    "MaybeInOpt",
    "JudgeEngineOpt",
    "ModelOpt",
    "NOpt",
    "NThreadsOpt",
    "NumOpt",
    "OutOpt",
    "OverwriteOpt",
    "PreQueryOpt",
    "QuietOpt",
    "RewardModelOpt",
    "SeedOpt",
    "SystemOpt",
    "TemperatureOpt",
    "TokenizerOpt",
    "TopPOpt",
    "TrustRemoteCodeOpt",
    "default_out",
    "field_help",
]
