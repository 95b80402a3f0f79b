"""The OpenAI-compatible server engine against real servers on 127.0.0.1.

llama-cpp-python's bundled server runs the bundled SmolLM2 GGUF (one per module, plus one that a
test kills mid-run); a small stdlib HTTP server scripts failures for the retry tests.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, ResponsesConfig
from magpie.engines.base import EngineError, Request, Sampling, create_engine
from magpie.engines.llamacpp import bundled_model_path
from magpie.engines.openai_server import OpenAIServerEngine
from magpie.runner import ProgressView
from magpie.store import ShardStore

pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")

QUERY = "<|im_start|>user\n"
STOPS = ("<|im_end|>",)
# One token per evaluation: logits then do not depend on which prefix the server had cached
# (batched and single-token evaluation round differently), so reruns reproduce rows exactly.
DETERMINISTIC = ("--n_batch", "1")
FAST_RETRY = {"max_retries": 2, "initial_backoff": 0.02, "max_backoff": 0.1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` with the bundled model, on a fixed local port."""

    def __init__(self, log: Path, *extra: str) -> None:
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(bundled_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.kill()
        pytest.fail("llama_cpp.server did not answer /v1/models in time")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    srv = LlamaServer(tmp_path_factory.mktemp("llama-server") / "server.log", *DETERMINISTIC)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def llm(server: LlamaServer) -> Iterator[OpenAIServerEngine]:
    engine = OpenAIServerEngine(None, base_url=server.url, concurrency=2)
    yield engine
    engine.close()


def quiet_view() -> ProgressView:
    return ProgressView(Console(stderr=True), enabled=False)


def engine_spec(url: str, **options: Any) -> dict[str, Any]:
    return {"name": "openai", "options": {"base_url": url, "concurrency": 2, **options}}


def instructions_config(url: str, num: int = 3, **options: Any) -> InstructionsConfig:
    return InstructionsConfig(
        engine=engine_spec(url, **options),
        template={"pre_query_template": "smollm2"},
        num=num,
        max_tokens=64,
        shard_size=2,
    )


def rows_of(path: Path) -> list[dict]:
    return sorted(ShardStore(path).read_all().to_pylist(), key=lambda r: r["uuid"])


# ---- through the llama-cpp-python server ---------------------------------------------------


def test_instructions_and_responses_stages(server: LlamaServer, tmp_path: Path) -> None:
    summary, _ = pipeline.instructions(
        instructions_config(server.url), tmp_path / "ins", quiet_view()
    )
    assert summary.complete and summary.rows == 3
    instructions = rows_of(tmp_path / "ins")
    assert len(instructions) == 3 and all(r["instruction"].strip() for r in instructions)

    config = ResponsesConfig(
        engine=engine_spec(server.url),
        template={"pre_query_template": "smollm2"},
        n=2,
        max_tokens=32,
        shard_size=2,
    )
    pipeline.responses(config, tmp_path / "ins", tmp_path / "res", quiet_view())
    responses = rows_of(tmp_path / "res")
    assert [r["uuid"] for r in responses] == [r["uuid"] for r in instructions]
    for row in responses:
        assert len(row["responses"]) == len(row["response_tokens"]) == 2
        assert set(row["response_finish_reasons"]) <= {"stop", "length"}
        assert all(0 < t <= 32 for t in row["response_tokens"])


def test_seeded_requests_are_deterministic(llm: OpenAIServerEngine) -> None:
    sampling = Sampling(temperature=1.0, max_tokens=24, stop=STOPS)
    requests = [Request(QUERY, sampling, n=2, seed=11), Request(QUERY, sampling, seed=12)]
    done: list[tuple[int, int]] = []
    first = llm.generate(requests, lambda n, tokens: done.append((n, tokens)))
    texts = [[c.text for c in cs] for cs in first]
    assert len(texts[0]) == 2 and texts[0][1] == texts[1][0]  # sample i uses seed + i
    assert len(done) == 2 and sum(t for _, t in done) == sum(
        c.completion_tokens for cs in first for c in cs
    )
    # Same texts whatever the server computed before (its KV cache holds another prompt now).
    other = Request("<|im_start|>system\nBe brief.<|im_end|>\n", sampling, seed=1)
    again = llm.generate([other, *reversed(requests)])[1:]
    assert texts == [[c.text for c in cs] for cs in reversed(again)]


def test_n_is_detected_when_the_server_ignores_it(server: LlamaServer) -> None:
    generic = OpenAIServerEngine(None, base_url=server.url, server="generic")
    try:
        sampling = Sampling(temperature=1.0, max_tokens=8)
        (pair,) = generic.generate([Request(QUERY, sampling, n=2, seed=3)])
        assert generic._n_native is False and len(pair) == 2
        (single,) = generic.generate([Request(QUERY, sampling, seed=4)])
        assert pair[1].text == single[0].text
        with pytest.raises(EngineError, match="--tokenizer"):
            generic.count_tokens("hello")
    finally:
        generic.close()


def test_logprobs(llm: OpenAIServerEngine) -> None:
    prompt = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    (completions,) = llm.generate(
        [Request(prompt, Sampling(temperature=0.0, max_tokens=3, logprobs=4))]
    )
    top = completions[0].top_logprobs
    assert top is not None and len(top) == completions[0].completion_tokens
    for step in top:
        assert 1 <= len(step) <= 4 and all(v <= 0 for v in step.values())
        assert list(step.values()) == sorted(step.values(), reverse=True)
    assert completions[0].text.startswith(max(top[0], key=top[0].get))


def test_json_schema(llm: OpenAIServerEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"rating": {"type": "integer"}, "reason": {"type": "string"}},
        "required": ["rating", "reason"],
    }
    prompt = "<|im_start|>user\nRate this answer as JSON.<|im_end|>\n<|im_start|>assistant\n"
    sampling = Sampling(temperature=0.8, max_tokens=60, json_schema=schema)
    results = llm.generate([Request(prompt, sampling, seed=s) for s in range(2)])
    for (completion,) in results:
        if completion.finish_reason == "stop":
            value = json.loads(completion.text)
            assert isinstance(value["rating"], int) and isinstance(value["reason"], str)
        else:
            assert completion.text.startswith("{")


