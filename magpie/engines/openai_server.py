"""OpenAI-compatible server engine: any `/v1/completions` endpoint (vLLM, llama.cpp, ...).

Magpie needs raw prompts (a pre-query template is not a chat message), so this engine only uses
the text-completions endpoint. Requests run concurrently on a private asyncio loop (bounded by
`concurrency`), are retried with exponential backoff and jitter on 429, 5xx, timeouts and
connection errors, and come back in request order.

Servers differ in the fields they accept beyond the OpenAI ones, so the engine recognizes the
kind of server from `/v1/models` (`owned_by`: "vllm", "llamacpp", or "me" for llama-cpp-python;
override with the `server` option) and sends what that kind understands:

| kind             | sampling extras                           | JSON schema                  |
|------------------|-------------------------------------------|------------------------------|
| vllm             | repetition_penalty                        | response_format json_schema  |
| llama-cpp-python | top_k=0, min_p=0, repeat_penalty          | grammar (GBNF, made locally) |
| llama.cpp        | top_k=0, min_p=0, repeat_penalty          | json_schema                  |
| generic          | repetition_penalty (when not 1)           | response_format json_schema  |

top_k=0 and min_p=0 switch off the llama.cpp servers' default truncation (top_k=40, min_p=0.05),
so sampling matches the embedded llama.cpp engine. llama-cpp-python's server drops unknown fields
(`repetition_penalty` would be ignored silently) and only accepts a GBNF `grammar`, which is
converted from the schema with llama-cpp-python's own converter.

A request for `n` samples is one call with `n` where the server honours it; a server that returns
fewer choices (llama.cpp ignores `n`) is remembered, and the missing samples are separate calls
with seeds `seed+1 ... seed+n-1`, as the embedded engine does. A request without a seed uses 0.

First-token controls (a ban list, a temperature boost) are applied by sampling the first token
alone (`max_tokens` 1, the ban as `logit_bias` -100, temperature x boost) and continuing from
the prompt plus that token's text; each of the `n` samples is its own pair of calls.

Determinism: a seeded request gives the same text as long as the server computes the same logits.
llama-cpp-python's server reuses the longest prompt prefix it has cached, and llama.cpp rounds a
batched evaluation slightly differently from a token-by-token one, so a sample can change with
what ran before it (a resumed run could then differ from an uninterrupted one). Start it with
`--n_batch 1` when reruns must reproduce rows exactly; vLLM's batching has the same caveat.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2

from magpie.engines.base import (
    BANNED,
    Completion,
    EngineError,
    ModelInfo,
    ProgressCallback,
    Request,
    Sampling,
    first_token_ids,
    join_first,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SERVER_KINDS = ("auto", "vllm", "llama-cpp-python", "llama.cpp", "generic")
_OWNERS = {"vllm": "vllm", "llamacpp": "llama.cpp", "me": "llama-cpp-python"}
_TOKENIZE_PATHS = {
    "vllm": "/tokenize",
    "llama-cpp-python": "/extras/tokenize",
    "llama.cpp": "/tokenize",
}
_jitter = random.Random()
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits about initial * 2**k, capped."""

    max_retries: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = min(self.max_backoff, self.initial_backoff * 2**attempt)
        wait = base * (0.5 + _jitter.random())
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


