"""Decode speed of the bundled model through transformers (dense weights) vs llama.cpp, per batch.

The question it answers: would a batched transformers engine beat llama.cpp as the embedded
default on this CPU (bf16 matrix products run on AMX tiles where the CPU has them)? transformers
reads the bundled GGUF itself and dequantizes it into dense `torch.nn.Linear` weights of the
asked dtype. For each dtype and batch size it times decode steps of one token per sequence over
a short context (a static start of `--context` tokens, the cache growing by one per step), the
best of `--repeats`; llama.cpp's column is `bench/weights.py`'s measurement of the same steps
(the shipped file, every sequence in its own KV stream), run in a subprocess. Kernel rates only:
an engine adds sampling, scheduling and finished sequences to this (`generate()` over a
fixed batch wastes the steps of every sequence that already ended).

    python bench/transformers_cpu.py [--dtypes bfloat16,float32] [--batches 1,8,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def step_rate(model, batch: int, context: int, steps: int, repeats: int) -> float:
    """Tokens/s of `steps` one-token decode steps of `batch` sequences after `context` tokens."""
    import torch

    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            prompt = torch.randint(100, 1000, (batch, context))
            cache = model(prompt, use_cache=True).past_key_values
            token = torch.randint(100, 1000, (batch, 1))
            model(token, past_key_values=cache, use_cache=True)  # warm-up step
            started = time.perf_counter()
            for _ in range(steps):
                model(token, past_key_values=cache, use_cache=True)
            best = min(best, time.perf_counter() - started)
    return batch * steps / best


def llamacpp_rate(path: Path, batch: int, steps: int, threads: int) -> float | None:
    """`bench/weights.py`'s decode tokens/s for the same batch, in a subprocess (None if it
    failed)."""
    script = REPO / "bench" / "weights.py"
    cmd = [sys.executable, str(script), "--child", str(path), str(batch), "native"]
    cmd += ["--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return float(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--context", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from magpie.cpu import cpu_facts
    from magpie.engines.llamacpp import bundled_model_path

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed kwargs
    torch.set_num_threads(args.threads)
    path = bundled_model_path()
    cpu = cpu_facts()
    print(f"cpu: {cpu['model']} ({', '.join(cpu['flags'])}); threads {args.threads}")
    print(f"torch {torch.__version__}; model {path.name}; context {args.context}")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{'engine':<24}" + "".join(f"{f'{b} seq tok/s':>16}" for b in batches))
    llama = [llamacpp_rate(path, b, args.steps, args.threads) for b in batches]
    cells = [f"{r:.1f}" if r is not None else "failed" for r in llama]
    print(f"{'llama.cpp (file)':<24}" + "".join(f"{c:>16}" for c in cells))
    for name in args.dtypes.split(","):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, name)
        ).eval()
        loaded = time.perf_counter() - started
        rates = [step_rate(model, b, args.context, args.steps, args.repeats) for b in batches]
        label = f"transformers {name}"
        print(f"{label:<24}" + "".join(f"{r:>16.1f}" for r in rates) + f"   (load {loaded:.0f} s)")
        if None not in llama:
            print(
                f"    best {max(rates):.1f} tok/s vs llama.cpp's best {max(llama):.1f}: "
                f"{max(rates) / max(llama):.2f}x; vs llama.cpp's one sequence "
                f"{max(rates) / llama[0]:.2f}x"
            )
        del model


if __name__ == "__main__":
    main()
