"""End-to-end DPO recipe throughput on the bundled model: pairs/hour and per-stage speed.

Runs `magpie run` (instructions -> responses -> judge scores -> pairs -> exports) on a small
recipe, prints each stage's rows/s and tokens/s, the end-to-end pairs/hour, and the responses
stage beside the raw llama.cpp engine driven directly on the same prompts and seeds.

    python bench/pipeline.py --num 10 --n 5 --max-tokens 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from magpie import pipeline
from magpie.config import Recipe
from magpie.engines.llamacpp import LlamaCppEngine
from magpie.runner import ProgressView
from magpie.stages.responses import row_seed


def raw_responses(out: Path, recipe: Recipe) -> tuple[float, int]:
    """The responses stage's work done by llama-cpp-python directly."""
    config = recipe.responses_config()
    engine = LlamaCppEngine()
    info = engine.info
    fmt = pipeline.resolve_format(info, config.template)
    llm = engine._llm
    rows = pq.read_table(out / "instructions").to_pylist()
    started, tokens = time.perf_counter(), 0
    for row in rows:
        prompt = llm.tokenize(
            fmt.response_prompt([], row["instruction"]).encode(), add_bos=False, special=True
        )
        for i in range(config.n):
            result = llm.create_completion(
                prompt,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=0,
                min_p=0.0,
                stop=list(fmt.stops),
                seed=row_seed(config.seed, row["uuid"]) + i,
            )
            tokens += result["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    engine.close()
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=10, help="instructions")
    parser.add_argument("--n", type=int, default=5, help="responses per instruction")
    parser.add_argument("--max-tokens", type=int, default=256, help="max tokens of a response")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        recipe = Recipe(
            out=str(out),
            num=args.num,
            responses={"n": args.n, "max_tokens": args.max_tokens},
            export=["trl"],
        )
        view = ProgressView(Console(stderr=True), enabled=False)
        started = time.perf_counter()
        results = pipeline.run_recipe(recipe, view)
        summaries = {r.step.stage: r.outputs[0] for r in results if r.outputs}
        total = time.perf_counter() - started
        for name in ("instructions", "responses", "score", "pairs"):
            s = summaries[name]
            seconds = max(s.seconds, 1e-9)
            rows = s.rows if name in ("instructions", "pairs") else s.input_rows
            print(
                f"{name:<13} {rows:>5} rows {s.seconds:7.1f} s  {rows / seconds:7.2f} rows/s  "
                f"{s.tokens / seconds:7.1f} tokens/s"
            )
        pairs = summaries["pairs"].rows
        hourly = pairs / total * 3600
        print(f"end to end    {pairs} pairs in {total:.1f} s = {hourly:.0f} pairs/hour")
        raw_seconds, raw_tokens = raw_responses(out, recipe)
        res = summaries["responses"]
        ratio = (res.tokens / res.seconds) / (raw_tokens / raw_seconds)
        print(
            f"raw llama.cpp responses: {raw_tokens / raw_seconds:.1f} tokens/s; "
            f"pipeline/raw = {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