class _Retryable(Exception):
    """A failure worth another attempt (429, 5xx, timeout, lost connection)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Rejected(EngineError):
    """The server refused a request (a 4xx other than 429); retrying would not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _LoopThread:
    """An asyncio loop on a daemon thread, so `generate` is sync whatever loop the caller runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="magpie-openai-engine", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class OpenAIServerEngine:
    """Generation through an OpenAI-compatible `/v1/completions` server."""

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 600,
        max_retries: int = 5,
        chat_template: str | None = None,
        tokenizer: str | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        server: str = "auto",
        **_: Any,
    ) -> None:
        _check_options(base_url, concurrency, max_retries, server)
        self.base_url = base_url.rstrip("/")
        self._retry = RetryPolicy(max_retries, initial_backoff, max_backoff)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._tokenizer_path = tokenizer
        self._local_tokenizer: Any = None
        self._grammars: dict[str, str] = {}
        self._bans: dict[tuple[str, ...], dict[str, float]] = {}
        self._bos_offset: int | None = None
        self._loop: _LoopThread | None = _LoopThread()
        # The key lives only in the HTTP client's headers, never in an attribute of the engine.
        self._client = self._loop.run(_open_client(api_key_env, timeout, concurrency))
        try:
            models = self._list_models(explicit=model is not None)
            self.server = server if server != "auto" else _server_kind(models)
            model_id = model or self._only_model(models)
            self._info = _model_info(model_id, chat_template, tokenizer)
        except BaseException:
            self.close()
            raise
        self._n_native: bool | None = False if self.server == "llama-cpp-python" else None

    def __repr__(self) -> str:
        return f"OpenAIServerEngine(base_url={self.base_url!r}, model={self._info.model_id!r})"

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ---- public API --------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        if not requests:
            return []
        return self._run(self._generate(list(requests), on_done))

    def count_tokens(self, text: str) -> int:
        path = _TOKENIZE_PATHS.get(self.server)
        if path is not None:
            return self._run(self._server_count(path, text))
        if self._tokenizer_path is not None:
            return self._count_locally(text)
        raise EngineError(
            f"the server at {self.base_url} has no known tokenize endpoint: pass --tokenizer "
            "with a local Hugging Face tokenizer directory of the served model"
        )

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.run(self._client.aclose())
        finally:
            loop.stop()

    # ---- generation --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise EngineError("the openai engine is closed: create a new engine")
        return self._loop.run(coro)

    async def _generate(
        self, requests: list[Request], on_done: ProgressCallback | None
    ) -> list[list[Completion]]:
        async def one(request: Request) -> list[Completion]:
            completions = await self._complete(request)
            if on_done is not None:
                on_done(1, sum(c.completion_tokens for c in completions))
            return completions

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _complete(self, request: Request) -> list[Completion]:
        seed = request.seed if request.seed is not None else 0
        if request.sampling.first_token_controls:
            return list(
                await asyncio.gather(*(self._steered(request, seed + i) for i in range(request.n)))
            )
        if request.n == 1 or self._n_native is False:
            return await self._samples(request, seed, range(request.n))
        first = await self._call(request, request.n, seed)
        if len(first) >= request.n:
            self._n_native = True
            return first[: request.n]
        self._n_native = False
        return first[:1] + await self._samples(request, seed, range(1, request.n))

    async def _samples(self, request: Request, seed: int, offsets: range) -> list[Completion]:
        """One call per sample, sample i with seed + i."""
        results = await asyncio.gather(*(self._call(request, 1, seed + i) for i in offsets))
        return [c for completions in results for c in completions]

    async def _call(
        self, request: Request, n: int, seed: int, logit_bias: dict[str, float] | None = None
    ) -> list[Completion]:
        payload = self._payload(request, n, seed)
        if logit_bias:
            payload["logit_bias"] = logit_bias
        body = await self._post_json(f"{self.base_url}/completions", payload)
        return await self._parse(body, request.sampling)

    async def _steered(self, request: Request, seed: int) -> Completion:
        """One sample whose first token is drawn alone (banned tokens biased by -100, the
        temperature times the boost), then continued from the prompt plus that token."""
        sampling = request.sampling
        bias = await self._ban_bias(sampling.first_token_ban)
        first_request = Request(request.prompt, sampling.first_step(), seed=seed)
        (first,) = await self._call(first_request, 1, seed, bias)
        if first.finish_reason != "length" or sampling.max_tokens <= 1:
            return first
        rest_request = Request(request.prompt + first.text, sampling.after_first(), seed=seed)
        (rest,) = await self._call(rest_request, 1, seed)
        return join_first(first, rest)

    async def _ban_bias(self, texts: tuple[str, ...]) -> dict[str, float]:
        """`logit_bias` of a first-token ban list: {token id: -100} (resolved once)."""
        if texts not in self._bans:
            ids = dict(zip(texts, await asyncio.gather(*map(self._token_ids, texts)), strict=True))
            resolved = first_token_ids(texts, ids.__getitem__)
            self._bans[texts] = {str(i): BANNED for i in resolved}
        return self._bans[texts]

    async def _token_ids(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens parsed, none added): server, else --tokenizer."""
        path = _TOKENIZE_PATHS.get(self.server)
        if path is None:
            if self._tokenizer_path is None:
                raise EngineError(
                    f"a first-token ban needs token ids and {self.base_url} has no known tokenize "
                    "endpoint: pass --tokenizer with the served model's tokenizer directory"
                )
            return list(self._tokenizer().encode(text, add_special_tokens=False))
        url = _server_root(self.base_url) + path
        if self.server == "llama-cpp-python":
            if self._bos_offset is None:
                self._bos_offset = len(await self._tokens(url, {"input": ""}))
            tokens = (await self._tokens(url, {"input": text}))[self._bos_offset :]
        elif self.server == "llama.cpp":
            payload = {"content": text, "add_special": False, "parse_special": True}
            tokens = await self._tokens(url, payload)
        else:
            payload = {"model": self._info.model_id, "prompt": text, "add_special_tokens": False}
            tokens = await self._tokens(url, payload)
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]

    def _payload(self, request: Request, n: int, seed: int) -> dict[str, Any]:
        sampling = request.sampling
        payload: dict[str, Any] = {
            "model": self._info.model_id,
            "prompt": request.prompt,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
        }
        if n > 1:
            payload["n"] = n
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if sampling.logprobs is not None:
            payload["logprobs"] = sampling.logprobs
        payload.update(_sampling_extras(self.server, sampling.repetition_penalty))
        if sampling.json_schema is not None:
            payload.update(self._schema_fields(sampling.json_schema))
        return payload

    def _schema_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.server == "llama-cpp-python":
            return {"grammar": self._gbnf(schema)}
        if self.server == "llama.cpp":
            return {"json_schema": schema}
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        }

    def _gbnf(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            try:
                from llama_cpp.llama_grammar import json_schema_to_gbnf
            except ImportError as exc:
                raise EngineError(
                    "JSON-constrained output on a llama-cpp-python server needs the schema as a "
                    "GBNF grammar: pip install llama-cpp-python locally to convert it"
                ) from exc
            self._grammars[key] = json_schema_to_gbnf(key)
        return self._grammars[key]

    async def _parse(self, body: dict[str, Any], sampling: Sampling) -> list[Completion]:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise EngineError(
                f"{self.base_url}/completions answered without choices: is it an "
                "OpenAI-compatible completions server?"
            )
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        usage = body.get("usage") or {}
        counts = await self._choice_tokens(choices, usage)
        return [
            Completion(
                text=choice.get("text") or "",
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=count,
                top_logprobs=(
                    _top_logprobs(choice.get("logprobs"), sampling.logprobs)
                    if sampling.logprobs is not None
                    else None
                ),
            )
            for choice, count in zip(choices, counts, strict=True)
        ]

    async def _choice_tokens(self, choices: list[dict], usage: dict[str, Any]) -> list[int]:
        """Generated tokens of each choice; `usage` only tells the total when there are several."""
        total = int(usage.get("completion_tokens") or 0)
        if len(choices) == 1:
            return [total]
        exact = [_tokens_in_choice(c) for c in choices]
        if all(count is not None for count in exact):
            return [int(count) for count in exact]  # type: ignore[arg-type]
        path = _TOKENIZE_PATHS.get(self.server)
        texts = [c.get("text") or "" for c in choices]
        if path is not None:
            return list(await asyncio.gather(*(self._server_count(path, t) for t in texts)))
        return _split_by_length(total, texts)

    # ---- token counting ----------------------------------------------------------------------

    async def _server_count(self, path: str, text: str) -> int:
        url = _server_root(self.base_url) + path
        if self.server == "llama-cpp-python":
            # Its endpoint always adds the BOS token where the model has one; measure that once.
            if self._bos_offset is None:
                self._bos_offset = len(await self._tokens(url, {"input": ""}))
            return len(await self._tokens(url, {"input": text})) - self._bos_offset
        if self.server == "llama.cpp":
            payload = {"content": text, "add_special": False, "parse_special": True}
        else:
            payload = {"model": self._info.model_id, "prompt": text, "add_special_tokens": False}
        return len(await self._tokens(url, payload))

    async def _tokens(self, url: str, payload: dict[str, Any]) -> list[Any]:
        body = await self._post_json(url, payload)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise EngineError(f"{url} answered without tokens: pass --tokenizer to count locally")
        return tokens

    def _count_locally(self, text: str) -> int:
        return len(self._tokenizer().encode(text, add_special_tokens=False))

    def _tokenizer(self) -> Any:
        """The local Hugging Face tokenizer of --tokenizer (loaded on first use)."""
        if self._local_tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._local_tokenizer = AutoTokenizer.from_pretrained(
                    self._tokenizer_path, local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise EngineError(
                    f"cannot read a tokenizer from {self._tokenizer_path}: pass --tokenizer with "
                    "a local Hugging Face tokenizer directory"
                ) from exc
        return self._local_tokenizer

    # ---- HTTP with retries -------------------------------------------------------------------

    def _list_models(self, explicit: bool) -> list[dict[str, Any]]:
        """`/v1/models`; a server without it is fine when the model is named."""
        try:
            data = self._run(self._get_json(f"{self.base_url}/models")).get("data")
        except _Rejected as exc:
            if exc.status == 404 and explicit:
                return []
            raise
        return data if isinstance(data, list) else []

    def _only_model(self, models: list[dict[str, Any]]) -> str:
        ids = [str(m.get("id")) for m in models if m.get("id")]
        if len(ids) == 1:
            return ids[0]
        served = f"it serves {', '.join(ids)}" if ids else "it lists no models"
        raise EngineError(
            f"cannot tell which model of {self.base_url} to use ({served}): pass --model"
        )

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._with_retries(url, lambda: self._client.get(url))

    async def _post_json(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._with_retries(url, lambda: self._client.post(url, json=payload))

    async def _with_retries(self, url: str, send: Any) -> dict[str, Any]:
        attempts = self._retry.max_retries + 1
        for attempt in range(attempts):
            try:
                async with self._semaphore:
                    return _json_or_raise(url, await _send(send))
            except _Retryable as failure:
                if attempt + 1 == attempts:
                    raise EngineError(
                        f"server {url} failed {attempts} times (last: {failure}); committed "
                        "shards are kept: rerun the same command to resume once the server is back"
                    ) from None
                await asyncio.sleep(self._retry.delay(attempt, failure.retry_after))
        raise AssertionError("unreachable")


async def _open_client(api_key_env: str, timeout: float, concurrency: int) -> httpx2.AsyncClient:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0)),
        limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


async def _send(send: Any) -> httpx2.Response:
    """Run one HTTP call, turning transport failures into `_Retryable`."""
    try:
        return await send()
    except httpx2.TimeoutException as exc:
        raise _Retryable(f"timed out: {type(exc).__name__}") from exc
    except (httpx2.UnsupportedProtocol, httpx2.InvalidURL) as exc:
        raise EngineError(
            f"bad server URL ({exc}): pass --base-url like {DEFAULT_BASE_URL}"
        ) from exc
    except httpx2.TransportError as exc:
        raise _Retryable(f"{type(exc).__name__}: {_one_line(str(exc)) or 'no answer'}") from exc


def _json_or_raise(url: str, response: httpx2.Response) -> dict[str, Any]:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}: {_server_message(response)}", _retry_after(response))
    if status >= 400:
        hint = ": set the API key variable (--api-key-env)" if status in (401, 403) else ""
        raise _Rejected(
            f"{url} rejected the request (HTTP {status}): {_server_message(response)}{hint}",
            status,
        )
    try:
        body = response.json()
    except ValueError as exc:
        raise EngineError(
            f"{url} answered with something other than JSON: check --base-url"
        ) from exc
    if not isinstance(body, dict):
        raise EngineError(f"{url} answered with unexpected JSON: check --base-url")
    return body


