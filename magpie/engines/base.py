"""The Engine protocol every generation backend implements, and the registry of engines by name.

Stages talk to engines only through this module: they build `Request`s of raw prompts (already
formatted with the pre-query or chat template) and get back one `Completion` list per request.
Concrete engines (llama.cpp, vLLM, an OpenAI-compatible server, transformers) live beside it and
are looked up by name, so no stage imports a concrete engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from magpie.errors import MagpieError

FinishReason = Literal["stop", "length"]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters of one request."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (judges need them)."""
    json_schema: dict[str, Any] | None = None
    """Constrain the output to JSON that validates against this schema."""
    first_token_ban: tuple[str, ...] = ()
    """Token texts the first generated token may not be (each one token of the model)."""
    first_token_boost: float = 1.0
    """The first token's logits are divided by this before sampling (on top of temperature)."""
    exact: bool = True
    """An engine that can (llama.cpp) gives this request the same completions whatever it is
    decoded with. False lets llama.cpp evaluate a long prompt's own tokens with its faster tiled
    attention, at the price of results that depend on the batch (a judge's long prompts)."""

    @property
    def first_token_controls(self) -> bool:
        """Whether the first generated token is sampled differently from the rest."""
        return bool(self.first_token_ban) or self.first_token_boost != 1.0

    def first_step(self) -> Sampling:
        """The first token alone, as engines that cannot treat step 0 apart sample it: one
        token at temperature x boost (the ban travels with it for the engine to apply)."""
        if self.json_schema is not None:
            raise EngineError(
                "first-token controls cannot be combined with a JSON schema: drop one of them"
            )
        return replace(
            self,
            max_tokens=1,
            temperature=self.temperature * self.first_token_boost,
            first_token_boost=1.0,
        )

    def after_first(self) -> Sampling:
        """The tokens after the first: the same settings without the first-token controls."""
        return replace(
            self, max_tokens=self.max_tokens - 1, first_token_ban=(), first_token_boost=1.0
        )


@dataclass(frozen=True)
class Request:
    """One raw prompt to complete `n` times. `seed` makes the samples reproducible."""

    prompt: str
    sampling: Sampling
    n: int = 1
    seed: int | None = None


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    top_logprobs: list[dict[str, float]] | None = None
    """Per generated token, the top alternatives and their log-probabilities."""


