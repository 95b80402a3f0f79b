"""Executor throughput: the responses stage on the local executor and on Ray with 1 and 2 actors.

Prints shards/s and generated tokens/s, cold (actor start and model load included) and warm (the
same executor's actors running a second time), for the deterministic fake engine (a fixed delay per
request stands in for a model: shows the scheduling overhead and how actors add up) and for the
bundled SmolLM2 through llama.cpp (on a 2-core machine expect little gain: both actors share the
same cores; the point is that it runs, and gives the same rows). Ray is started here with 2 CPUs.

    python bench/executors.py --rows 8 --max-tokens 48
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, ResponsesConfig
from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
from magpie.store import ShardStore


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def measure(config: ResponsesConfig, source: Path, out: Path, executor):
    started = time.perf_counter()
    summary = pipeline.responses(config, source, out, view(), executor=executor)
    seconds = time.perf_counter() - started
    return seconds, summary.shards, summary.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="instructions (llama.cpp)")
    parser.add_argument("--fake-rows", type=int, default=48, help="instructions (fake engine)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.05, help="fake seconds per request")
    parser.add_argument("--engines", default="fake,llamacpp", help="comma list: fake, llamacpp")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    engines = {
        "fake": ({"name": "fake", "options": {"delay": args.delay}}, args.fake_rows, 4),
        "llamacpp": ({"name": "llamacpp"}, args.rows, 2),
    }
    print(f"{'engine':9} {'executor':12} {'shards':>6} {'s':>7} {'shards/s':>9} {'tok/s':>8} same")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (engine, rows, shard_size) in engines.items():
            if name not in args.engines.split(","):
                continue
            source = root / f"{name}-ins"
            ins = InstructionsConfig.model_validate(
                {"engine": engine, "num": rows, "max_tokens": 64, "shard_size": 16}
            )
            pipeline.instructions(ins, source, view())
            config = ResponsesConfig.model_validate(
                {
                    "engine": engine,
                    "n": args.n,
                    "max_tokens": args.max_tokens,
                    "shard_size": shard_size,
                }
            )
            runs = {
                "local": ExecutorSpec(name="local"),
                "ray x1": ExecutorSpec(name="ray", actors=1, num_cpus=2),
                "ray x2": ExecutorSpec(name="ray", actors=2, num_cpus=1),
            }
            reference = None
            for label, spec in runs.items():
                executor = create_executor(spec)  # actors stay up between its runs
                for when in ("cold", "warm"):
                    out = root / f"{name}-{label.replace(' ', '')}-{when}"
                    seconds, shards, tokens = measure(config, source, out, executor)
                    table = ShardStore(out).read_all().select(["responses"]).to_pylist()
                    reference = reference if reference is not None else table
                    print(
                        f"{name:9} {label + ' ' + when:12} {shards:6d} {seconds:7.1f} "
                        f"{shards / seconds:9.2f} {tokens / seconds:8.1f} "
                        f"{'yes' if table == reference else 'NO'}"
                    )
                executor.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
