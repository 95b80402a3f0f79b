"""`magpie tag`, `magpie filter` and `magpie stats` on real models, real files and real DuckDB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from magpie.engines.llamacpp import bundled_model_path
from magpie.stages.tags import HAZARDS, Difficulty, Quality, TaskCategory, guard_label

INSTRUCTIONS = [
    "How do I bake a loaf of sourdough bread at home?",
    "Write a Python function that reverses a linked list.",
    "What is the derivative of x squared times sine of x?",
]
GUARD_TEMPLATE = (
    "{% for m in messages %}<|im_start|>user\nTask: check if there is unsafe content in the "
    "message below.\n\n{{ m['content'] }}\n\nProvide your safety assessment.<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    return path


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tags")
    source = write_jsonl(folder / "mine.jsonl", INSTRUCTIONS)
    out = folder / "tagged"
    result = run_cli(
        "tag", "--in", str(source), "--out", str(out), "-q",
        "--tags", "difficulty,quality,category,safety,language",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_judge_tags_are_valid_every_time(tagged: Path) -> None:
    rows = rows_of(tagged)
    assert [r["instruction"] for r in rows] == INSTRUCTIONS
    manifest = json.loads((tagged / ".magpie" / "manifest.json").read_text())
    invalid = sum(manifest["rejections"].values())
    for row in rows:
        assert row["uuid"]  # made deterministically for data the user brings
        if row["difficulty"] is not None:
            assert row["difficulty"] in get_args(Difficulty)
            assert row["intent"] and row["knowledge"]
        if row["input_quality"] is not None:
            assert row["input_quality"] in get_args(Quality) and row["quality_explanation"]
        if row["task_category"] is not None:
            assert row["task_category"] in get_args(TaskCategory)
            assert set(row["other_task_category"]) <= set(get_args(TaskCategory))
            assert row["task_category"] not in row["other_task_category"]
        if row["llama_guard_2"] is not None:
            first, *codes = row["llama_guard_2"].split("\n")
            assert first == row["safety"] and first in {"safe", "unsafe"}
            assert all(c in HAZARDS for c in ",".join(codes).split(",") if c)
        assert row["difficulty_generator"].startswith("HuggingFaceTB/SmolLM2")
        assert row["language"] == "EN"
    nulls = sum(
        row[c] is None
        for row in rows
        for c in ("difficulty", "input_quality", "task_category", "llama_guard_2")
    )
    assert nulls == invalid  # every null is a counted failure


def test_guard_model_safety_tag(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from magpie.rewards.guard import GuardModel

    gguf = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GUARD_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    )  # fmt: skip
    path = tmp_path / "tiny-guard"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    guard = GuardModel(str(path))
    labels = guard.classify(INSTRUCTIONS)
    assert labels == guard.classify(INSTRUCTIONS)
    for label in labels:
        verdict, *codes = label.split("\n")
        assert verdict in {"safe", "unsafe"} and (verdict == "unsafe" or not codes)
    source = write_jsonl(tmp_path / "in.jsonl", INSTRUCTIONS)
    out = tmp_path / "out"
    result = run_cli(
        "tag", "--in", str(source), "--out", str(out), "--tags", "safety",
        "--guard-model", str(path), "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert [r["llama_guard_2"] for r in rows] == labels
    assert {r["safety_generator"] for r in rows} == {str(path)}


def test_guard_label_format() -> None:
    assert guard_label("safe", ["S1"]) == "safe"
    assert guard_label("unsafe", ["S1", "S10"]) == "unsafe\nS1,S10"
    assert guard_label("unsafe", []) == "unsafe"


def test_neighbors_find_planted_duplicates(tmp_path: Path) -> None:
    texts = [f"Give me {n} tips for learning the {lang} language." for n, lang in
             zip(range(3, 13), ["French", "German", "Thai", "Swahili", "Dutch", "Greek",
                                "Korean", "Polish", "Hindi", "Welsh"], strict=True)]  # fmt: skip
    texts += ["Explain how a rainbow forms.", "explain how a rainbow forms!"]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out"
    result = run_cli("tag", "--in", str(source), "--out", str(out), "--tags", "neighbors", "-q")
    assert result.returncode == 0, result.stderr
    rows = {r["instruction"]: r for r in rows_of(out)}
    a, b = rows["Explain how a rainbow forms."], rows["explain how a rainbow forms!"]
    assert a["repeat_count"] >= 1 and b["repeat_count"] >= 1
    assert a["min_similar_uuid"] == b["min_similar_uuid"] == min(a["uuid"], b["uuid"])
    assert a["min_neighbor_distance"] < 0.15


def test_reward_tag_needs_responses_or_reports_clearly(tagged: Path, tmp_path: Path) -> None:
    result = run_cli(
        "tag", "--in", str(tagged), "--out", str(tmp_path / "r"), "--tags", "reward",
        "--reward-model", "judge", "-q",
    )  # fmt: skip
    assert result.returncode == 2 and "magpie responses" in result.stderr
    result = run_cli("tag", "--in", str(tagged), "--out", str(tmp_path / "r"), "--tags", "reward")
    assert result.returncode == 2 and "--reward-model" in result.stderr
    result = run_cli("tag", "--in", str(tagged), "--out", str(tmp_path / "r"), "--tags", "colour")
    assert result.returncode == 2 and "--tags" in result.stderr


def test_reward_tag_scores_instruction_with_first_response(tmp_path: Path) -> None:
    table = pa.table(
        {
            "instruction": INSTRUCTIONS,
            "responses": [
                ["Mix flour and water.", "x"],
                ["def rev(l): ...", "y"],
                ["2x sin x", "z"],
            ],
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    out = tmp_path / "out"
    result = run_cli(
        "tag", "--in", str(tmp_path / "data.parquet"), "--out", str(out), "--tags", "reward",
        "--reward-model", "judge", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for row in rows_of(out):
        assert 1.0 <= row["instruct_reward"] <= 10.0
        assert row["reward_model"].startswith("judge:")


def test_filter_and_stats_over_tagged_rows(tagged: Path, tmp_path: Path) -> None:
    out = tmp_path / "english"
    result = run_cli(
        "filter", "--in", str(tagged), "--out", str(out), "--where", "length(instruction) > 50",
        "--preset", "english",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kept = rows_of(out)
    assert [r["instruction"] for r in kept] == [t for t in INSTRUCTIONS if len(t) > 50]
    bad = run_cli(
        "filter", "--in", str(tagged), "--out", str(tmp_path / "x"), "--where", "nope > 1"
    )
    assert bad.returncode == 2 and "instruction" in bad.stderr and "Traceback" not in bad.stderr
    result = run_cli("stats", str(tagged), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 3
