"""Continuous batching on llama.cpp's low-level API: many sequences decoded in one `llama_batch`.

One `BatchDecoder.run` call completes a list of sequences (a prompt, its sampling and seed each):
- the longest prefix common to every prompt is evaluated once, in its own sequence (the *root*),
  and every sequence starts from a copy of it (in a unified KV cache a copy only tags cells);
- sequences with the same prompt (the n samples of a request, identical instruction queries)
  share it: the first one evaluates it, a *holder* sequence keeps prompt[:-1], later ones copy
  that and evaluate only the last prompt token;
- up to `n_seq` sequences decode together; each step feeds one token of every running sequence
  plus prompt chunks of newly admitted ones, never more than `capacity` tokens per decode; a
  finished sequence's slot goes to the next waiting one (admitted in order, when its worst-case
  KV need fits beside the running ones);
- each sequence has its own sampler chain (the same chain llama-cpp-python builds: penalties,
  grammar, then greedy or top-k/typical/top-p/min-p/temperature/dist with its seed); the first
  generated token's logits can be steered first (banned ids, a temperature boost).

Determinism: the KV cache is cleared at the start of every call and the schedule depends only on
the sequences and the decoder's settings, so a call's results depend only on its inputs (the
logits of a sequence do depend on what it was batched with, hence not on its seed alone).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp._utils import suppress_stdout_stderr

from magpie.engines.base import EngineError, Sampling
from magpie.engines.llamacpp_runtime import ThreadGovernor

LAST_N_PENALTY = 64
"""Tokens the repetition penalty looks back over (llama-cpp-python's default)."""


@dataclass(frozen=True)
class SeqSpec:
    """One sequence to complete."""

    tokens: list[int]
    sampling: Sampling
    seed: int
    first_ban: tuple[int, ...] = ()
    """Token ids the first generated token may not be (`sampling.first_token_ban` resolved)."""


@dataclass
class SeqResult:
    """What one sequence produced."""

    text: str
    finish_reason: str
    completion_tokens: int
    top_logprobs: list[dict[str, float]] | None


@dataclass
class _Group:
    """Sequences with the same prompt; `shared` > 0 when a holder keeps prompt[:-1] for them."""

    tokens: list[int]
    members: list[int]
    shared: int = 0
    admitted: int = 0
    live: int = 0
    filler: _Live | None = None
    holder_ready: bool = False


@dataclass
class _Live:
    index: int
    spec: SeqSpec
    group: _Group
    slot: int
    pos: int
    feed: list[int]
    need: int
    sampler: internals.LlamaSampler
    stops: list[bytes]
    out: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    logprobs: list[dict[str, float]] | None = None
    result: SeqResult | None = None


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all `prompts` share, leaving each at least one token."""
    if not prompts:
        return 0
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return max(length, 0)


class BatchDecoder:
    """Runs sequences through one llama.cpp context with continuous batching.

    Args:
        llm: a loaded `llama_cpp.Llama` (its model, vocabulary and context settings are reused).
        n_seq: sequences decoded at once.
        n_cells: KV cache cells shared by all sequences (the unified cache's size).
        capacity: most tokens per `llama_decode`.
        n_threads: CPU threads.
        adaptive_threads: re-fit the thread count to the free cores while decoding.
        flash_attn: use llama.cpp's flash attention (faster here: it skips other sequences' cells).
    """

    def __init__(
        self,
        llm: Any,
        *,
        n_seq: int,
        n_cells: int,
        capacity: int,
        n_threads: int,
        flash_attn: bool = True,
        adaptive_threads: bool = False,
    ) -> None:
        self._llm = llm
        self._vocab = llm._model.vocab
        self.capacity = max(1, capacity)
        self.n_seq = max(1, min(n_seq, self.capacity, llama_cpp.llama_max_parallel_sequences() - 2))
        self.n_cells = n_cells
        self._root, self._holder = self.n_seq, self.n_seq + 1
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_cells
        params.n_batch = self.capacity
        params.n_ubatch = min(self.capacity, max(1, llm.context_params.n_ubatch))
        params.n_seq_max = self.n_seq + 2
        # llama.cpp sizes its output buffers for max(outputs, sequences) and asserts that fits
        # `n_outputs_max` (default n_batch): with one-token batches it would not.
        params.n_outputs_max = max(self.capacity, params.n_seq_max)
        params.kv_unified = True  # a copied prefix is shared cells, not a copy of them
        if flash_attn:  # the CPU kernel skips masked cells: cost follows a sequence's own length
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = n_threads
        try:
            with suppress_stdout_stderr(disable=False):  # a context-size notice, not an error
                self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise EngineError(
                f"llama.cpp could not make a context of {n_cells} KV cells for {self.n_seq} "
                "sequences: lower the engine options batch_size or kv_cells"
            ) from exc
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._governor = ThreadGovernor(self._ctx.ctx, n_threads) if adaptive_threads else None
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._kinds: dict[int, int] = {}

    # ------------------------------------------------------------------ public

    def run(
        self,
        specs: Sequence[SeqSpec],
        on_finish: Callable[[int, SeqResult], bool | None] | None = None,
    ) -> list[SeqResult | None]:
        """Complete every sequence; `on_finish(index, result)` is called as each one ends, and
        when it returns True the call stops: sequences not finished by then come back None."""
        results: list[SeqResult | None] = [None] * len(specs)
        if not specs:
            return []
        llama_cpp.llama_memory_clear(self._memory, False)
        root = common_prefix([s.tokens for s in specs])
        groups = self._groups(specs, root)
        self._eval_root(specs[0].tokens[:root])
        order = [(g, i) for g in groups for i in g.members]
        cells_used = root
        free = list(range(self.n_seq))
        running: list[_Live] = []
        queued = 0
        stopped = False
        while (queued < len(order) or running) and not stopped:
            # admit waiting sequences, in order, while a slot and their KV cells are free
            while queued < len(order) and free:
                group, index = order[queued]
                spec = specs[index]
                if group.shared and group.admitted and not group.holder_ready:
                    break  # the holder is filled after the group's first sequence is evaluated
                start = len(spec.tokens) - 1 if group.holder_ready else root
                opens_group = group.shared and not group.admitted
                need = len(spec.tokens) - start + spec.sampling.max_tokens + 1
                if group.shared:
                    need -= group.shared if opens_group else 0
                extra = group.shared if opens_group else 0
                if running and cells_used + need + extra > self.n_cells:
                    break
                cells_used += need + extra
                slot = free.pop(0)
                source = self._holder if group.holder_ready else self._root
                if start:
                    self._copy(source, slot, start)
                live = _Live(
                    index=index,
                    spec=spec,
                    group=group,
                    slot=slot,
                    pos=start,
                    feed=list(spec.tokens[start:]),
                    need=need,
                    sampler=self._sampler(spec),
                    stops=[s.encode("utf-8") for s in spec.sampling.stop if s],
                    logprobs=[] if spec.sampling.logprobs is not None else None,
                )
                group.admitted += 1
                group.live += 1
                if opens_group:
                    group.filler = live
                running.append(live)
                queued += 1
                if group.holder_ready and group.admitted == len(group.members):
                    llama_cpp.llama_memory_seq_rm(self._memory, self._holder, -1, -1)
                    group.holder_ready = False
            sampled = self._step(running)
            for live, batch_index in sampled:
                self._sample(live, batch_index)
            # a group's holder takes prompt[:-1] once its first sequence has evaluated it
            for live in running:
                group = live.group
                if group.filler is live and live.pos >= len(group.tokens) - 1:
                    llama_cpp.llama_memory_seq_rm(self._memory, self._holder, -1, -1)
                    self._copy(live.slot, self._holder, len(group.tokens) - 1)
                    group.filler = None
                    group.holder_ready = group.admitted < len(group.members)
            still = []
            for live in running:
                if live.result is None:
                    still.append(live)
                    continue
                llama_cpp.llama_memory_seq_rm(self._memory, live.slot, -1, -1)
                free.append(live.slot)
                free.sort()
                cells_used -= live.need
                live.group.live -= 1
                if live.group.live == 0 and live.group.admitted == len(live.group.members):
                    cells_used -= live.group.shared
                live.sampler.close()
                results[live.index] = live.result
                if on_finish is not None and on_finish(live.index, live.result):
                    stopped = True
            running = still
        for live in running:  # stopped early: drop the sequences still running
            llama_cpp.llama_memory_seq_rm(self._memory, live.slot, -1, -1)
            live.sampler.close()
        return results

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()

    # ------------------------------------------------------------------ scheduling

    def _groups(self, specs: Sequence[SeqSpec], root: int) -> list[_Group]:
        """Sequences grouped by prompt, groups in order of first appearance."""
        by_prompt: dict[tuple[int, ...], _Group] = {}
        for index, spec in enumerate(specs):
            key = tuple(spec.tokens)
            if key not in by_prompt:
                by_prompt[key] = _Group(tokens=spec.tokens, members=[])
            by_prompt[key].members.append(index)
        groups = list(by_prompt.values())
        for group in groups:
            if len(group.members) > 1 and len(group.tokens) - 1 > root:
                group.shared = len(group.tokens) - 1 - root
        return groups

    def _copy(self, source: int, target: int, upto: int) -> None:
        """Give sequence `target` the KV of positions [0, upto) of sequence `source`."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, upto)

    def _eval_root(self, tokens: list[int]) -> None:
        """Evaluate the shared prefix into the root sequence, no logits."""
        for start in range(0, len(tokens), self.capacity):
            chunk = tokens[start : start + self.capacity]
            self._fill([(t, start + k, self._root, False) for k, t in enumerate(chunk)])
            self._decode()

    def _step(self, running: list[_Live]) -> list[tuple[_Live, int]]:
        """One decode: a token of every generating sequence, then prompt chunks; who samples."""
        entries: list[tuple[int, int, int, bool]] = []
        sampled: list[tuple[_Live, int]] = []
        fed: list[tuple[_Live, int]] = []
        generating = [live for live in running if live.pos >= len(live.spec.tokens)]
        prefilling = [live for live in running if live.pos < len(live.spec.tokens)]
        for live in generating + prefilling:
            room = self.capacity - len(entries)
            if room <= 0:
                break
            chunk = live.feed[:room]
            for k, token in enumerate(chunk):
                last = k == len(chunk) - 1 and len(chunk) == len(live.feed)
                if last:
                    sampled.append((live, len(entries)))
                entries.append((token, live.pos + k, live.slot, last))
            fed.append((live, len(chunk)))
        self._fill(entries)
        self._decode()
        for live, count in fed:
            live.pos += count
            del live.feed[:count]
        return sampled

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)

    def _decode(self) -> None:
        if self._batch.n_tokens == 0:
            return
        if self._governor is not None:
            self._governor.tick()
        code = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        if code != 0:
            raise EngineError(
                f"llama_decode failed (code {code}): the KV cache is full; raise the engine "
                "option kv_cells or lower batch_size"
            )

    # ------------------------------------------------------------------ sampling

    def _sampler(self, spec: SeqSpec) -> internals.LlamaSampler:
        """The chain llama-cpp-python's create_completion builds for these settings."""
        sampling = spec.sampling
        chain = internals.LlamaSampler()
        chain.add_penalties(
            n_vocab=self._n_vocab,
            penalty_last_n=LAST_N_PENALTY,
            penalty_repeat=sampling.repetition_penalty,
            penalty_freq=0.0,
            penalty_present=0.0,
        )
        if sampling.json_schema is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(json.dumps(sampling.json_schema), verbose=False)
            chain.add_grammar(self._llm._model, grammar)
        if sampling.temperature == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(0)
            chain.add_typical(1.0, 1)
            chain.add_top_p(sampling.top_p, 1)
            chain.add_min_p(0.0, 1)
            chain.add_temp(sampling.temperature)
            chain.add_dist(spec.seed & 0xFFFFFFFF)
        return chain

    def _sample(self, live: _Live, batch_index: int) -> None:
        """Sample the next token of `live` from output `batch_index` and apply the stop rules."""
        sampling = live.spec.sampling
        if not live.out and (live.spec.first_ban or sampling.first_token_boost != 1.0):
            self._steer_first(live.spec, batch_index)
        if live.logprobs is not None:
            live.logprobs.append(self._top_logprobs(batch_index, sampling.logprobs or 0))
        token = llama_cpp.llama_sampler_sample(live.sampler.sampler, self._ctx.ctx, batch_index)
        kind = self._kind(token)
        if kind == _EOG:
            self._finish(live, "stop", bytes(live.text))
            return
        live.out.append(token)
        live.text += self._piece(token)
        hits = [s for s in live.stops if s in live.text]
        if hits:
            self._finish(live, "stop", bytes(live.text[: live.text.index(hits[0])]))
        elif len(live.out) >= sampling.max_tokens:
            self._finish(live, "length", bytes(live.text))
        elif kind == _CONTROL:
            self._finish(live, "stop", bytes(live.text))
        else:
            live.feed = [token]

    def _steer_first(self, spec: SeqSpec, batch_index: int) -> None:
        """Before the first token is sampled: divide its logits by the boost, ban the banned
        ids (in place, in llama.cpp's own logits buffer, which the sampler chain reads)."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, batch_index)
        row = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        if spec.sampling.first_token_boost != 1.0:
            row /= spec.sampling.first_token_boost
        if spec.first_ban:
            row[list(spec.first_ban)] = -np.inf

    def _finish(self, live: _Live, reason: str, text: bytes) -> None:
        live.result = SeqResult(
            text=text.decode("utf-8", errors="ignore"),
            finish_reason=reason,
            completion_tokens=len(live.out),
            top_logprobs=live.logprobs,
        )

    def _top_logprobs(self, batch_index: int, k: int) -> dict[str, float]:
        """Top-`k` log-probabilities at one output; tokens that render alike are merged."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, batch_index)
        row = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).astype(np.float64)
        shifted = row - row.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, min(k, len(logprobs) - 1))[:k]
        step: dict[str, float] = {}
        for token in sorted(best, key=lambda t: -logprobs[t]):
            text = self._llm.detokenize([int(token)], special=True).decode("utf-8", "replace")
            value = float(logprobs[token])
            step[text] = float(np.logaddexp(step[text], value)) if text in step else value
        return step

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._llm._model.detokenize([token], special=False)
            self._pieces[token] = piece
        return piece

    def _kind(self, token: int) -> int:
        kind = self._kinds.get(token)
        if kind is None:
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                kind = _EOG
            elif llama_cpp.llama_vocab_is_control(self._vocab, ctypes.c_int32(token)):
                kind = _CONTROL
            else:
                kind = _TEXT
            self._kinds[token] = kind
        return kind


_TEXT, _EOG, _CONTROL = 0, 1, 2
