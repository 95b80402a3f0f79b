"""The DPO recipe end to end: responses, scoring, pairs, exports and `magpie run` with resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

from magpie.config import Recipe, load_yaml
from magpie.engines.llamacpp import bundled_model_path

SMALL_INS = ["--max-tokens", "96", "--shard-size", "4", "-q"]
SMALL_RES = ["--n", "2", "--max-tokens", "48", "--shard-size", "2", "-q"]


def rows_of(path: Path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["uuid"])


@pytest.fixture(scope="module")
def instructions_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "ins"
    result = run_cli("instructions", "--num", "3", "--out", str(out), *SMALL_INS)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def responses_dir(instructions_dir: Path) -> Path:
    out = instructions_dir.parent / "res"
    result = run_cli("responses", "--in", str(instructions_dir), "--out", str(out), *SMALL_RES)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    """A random LlamaForSequenceClassification with the bundled model's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm") / "tiny-llama-rm"
    gguf = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(std=1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_responses_columns_and_configs(instructions_dir: Path, responses_dir: Path) -> None:
    rows = rows_of(responses_dir)
    assert [r["uuid"] for r in rows] == [r["uuid"] for r in rows_of(instructions_dir)]
    for row in rows:
        assert len(row["responses"]) == 2
        assert len(row["response_finish_reasons"]) == len(row["response_tokens"]) == 2
        assert set(row["response_finish_reasons"]) <= {"stop", "length"}
        configs = row["gen_response_configs"]
        assert configs["temperature"] == 0.8 and configs["top_p"] == 1.0
        assert configs["repetition_penalty"] == 1.0 and configs["max_tokens"] == 48
        assert configs["engine"] == "llamacpp"
        assert configs["prompt"].endswith("{instruction}<|im_end|>\n<|im_start|>assistant\n")
        assert "<|im_end|>" in configs["stop_tokens"]
    manifest = json.loads((responses_dir / ".magpie" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["input_rows"] == 3


def test_responses_are_reproducible(instructions_dir: Path, responses_dir: Path) -> None:
    again = instructions_dir.parent / "res-again"
    result = run_cli("responses", "--in", str(instructions_dir), "--out", str(again), *SMALL_RES)
    assert result.returncode == 0, result.stderr
    assert rows_of(again) == rows_of(responses_dir)


def test_sft_mode_writes_conversations(instructions_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = run_cli(
        "responses", "--in", str(instructions_dir), "--out", str(out), "--n", "1",
        "--temperature", "0", "--max-tokens", "32", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for row in rows_of(out):
        assert row["response"] == row["responses"][0]
        assert row["conversations"] == [
            {"from": "human", "value": row["instruction"]},
            {"from": "gpt", "value": row["response"]},
        ]


def test_score_with_a_classifier_reward_model(
    responses_dir: Path, tiny_reward_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scored"
    result = run_cli(
        "score", "--in", str(responses_dir), "--out", str(out),
        "--reward-model", str(tiny_reward_model), "--batch-size", "3", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    for row in rows:
        assert len(row["rewards"]) == 2
        assert all(math.isfinite(r) for r in row["rewards"] if r is not None)
        assert row["reward_model"] == str(tiny_reward_model)
        assert [s["score"] for s in row["rewards_tiny_llama_rm"]] == row["rewards"]
    scores = [r for row in rows for r in row["rewards"] if r is not None]
    assert len(set(scores)) > 1


def test_pairs_and_exports_from_scores(
    responses_dir: Path, tiny_reward_model: Path, tmp_path: Path
) -> None:
    import datasets

    scored, dpo = tmp_path / "scored", tmp_path / "dpo"
    args = ["--reward-model", str(tiny_reward_model), "-q"]
    assert run_cli("score", "--in", str(responses_dir), "--out", str(scored), *args).returncode == 0
    result = run_cli("pairs", "--in", str(scored), "--out", str(dpo), "-q")
    assert result.returncode == 0, result.stderr
    pairs = pq.read_table(dpo).to_pylist() if list(dpo.glob("part-*.parquet")) else []
    set_aside_dir = dpo / ".magpie" / "rejected"
    set_aside = pq.read_table(set_aside_dir).num_rows if any(set_aside_dir.iterdir()) else 0
    assert len(pairs) + set_aside == 3  # nothing is lost
    for row in pairs:
        assert row["chosen_reward"] >= row["rejected_reward"]
        assert row["chosen"][0] == {"content": row["instruction"], "role": "user"}
        assert row["chosen"][1]["content"] == row["responses"][row["chosen_index"]]
    if not pairs:
        pytest.skip("every row tied or lacked two valid responses; exports need pairs")
    trl_dir = tmp_path / "trl"
    result = run_cli("export", "--in", str(dpo), "--out", str(trl_dir), "--format", "trl")
    assert result.returncode == 0, result.stderr
    ds = datasets.load_dataset("parquet", data_dir=str(trl_dir), cache_dir=str(tmp_path / "c"))
    assert set(ds["train"].column_names) >= {"prompt", "chosen", "rejected"}


def test_missing_input_and_wrong_input_are_clear(instructions_dir: Path, tmp_path: Path) -> None:
    result = run_cli("responses", "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cli("score", "--in", str(instructions_dir), "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "magpie responses" in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_recipes_parse() -> None:
    demo = Recipe.model_validate(load_yaml(REPO / "recipes" / "cpu-demo.yaml"))
    default = Recipe()  # `magpie run` with no recipe runs the CPU demo
    assert demo.instructions_config() == default.instructions_config()
    assert demo.responses_config() == default.responses_config()
    assert (demo.out, demo.num, demo.score, demo.pairs, demo.export) == (
        default.out,
        default.num,
        default.score,
        default.pairs,
        default.export,
    )
    recipe = Recipe.model_validate(load_yaml(REPO / "recipes" / "llama-3.1-70b-armorm-dpo.yaml"))
    assert recipe.engine.name == "vllm"
    assert recipe.engine.options["tensor_parallel_size"] == 4
    responses = recipe.responses_config()
    assert (responses.n, responses.temperature, responses.max_tokens) == (5, 0.8, 4096)
    assert recipe.score.reward_model == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    assert recipe.score.trust_remote_code and recipe.num == 100_000


def _run_recipe(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"out: {path}\nnum: 3\ninstructions: {{max_tokens: 96, shard_size: 2}}\n"
        "responses: {n: 2, max_tokens: 40, shard_size: 1}\nscore: {shard_size: 1}\n"
        "pairs: {}\nexport: [trl, magpie, sharegpt]\n"
    )
    return recipe


def test_run_end_to_end_and_resume_after_kill(tmp_path: Path) -> None:
    import datasets

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    result = run_cli("run", str(_run_recipe(clean, tmp_path / "a")), "-q")
    assert result.returncode == 0, result.stderr
    for stage in ("instructions", "responses", "scored", "pairs"):
        assert json.loads((clean / stage / ".magpie" / "manifest.json").read_text())["complete"]
    assert (clean / "recipe.yaml").is_file()
    pairs = (
        pq.read_table(clean / "pairs").num_rows if list((clean / "pairs").glob("*.parquet")) else 0
    )
    card = (clean / "README.md").read_text()  # the card and viewer beside the final dataset
    assert "| instructions |" in card and "| pairs |" in card
    if pairs:
        assert (clean / "view.html").is_file()
        ds = datasets.load_dataset(str(clean), cache_dir=str(tmp_path / "card"))
        assert ds["train"].num_rows == pairs
    for fmt in ("trl", "magpie", "sharegpt"):
        if pairs:
            ds = datasets.load_dataset(
                "parquet", data_dir=str(clean / "export" / fmt), cache_dir=str(tmp_path / fmt)
            )
            assert ds["train"].num_rows == pairs

    recipe = _run_recipe(killed, tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "magpie", "run", str(recipe), "-q"], cwd=REPO)
    deadline = time.monotonic() + 300
    while not (killed / "responses" / "part-00001.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_cli("run", str(recipe), "-q")
    assert result.returncode == 0, result.stderr
    for stage in ("instructions", "responses", "scored", "pairs"):
        if list((clean / stage).glob("*.parquet")):
            assert rows_of(killed / stage) == rows_of(clean / stage)