def _server_message(response: httpx2.Response) -> str:
    """The error text of an OpenAI-style, FastAPI-style or plain error body, on one line."""
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text)[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return _one_line(error if isinstance(error, str) else json.dumps(error))[:300]
    return _one_line(json.dumps(body))[:300]


def _retry_after(response: httpx2.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_options(base_url: str, concurrency: int, max_retries: int, server: str) -> None:
    if not base_url.startswith(("http://", "https://")):
        raise EngineError(f"invalid --base-url {base_url!r}: use a URL like {DEFAULT_BASE_URL}")
    if concurrency < 1:
        raise EngineError(f"invalid concurrency {concurrency}: use 1 or more")
    if max_retries < 0:
        raise EngineError(f"invalid max_retries {max_retries}: use 0 or more")
    if server not in SERVER_KINDS:
        raise EngineError(f"unknown server kind {server!r}: use one of {', '.join(SERVER_KINDS)}")


def _server_kind(models: list[dict[str, Any]]) -> str:
    owners = {_OWNERS.get(str(m.get("owned_by"))) for m in models}
    return owners.pop() if len(owners) == 1 and None not in owners else "generic"


def _server_root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


def _model_info(model_id: str, chat_template: str | None, tokenizer: str | None) -> ModelInfo:
    """Tokenizer facts from local files: a server does not tell its chat template."""
    info = ModelInfo(model_id=model_id)
    if tokenizer is not None:
        from magpie.engines.hf import hf_model_info

        local = hf_model_info(tokenizer)
        info = ModelInfo(
            model_id=model_id,
            chat_template=local.chat_template,
            bos_token=local.bos_token,
            eos_token=local.eos_token,
        )
    if chat_template is not None:
        try:
            info.chat_template = Path(chat_template).read_text()
        except OSError as exc:
            raise EngineError(
                f"cannot read chat template {chat_template}: pass a readable Jinja file"
            ) from exc
    return info


def _sampling_extras(server: str, repetition_penalty: float) -> dict[str, Any]:
    if server in ("llama-cpp-python", "llama.cpp"):
        return {"top_k": 0, "min_p": 0.0, "repeat_penalty": repetition_penalty}
    if server == "vllm" or repetition_penalty != 1.0:
        return {"repetition_penalty": repetition_penalty}
    return {}


def _tokens_in_choice(choice: dict[str, Any]) -> int | None:
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        if isinstance(logprobs.get("tokens"), list):
            return len(logprobs["tokens"])
        if isinstance(logprobs.get("content"), list):
            return len(logprobs["content"])
    return None


def _split_by_length(total: int, texts: list[str]) -> list[int]:
    """Share `total` tokens out in proportion to text length (last resort, no tokenizer)."""
    chars = sum(len(t) for t in texts) or 1
    counts = [total * len(t) // chars for t in texts]
    counts[-1] += total - sum(counts)
    return counts


def _top_logprobs(logprobs: Any, k: int) -> list[dict[str, float]]:
    """One dict token -> logprob per generated position, the `k` most likely kept."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("top_logprobs"), list):
        steps = [dict(step or {}) for step in logprobs["top_logprobs"]]
    elif isinstance(logprobs.get("content"), list):
        steps = [
            {alt["token"]: alt["logprob"] for alt in item.get("top_logprobs") or []}
            for item in logprobs["content"]
        ]
    else:
        return []
    return [
        dict(sorted(((t, float(v)) for t, v in step.items()), key=lambda tv: -tv[1])[:k])
        for step in steps
    ]
