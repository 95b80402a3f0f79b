"""`magpie instructions --num N` vs distilabel's `MagpieGenerator` on the same GGUF and template.

Both sides use the bundled SmolLM2 GGUF through llama.cpp, the same pre-query template, T=1.0,
top_p=1.0 and the same max tokens; the figure is instructions/s and its ratio (target >= 3x).
Ours is timed as a user runs it (a fresh `magpie instructions` process: start-up and model load
included), distilabel from its model load. Our rows are checked (not empty, not cut at max
tokens, not too short, no template leak, no duplicate) and distilabel's are not, so the script
also counts how many of distilabel's rows would pass those checks and gives the ratio on those.
distilabel is not a dependency of ours: install it beside ours in its own venv (reusing the
llama-cpp-python wheel `make` built, so both sides run the same llama.cpp build), e.g.

    python -m venv /work/venv-distilabel
    bash scripts/llama-cpp-wheel.sh /work/venv-distilabel/bin/python
    /work/venv-distilabel/bin/pip install "distilabel==1.5.3" requests -e .
    .venv/bin/python bench/vs_distilabel.py --write-tokenizer /tmp/smollm2-tokenizer
    /work/venv-distilabel/bin/python bench/vs_distilabel.py --num 64 \
        --tokenizer /tmp/smollm2-tokenizer

distilabel's Magpie mode formats prompts with a Hugging Face tokenizer (`tokenizer_id`); offline
there is none to download, so `--write-tokenizer` converts the GGUF's own tokenizer and chat
template with transformers (run it with our dev venv, which has torch and gguf).

Without distilabel this prints why and exits 0 (it installs nothing at run time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_magpie(num: int, max_tokens: int) -> float:
    """Seconds `magpie instructions` takes for `num` rows (a fresh process, as a user runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "magpie",
                "instructions",
                "--num",
                str(num),
                "--max-tokens",
                str(max_tokens),
                "--out",
                str(Path(tmp) / "ins"),
                "--quiet",
            ],
            check=True,
        )
        return time.perf_counter() - started


def write_tokenizer(target: str) -> None:
    """Save the bundled GGUF's tokenizer and chat template as a Hugging Face tokenizer folder."""
    from transformers import AutoTokenizer

    from magpie.engines.llamacpp import bundled_model_path

    path = bundled_model_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(target)
    print(f"tokenizer written to {target}")


def run_distilabel(num: int, max_tokens: int, tokenizer: str) -> tuple[float, int, int]:
    """Seconds distilabel's MagpieGenerator takes for `num` instructions on the same model (model
    load included, as ours), the rows it made (it may make a few more than `num`), and how many
    of them pass the checks ours keeps rows by."""
    from distilabel.models.llms import LlamaCppLLM
    from distilabel.steps.tasks import MagpieGenerator

    from magpie.config import InstructionsConfig
    from magpie.engines.base import Completion
    from magpie.engines.llamacpp import LlamaCppEngine, bundled_model_path
    from magpie.stages.instructions import InstructionStage, dedup_key
    from magpie.templates import chat_format_for

    engine = LlamaCppEngine(vocab_only=True)
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    started = time.perf_counter()
    llm = LlamaCppLLM(
        model_path=str(bundled_model_path()),
        n_ctx=2048,
        magpie_pre_query_template=fmt.pre_query,
        tokenizer_id=tokenizer,
        generation_kwargs={
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": max_tokens,
            # llama-cpp-python otherwise adds top_k=40 and min_p=0.05: not the same sampling
            "extra_generation_kwargs": {"top_k": 0, "min_p": 0.0},
        },
    )
    task = MagpieGenerator(llm=llm, n_turns=1, num_rows=num, batch_size=num, only_instruction=True)
    task.load()
    rows = [row for batch, _ in task.process() for row in batch]
    seconds = time.perf_counter() - started
    assert len(rows) >= num, f"distilabel made {len(rows)} rows"
    # our checks: empty, cut at max tokens (token count re-measured), too short, template
    # leak, exact duplicate
    stage = InstructionStage(engine, fmt, InstructionsConfig(max_tokens=max_tokens), "")
    usable, seen = 0, set()
    for row in rows:
        text = row.get("instruction") or ""
        length = engine.count_tokens(text)
        finish = "length" if length >= max_tokens else "stop"
        completion = Completion(text, finish, 0, length)
        key = dedup_key(text)
        if stage.rejection_reason(completion) is None and key not in seen:
            seen.add(key)
            usable += 1
    engine.close()
    return seconds, len(rows), usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--tokenizer", help="HF tokenizer folder of the bundled model")
    parser.add_argument("--write-tokenizer", metavar="DIR", help="make that folder and exit")
    args = parser.parse_args()
    if args.write_tokenizer:
        write_tokenizer(args.write_tokenizer)
        return
    try:
        import distilabel  # noqa: F401
    except ImportError:
        print("distilabel is not importable here: skipped (see this file's docstring to install)")
        return
    if not args.tokenizer:
        parser.error(
            "--tokenizer DIR is needed (make it with --write-tokenizer, see the docstring)"
        )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ratios: list[float] = []
    for round_ in range(args.rounds):  # interleaved: this machine's speed drifts between runs
        ours = run_magpie(args.num, args.max_tokens)
        theirs, made, usable = run_distilabel(args.num, args.max_tokens, args.tokenizer)
        ratios.append(args.num / ours / (made / theirs))
        print(f"[{round_}] magpie     : {args.num} instructions in {ours:.1f} s", end="")
        print(f" ({args.num / ours:.2f}/s)")
        print(f"    distilabel : {made} instructions in {theirs:.1f} s ({made / theirs:.2f}/s)")
        print(f"    ratio      : {ratios[-1]:.2f}x instructions/s")
        rate = usable / theirs
        print(f"    distilabel rows that pass magpie's checks: {usable} of {made} ({rate:.2f}/s)")
        print(f"    ratio      : {args.num / ours / rate:.2f}x usable instructions/s")
    if len(ratios) > 1:
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"ratios: {listed}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
