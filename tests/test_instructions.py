"""`magpie instructions` end to end on the bundled model: rows, storage, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

from magpie.config import InstructionsConfig
from magpie.engines.base import Completion
from magpie.stages.instructions import InstructionStage, attempt_seed
from magpie.templates import FAMILIES

FAST = ["--max-tokens", "96", "--shard-size", "3", "-q"]


def rows_of(path: Path) -> list[dict]:
    table = pq.read_table(path)
    return sorted(table.to_pylist(), key=lambda r: r["attempt"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run that other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "ins"
    result = run_cli("instructions", "--num", "7", "--out", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    return out


def test_rows_columns_and_manifest(reference: Path) -> None:
    rows = rows_of(reference)
    assert len(rows) == 7
    for row in rows:
        assert row["instruction"].strip() == row["instruction"] and len(row["instruction"]) >= 8
        assert "<|im_start|>" not in row["instruction"]
        configs = row["gen_input_configs"]
        assert configs["temperature"] == 1.0 and configs["top_p"] == 1.0
        assert configs["input_generator"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
        assert (
            configs["pre_query_template"]
            == FAMILIES["smollm2"].chat_format(use_default=True).pre_query
        )
        assert configs["seed"] == attempt_seed(0, row["attempt"], 1)
        assert row["instruction_length"] == len(row["instruction"])
    assert len({r["uuid"] for r in rows}) == 7
    manifest = json.loads((reference / ".magpie" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == 7
    assert manifest["config"]["config"]["num"] == 7
    assert manifest["magpie_version"]
    rejected = sum(manifest["rejections"].values())
    surplus = sum(
        json.loads(pq.read_schema(p).metadata[b"magpie"]).get("surplus", 0)
        for p in reference.glob("part-*.parquet")
    )
    assert manifest["attempts"] == 7 + rejected + surplus
    assert (reference / ".magpie" / "config.yaml").is_file()


def test_rejected_attempts_are_kept_with_their_reason(reference: Path) -> None:
    rejected_dir = reference / ".magpie" / "rejected"
    table = pq.read_table(rejected_dir) if any(rejected_dir.iterdir()) else None
    manifest = json.loads((reference / ".magpie" / "manifest.json").read_text())
    count = 0 if table is None else table.num_rows
    assert count == sum(manifest["rejections"].values())
    if table is not None:
        assert set(table.column("reason").to_pylist()) <= set(manifest["rejections"])


def test_datasets_and_duckdb_read_the_directory(reference: Path, tmp_path: Path) -> None:
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(reference), cache_dir=str(tmp_path))
    assert ds["train"].num_rows == 7
    assert "gen_input_configs" in ds["train"].column_names
    count = duckdb.sql(f"select count(*) from '{reference}/*.parquet'").fetchall()[0][0]
    assert count == 7


def test_same_command_gives_the_same_rows(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    result = run_cli("instructions", "--num", "7", "--out", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    assert rows_of(out) == rows_of(reference)


def test_resume_after_kill_gives_the_uninterrupted_rows(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["instructions", "--num", "7", "--out", str(out), *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "magpie", *args], cwd=REPO)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-00001.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = sorted(p.name for p in out.glob("part-*.parquet"))
    assert committed and not list(out.glob(".part-*"))  # no torn shard is visible
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    assert rows_of(out) == rows_of(reference)
    again = run_cli(*args)  # a finished run is a no-op
    assert again.returncode == 0 and rows_of(out) == rows_of(reference)


def test_different_config_into_same_dir_is_refused(reference: Path, tmp_path: Path) -> None:
    result = run_cli("instructions", "--num", "7", "--out", str(reference), "--seed", "1", *FAST)
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert len(rows_of(reference)) == 7  # nothing lost


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "ins"
    assert run_cli("instructions", "--num", "2", "--out", str(out), *FAST).returncode == 0
    result = run_cli(
        "instructions", "--num", "2", "--seed", "9", "--out", str(out), "--overwrite", *FAST
    )
    assert result.returncode == 0, result.stderr
    assert all(
        r["gen_input_configs"]["seed"] == attempt_seed(9, r["attempt"], 1) for r in rows_of(out)
    )


BRIEF = "You are a helpful assistant. Keep every answer to two or three sentences."


def test_multi_turn_conversations(tmp_path: Path) -> None:
    out = tmp_path / "mt"
    result = run_cli(
        "instructions",
        "--num",
        "2",
        "--turns",
        "2",
        "--out",
        str(out),
        "--system-prompt",
        BRIEF,  # the math preset's step-by-step replies ran past 160 tokens in most attempts
        "--max-tokens",
        "128",
        "--shard-size",
        "8",  # a block of 8 attempts: two turns each are the cost of this test
        "--temperature",
        "0.7",
        "--response-temperature",
        "0.7",
        "--response-max-tokens",
        "160",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    for row in rows_of(out):
        turns = row["conversations"]
        assert [m["from"] for m in turns] == ["human", "gpt", "human", "gpt"]
        assert turns[0]["value"] == row["instruction"]
        assert all(m["value"].strip() for m in turns)
        assert BRIEF in row["gen_input_configs"]["pre_query_template"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num", "0"], "--num"),
        (["--engine", "nope"], "--engine"),
        (["--model", "/nonexistent/model.gguf"], "--model"),
        (["--out", "/proc/magpie-cannot-write"], "--out"),
        (["--top-p", "1.5"], "--top-p"),
        (["--chat-template", "/nonexistent.jinja"], "--chat-template"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = [] if "--out" in args else ["--out", str(tmp_path / "x")]
    result = run_cli("instructions", *out, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_rejection_reasons_in_order() -> None:
    fmt = FAMILIES["smollm2"].chat_format(use_default=True)
    stage = InstructionStage(
        engine=None, chat_format=fmt, config=InstructionsConfig(), model_id="m"
    )  # type: ignore[arg-type]

    def reason(text: str, finish: str = "stop") -> str | None:
        return stage.rejection_reason(Completion(text, finish, 1, 1))  # type: ignore[arg-type]

    assert reason("   ") == "empty"
    assert reason("A long enough question that ran out", "length") == "truncated"
    assert reason("Hi?") == "too_short"
    assert reason("What is 2+2?<|im_start|>assistant") == "template_leak"
    assert reason("What is 2+2?\nassistant\nIt is 4") == "template_leak"
    assert reason("What is the capital of France?") is None
