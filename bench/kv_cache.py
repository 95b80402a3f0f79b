"""KV cache type: batched decode speed by context length, and how far the logits move.

For each `kv_type` of the llama.cpp engine (F16, Q8_0) on the bundled model, prints:
- tokens/s of one decode step of `--batch` sequences whose streams already hold `ctx` tokens, for
  several context lengths (the responses stage decodes at 100-350 tokens of context);
- against F16: the mean and largest KL divergence of the next-token distribution over a
  `--tokens`-token text, and how often the top token agrees.

Run on a quiet machine: `python bench/kv_cache.py [--batch 32] [--steps 8]`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_cpp
import numpy as np

from magpie.engines.llamacpp import DEFAULT_BATCH_SIZE, LlamaCppEngine
from magpie.engines.llamacpp_batch import KV_TYPES

CONTEXTS = (32, 128, 256, 448)
TEXT = Path(__file__).resolve().parents[1] / "README.md"


def decode_speed(engine: LlamaCppEngine, batch: int, steps: int) -> dict[int, float]:
    """Tokens/s of a decode step of `batch` sequences at each context length of CONTEXTS."""
    decoder = engine._decoder
    decoder._context_for(512)
    speeds = {}
    for context in CONTEXTS:
        llama_cpp.llama_memory_clear(decoder._memory, False)
        prompt = [(100 + k % 50, k, 0, False) for k in range(context)]
        for start in range(0, context, decoder.capacity):
            decoder._decode(prompt[start : start + decoder.capacity])
        for seq in range(1, batch):
            llama_cpp.llama_memory_seq_cp(decoder._memory, 0, seq, -1, -1)
        best = float("inf")
        for _ in range(3):  # the best of three runs of `steps` steps
            started = time.perf_counter()
            for step in range(steps):
                decoder._decode([(120, context + step, seq, True) for seq in range(batch)])
            best = min(best, time.perf_counter() - started)
            for seq in range(batch):
                llama_cpp.llama_memory_seq_rm(decoder._memory, seq, context, -1)
        speeds[context] = batch * steps / best
    return speeds


def next_token_logprobs(engine: LlamaCppEngine, tokens: list[int]) -> np.ndarray:
    """Log-softmax of the logits after every token of `tokens` (one sequence, chunks of 64)."""
    decoder = engine._decoder
    decoder._context_for(len(tokens) + 1)
    llama_cpp.llama_memory_clear(decoder._memory, False)
    rows = []
    for start in range(0, len(tokens), 64):
        chunk = tokens[start : start + 64]
        decoder._decode([(t, start + k, 0, True) for k, t in enumerate(chunk)])
        rows.extend(decoder._logits(k).copy() for k in range(len(chunk)))
    logits = np.array(rows, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per decode step"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per context")
    parser.add_argument("--tokens", type=int, default=480, help="tokens of text for the KL check")
    args = parser.parse_args()
    reference = None
    for kv_type in KV_TYPES:
        engine = LlamaCppEngine(batch_size=args.batch, kv_type=kv_type)
        speeds = decode_speed(engine, args.batch, args.steps)
        text = TEXT.read_text(encoding="utf-8")[: args.tokens * 8].encode()
        tokens = engine._llm.tokenize(text, add_bos=False)[: args.tokens]
        logprobs = next_token_logprobs(engine, tokens)
        engine.close()
        line = "  ".join(f"ctx {c}: {s:6.1f} tok/s" for c, s in speeds.items())
        print(f"kv_type {kv_type:5s} batch {args.batch}: {line}")
        if reference is None:
            reference = (speeds, logprobs)
            continue
        base_speeds, base = reference
        kl = (np.exp(base) * (base - logprobs)).sum(axis=1)
        agree = float((base.argmax(axis=1) == logprobs.argmax(axis=1)).mean())
        ratios = "  ".join(f"ctx {c}: {speeds[c] / base_speeds[c]:.2f}x" for c in CONTEXTS)
        print(f"  vs f16: {ratios}")
        print(
            f"  vs f16 over {len(tokens)} tokens: KL mean {kl.mean():.1e}, max {kl.max():.1e};"
            f" top token agrees {agree:.1%}"
        )


if __name__ == "__main__":
    main()
