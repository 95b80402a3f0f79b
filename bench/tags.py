"""Tag throughput: judge tags/s per tag on the bundled model, embeddings, FAISS k-NN, language.

    python bench/tags.py --rows 2000 --judge-rows 16

Prints rows/s (and generated tokens/s for judge tags) for each step; no assertions on speed.
Model and detector loading are timed separately from the throughput figures.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from magpie.stages.language import detect_languages, get_detector  # noqa: E402
from magpie.stages.neighbors import embed, load_encoder, neighbor_stats  # noqa: E402

WORDS = """
explain describe compare summarize write draft list design plan analyse translate improve river
compiler tax bread orbit poem market gene castle violin glacier protocol budget garden recipe
theorem election harbour museum vaccine satellite novel algorithm festival mortgage beginner expert
child manager student nurse farmer pilot chef lawyer engineer historian quickly carefully briefly
formally politely honestly step detail example table story letter cheap modern ancient fragile
noisy silent urban rural digital frozen spicy legal secret
"""
VOCAB = WORDS.split()
FOREIGN = [
    "¿Cómo se dice gracias en japonés?",
    "写一首关于春天的诗。",
    "Wie funktioniert ein Motor?",
]


def synthetic_instructions(rows: int, words: int = 24, seed: int = 0) -> list[str]:
    """Random-word instructions of about `words` words; a few foreign and repeated rows."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(rows):
        if i % 50 == 49:
            texts.append(rng.choice(FOREIGN))
        elif i % 20 == 19:
            texts.append(rng.choice(texts).lower())  # a near duplicate of an earlier row
        else:
            count = rng.randint(words // 2, words * 3 // 2)
            texts.append(" ".join(rng.choices(VOCAB, k=count)).capitalize() + ".")
    return texts


def timed(label: str, rows: int | None, step: Callable[[], Any]) -> Any:
    """Run `step`, print its time (and rows/s when `rows` is given), return its result."""
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    rate = f"{rows:>8} rows  {rows / seconds:10.1f} rows/s" if rows else ""
    print(f"{label:<36} {seconds:8.2f} s  {rate}")
    return result


def judge_tags(texts: list[str]) -> None:
    """Each judge tag over `texts` on the bundled model through llama.cpp (JSON-constrained)."""
    from magpie.engines.llamacpp import LlamaCppEngine
    from magpie.stages.tags import JUDGE_TAGS, JudgeTagger
    from magpie.templates import chat_format_for

    engine = LlamaCppEngine()
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    tagger = JudgeTagger(engine, fmt, info.model_id)
    rows = [{"uuid": str(i), "instruction": t} for i, t in enumerate(texts)]

    class Quiet:
        def on_done(self, units: int, tokens: int) -> None:
            pass

    for name, tag in JUDGE_TAGS.items():
        start = time.perf_counter()
        answers, failed, tokens = tagger.answers(tag, rows, Quiet())
        seconds = time.perf_counter() - start
        print(
            f"{'judge tag ' + name:<36} {seconds:8.2f} s  {len(rows):>8} rows  "
            f"{len(rows) / seconds:10.2f} rows/s  {tokens / seconds:7.1f} tokens/s  "
            f"failed {failed}"
        )
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", "-n", type=int, default=2000)
    parser.add_argument("--words", type=int, default=24, help="mean words per instruction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--model", default=None, help="sentence-transformers path (default MiniLM)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--indexes", default="flat,ivf,hnsw", help="comma-separated index kinds")
    parser.add_argument("--judge-rows", type=int, default=16, help="rows for each judge tag")
    args = parser.parse_args()

    if args.judge_rows:
        judge_tags(synthetic_instructions(args.judge_rows, 12, seed=1))

    texts = synthetic_instructions(args.rows, args.words)
    uuids = [f"{i:08d}" for i in range(args.rows)]

    timed("load encoder", None, lambda: load_encoder(args.model, args.device))
    vectors = timed(
        "embed",
        args.rows,
        lambda: embed(texts, args.model, batch_size=args.batch_size, device=args.device),
    )
    for kind in args.indexes.split(","):
        stats = timed(
            f"k-NN ({kind}, k={args.k})",
            args.rows,
            lambda kind=kind: neighbor_stats(uuids, vectors, k=args.k, index=kind),
        )
        flagged = sum(1 for count in stats["repeat_count"].to_pylist() if count)
        print(f"{'':<36} rows with a near duplicate: {flagged}")

    for low in (False, True):
        mode = "low" if low else "high"
        timed(f"load detector ({mode} accuracy)", None, lambda low=low: get_detector(low))
        timed(
            f"language ({mode} accuracy, warm-up)",
            args.rows,
            lambda low=low: detect_languages(texts, low_accuracy=low),
        )
        timed(
            f"language ({mode} accuracy)",
            args.rows,
            lambda low=low: detect_languages(texts, low_accuracy=low),
        )


if __name__ == "__main__":
    main()
