"""Engine overhead: tokens/s through a magpie engine vs. its library called directly.

The same pre-query prompts (the bundled SmolLM2's, one seed per prompt) go through
`Engine.generate` and through the library's own call: `vllm.LLM.generate` on the engine's loaded
model for vLLM, `Llama.create_completion` for llama.cpp. Prints tokens/s of both and the ratio
(the engine's overhead; target >= 0.95). Best of `--repeats` interleaved rounds after a warm-up.

    python bench/engines.py --engine vllm --prompts 256
    python bench/engines.py --engine llamacpp --prompts 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from magpie.engines.base import Engine, Request, Sampling, create_engine
from magpie.templates import chat_format_for


def pre_query_sampling(engine: Engine, max_tokens: int) -> tuple[str, Sampling]:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    return fmt.pre_query, Sampling(
        temperature=1.0, top_p=1.0, max_tokens=max_tokens, stop=fmt.stops
    )


def through_engine(engine: Engine, prompt: str, sampling: Sampling, seeds: range) -> int:
    results = engine.generate([Request(prompt, sampling, seed=s) for s in seeds])
    return sum(c.completion_tokens for cs in results for c in cs)


def direct_vllm(engine: Engine, prompt: str, sampling: Sampling, seeds: range) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine._llm  # the engine's loaded model, driven directly
    ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    params = [
        SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop),
            seed=s,
        )
        for s in seeds
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for _ in seeds]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


def direct_llamacpp(engine: Engine, prompt: str, sampling: Sampling, seeds: range) -> int:
    llm = engine._llm
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    generated = 0
    for seed in seeds:
        out = llm.create_completion(
            ids,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            stop=list(sampling.stop),
            seed=seed,
        )
        generated += out["usage"]["completion_tokens"]
    return generated


Runner = Callable[[Engine, str, Sampling, range], int]


def best_rates(
    runs: dict[str, Runner], engine: Engine, prompt: str, sampling: Sampling, n: int, k: int
) -> dict[str, tuple[float, int]]:
    """Best tokens/s (and tokens generated) of each runner over `k` interleaved rounds."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(k):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run(engine, prompt, sampling, range(n))
            rate = tokens / (time.perf_counter() - started)
            if rate > best.get(name, (0.0, 0))[0]:
                best[name] = (rate, tokens)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "llamacpp"], default="vllm")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    options = {"max_model_len": 2048} if args.engine == "vllm" else {"n_ctx": 2048}
    started = time.perf_counter()
    engine = create_engine(args.engine, model=None, **options)
    print(f"{args.engine}: engine ready in {time.perf_counter() - started:.1f} s")
    direct = direct_vllm if args.engine == "vllm" else direct_llamacpp
    prompt, sampling = pre_query_sampling(engine, args.max_tokens)
    try:
        through_engine(engine, prompt, sampling, range(8))  # warm-up
        runs = {"engine": through_engine, "direct": direct}
        best = best_rates(runs, engine, prompt, sampling, args.prompts, args.repeats)
    finally:
        engine.close()
    print(f"{args.engine}: {args.prompts} prompts, max_tokens {args.max_tokens}")
    for name, (rate, tokens) in best.items():
        print(f"{name:<7}: {rate:.1f} tokens/s ({tokens} tokens)")
    ratio = best["engine"][0] / best["direct"][0]
    print(f"ratio  : {ratio:.3f} of the library called directly")


if __name__ == "__main__":
    main()
