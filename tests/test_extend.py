"""`magpie extend`: follow-up turns from the pre-query continuation, on the bundled model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli
from rich.console import Console

from magpie import pipeline
from magpie.engines.base import Completion, ModelInfo, ProgressCallback, Request
from magpie.errors import MagpieError
from magpie.prompts import FOLLOWUP_SYSTEM_PROMPT
from magpie.runner import ProgressView
from magpie.stages.extend import ExtendConfig, flat_column_names
from magpie.store import ShardStore

ROWS = [
    ("How do I boil an egg so the yolk stays soft?",
     "Lower the egg into boiling water for six minutes, then cool it under cold water."),
    ("Name three primary colours.", "Red, yellow and blue are the traditional primary colours."),
    ("What is the capital of France?", "The capital of France is Paris."),
]  # fmt: skip
SMALL = {"max_tokens": 64, "response_max_tokens": 32, "min_chars": 4}


class Recording:
    """The real engine, remembering every request it was given."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.requests: list[Request] = []

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        self.requests.extend(requests)
        return self.engine.generate(requests, on_done)

    def close(self) -> None:
        pass


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in rows))
    return path


def view() -> ProgressView:
    return ProgressView(Console(quiet=True), enabled=False)


def committed(out: Path) -> list[int]:
    return ShardStore(out).shard_indices() if out.exists() else []


def rows_and_rejected(out: Path) -> tuple[list[dict], list[dict]]:
    rows = pq.read_table(out).to_pylist() if list(out.glob("*.parquet")) else []
    rejected_dir = out / ".magpie" / "rejected"
    rejected = [
        r for f in sorted(rejected_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    return rows, rejected


def test_two_turns_on_the_bundled_model(engine, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    spy = Recording(engine)
    config = ExtendConfig(turns=2, shard_size=2, **SMALL)
    summary = pipeline.extend(config, source, tmp_path / "out", view(), engine=spy)
    assert summary.complete and summary.input_rows == len(ROWS)
    rows, rejected = rows_and_rejected(tmp_path / "out")
    assert len(rows) + len(rejected) == len(ROWS) and rows, [r["reason"] for r in rejected]
    for row in rows:
        conv = row["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt", "human", "gpt"]
        assert (conv[0]["value"], conv[1]["value"]) in ROWS
        assert (row["instruction"], row["response"]) == (conv[0]["value"], conv[1]["value"])
        assert (row["instruction_2"], row["response_2"]) == (conv[2]["value"], conv[3]["value"])
        assert row["instruction_2"].strip() and row["response_2"].strip()
    assert set(flat_column_names(2)) <= set(
        pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).names
    )
    for r in rejected:
        assert r["reason"] in {
            "user_empty",
            "user_truncated",
            "user_too_short",
            "user_leak",
            "reply_empty",
        }
    # user turns: the pre-query continuation under the follow-up system turn, sampled at T=1.0;
    # replies: the normal chat template (SmolLM2's default system), greedy
    users = [r for r in spy.requests if r.sampling.temperature == 1.0]
    replies = [r for r in spy.requests if r.sampling.temperature == 0.0]
    assert len(users) == len(ROWS) and len(replies) == len(rows)
    for request, (instruction, response) in zip(users, ROWS, strict=True):
        assert FOLLOWUP_SYSTEM_PROMPT in request.prompt
        assert request.prompt.endswith(f"{response}<|im_end|>\n<|im_start|>user\n")
        assert instruction in request.prompt and request.sampling.top_p == 1.0
    for request in replies:
        assert FOLLOWUP_SYSTEM_PROMPT not in request.prompt
        assert "named SmolLM" in request.prompt
        assert request.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    manifest = ShardStore(tmp_path / "out").read_manifest()
    assert FOLLOWUP_SYSTEM_PROMPT in manifest["config"]["followup_chat_format"]["pre_query"]

    # a second run with the same settings resumes to the same rows without generating
    spy.requests.clear()
    again = pipeline.extend(config, source, tmp_path / "out", view(), engine=spy)
    assert again.resumed_shards == 2 == again.shards and spy.requests == []


def test_rows_already_long_enough_are_flattened_without_generation(engine, tmp_path: Path) -> None:
    conv = [
        {"from": "human", "value": "Hi, what is 2 + 2?"},
        {"from": "gpt", "value": "It is 4."},
        {"from": "human", "value": "And 3 + 3?"},
        {"from": "gpt", "value": "It is 6."},
    ]
    source = tmp_path / "mt.jsonl"
    source.write_text(json.dumps({"instruction": conv[0]["value"], "conversations": conv}) + "\n")
    spy = Recording(engine)
    pipeline.extend(ExtendConfig(turns=2, **SMALL), source, tmp_path / "out", view(), engine=spy)
    (row,), _ = rows_and_rejected(tmp_path / "out")
    assert spy.requests == []
    assert (row["instruction_2"], row["response_2"]) == ("And 3 + 3?", "It is 6.")


def test_bad_input_and_settings_are_one_line(tmp_path: Path) -> None:
    source = tmp_path / "ins.jsonl"
    source.write_text(json.dumps({"instruction": "Tell me a joke."}) + "\n")
    result = run_cli("extend", "--in", str(source), "--out", str(tmp_path / "o"), "-q")
    assert result.returncode == 2 and "no 'response' or 'conversations'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("extend", "--in", str(source), "--out", str(tmp_path / "o"), "--turns", "1")
    assert result.returncode == 2 and "turns" in result.stderr
    with pytest.raises(MagpieError, match="no 'response'"):
        pipeline.extend(ExtendConfig(), source, tmp_path / "p", view())


def test_resume_after_kill_writes_the_same_rows(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    args = ["--in", str(source), "--turns", "2", "--shard-size", "1", "--max-tokens", "64",
            "--response-max-tokens", "32", "--min-chars", "4", "-q"]  # fmt: skip
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    result = run_cli("extend", "--out", str(clean), *args)
    assert result.returncode == 0, result.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "magpie", "extend", "--out", str(killed), *args], cwd=REPO
    )
    deadline = time.monotonic() + 300
    while not committed(killed):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(committed(killed)) < len(ROWS)
    assert not ShardStore(killed).read_manifest()["complete"]
    result = run_cli("extend", "--out", str(killed), *args)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    assert rows_and_rejected(killed) == rows_and_rejected(clean)