def test_count_tokens_and_info(llm: OpenAIServerEngine, engine, tmp_path: Path) -> None:
    text = "<|im_start|>user\nHow many tokens?<|im_end|>\n"
    assert llm.count_tokens(text) == engine.count_tokens(text)
    assert llm.info.model_id == str(bundled_model_path()) and llm.info.chat_template is None
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    other = create_engine(
        "openai", model="custom-name", base_url=llm.base_url, chat_template=str(template)
    )
    try:
        assert other.info.model_id == "custom-name"
        assert other.info.chat_template == template.read_text()
    finally:
        other.close()


def test_judge_scores_through_the_server(server: LlamaServer, engine, tmp_path: Path) -> None:
    """The LLM judge works over any engine with logprobs: here the OpenAI-compatible one."""
    from magpie.rewards.judge import load_judge

    template = tmp_path / "chat.jinja"
    template.write_text(engine.info.chat_template or "")
    judge = load_judge(
        "judge", "openai", base_url=server.url, chat_template=str(template), concurrency=2
    )
    try:
        conversation = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
        (score,) = judge.score([conversation])
        assert 1.0 <= score <= 10.0
        assert judge.model_id.startswith("judge:")
    finally:
        judge.close()


def test_killed_server_fails_cleanly_and_the_rerun_resumes(tmp_path: Path) -> None:
    srv = LlamaServer(tmp_path / "server.log", *DETERMINISTIC)
    srv.start()
    try:
        config = instructions_config(srv.url, num=4, **FAST_RETRY)
        pipeline.instructions(config, tmp_path / "ref", quiet_view())

        out = tmp_path / "run"
        killer = threading.Thread(target=kill_after_first_shard, args=(srv, out), daemon=True)
        killer.start()
        with pytest.raises(EngineError) as failure:
            pipeline.instructions(config, out, quiet_view())
        killer.join()
        message = str(failure.value)
        assert srv.url in message and "resume" in message and "\n" not in message
        kept = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
        assert "part-00000.parquet" in kept

        srv.start()
        summary, _ = pipeline.instructions(config, out, quiet_view())
        assert summary.complete and summary.resumed_shards >= len(kept)
        assert all((out / name).read_bytes() == data for name, data in kept.items())
        assert rows_of(out) == rows_of(tmp_path / "ref")
    finally:
        srv.kill()


