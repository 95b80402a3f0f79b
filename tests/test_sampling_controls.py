"""Instruction-generation controls of the original Magpie scripts: stop at newline, sanitize,
first-token ban and boost, on the fake engine, a scripted OpenAI server, vLLM's SamplingParams
and the bundled model (llama.cpp)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, config_hash
from magpie.engines.base import BANNED, Completion, EngineError, Request, Sampling, join_first
from magpie.engines.fake import FakeEngine
from magpie.errors import MagpieError
from magpie.executors.base import ProgressView
from magpie.sanitize import MARKDOWN_HEADERS, count_sanitized, sanitize_instruction
from magpie.store import ShardStore

QUERY = "<|im_start|>user\n"


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def fake_config(**kw: Any) -> InstructionsConfig:
    base = {
        "engine": {"name": "fake", "options": {"headers": True}},
        "num": 8,
        "max_tokens": 40,
        "shard_size": 8,
        "min_chars": 3,
    }
    return InstructionsConfig.model_validate({**base, **kw})


# ----------------------------------------------------------------------------- sanitize


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "Question 3: What is the capital of France? Answer: Paris",
            "What is the capital of France?",
        ),
        ("**Task** Write a poem about the sea.\nIt should rhyme.", "Write a poem about the sea."),
        ("## Problem: Find x if 2x=4.\n\n## Step 1: divide both sides", "Find x if 2x=4."),
        ('"How do I bake bread?" asked the user.', "How do I bake bread?"),
        ("1. Explain recursion.\n2. Give an example.", "Explain recursion."),
        ("Write a limerick. Explanation: it rhymes", "Write a limerick."),
        ("**What is AI?** Explain briefly.", "What is AI?"),
        ("Q2: Name three rivers in Europe", "Name three rivers in Europe"),
        ("Plain single line request", "Plain single line request"),
        ("  Why is the sky blue?  ", "Why is the sky blue?"),
    ],
)
def test_sanitize_strips_labels_and_what_follows(raw: str, clean: str) -> None:
    assert sanitize_instruction(raw) == clean


def test_sanitize_leaves_ordinary_words_alone() -> None:
    assert sanitize_instruction("Question everything you read") == "Question everything you read"
    assert sanitize_instruction("Task management tips") == "Task management tips"


# ----------------------------------------------------------------------------- config


def test_config_presets_and_hash() -> None:
    config = InstructionsConfig(first_token_ban=["markdown-headers", "#", "Hello"])
    assert config.first_token_ban == [*MARKDOWN_HEADERS, "Hello"]
    plain = InstructionsConfig()
    # fields added later stay out of the hash at their defaults: older datasets resume
    older = {
        k: v
        for k, v in plain.model_dump(mode="json").items()
        if k not in InstructionsConfig.HASH_OPTIONAL + InstructionsConfig.BUDGET_FIELDS
    }
    import hashlib

    expected = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(plain) == expected
    hashes = {
        config_hash(InstructionsConfig(**change))
        for change in (
            {},
            {"stop_at_newline": True},
            {"sanitize": True},
            {"first_token_ban": ["#"]},
            {"first_token_boost": 1.2},
        )
    }
    assert len(hashes) == 5
    with pytest.raises(ValueError, match="empty first-token ban"):
        InstructionsConfig(first_token_ban=[""])


def test_recipe_sections_take_the_controls() -> None:
    import yaml

    from magpie.config import Recipe

    recipe = Recipe.model_validate(
        yaml.safe_load(
            "instructions:\n  stop_at_newline: false\n  sanitize: true\n"
            "  first_token_ban: markdown-headers\n  first_token_boost: 1.2\n"
        )
    )
    config = recipe.instructions_config()
    assert config.sanitize and config.first_token_ban == list(MARKDOWN_HEADERS)
    assert config.first_token_boost == 1.2 and not config.stop_at_newline
    with pytest.raises(MagpieError, match="first_token_boost"):
        Recipe.model_validate({"instructions": {"first_token_boost": 0}}).instructions_config()


def test_sampling_steps_and_join() -> None:
    sampling = Sampling(
        temperature=0.9, max_tokens=10, first_token_ban=("#",), first_token_boost=1.2
    )
    first, rest = sampling.first_step(), sampling.after_first()
    assert (first.max_tokens, first.temperature, first.first_token_ban) == (1, 0.9 * 1.2, ("#",))
    assert (rest.max_tokens, rest.temperature, rest.first_token_controls) == (9, 0.9, False)
    assert not Sampling().first_token_controls
    joined = join_first(Completion("Hi", "length", 4, 1), Completion(" there", "stop", 5, 2))
    assert (joined.text, joined.finish_reason, joined.prompt_tokens, joined.completion_tokens) == (
        "Hi there",
        "stop",
        4,
        3,
    )


# ----------------------------------------------------------------------------- fake engine


def test_fake_engine_honours_the_controls() -> None:
    engine = FakeEngine(headers=True)
    requests = [Request(QUERY, Sampling(max_tokens=40), seed=s) for s in range(12)]
    texts = [c.text for (c,) in engine.generate(requests)]
    assert all(t.startswith("## ") and "\n" in t for t in texts)
    banned = Sampling(max_tokens=40, first_token_ban=("##",), stop=("\n",))
    steered = [
        c.text for (c,) in engine.generate([Request(QUERY, banned, seed=s) for s in range(12)])
    ]
    assert all(t.split()[0] != "##" and "\n" not in t for t in steered)
    boosted = Sampling(max_tokens=40, first_token_boost=1.2)
    redrawn = [
        c.text for (c,) in engine.generate([Request(QUERY, boosted, seed=s) for s in range(12)])
    ]
    assert redrawn != texts and all(
        a.split()[1:] == b.split()[1:] for a, b in zip(redrawn, texts, strict=True)
    )


def test_stage_bans_stops_and_sanitizes_on_the_fake_engine(tmp_path: Path) -> None:
    base, _ = pipeline.instructions(fake_config(), tmp_path / "base", view())
    rows = ShardStore(tmp_path / "base").read_all().to_pylist()
    assert base.rows == 8 and all(r["instruction"].startswith("## ") for r in rows)
    assert "raw_instruction" not in rows[0]

    config = fake_config(first_token_ban=["markdown-headers"], stop_at_newline=True)
    pipeline.instructions(config, tmp_path / "steered", view())
    rows = ShardStore(tmp_path / "steered").read_all().to_pylist()
    assert len(rows) == 8
    for row in rows:
        assert row["instruction"].split()[0] not in MARKDOWN_HEADERS
        assert "\n" not in row["instruction"]

    pipeline.instructions(fake_config(sanitize=True), tmp_path / "clean", view())
    rows = ShardStore(tmp_path / "clean").read_all().to_pylist()
    for row in rows:  # "## Title.\nSome more detail x." -> the title line, label-free
        assert row["raw_instruction"].startswith("## ") and "\n" not in row["instruction"]
        assert row["instruction"] == sanitize_instruction(row["raw_instruction"])
    assert count_sanitized(tmp_path / "clean") == (8, 8)
    with pytest.raises(MagpieError, match="'two words' is 2 tokens"):
        pipeline.instructions(fake_config(first_token_ban=["two words"]), tmp_path / "x", view())
    assert not any((tmp_path / "x").iterdir())  # refused before the output was opened
    fixed, _ = pipeline.instructions(fake_config(first_token_ban=["##"]), tmp_path / "x", view())
    assert fixed.rows == 8  # so the same folder takes the corrected run
    schema = pq.read_schema(next((tmp_path / "clean").glob("part-*.parquet")))
    assert schema.field("instruction_length").type == schema.field("attempt").type  # int64


def test_cli_flags_and_sanitized_count(tmp_path: Path) -> None:
    out = tmp_path / "ins"
    args = ["instructions", "--engine", "fake", "--num", "4", "--out", str(out), "--sanitize"]
    result = run_cli(*args, "--ban-first-token", "markdown-headers", "--stop-at-newline")
    assert result.returncode == 0, result.stderr
    assert "sanitized:" in result.stdout and "of 4 instructions changed" in result.stdout
    config = ShardStore(out).read_manifest()["config"]["config"]
    assert config["first_token_ban"] == list(MARKDOWN_HEADERS) and config["stop_at_newline"]


# ----------------------------------------------------------------------------- vLLM translation


def test_vllm_sampling_params_of_first_token_controls() -> None:
    from magpie.engines.vllm import sampling_kwargs

    sampling = Sampling(
        temperature=0.9, top_p=1.0, max_tokens=1024, stop=("<|eot_id|>",), first_token_ban=("#",)
    )
    ban = {2: BANNED, 567: BANNED}
    first = sampling_kwargs(sampling, n=2, seed=7, stop_token_ids=[128009], ban=ban)
    assert first["max_tokens"] == 1 and first["n"] == 2 and first["seed"] == 7
    assert first["logit_bias"] == {2: -100.0, 567: -100.0}
    assert first["stop"] == ["<|eot_id|>"] and first["stop_token_ids"] == [128009]
    rest = sampling_kwargs(sampling, n=2, seed=7, stop_token_ids=[128009], ban=ban, sample=1)
    assert (rest["max_tokens"], rest["n"], rest["seed"], rest["logit_bias"]) == (1023, 1, 8, None)
    boosted = sampling_kwargs(
        Sampling(temperature=1.0, first_token_boost=1.2), n=1, seed=0, stop_token_ids=[]
    )
    assert boosted["temperature"] == pytest.approx(1.2) and boosted["logit_bias"] is None
    plain = sampling_kwargs(Sampling(max_tokens=64), n=3, seed=5, stop_token_ids=[])
    assert (plain["max_tokens"], plain["n"], plain["logit_bias"]) == (64, 3, None)
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed here")
    params = vllm.SamplingParams(**first)
    assert params.max_tokens == 1 and params.logit_bias == {2: -100.0, 567: -100.0}


# ----------------------------------------------------------------------------- OpenAI server

VOCAB = {"#": 1, "##": 2, "What": 3, " is": 4, " it": 5, "?": 6, "\n": 7, "Tell": 8}
FIRST_CHOICES = ("##", "#", "What")  # the toy model's first token, best first
SCRIPT = ("What", " is", " it", "?", "\n", "Tell")


def toy_pieces(done: str, banned: set[int]) -> list[str]:
    """What the toy model writes after `done` (the text already after the query)."""
    first = next(
        p for p in FIRST_CHOICES if done.startswith(p) or not done and VOCAB[p] not in banned
    )
    script = [first, *SCRIPT[1:]] if first == "What" else [first, *SCRIPT]
    text = ""
    while script and text != done:
        text += script.pop(0)
    return script


class ToyModel(BaseHTTPRequestHandler):
    """A vLLM-style completions server over a toy vocabulary: greedy, it writes
    "##What is it?\nTell" (or "What is it?..." when "##" and "#" are biased -100)."""

    requests: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        return None

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer({"data": [{"id": "toy", "owned_by": "vllm"}]})

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self._answer({"tokens": [VOCAB[p] for p in toy_split(payload["prompt"])]})
            return
        type(self).requests.append(payload)
        banned = {int(k) for k, v in (payload.get("logit_bias") or {}).items() if v <= -100}
        pieces = toy_pieces(payload["prompt"].removeprefix(QUERY), banned)
        out, reason = "", "length"
        for count, piece in enumerate(pieces):
            if piece in payload.get("stop", []):
                reason = "stop"
                break
            if count == payload["max_tokens"]:
                break
            out += piece
        usage = {"prompt_tokens": 3, "completion_tokens": len(out) and len(toy_split(out))}
        choice = {"index": 0, "text": out, "finish_reason": reason}
        self._answer({"choices": [choice], "usage": usage})


def toy_split(text: str) -> list[str]:
    pieces = []
    while text:
        piece = max((p for p in VOCAB if text.startswith(p)), key=len)
        pieces.append(piece)
        text = text[len(piece) :]
    return pieces


@pytest.fixture
def toy_server() -> Iterator[str]:
    ToyModel.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ToyModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_engine_sends_the_ban_as_logit_bias_on_the_first_token(toy_server: str) -> None:
    from magpie.engines.openai_server import OpenAIServerEngine

    engine = OpenAIServerEngine(None, base_url=toy_server, concurrency=2)
    try:
        plain = Sampling(temperature=0.0, max_tokens=20, stop=("\n",))
        (free,) = engine.generate([Request(QUERY, plain, seed=1)])[0]
        assert free.text == "##What is it?"
        assert "logit_bias" not in ToyModel.requests[-1]
        ToyModel.requests.clear()
        banned = Sampling(
            temperature=0.5, max_tokens=20, stop=("\n",), first_token_ban=MARKDOWN_HEADERS[:2]
        )
        (steered,) = engine.generate([Request(QUERY, banned, seed=1)])[0]
        assert steered.text == "What is it?" and steered.finish_reason == "stop"
        first, rest = ToyModel.requests
        assert first["max_tokens"] == 1 and first["logit_bias"] == {"1": BANNED, "2": BANNED}
        assert first["prompt"] == QUERY and first["seed"] == 1
        assert rest["prompt"] == QUERY + "What" and "logit_bias" not in rest
        assert rest["max_tokens"] == 19 and rest["temperature"] == 0.5
        with pytest.raises(EngineError, match="is 2 tokens"):
            engine.generate([Request(QUERY, Sampling(first_token_ban=("What is",)))])
    finally:
        engine.close()


# ----------------------------------------------------------------------------- bundled model


def _first_piece(engine: Any, sampling: Sampling, seeds: range) -> list[str]:
    requests = [Request(QUERY, sampling, seed=s) for s in seeds]
    return [c.text for (c,) in engine.generate(requests)]


def test_llamacpp_ban_rules_out_what_greedy_would_pick(engine: Any) -> None:
    greedy = Sampling(temperature=0.0, max_tokens=1)
    (top,) = _first_piece(engine, greedy, range(1))
    assert len(engine.tokenize(top)) == 1, top
    (second,) = _first_piece(
        engine, Sampling(temperature=0.0, max_tokens=1, first_token_ban=(top,)), range(1)
    )
    assert second != top and second
    # sampled: the banned tokens never come first, whatever the seed
    sampled = Sampling(temperature=1.0, max_tokens=1)
    free = _first_piece(engine, sampled, range(24))
    common = tuple(dict.fromkeys(t for t in free if len(engine.tokenize(t)) == 1))[:3]
    banned = Sampling(temperature=1.0, max_tokens=1, first_token_ban=(*MARKDOWN_HEADERS, *common))
    steered = _first_piece(engine, banned, range(24))
    assert common and not set(steered) & {*MARKDOWN_HEADERS, *common}
    with pytest.raises(EngineError, match="not one"):
        engine.generate([Request(QUERY, Sampling(first_token_ban=("What is the capital",)))])


def test_llamacpp_boost_flattens_only_the_first_token(engine: Any) -> None:
    def top(sampling: Sampling) -> list[dict[str, float]]:
        (completion,) = engine.generate([Request(QUERY, sampling, seed=0)])[0]
        return completion.top_logprobs or []

    plain = top(Sampling(temperature=0.0, max_tokens=2, logprobs=5))
    boosted = top(Sampling(temperature=0.0, max_tokens=2, logprobs=5, first_token_boost=2.0))
    best = max(plain[0], key=plain[0].get)
    assert max(boosted[0], key=boosted[0].get) == best  # same ranking, flatter distribution
    assert boosted[0][best] < plain[0][best]
    assert boosted[1] == pytest.approx(plain[1])  # the second token is sampled as usual


def test_stop_at_newline_on_the_bundled_model(engine: Any, tmp_path: Path) -> None:
    listing = QUERY + "Name three fruits, one per line:\n- apple\n-"
    free = Sampling(temperature=0.0, max_tokens=24)
    (whole,) = engine.generate([Request(listing, free)])[0]
    assert "\n" in whole.text.strip()  # the model does go on to the next line
    (line,) = engine.generate(
        [Request(listing, Sampling(temperature=0.0, max_tokens=24, stop=("\n",)))]
    )[0]
    assert "\n" not in line.text and whole.text.startswith(line.text)
    config = InstructionsConfig.model_validate(
        {
            "num": 4,
            "max_tokens": 48,
            "shard_size": 8,
            "stop_at_newline": True,
            "first_token_ban": ["markdown-headers"],
        }
    )
    summary, _ = pipeline.instructions(config, tmp_path / "ins", view(), engine=engine)
    rows = ShardStore(tmp_path / "ins").read_all().to_pylist()
    assert rows and summary.rows == len(rows)
    for row in rows:
        assert "\n" not in row["instruction"] and not row["instruction"].startswith("#")


def test_llama_cpp_python_server_takes_the_ban(tmp_path: Path) -> None:
    """The real llama-cpp-python server with the bundled model: its greedy first token, banned
    through `logit_bias`, is replaced by another; the rest of the text continues from it."""
    from test_openai_engine import DETERMINISTIC, LlamaServer

    from magpie.engines.openai_server import OpenAIServerEngine

    server = LlamaServer(tmp_path / "server.log", *DETERMINISTIC)
    server.start()
    engine = OpenAIServerEngine(None, base_url=server.url, concurrency=2)
    try:
        greedy = Sampling(temperature=0.0, max_tokens=1)
        (top,) = engine.generate([Request(QUERY, greedy)])[0]
        ban = Sampling(temperature=0.0, max_tokens=12, first_token_ban=(top.text,))
        (other,) = engine.generate([Request(QUERY, ban)])[0]
        assert other.text and not other.text.startswith(top.text)
        assert 1 < other.completion_tokens <= 12
    finally:
        engine.close()
        server.kill()
