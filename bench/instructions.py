"""Instruction synthesis throughput: the pipeline vs. raw llama.cpp, single-stream and batched.

Three runs on the same bundled model, pre-query prompt, sampling and seeds (the pipeline and the
raw batched driver on the weights the engine runs, F16 or on AMX Q8_0; single-stream on the shipped
Q4_1 file, the faster type one sequence at a time):
- pipeline: `magpie instructions` (batched engine + checks + Parquet shards + manifest);
- raw batched: llama.cpp's batch API driven directly (this file's own driver: the prefix
  evaluated once and its KV shared, every sequence's token drawn by the engine's numpy sampler
  from its own seeded generator, so both make the same draws, `--batch` sequences per decode)
  over the pipeline's attempt blocks one after another (target pipeline/raw-batched >= 0.95);
  and once more over all attempts as one pool (no block tails). The pipeline now starts the
  next block's attempts in a block's tail (spare requests), so one pool is its ceiling;
- raw single-stream: llama-cpp-python's `create_completion` one attempt at a time, what the
  engine did before batching (target pipeline/single >= 3 at the default batch). Raw one pool /
  raw single is what batching itself gives on this CPU, the ceiling of that ratio (on AMX the
  one-sequence kernel is fast: ~2.6-2.9x).
Tokens are counted as sampled, the end-of-turn token included, on every side; the pipeline's
count includes attempts it dropped unfinished once a block had its rows (work done, as in the
raw runs, which run every attempt of a block to its end). The machine may be shared: the load
average is printed, and the runs are interleaved (`--rounds`) so each ratio compares runs made
under similar load. `--alternatives` runs the pipeline again with other llama.cpp weights,
runtimes and KV cache types, so the configuration the engine chose on this CPU is printed next
to them. The same decodes take 10-15% more or less time from one run to the next on a shared
machine, so the time inside `llama_decode` is measured on both sides too, and the ratio is also
printed as if both had decoded at the raw run's speed (what the pipeline itself adds).

    python bench/instructions.py --rows 64 [--alternatives f16:native:f16,file:native:f16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from rich.console import Console

from magpie.config import InstructionsConfig
from magpie.cpu import cpu_facts
from magpie.engines.llamacpp import DEFAULT_BATCH_SIZE, LlamaCppEngine, bundled_model_path
from magpie.engines.llamacpp_batch import KV_TYPES
from magpie.engines.llamacpp_runtime import select_runtime
from magpie.engines.llamacpp_sampling import new_generator, pick_tokens
from magpie.runner import ProgressView, run_source
from magpie.stages.instructions import InstructionStage, attempt_seed
from magpie.store import ShardStore
from magpie.templates import chat_format_for


class DecodeClock:
    """Time spent inside `llama_decode` and tokens decoded, for whichever run is timed: on a
    shared machine the same decodes take 10-15% more or less from one run to the next, so the
    time outside them is what the pipeline adds to the raw driver."""

    def __init__(self) -> None:
        self.seconds, self.entries = 0.0, 0
        self._decode = llama_cpp.llama_decode
        llama_cpp.llama_decode = self._timed  # the engine and the drivers look it up per call

    def _timed(self, ctx: Any, batch: Any) -> int:
        started = time.perf_counter()
        code = self._decode(ctx, batch)
        self.seconds += time.perf_counter() - started
        self.entries += batch.n_tokens
        return code

    def mark(self) -> tuple[float, int]:
        return self.seconds, self.entries


def same_speed_ratio(
    pipe: tuple[float, float, int, int], raw: tuple[float, float, int, int]
) -> float:
    """Pipeline / raw tokens/s had both decoded at the raw run's speed: each is (seconds,
    seconds inside llama_decode, tokens decoded, tokens generated)."""
    per_token = raw[1] / raw[2]
    pipe_seconds = pipe[0] - pipe[1] + per_token * pipe[2]
    return (pipe[3] / pipe_seconds) / (raw[3] / raw[0])


def run_pipeline(engine: LlamaCppEngine, config: InstructionsConfig) -> tuple[float, int, int]:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    stage = InstructionStage(engine, fmt, config, info.model_id)
    with tempfile.TemporaryDirectory() as tmp:
        store = ShardStore(Path(tmp) / "ins")
        store.open_for_write("instructions", {}, "bench", overwrite=False)
        progress = ProgressView(Console(stderr=True), enabled=False).stage("bench", config.num)
        sampled, decodes = engine._decoder.sampled_tokens, engine._decoder.decodes
        started = time.perf_counter()
        summary = run_source(
            stage, store, config.num, config.shard_size, config.attempt_budget(), progress
        )
        seconds = time.perf_counter() - started
    print(f"    pipeline decodes: {engine._decoder.decodes - decodes} (llama_decode calls)")
    return seconds, summary.attempts, engine._decoder.sampled_tokens - sampled


def run_single(engine: LlamaCppEngine, config: InstructionsConfig, attempts: int):
    """One attempt at a time through llama-cpp-python's high-level API on the GGUF as shipped
    (the old engine, and what a llama.cpp user runs; Q4_1 is the faster type single-stream)."""
    fmt = _format(engine)
    llm = llama_cpp.Llama(
        model_path=str(bundled_model_path()), n_ctx=1024, verbose=False, n_threads=_threads()
    )
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
        # + the end-of-turn token it sampled and left out of its count
        generated += out["usage"]["completion_tokens"] + (
            out["choices"][0]["finish_reason"] == "stop"
        )
    seconds = time.perf_counter() - started
    llm.close()
    return seconds, generated


def _threads() -> int:
    return int(os.environ.get("MAGPIE_N_THREADS") or os.cpu_count() or 1)


def run_raw_batched(
    engine: LlamaCppEngine, config: InstructionsConfig, blocks: list[list[int]], batch: int
):
    """The same attempts through llama.cpp's batch API, written directly against it: each of
    `blocks` (attempt numbers) runs as one pool of `batch` slots, one block after another."""
    fmt = _format(engine)
    llm = engine._llm
    model = llm._model
    prompt = llm.tokenize(fmt.pre_query.encode(), add_bos=False, special=True)
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = batch + 1
    params.n_ctx = 512 * params.n_seq_max
    params.n_batch = params.n_ubatch = 512
    params.kv_unified = False  # a KV stream per sequence, as the engine runs them
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.type_k = params.type_v = KV_TYPES[engine.kv_type]  # the engine's KV cache type
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    mem = llama_cpp.llama_get_memory(ctx)
    lb = llama_cpp.llama_batch_init(512, 0, 1)
    stops = [s.encode() for s in fmt.stops if s]

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (tok, pos, seq, logits) in enumerate(entries):
            lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, pos, 1
            lb.seq_id[i][0], lb.logits[i] = seq, logits
        lb.n_tokens = len(entries)
        assert llama_cpp.llama_decode(ctx, lb) == 0

    started = time.perf_counter()
    root = batch  # the prompt minus its last token lives in this sequence
    decode([(t, p, root, False) for p, t in enumerate(prompt[:-1])])
    generated = 0
    for block in blocks:
        generated += _run_pool(config, llm, ctx, mem, decode, prompt, stops, list(block), batch)
    seconds = time.perf_counter() - started
    llama_cpp.llama_batch_free(lb)
    llama_cpp.llama_free(ctx)
    return seconds, generated


def _run_pool(
    config: InstructionsConfig,
    llm: Any,
    ctx: Any,
    mem: Any,
    decode: Callable[[list[tuple[int, int, int, bool]]], None],
    prompt: list[int],
    stops: list[bytes],
    waiting: list[int],
    batch: int,
) -> int:
    """Run the attempts `waiting` in `batch` slots (continuous batching); tokens generated."""
    vocab, root = llm._model.vocab, batch
    live: dict[int, list] = {}  # slot -> [generator, next token, position, text, count]
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    generated = 0
    while waiting or live:
        for slot in range(batch):
            if slot not in live and waiting:
                rng = new_generator(attempt_seed(config.seed, waiting.pop(0), 1))
                llama_cpp.llama_memory_seq_cp(mem, root, slot, -1, -1)
                live[slot] = [rng, prompt[-1], len(prompt) - 1, b"", 0]
        while live and not waiting and max(live) >= len(live):  # keep slots 0..k-1
            gap = min(set(range(len(live))) - set(live))
            top = max(live)
            llama_cpp.llama_memory_seq_cp(mem, top, gap, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, top, -1, -1)
            live[gap] = live.pop(top)
        order = sorted(live)
        decode([(live[s][1], live[s][2], s, True) for s in order])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(order), n_vocab))
        picks = pick_tokens(logits, [config.temperature] * len(order), [live[s][0] for s in order])
        for slot, token in zip(order, picks, strict=True):
            state = live[slot]
            state[4] += 1
            state[3] += llm._model.detokenize([token], special=False)
            state[1], state[2] = token, state[2] + 1
            done = (
                llama_cpp.llama_vocab_is_eog(vocab, token)
                or state[4] >= config.max_tokens
                or any(s in state[3] for s in stops)
            )
            if done:
                generated += state[4]
                llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
                del live[slot]
    return generated


def _format(engine: LlamaCppEngine):
    info = engine.info
    return chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="accepted instructions to produce")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--skip-single", action="store_true", help="only pipeline vs batched")
    parser.add_argument(
        "--alternatives",
        default="",
        help="other llama.cpp configurations to run the pipeline with, as WEIGHTS:RUNTIME:KV "
        "(e.g. f16:native:f16,file:native:f16,file:no-repack:q8_0), after the chosen one",
    )
    args = parser.parse_args()
    config = InstructionsConfig(
        num=args.rows, shard_size=args.shard_size, max_tokens=args.max_tokens
    )
    engine = LlamaCppEngine(batch_size=args.batch)
    cpu = cpu_facts()
    print(f"cpu: {cpu['model']} ({', '.join(cpu['flags'])})")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; batch {args.batch}")
    print(f"engine weights: {engine.weights.kind} ({engine.weights.reason})")
    print(f"engine runtime: {engine.runtime.name} ({engine.runtime.reason}); KV {engine.kv_type}")
    alternatives = [
        (*alt.split(":"), "auto", "auto")[:3] for alt in args.alternatives.split(",") if alt
    ]
    clock = DecodeClock()
    for round_ in range(args.rounds):
        decode_seconds, decoded = clock.mark()
        seconds, attempts, tokens = run_pipeline(engine, config)
        pipe = (seconds, clock.seconds - decode_seconds, clock.entries - decoded, tokens)
        numbers = list(range(attempts))
        blocks = [numbers[i : i + args.shard_size] for i in range(0, attempts, args.shard_size)]
        decode_seconds, decoded = clock.mark()
        raw_seconds, raw_tokens = run_raw_batched(engine, config, blocks, args.batch)
        raw = (raw_seconds, clock.seconds - decode_seconds, clock.entries - decoded, raw_tokens)
        pool_seconds, pool_tokens = run_raw_batched(engine, config, [numbers], args.batch)
        pipe_tps, raw_tps = tokens / seconds, raw_tokens / raw_seconds
        pool_tps = pool_tokens / pool_seconds
        print(f"[{round_}] pipeline : {args.rows} rows, {attempts} attempts, {seconds:.1f} s")
        print(f"    {args.rows / seconds:.2f} instructions/s, {pipe_tps:.1f} tokens/s")
        print(f"    raw batched : {raw_seconds:.1f} s, {raw_tps:.1f} tokens/s (the same blocks)")
        print(f"    raw one pool: {pool_seconds:.1f} s, {pool_tps:.1f} tokens/s (no blocks)")
        if not args.skip_single:
            one_seconds, one_tokens = run_single(engine, config, attempts)
            one_tps = one_tokens / one_seconds
            print(f"    raw single  : {one_seconds:.1f} s, {one_tps:.1f} tokens/s")
            print(f"    pipeline / raw single  : {pipe_tps / one_tps:.2f}x tokens/s")
            print(
                f"    raw one pool / single  : {pool_tps / one_tps:.2f}x (batching's ceiling here)"
            )
        print(f"    pipeline / raw batched : {pipe_tps / raw_tps:.3f}")
        print(
            f"    outside llama_decode: pipeline {pipe[0] - pipe[1]:.2f} s, raw batched "
            f"{raw[0] - raw[1]:.2f} s; llama_decode {pipe[1]:.1f} s for {pipe[2]} tokens vs "
            f"{raw[1]:.1f} s for {raw[2]}"
        )
        print(
            f"    pipeline / raw batched at the same decode speed: "
            f"{same_speed_ratio(pipe, raw):.3f}"
        )
        print(f"    pipeline / raw one pool: {pipe_tps / pool_tps:.3f}")
        chosen = f"{engine.weights.kind}:{engine.runtime.name}:{engine.kv_type} (chosen)"
        print(f"    {'configuration':<28}{'tokens/s':>10}{'vs chosen':>11}")
        print(f"    {chosen:<28}{pipe_tps:>10.1f}{1:>11.2f}")
        for weights, runtime, kv in alternatives:
            other = LlamaCppEngine(
                batch_size=args.batch, weights=weights, runtime=runtime, kv_type=kv
            )
            alt_seconds, _, alt_tokens = run_pipeline(other, config)
            other.close()
            alt_tps = alt_tokens / alt_seconds
            label = f"{other.weights.kind}:{other.runtime.name}:{other.kv_type}"
            print(f"    {label:<28}{alt_tps:>10.1f}{alt_tps / pipe_tps:>11.2f}")
        select_runtime(engine.weights.path)  # the chosen runtime's model loading, again
        print(f"    load average now {os.getloadavg()[0]:.1f}")
    engine.close()


if __name__ == "__main__":
    main()
