"""Instruction synthesis throughput: the full pipeline vs. the raw llama.cpp engine.

Prints instructions/s and generated tokens/s for `magpie instructions` (engine + checks + Parquet
shards + manifest) and for llama-cpp-python called directly with the same prompt, sampling and
seeds, and the ratio of the two (the pipeline's overhead; target >= 0.95).

    python bench/instructions.py --rows 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from magpie.config import InstructionsConfig
from magpie.engines.llamacpp import LlamaCppEngine
from magpie.runner import ProgressView, run_source
from magpie.stages.instructions import InstructionStage, attempt_seed
from magpie.store import ShardStore
from magpie.templates import chat_format_for


def run_pipeline(engine: LlamaCppEngine, config: InstructionsConfig) -> tuple[float, int, int]:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    stage = InstructionStage(engine, fmt, config, info.model_id)
    with tempfile.TemporaryDirectory() as tmp:
        store = ShardStore(Path(tmp) / "ins")
        store.open_for_write("instructions", {}, "bench", overwrite=False)
        progress = ProgressView(Console(stderr=True), enabled=False).stage("bench", config.num)
        started = time.perf_counter()
        summary = run_source(
            stage, store, config.num, config.shard_size, config.attempt_budget(), progress
        )
        seconds = time.perf_counter() - started
    return seconds, summary.attempts, summary.tokens


def run_raw(engine: LlamaCppEngine, config: InstructionsConfig, attempts: int) -> tuple[float, int]:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    llm = engine._llm  # the same loaded model, driven directly
    tokens = llm.tokenize(fmt.pre_query.encode(), add_bos=False, special=True)
    generated = 0
    started = time.perf_counter()
    for attempt in range(attempts):
        out = llm.create_completion(
            tokens,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=0,
            min_p=0.0,
            stop=list(fmt.stops),
            seed=attempt_seed(config.seed, attempt, 1),
        )
        generated += out["usage"]["completion_tokens"]
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="accepted instructions to produce")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    config = InstructionsConfig(
        num=args.rows, shard_size=args.shard_size, max_tokens=args.max_tokens
    )
    engine = LlamaCppEngine()
    seconds, attempts, tokens = run_pipeline(engine, config)
    raw_seconds, raw_tokens = run_raw(engine, config, attempts)
    engine.close()
    pipe_tps, raw_tps = tokens / seconds, raw_tokens / raw_seconds
    print(f"pipeline : {args.rows} rows from {attempts} attempts in {seconds:.1f} s")
    print(f"           {args.rows / seconds:.2f} instructions/s, {pipe_tps:.1f} tokens/s")
    print(f"raw      : {attempts} completions in {raw_seconds:.1f} s, {raw_tps:.1f} tokens/s")
    print(f"ratio    : {pipe_tps / raw_tps:.3f} of raw llama.cpp tokens/s")


if __name__ == "__main__":
    main()