@dataclass
class ModelInfo:
    """What an engine knows about its model's tokenizer, for template derivation."""

    model_id: str
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A text-completion backend. Implementations batch internally as they see fit."""

    name: str

    @property
    def info(self) -> ModelInfo: ...

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        """Complete every request; the result holds `request.n` completions per request, in order.

        `on_done(requests_finished, tokens_generated)` is called as work completes (for progress).
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` has in the model's vocabulary (special tokens parsed)."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


def batch_invariant(engine: object) -> bool:
    """Whether an engine's completions of a request (or a scorer's scores) are the same whatever
    it is batched with (it says so with a true `batch_invariant` attribute): then the requests of
    several shards may go to one call and each shard still gets the rows it gets alone."""
    return bool(getattr(engine, "batch_invariant", False))


def takes_spare(engine: Engine) -> bool:
    """Whether an engine runs the next call's requests ahead in free slots (`generate_until`'s
    `spare`): only worth it, and only exact, where its results are batch-invariant."""
    return batch_invariant(engine) and bool(getattr(engine, "takes_spare", False))


StopWhen = Callable[[int, list[Completion]], bool]
"""`until(request_index, completions)`: called as each request finishes; True stops the call.

It may also have a method `admit(request_index) -> bool`: whether an engine that starts requests
in order should start that one now (False: wait until more have finished). It must depend only
on what `until` has seen, so a call's schedule stays a function of its requests."""


def generate_until(
    engine: Engine,
    requests: Sequence[Request],
    on_done: ProgressCallback | None,
    until: StopWhen,
    spare: Sequence[Request] = (),
) -> list[list[Completion] | None]:
    """`engine.generate`, stopped early once `until` says so where the engine can stop (it has
    `generate_until`); None stands for a request left unfinished. Others run every request.

    `spare` requests are those the caller will likely ask for in its next call: an engine that
    takes them (`takes_spare`, batch-invariant) runs them in slots the others leave free, as
    `until.admit` allows (their indices follow the requests'), and gives their completions to
    the next call that asks for them; others ignore them."""
    early = getattr(engine, "generate_until", None)
    if early is not None:
        if spare and takes_spare(engine):
            return early(requests, on_done, until, spare=spare)
        return early(requests, on_done, until)
    results: list[list[Completion] | None] = list(engine.generate(requests, on_done))
    return results


EngineFactory = Callable[..., Engine]
_REGISTRY: dict[str, tuple[str, str]] = {
    "llamacpp": ("magpie.engines.llamacpp", "LlamaCppEngine"),
    "vllm": ("magpie.engines.vllm", "VLLMEngine"),
    "openai": ("magpie.engines.openai_server", "OpenAIServerEngine"),
    "fake": ("magpie.engines.fake", "FakeEngine"),
}


class EngineError(MagpieError):
    """An engine failed in a way the user can act on; the message says how."""


def check_prompt_fits(tokens: int, max_tokens: int, context: int, knob: str) -> None:
    """Refuse an empty prompt, or one whose generation would overrun the model's context."""
    if tokens == 0:
        raise EngineError("empty prompt: the pre-query template rendered no tokens")
    if tokens + max_tokens > context:
        raise EngineError(
            f"prompt of {tokens} tokens + max_tokens {max_tokens} exceed the context of "
            f"{context}: lower max_tokens or raise {knob}"
        )


BANNED = -100.0
"""Logit bias of a banned token for engines that take a bias (OpenAI's strongest value)."""


def first_token_ids(texts: Sequence[str], tokenize: Callable[[str], list[int]]) -> list[int]:
    """Token ids of the first-token ban list; each text must be exactly one token."""
    ids = []
    for text in texts:
        tokens = tokenize(text)
        if len(tokens) != 1:
            raise EngineError(
                f"first-token ban {text!r} is {len(tokens)} tokens in this model's vocabulary, "
                "not one: list single tokens (--ban-first-token)"
            )
        ids.append(tokens[0])
    return ids


def join_first(first: Completion, rest: Completion | None) -> Completion:
    """One completion from a first token sampled alone and the continuation after it."""
    if rest is None:
        return first
    logprobs = None
    if first.top_logprobs is not None or rest.top_logprobs is not None:
        logprobs = (first.top_logprobs or []) + (rest.top_logprobs or [])
    return Completion(
        text=first.text + rest.text,
        finish_reason=rest.finish_reason,
        prompt_tokens=first.prompt_tokens,
        completion_tokens=first.completion_tokens + rest.completion_tokens,
        top_logprobs=logprobs,
    )


def engine_names() -> list[str]:
    """Names accepted by `--engine`."""
    return sorted(_REGISTRY)


def register_engine(name: str, module: str, attribute: str) -> None:
    """Make an engine class available under `name` (imported lazily on first use)."""
    _REGISTRY[name] = (module, attribute)


def create_engine(name: str, **options: Any) -> Engine:
    """Instantiate the engine registered as `name` with engine-specific options."""
    if name not in _REGISTRY:
        raise EngineError(
            f"unknown engine {name!r}: use --engine with one of {', '.join(engine_names())}"
        )
    module_name, attribute = _REGISTRY[name]
    import importlib

    factory: EngineFactory = getattr(importlib.import_module(module_name), attribute)
    return factory(**options)


class EnginePool:
    """Engines built from their specs in this process, shared by every stage that names them.

    A spec is (name, model, options) — anything with `name`, `model` and `options` attributes,
    such as `magpie.config.EngineSpec`; it is what travels to a worker, never a live engine.
    `defaults` fill engine options a spec leaves unset (e.g. CPU threads inside a Ray actor).
    """

    def __init__(self, defaults: dict[str, dict[str, Any]] | None = None) -> None:
        self._defaults = defaults or {}
        self._engines: dict[str, Engine] = {}
        self._closers: list[Callable[[], None]] = []

    @staticmethod
    def key(spec: Any) -> str:
        import json

        return json.dumps([spec.name, spec.model, spec.options], sort_keys=True, default=str)

    def add(self, spec: Any, engine: Engine) -> None:
        """Use an engine built elsewhere for `spec` (the caller closes it)."""
        self._engines[self.key(spec)] = engine

    def get(self, spec: Any) -> Engine:
        """The engine of `spec`, built on first use."""
        key = self.key(spec)
        if key not in self._engines:
            options = {**self._defaults.get(spec.name, {}), **spec.options}
            engine = create_engine(spec.name, model=spec.model, **options)
            self._engines[key] = engine
            self._closers.append(engine.close)
        return self._engines[key]

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call `closer` when the pool closes (reward models and other held resources)."""
        self._closers.append(closer)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        self._engines.clear()