def kill_after_first_shard(srv: LlamaServer, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (out / "part-00000.parquet").exists():
        time.sleep(0.005)
    srv.kill()


# ---- scripted failures on a stdlib server --------------------------------------------------


class Scripted(ThreadingHTTPServer):
    """Answers /v1/completions with the scripted statuses first, then with valid completions."""

    def __init__(self, script: list[int], honour_n: bool = True, models: int = 1) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = list(script)
        self.honour_n = honour_n
        self.models = [
            {"id": f"fake-{i}", "object": "model", "owned_by": "test"} for i in range(models)
        ]
        self.calls: list[dict[str, Any]] = []
        self.headers_seen: list[str | None] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        if not self.server.models:
            return self.reply(404, {"detail": "Not Found"})
        self.reply(200, {"object": "list", "data": self.server.models})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append(body)
        self.server.headers_seen.append(self.headers.get("Authorization"))
        if self.server.script:
            status = self.server.script.pop(0)
            if status == 400:
                return self.reply(400, {"error": {"message": "prompt is too long", "code": 400}})
            return self.reply(status, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        n = body.get("n", 1) if self.server.honour_n else 1
        choices = [
            {
                "index": i,
                "text": f"seed {body['seed']} #{i}",
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i in range(n)
        ]
        self.reply(
            200, {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 4 * n}}
        )

    def reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def make(script: list[int], **kwargs: Any) -> Scripted:
        srv = Scripted(script, **kwargs)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def fake_engine(srv: Scripted, **options: Any) -> OpenAIServerEngine:
    return OpenAIServerEngine(None, base_url=srv.url, **{**FAST_RETRY, **options})


def test_retries_429_and_503_then_succeeds(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGPIE_TEST_KEY", "sk-secret")
    srv = scripted([429, 503])
    llm = fake_engine(srv, api_key_env="MAGPIE_TEST_KEY")
    try:
        (completions,) = llm.generate([Request("hi", Sampling(), seed=7)])
        assert completions[0].text == "seed 7 #0" and completions[0].completion_tokens == 4
        assert len(srv.calls) == 3 and set(srv.headers_seen) == {"Bearer sk-secret"}
        assert "sk-secret" not in repr(llm) + repr(vars(llm))
        assert llm.server == "generic" and llm.info.model_id == "fake-0"
    finally:
        llm.close()


def test_permanent_500_gives_one_line_error(scripted) -> None:
    srv = scripted([500] * 10)
    llm = fake_engine(srv)
    try:
        with pytest.raises(EngineError) as failure:
            llm.generate([Request("hi", Sampling())])
        message = str(failure.value)
        assert f"{srv.url}/completions" in message and "HTTP 500" in message
        assert "committed shards are kept" in message and "\n" not in message
        assert len(srv.calls) == FAST_RETRY["max_retries"] + 1
    finally:
        llm.close()


def test_client_errors_are_not_retried(scripted) -> None:
    srv = scripted([400])
    llm = fake_engine(srv)
    try:
        with pytest.raises(EngineError, match="HTTP 400.*prompt is too long"):
            llm.generate([Request("hi", Sampling())])
        assert len(srv.calls) == 1
    finally:
        llm.close()


def test_n_in_one_request_where_the_server_honours_it(scripted) -> None:
    srv = scripted([])
    llm = fake_engine(srv)
    try:
        (completions,) = llm.generate([Request("hi", Sampling(), n=3, seed=5)])
        assert [c.text for c in completions] == [f"seed 5 #{i}" for i in range(3)]
        assert len(srv.calls) == 1 and srv.calls[0]["n"] == 3 and llm._n_native is True
    finally:
        llm.close()


def test_model_choice_and_unreachable_server(scripted) -> None:
    srv = scripted([], models=2)
    with pytest.raises(EngineError, match="fake-0, fake-1.*--model"):
        fake_engine(srv)
    no_list = scripted([], models=0)  # no /v1/models: fine once the model is named
    with pytest.raises(EngineError, match=r"models rejected the request \(HTTP 404\): Not Found"):
        fake_engine(no_list)
    named = OpenAIServerEngine("named", base_url=no_list.url, **FAST_RETRY)
    try:
        assert named.generate([Request("hi", Sampling(), seed=2)])[0][0].text == "seed 2 #0"
        assert no_list.calls[0]["model"] == "named"
    finally:
        named.close()
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineError, match=f"{url}/models.*resume"):
        OpenAIServerEngine("x", base_url=url, **FAST_RETRY)
