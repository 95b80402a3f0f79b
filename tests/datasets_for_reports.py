"""Small datasets for the card and viewer tests, made by the real pairs stage and store.

The rows carry the unitag columns, two languages, near-duplicate statistics, and texts that try to
break out of HTML (`<script>`, `<img onerror=...>`, `</textarea>`, `</script>`): the card and the
viewer must show them as text.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

INJECTIONS = (
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    "</textarea><script>window.__pwned = 3</script>",
    "</script><script>window.__pwned = 4</script><!--",
)
CATEGORIES = ("Math", "Coding & Debugging", "Information seeking", "Creative writing")
WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "lantern", "copper", "orbit")


def scored_table(rows: int, seed: int = 0) -> pa.Table:
    """Rows as `magpie score` leaves them, with unitag tags (one in seven rows all tied)."""
    rng = random.Random(seed)
    data: dict[str, list] = {k: [] for k in ("instruction", "responses", "rewards")}
    tags: dict[str, list] = {
        k: []
        for k in (
            "task_category",
            "difficulty",
            "input_quality",
            "language",
            "instruct_reward",
            "min_neighbor_distance",
            "repeat_count",
        )
    }
    for i in range(rows):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))
        instruction = f"Question {i}: {words}?"
        if i % 9 == 4:
            instruction += " " + INJECTIONS[(i // 9) % len(INJECTIONS)]
        replies = [
            f"Answer {i}.{k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
            for k in range(3)
        ]
        if i % 11 == 3:
            replies[0] = "Here is code:\n```python\nprint('<b>hi</b>')\n```\n- **bold** item"
        if i % 10 == 5:
            replies[2] = INJECTIONS[(i // 10) % len(INJECTIONS)]
        rewards = (
            [2.0, 2.0, 2.0] if i % 7 == 0 else [round(rng.uniform(-3, 3), 3) for _ in range(3)]
        )
        data["instruction"].append(instruction)
        data["responses"].append(replies)
        data["rewards"].append(rewards)
        category = CATEGORIES[i % len(CATEGORIES)]
        tags["task_category"].append(
            category if i % 13 else '<img src=x onerror="window.__pwned = 5">'
        )
        tags["difficulty"].append(("easy", "medium", "hard", None)[i % 4])
        tags["input_quality"].append(("good", "excellent", "average")[i % 3])
        tags["language"].append("ZH" if i % 5 == 0 else "EN")
        tags["instruct_reward"].append(round(rng.uniform(-8, 4), 3))
        tags["min_neighbor_distance"].append(round(rng.uniform(0, 1.5), 4))
        tags["repeat_count"].append(1 if i % 6 == 0 else 0)
    return pa.table(
        {
            "instruction": data["instruction"],
            "responses": pa.array(data["responses"], pa.list_(pa.string())),
            "rewards": pa.array(data["rewards"], pa.list_(pa.float64())),
            **tags,
        }
    )


def make_pairs_dataset(folder: Path, rows: int = 60, shard_size: int = 25) -> Path:
    """`folder/scored` (plain Parquet) paired by the real `pipeline.pairs` into `folder/pairs`."""
    from magpie import pipeline
    from magpie.config import PairsConfig
    from magpie.runner import ProgressView

    scored = folder / "scored"
    scored.mkdir(parents=True, exist_ok=True)
    pq.write_table(scored_table(rows), scored / "data.parquet")
    out = folder / "pairs"
    view = ProgressView(Console(quiet=True), enabled=False)
    pipeline.pairs(PairsConfig(shard_size=shard_size), scored, out, view)
    return out


def visible_text_rows(table: pa.Table) -> list[str]:
    """Per row, the texts the viewer searches (instruction, chosen and rejected replies)."""
    out = []
    for row in table.select(["instruction", "chosen", "rejected"]).to_pylist():
        out.append(
            "\n".join(
                [row["instruction"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]]
            )
        )
    return out
