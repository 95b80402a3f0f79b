"""llama.cpp configurations on this CPU: prompt and decode tokens/s of each, and which one
`auto` chooses. Each configuration runs in its own subprocess (a crash is reported, not fatal).

    python bench/runtimes.py [--model M.gguf] [--prompt-tokens 256] [--decode-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magpie.cpu import cpu_facts  # noqa: E402
from magpie.engines import llamacpp_runtime as rt  # noqa: E402


def measure(name: str, model: str | None, prompt_tokens: int, decode_tokens: int) -> dict:
    """In this process: load the engine forced to runtime `name`, time a prompt and a decode."""
    from magpie.engines.base import Request, Sampling
    from magpie.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model=model, n_ctx=2048, runtime=name)
    words = " ".join(f"word{i}" for i in range(prompt_tokens))
    prompt = f"<|im_start|>user\nRepeat: {words}<|im_end|>\n<|im_start|>assistant\n"
    tokens = engine.count_tokens(prompt)
    warm = "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    engine.generate([Request(warm, Sampling(temperature=0.0, max_tokens=4))])  # context set-up
    started = time.perf_counter()
    engine.generate([Request(prompt, Sampling(temperature=0.0, max_tokens=1), seed=0)])
    prompt_s = time.perf_counter() - started
    story = "<|im_start|>user\nWrite a long story about a lighthouse.<|im_end|>\n"
    request = Request(
        story + "<|im_start|>assistant\n", Sampling(temperature=0.0, max_tokens=decode_tokens)
    )
    started = time.perf_counter()
    out = engine.generate([request])[0][0]
    decode_s = time.perf_counter() - started
    engine.close()
    return {
        "prompt_tok_s": round(tokens / prompt_s, 1),
        "decode_tok_s": round(out.completion_tokens / decode_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = measure(args.child, args.model, args.prompt_tokens, args.decode_tokens)
        print(json.dumps(figures))
        return
    cpu = cpu_facts()
    print(f"cpu: {cpu['model']} ({', '.join(cpu['flags'])}), load {os.getloadavg()[0]:.1f}")
    from magpie.engines.llamacpp import bundled_model_path

    model = Path(args.model) if args.model else bundled_model_path()
    print(f"auto chooses: {rt.select_runtime(model).name}")
    print(f"{'runtime':<14}{'prompt tok/s':>14}{'decode tok/s':>14}")
    for name in rt.RUNTIMES:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--decode-tokens",
            str(args.decode_tokens),
        ]
        if args.model:
            cmd += ["--model", args.model]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            why = rt.signal_name(-done.returncode) if done.returncode < 0 else "failed"
            print(f"{name:<14}{why:>28}")
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<14}{figures['prompt_tok_s']:>14}{figures['decode_tok_s']:>14}")


if __name__ == "__main__":
    main()
