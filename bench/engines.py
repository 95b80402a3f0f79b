"""Engine overhead: tokens/s through a magpie engine vs. its library called directly.

The same pre-query prompts (the bundled SmolLM2's, one seed per prompt) go through
`Engine.generate` and through the library's own call: `vllm.LLM.generate` on the engine's loaded
model for vLLM, `Llama.create_completion` for llama.cpp. Prints tokens/s of both and the ratio
(the engine's overhead; target >= 0.95). Best of `--repeats` interleaved rounds after a warm-up.

    python bench/engines.py --engine vllm --prompts 256 --instructions 64
    python bench/engines.py --engine llamacpp --prompts 64 --instructions 16
    python -m llama_cpp.server --model SmolLM2.gguf --port 8000 &   # then:
    python bench/engines.py --engine openai --base-url http://127.0.0.1:8000/v1

Workloads: N pre-query prompts (instruction synthesis) and M instructions x 5 responses at T=0.8.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

from magpie.engines.base import Engine, Request, Sampling, create_engine
from magpie.templates import FAMILIES, chat_format_for

INSTRUCTIONS = [
    "Explain how vaccines train the immune system.",
    "Write a short poem about autumn leaves.",
    "How do I sort a list of dictionaries by a key in Python?",
    "What are three tips for a first job interview?",
]


def chat_format(engine: Engine):
    info = engine.info
    if info.chat_template is None:  # a server cannot tell its template
        return FAMILIES["smollm2"].chat_format(use_default=True)
    return chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)


def workload(engine: Engine, kind: str, count: int, max_tokens: int) -> list[Request]:
    """`count` pre-query prompts (n=1), or `count` instructions x 5 responses at T=0.8."""
    fmt = chat_format(engine)
    if kind == "queries":
        sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens, stop=fmt.stops)
        return [Request(fmt.pre_query, sampling, seed=s) for s in range(count)]
    sampling = Sampling(temperature=0.8, top_p=1.0, max_tokens=max_tokens, stop=fmt.stops)
    return [
        Request(fmt.response_prompt([], INSTRUCTIONS[i % len(INSTRUCTIONS)]), sampling, 5, 100 * i)
        for i in range(count)
    ]


def through_engine(engine: Engine, requests: list[Request]) -> int:
    results = engine.generate(requests)
    return sum(c.completion_tokens for cs in results for c in cs)


def direct_vllm(engine: Engine, requests: list[Request]) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine._llm  # the engine's loaded model, driven directly
    tokenizer = llm.get_tokenizer()
    prompts = [
        TokensPrompt(prompt_token_ids=tokenizer.encode(r.prompt, add_special_tokens=False))
        for r in requests
    ]
    params = [
        SamplingParams(
            n=r.n,
            temperature=r.sampling.temperature,
            top_p=r.sampling.top_p,
            max_tokens=r.sampling.max_tokens,
            stop=list(r.sampling.stop),
            seed=r.seed,
        )
        for r in requests
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


def direct_llamacpp(engine: Engine, requests: list[Request]) -> int:
    llm = engine._llm
    generated = 0
    for r in requests:
        ids = llm.tokenize(r.prompt.encode(), add_bos=False, special=True)
        for i in range(r.n):
            out = llm.create_completion(
                ids,
                max_tokens=r.sampling.max_tokens,
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p,
                top_k=0,
                min_p=0.0,
                stop=list(r.sampling.stop),
                seed=(r.seed or 0) + i,
            )
            generated += out["usage"]["completion_tokens"]
    return generated


def direct_openai(engine: Engine, requests: list[Request], concurrency: int = 8) -> int:
    """The same completions posted straight to the server, as many in flight as the engine."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx2 as httpx

    url = engine.base_url.rstrip("/") + "/completions"

    def post(job: tuple[Request, int]) -> int:
        r, i = job
        body = {
            "model": engine.info.model_id,
            "prompt": r.prompt,
            "max_tokens": r.sampling.max_tokens,
            "temperature": r.sampling.temperature,
            "top_p": r.sampling.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "stop": list(r.sampling.stop),
            "seed": (r.seed or 0) + i,
        }
        return httpx.post(url, json=body, timeout=600).json()["usage"]["completion_tokens"]

    jobs = [(r, i) for r in requests for i in range(r.n)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return sum(pool.map(post, jobs))


Runner = Callable[[Engine, list[Request]], int]
DIRECT: dict[str, Runner] = {
    "vllm": direct_vllm,
    "llamacpp": direct_llamacpp,
    "openai": direct_openai,
}


def best_rates(
    runs: dict[str, Runner], engine: Engine, requests: list[Request], rounds: int
) -> dict[str, tuple[float, int]]:
    """Best tokens/s (and tokens generated) of each runner over interleaved rounds."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run(engine, requests)
            rate = tokens / (time.perf_counter() - started)
            if rate > best.get(name, (0.0, 0))[0]:
                best[name] = (rate, tokens)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(DIRECT), default="vllm")
    parser.add_argument("--prompts", type=int, default=256, help="pre-query prompts")
    parser.add_argument("--instructions", type=int, default=64, help="x 5 responses each")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="--engine openai")
    parser.add_argument("--concurrency", type=int, default=8, help="--engine openai")
    args = parser.parse_args()
    options: dict = {
        "vllm": {"max_model_len": 2048},
        "llamacpp": {"n_ctx": 2048},
        "openai": {"base_url": args.base_url, "concurrency": args.concurrency},
    }[args.engine]
    started = time.perf_counter()
    engine = create_engine(args.engine, model=None, **options)
    print(f"{args.engine}: engine ready in {time.perf_counter() - started:.1f} s")
    direct = DIRECT[args.engine]
    if args.engine == "openai":
        direct = functools.partial(direct_openai, concurrency=args.concurrency)
    runs = {"engine": through_engine, "direct": direct}
    try:
        through_engine(engine, workload(engine, "queries", 4, args.max_tokens))  # warm-up
        for kind, count in (("queries", args.prompts), ("responses", args.instructions)):
            if not count:
                continue
            requests = workload(engine, kind, count, args.max_tokens)
            best = best_rates(runs, engine, requests, args.repeats)
            label = f"{count} pre-query prompts" if kind == "queries" else f"{count} x 5 responses"
            ratio = best["engine"][0] / best["direct"][0]
            print(
                f"{args.engine} {label}, max_tokens {args.max_tokens}: engine "
                f"{best['engine'][0]:.1f} tok/s, direct {best['direct'][0]:.1f} tok/s, "
                f"ratio {ratio:.3f}"
            )
    finally:
        engine.close()


if __name__ == "__main__":
    main()
