"""Continuous batching on llama.cpp's low-level API: many sequences decoded in one `llama_batch`.

One `BatchDecoder.run` call completes a list of sequences (a prompt, its sampling and seed each):
- the longest prefix common to every prompt is evaluated once, in its own sequence (the *root*),
  and every sequence starts from a copy of it (in a unified KV cache a copy only tags cells);
- sequences with the same prompt (the n samples of a request, identical instruction queries)
  share it: the first one evaluates it, a *holder* sequence keeps prompt[:-1], later ones copy
  that and evaluate only the last prompt token; a run of different prompts that share more than
  the root (a judge's prompts for the answers to one instruction) shares that longer prefix the
  same way, each then evaluating only its own rest;
- up to `n_seq` sequences decode together; each step feeds one token of every running sequence
  plus prompt chunks of newly admitted ones (at most `capacity` tokens in all, and for exact
  requests at most `STREAM_CHUNK` of one sequence); a finished sequence's slot goes to the next
  waiting one (admitted in order);
- slots the call's own sequences leave free (its tail) may run *spare* sequences, which the next
  call will likely ask for: what they reach is kept, and the next call that asks for the same
  sequence takes it over (finished, or running on its slot) instead of starting it again;
- every sequence has its own KV stream (llama.cpp's non-unified cache), sized per call for the
  longest prompt + max_tokens: attention then reads only a sequence's own cells. (A unified
  cache makes every token scan every sequence's cells: at 64 sequences that scan cost more than
  the model itself.) Copying a prefix between streams copies the stream, then trims it;
- plain requests (temperature, top_p = 1, no penalty, no grammar) are sampled together with
  numpy, each from its own seeded generator (`llamacpp_sampling`); the others have their own
  sampler chain (the chain llama-cpp-python builds: penalties, then greedy or
  top-k/typical/top-p/min-p/temperature/dist with its seed); a JSON schema's grammar checks the
  pick and is applied to the whole vocabulary only when it refuses it; the first generated
  token's logits can be steered first (banned ids, a temperature boost).

Determinism: a call's results depend only on its sequences and the decoder's settings, not on
what ran before nor on the thread count. An exact request (`Sampling.exact`, the default) goes
further: its results depend only on its prompt, sampling and seed (and the model, weights type,
KV type and CPU kernels), not on what it is decoded with, `batch_size` or `n_batch` (2 or more).
llama.cpp's CPU kernels compute a token the same way in any batch except in three cases, which
the decoder keeps out: a micro-batch of one token (a vector kernel instead of the matrix one;
`_decode` adds a companion token), a micro-batch with one row of logits (the last layer then runs
on that row alone; `_step` asks for a second row) and 64 or more tokens of one sequence in a
micro-batch (tiled flash attention: exact requests are fed in chunks of `STREAM_CHUNK`). See
`batch_layout` for how llama.cpp cuts a decode into micro-batches.
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
from magpie.engines.llamacpp_sampling import is_plain, new_generator, pick_tokens
from magpie.signals import raise_pending

LAST_N_PENALTY = 64
"""Tokens the repetition penalty looks back over (llama-cpp-python's default)."""
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
"""KV cache types (ggml type ids). `q8_0` stores 8-bit values with a scale per 32 (half of F16)."""
KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32}


def check_kv_type(kv_type: str) -> str:
    """`kv_type` if it names a KV cache type, else the one-line error that says which do."""
    if kv_type not in KV_TYPES:
        raise EngineError(
            f"kv_type={kv_type!r} is not a KV cache type: use one of {', '.join(KV_TYPES)}"
        )
    return kv_type


MIN_GROUP_PREFIX = 16
"""Fewest tokens beyond the root that different prompts must share to be evaluated once."""
STREAM_CHUNK = 63
"""Most tokens of one exact sequence per decode: llama.cpp's CPU flash attention computes 64 or
more query tokens of a stream with a tiled kernel, faster for long prompts, whose results differ
slightly. (With llama.cpp's own row kernel a CPU judge's long prompts ran 25-45% slower fed
this way, so a judge is inexact there; with ours, `scripts/fa_rows.cpp`, as fast.)"""
MIN_STREAM_CELLS = 256
"""Smallest KV stream; streams grow in powers of two, so calls of similar length share a context."""


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
    """Sequences whose prompts share their first `span` tokens: the same prompt (span =
    len - 1), or single prompts in a row that share a prefix beyond the root (the judgements of
    one instruction's answers). `shared` > 0 when a holder keeps those tokens for them."""

    tokens: list[int]
    members: list[int]
    span: int = 0
    once: bool = False
    """Its prompts are asked once each (a group of different prompts, or one alone)."""
    shared: int = 0
    admitted: int = 0
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
    sampler: internals.LlamaSampler | None
    """llama.cpp's chain (None when the request samples plainly: `rng` draws its tokens)."""
    rng: np.random.Generator | None
    grammar: Any
    """A grammar sampler checked after the chain (None without a JSON schema)."""
    stops: list[bytes]
    out: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    logprobs: list[dict[str, float]] | None = None
    result: SeqResult | None = None


def micro_batches(counts: dict[int, int], n_ubatch: int) -> list[list[tuple[int, int, int]]]:
    """How llama.cpp cuts a decode of `counts` tokens per sequence id (fed in id order) into
    micro-batches when every sequence has its own KV stream (`split_equal`): each takes a run of
    consecutive ids and the same number of tokens from each, as many as all of them have left
    (at most `n_ubatch` in all). Each micro-batch: (sequence, first token, tokens) per member."""
    left = dict(counts)
    done = dict.fromkeys(counts, 0)
    cuts: list[list[tuple[int, int, int]]] = []
    while any(left.values()):
        run: list[int] = []
        for seq in sorted(s for s, n in left.items() if n):
            if run and seq != run[-1] + 1:
                break
            run.append(seq)
        take = max(1, min(min(left[s] for s in run), n_ubatch // len(run)))
        cuts.append([(seq, done[seq], take) for seq in run])
        for seq in run:
            left[seq] -= take
            done[seq] += take
    return cuts


def batch_layout(counts: dict[int, int], n_ubatch: int) -> list[list[tuple[int, int, int]]]:
    """The micro-batches of a decode that wants `counts` tokens per sequence (at least 1 each),
    feeding fewer tokens of a prompt where needed so that none holds a single token.

    llama.cpp's CPU matrix product runs one row with a vector kernel and two or more with a
    matrix kernel, whose sums round differently: were a sequence ever computed alone in a
    micro-batch, its text would depend on what it was batched with. (A lone token that is all
    a decode holds gets a companion in `BatchDecoder._decode`; rows of logits are made two or
    more in `BatchDecoder._step`.)"""
    counts = dict(counts)
    while True:
        cuts = micro_batches(counts, n_ubatch)
        lone = next((c[0][0] for c in cuts if len(c) == 1 and c[0][2] == 1 and c[0][1]), None)
        if lone is None:
            return cuts
        counts[lone] -= 1  # the rest of its prompt waits for the next decode


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
        n_seq: sequences decoded at once (fewer when the KV budget cannot hold that many streams
            of a call's length).
        n_cells: KV budget: cells of all streams together.
        capacity: most tokens per `llama_decode`.
        n_threads: CPU threads.
        adaptive_threads: re-fit the thread count to the free cores while decoding.
        flash_attn: use llama.cpp's flash attention (a quantized KV cache needs it).
        kv_type: type of the cached keys and values: `f16` or `q8_0` (see `KV_TYPES`).
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
        kv_type: str = "f16",
    ) -> None:
        check_kv_type(kv_type)
        if kv_type != "f16" and not flash_attn:
            raise EngineError(f"kv_type={kv_type!r} needs flash attention")
        self._llm = llm
        self._vocab = llm._model.vocab
        self.capacity = max(1, capacity)
        self.n_seq = max(1, min(n_seq, self.capacity, llama_cpp.llama_max_parallel_sequences() - 2))
        self._chunk = min(STREAM_CHUNK, self.capacity)
        self._n_ubatch = min(self.capacity, max(1, llm.context_params.n_ubatch))
        self.n_cells = n_cells
        self._flash_attn, self._threads, self._adaptive = flash_attn, n_threads, adaptive_threads
        self.kv_type = kv_type
        self._ctx: Any = None
        self._memory: Any = None
        self._governor: ThreadGovernor | None = None
        self.stream_cells = 0
        self.sampled_tokens = 0
        """Tokens sampled so far, by every sequence (also those a stop rule dropped unfinished)."""
        self.decodes = 0
        """`llama_decode` calls so far (a measure of batching that does not depend on timing)."""
        self._slots = 0
        self._root = self._holder = 0
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._kinds: dict[int, int] = {}
        self._grammars: dict[str, tuple[bytes, bytes]] = {}
        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._kept: list[_Live] = []
        """Spare sequences a call left running (on their slots), for the next call."""
        self._kept_results: dict[tuple[Any, ...], SeqResult] = {}
        """Spare sequences a call finished, by `_seq_key`, for the next call."""
        self._context_for(MIN_STREAM_CELLS)

    def _context_for(self, need: int) -> None:
        """Make sure the context has streams of at least `need` cells (rebuilt when smaller)."""
        if self._ctx is not None and self.stream_cells >= need:
            return
        cells = MIN_STREAM_CELLS
        while cells < need:
            cells *= 2
        slots = max(1, min(self.n_seq, self.n_cells // cells - 2))
        llm = self._llm
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = slots + 2  # + the root (shared prefix) and the holder (shared prompt)
        params.n_ctx = cells * params.n_seq_max
        params.n_batch = self.capacity
        params.n_ubatch = self._n_ubatch
        # llama.cpp sizes its output buffers for max(outputs, sequences) and asserts that fits
        # `n_outputs_max` (default n_batch): with one-token batches it would not.
        params.n_outputs_max = max(self.capacity, params.n_seq_max)
        params.kv_unified = False  # a stream per sequence: attention reads only its own cells
        params.type_k = params.type_v = KV_TYPES[self.kv_type]
        if self._flash_attn:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = self._threads
        self._drop_kept()  # running sequences live in the context's KV
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        try:
            with suppress_stdout_stderr(disable=False):  # a context-size notice, not an error
                self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise EngineError(
                f"llama.cpp could not make a context of {slots + 2} KV streams of {cells} cells: "
                "lower the engine options batch_size or kv_cells, or max_tokens"
            ) from exc
        self.stream_cells, self._slots = cells, slots
        self._root, self._holder = slots, slots + 1
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        if self._adaptive:
            threads = self._governor.threads if self._governor is not None else self._threads
            self._governor = ThreadGovernor(self._ctx.ctx, threads)
            llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)

    # ------------------------------------------------------------------ public

    def run(
        self,
        specs: Sequence[SeqSpec],
        on_finish: Callable[[int, SeqResult], bool | None] | None = None,
        admit: Callable[[int], bool] | None = None,
        spare: Sequence[SeqSpec] = (),
    ) -> list[SeqResult | None]:
        """Complete every sequence; `on_finish(index, result)` is called as each one ends, and
        when it returns True the call stops: sequences not finished by then come back None.
        `admit(index)`, when given, is asked before sequence `index` starts while others run:
        False holds it (and those after it) back until more have finished.

        `spare` sequences (those a later call will likely ask for; `admit` is asked for them
        too, as indices after `specs`) take the slots the others leave free; the call does not
        wait for them. Each one's result, or its state where it is still running, is kept for
        the next call, which takes it over where it asks for the same sequence (the same
        prompt, sampling and seed); anything else kept is dropped then. Only exact sequences
        are worth it: their results do not depend on when they ran."""
        results: list[SeqResult | None] = [None] * len(specs)
        if not specs:
            return []
        every = [*specs, *spare]
        self._context_for(max(len(s.tokens) + s.sampling.max_tokens + 1 for s in every))
        running, finished = self._take_kept(every)
        stopped = False
        for index in sorted(i for i in finished if i < len(specs)):  # finished in a last call
            results[index] = finished[index]
            if on_finish is not None and on_finish(index, finished[index]):
                stopped = True
                break
        fresh = [i for i in range(len(every)) if i not in finished and i not in running]
        running_list = list(running.values())
        root = common_prefix([every[i].tokens for i in fresh])
        groups = self._groups(every, fresh, root)
        exact = any(every[i].sampling.exact for i in fresh)
        if fresh and not stopped:
            self._eval_root(every[fresh[0]].tokens[:root], self._chunk if exact else self.capacity)
        order = [(g, i) for g in groups for i in g.members if i < len(specs)]
        spares = [(g, i) for g in groups for i in g.members if i >= len(specs)]
        taken = {live.slot for live in running_list}
        free = [slot for slot in range(self._slots) if slot not in taken]
        queued = extra = 0

        def wanted() -> bool:
            return queued < len(order) or any(live.index < len(specs) for live in running_list)

        while wanted() and not stopped:
            raise_pending()  # an interrupt a llama.cpp log callback swallowed
            # admit waiting sequences, in order, while a slot is free; spares fill slots the
            # others leave free
            while free:
                if queued < len(order):
                    group, index = order[queued]
                    own = any(live.index < len(specs) for live in running_list)
                    if (admit is None or not own or admit(index)) and self._ready(group):
                        running_list.append(self._start(group, index, every[index], root, free))
                        queued += 1
                        continue
                if extra < len(spares) and self._ready(spares[extra][0]):
                    group, index = spares[extra]
                    if admit is not None and not admit(index):
                        break
                    running_list.append(self._start(group, index, every[index], root, free))
                    extra += 1
                    continue
                break
            self._compact(running_list, free)
            self._sample(self._step(running_list))
            # a group's holder takes its shared span once its first sequence has evaluated it
            for live in running_list:
                group = live.group
                if group.filler is live and live.pos >= group.span:
                    llama_cpp.llama_memory_seq_rm(self._memory, self._holder, -1, -1)
                    self._copy(live.slot, self._holder, group.span)
                    group.filler = None
                    group.holder_ready = group.admitted < len(group.members)
            still = []
            for live in running_list:
                if live.result is None:
                    still.append(live)
                    continue
                llama_cpp.llama_memory_seq_rm(self._memory, live.slot, -1, -1)
                free.append(live.slot)
                free.sort()
                self._release(live)
                if live.index >= len(specs):
                    self._kept_results[_seq_key(live.spec)] = live.result
                    continue
                results[live.index] = live.result
                if on_finish is not None and on_finish(live.index, live.result):
                    stopped = True
            running_list = still
        for live in running_list:
            if live.index >= len(specs):  # a spare still running: the next call may take it
                self._kept.append(live)
                continue
            llama_cpp.llama_memory_seq_rm(self._memory, live.slot, -1, -1)
            self._release(live)
        for index, result in finished.items():  # spare results nobody asked for yet
            if index >= len(specs):
                self._kept_results[_seq_key(every[index])] = result
        return results

    def _take_kept(self, every: Sequence[SeqSpec]) -> tuple[dict[int, _Live], dict[int, SeqResult]]:
        """What the last call kept of the sequences asked for now: those still running (by
        index, on their slots) and those finished. Everything else kept is dropped, and every
        KV stream but those of the running ones is cleared."""
        kept, self._kept = self._kept, []
        done, self._kept_results = self._kept_results, {}
        where: dict[tuple[Any, ...], list[int]] = {}
        for index, spec in enumerate(every):
            where.setdefault(_seq_key(spec), []).append(index)
        running: dict[int, _Live] = {}
        finished: dict[int, SeqResult] = {}
        for key, result in done.items():
            if where.get(key):
                finished[where[key].pop(0)] = result
        for live in kept:
            indices = where.get(_seq_key(live.spec))
            if indices:
                live.index = indices.pop(0)
                live.group = _Group(tokens=live.spec.tokens, members=[live.index])
                running[live.index] = live
            else:
                self._release(live)
        if running:
            slots = {live.slot for live in running.values()}
            for seq in range(self._slots + 2):
                if seq not in slots:
                    llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        else:
            llama_cpp.llama_memory_clear(self._memory, False)
        return running, finished

    def _ready(self, group: _Group) -> bool:
        """Whether the group's next sequence may start (a holder is filled after the group's
        first sequence has evaluated the shared span)."""
        return not (group.shared and group.admitted and not group.holder_ready)

    def _start(self, group: _Group, index: int, spec: SeqSpec, root: int, free: list[int]) -> _Live:
        """Start sequence `index` on the first free slot, from the holder's or the root's KV."""
        start = group.span if group.holder_ready else root
        opens_group = group.shared and not group.admitted
        slot = free.pop(0)
        source = self._holder if group.holder_ready else self._root
        plain = is_plain(spec.sampling)
        if start:
            self._copy(source, slot, start)
        live = _Live(
            index=index,
            spec=spec,
            group=group,
            slot=slot,
            pos=start,
            feed=list(spec.tokens[start:]),
            sampler=None if plain else self._sampler(spec),
            rng=new_generator(spec.seed) if plain else None,
            grammar=self._grammar(spec),
            stops=[s.encode("utf-8") for s in spec.sampling.stop if s],
            logprobs=[] if spec.sampling.logprobs is not None else None,
        )
        group.admitted += 1
        if opens_group:
            group.filler = live
        if group.holder_ready and group.admitted == len(group.members):
            llama_cpp.llama_memory_seq_rm(self._memory, self._holder, -1, -1)
            group.holder_ready = False
        return live

    def close(self) -> None:
        self._drop_kept()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    # ------------------------------------------------------------------ scheduling

    def _groups(self, specs: Sequence[SeqSpec], indices: list[int], root: int) -> list[_Group]:
        """The sequences `indices` of `specs` grouped by prompt, groups in order of first
        appearance; then a run of prompts asked once each joins one group over their common
        prefix, when it is MIN_GROUP_PREFIX tokens or more beyond the root and joining saves
        more tokens than a shorter common prefix loses."""
        by_prompt: dict[tuple[int, ...], _Group] = {}
        for index in indices:
            spec = specs[index]
            key = tuple(spec.tokens)
            if key not in by_prompt:
                by_prompt[key] = _Group(tokens=spec.tokens, members=[])
            by_prompt[key].members.append(index)
        groups: list[_Group] = []
        for group in by_prompt.values():
            group.span = len(group.tokens) - 1
            last = groups[-1] if groups else None
            if last is not None and last.once and len(group.members) == 1:
                span = min(common_prefix([last.tokens, group.tokens]), last.span)
                # joining saves `span - root` tokens; a shorter span costs each later member
                # of `last` what it no longer shares
                lost = (len(last.members) - 1) * (last.span - span)
                if span - root >= MIN_GROUP_PREFIX and span - root > lost:
                    last.members.extend(group.members)
                    last.span = span
                    continue
            group.once = len(group.members) == 1
            groups.append(group)
        for group in groups:
            if len(group.members) > 1 and group.span > root:
                group.shared = group.span - root
        return groups

    def _compact(self, running: list[_Live], free: list[int]) -> None:
        """Move the sequences of the highest slots into free lower ones, so the running slots
        are 0..k-1: a gap in the sequence ids splits every decode into two passes."""
        for live in sorted(running, key=lambda item: item.slot, reverse=True):
            if not free or free[0] > live.slot:
                break
            target = free.pop(0)
            self._copy(live.slot, target, live.pos)
            llama_cpp.llama_memory_seq_rm(self._memory, live.slot, -1, -1)
            free.append(live.slot)
            free.sort()
            live.slot = target

    def _copy(self, source: int, target: int, upto: int) -> None:
        """Give sequence `target` the KV of positions [0, upto) of sequence `source`: streams are
        copied whole (llama.cpp copies nothing less between streams), then trimmed."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, target, upto, -1)

    def _eval_root(self, tokens: list[int], most: int) -> None:
        """Evaluate the shared prefix into the root sequence, no logits, in chunks of at most
        `most` tokens and (when there are two or more) never of one token."""
        count = -(-len(tokens) // most) if tokens else 0
        start = 0
        for number in range(count):
            size = (len(tokens) - start) // (count - number)
            chunk = tokens[start : start + size]
            self._decode([(t, start + k, self._root, False) for k, t in enumerate(chunk)])
            start += size

    def _step(self, running: list[_Live]) -> list[tuple[_Live, int]]:
        """One decode: every running sequence's next token and prompt chunks of those still
        prefilling, laid out so that no micro-batch holds a single token or a single row of
        logits (see `batch_layout`); returns who samples and at which batch index."""
        by_slot = {live.slot: live for live in running}
        counts = dict.fromkeys(sorted(by_slot), 1)  # all fed: slots 0..k-1 stay one run
        room = self.capacity - len(running)
        for live in running:  # prompt chunks, in admission order
            if room > 0 and live.pos < len(live.spec.tokens):
                chunk = self._chunk if live.spec.sampling.exact else self.capacity
                more = min(room, len(live.feed), chunk) - 1
                counts[live.slot] += more
                room -= more
        cuts = batch_layout(counts, self._n_ubatch)
        fed = {seq: 0 for seq in counts}
        for cut in cuts:
            for seq, _, take in cut:
                fed[seq] += take
        entries: list[tuple[int, int, int, bool]] = []
        index: dict[tuple[int, int], int] = {}
        sampled: list[tuple[_Live, int]] = []
        for slot, count in fed.items():
            live = by_slot[slot]
            for k, token in enumerate(live.feed[:count]):
                last = k == count - 1 and count == len(live.feed)
                if last:
                    sampled.append((live, len(entries)))
                index[slot, k] = len(entries)
                entries.append((token, live.pos + k, slot, last))
        for cut in cuts:  # a micro-batch with one row of logits gets a second one
            rows = [index[seq, first + k] for seq, first, take in cut for k in range(take)]
            if len(rows) > 1 and sum(entries[i][3] for i in rows) == 1:
                spare = next(i for i in rows if not entries[i][3])
                entries[spare] = (*entries[spare][:3], True)
        self._decode(entries)
        for slot, count in fed.items():
            by_slot[slot].pos += count
            del by_slot[slot].feed[:count]
        return sampled

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One `llama_decode` of (token, position, sequence, wants logits) entries. A lone token
        gets a companion in the next sequence, removed afterwards: llama.cpp computes a
        one-token micro-batch with other kernels (see `batch_layout`)."""
        if not entries:
            return
        pad = None
        if len(entries) == 1 and self.capacity >= 2:
            seq = entries[0][2] + 1
            pad = (seq, llama_cpp.llama_memory_seq_pos_max(self._memory, seq) + 1)
            entries = [*entries, (entries[0][0], pad[1], seq, entries[0][3])]
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        if self._governor is not None:
            self._governor.tick()
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        self.decodes += 1
        if pad is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, pad[0], pad[1], -1)
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

    def _grammar(self, spec: SeqSpec) -> Any:
        """The grammar sampler of a JSON-schema request (grammars compiled once per schema)."""
        schema = spec.sampling.json_schema
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            self._grammars[key] = (grammar._grammar.encode(), grammar._root.encode())
        text, root = self._grammars[key]
        return llama_cpp.llama_sampler_init_grammar(self._vocab, text, root)

    def _drop_kept(self) -> None:
        """Forget the running spare sequences a call left (their KV goes with the context)."""
        for live in self._kept:
            self._release(live)
        self._kept = []

    def _release(self, live: _Live) -> None:
        if live.sampler is not None:
            live.sampler.close()
            live.sampler = None
        if live.grammar is not None:
            llama_cpp.llama_sampler_free(live.grammar)
            live.grammar = None

    def _constrained(self, live: _Live, batch_index: int) -> int:
        """Sample under the grammar, lazily. Greedy: the best token the grammar allows, looked
        for among the top tokens first (`_greedy_allowed`). Else the chain picks from all
        tokens and the grammar checks that one; only when it refuses is the grammar applied to
        the whole vocabulary and the chain run again. (The grammar costs ~13 ms over SmolLM2's
        49K tokens and ~0.01 ms for one; the picks are those of the grammar applied first.)"""
        assert live.sampler is not None
        sampling = live.spec.sampling
        logits = self._logits(batch_index)
        if sampling.temperature == 0.0 and sampling.repetition_penalty == 1.0:
            token = self._greedy_allowed(live.grammar, logits)
        else:
            chain = live.sampler.sampler
            token = self._apply(chain, self._candidates(logits))
            one = self._candidates(None, np.array([token]))
            llama_cpp.llama_sampler_apply(live.grammar, ctypes.byref(one[0]))
            if one[1][0]["logit"] == -np.inf:
                cur = self._candidates(logits)
                llama_cpp.llama_sampler_apply(live.grammar, ctypes.byref(cur[0]))
                token = self._apply(chain, cur)
            llama_cpp.llama_sampler_accept(chain, token)
        llama_cpp.llama_sampler_accept(live.grammar, token)
        return token

    def _greedy_allowed(self, grammar: Any, logits: np.ndarray) -> int:
        """The highest-logit token the grammar allows, the first id on ties (llama.cpp's greedy
        pick after the grammar). The grammar checks the top 1, 16 and 512 tokens before the
        whole vocabulary: a model often wants a token the grammar refuses (a quote style, a
        space), and its best allowed token is nearly always among the next few."""
        for k in (1, 16, 512, self._n_vocab):
            if k == 1:
                ids = np.array([np.argmax(logits)])
            elif k < self._n_vocab:
                ids = np.argpartition(logits, -k)[-k:]
            else:
                ids = None
            cur = self._candidates(logits, ids)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur[0]))
            allowed = cur[1]["logit"] != -np.inf
            if not allowed.any():
                continue
            best = cur[1]["logit"][allowed].max()
            # tokens outside the top k have logits <= its lowest: strictly above it, none ties
            if ids is None or k == 1 or best > logits[ids].min():
                return int(cur[1]["id"][allowed & (cur[1]["logit"] == best)].min())
        raise EngineError("the JSON grammar allows no token: the schema cannot be completed")

    def _candidates(self, logits: Any, ids: np.ndarray | None = None) -> tuple[Any, np.ndarray]:
        """A `llama_token_data_array` over all tokens (or over `ids`) with their logits (0 when
        `logits` is None), and its buffer."""
        if ids is None:
            data = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
            data["id"] = self._token_ids
            data["logit"] = logits
        else:
            data = np.empty(len(ids), dtype=_TOKEN_DATA)
            data["id"] = ids
            data["logit"] = 0.0 if logits is None else logits[ids]
        data["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(data),
            selected=-1,
            sorted=False,
        )
        return array, data

    @staticmethod
    def _apply(chain: Any, cur: tuple[Any, np.ndarray]) -> int:
        """Run a sampler chain over candidates; the token it selects (without accepting it)."""
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur[0]))
        return int(cur[1][cur[0].selected]["id"])

    def _sample(self, sampled: list[tuple[_Live, int]]) -> None:
        """Sample the next token of every sequence that has logits at its batch index: plain
        requests all at once (`llamacpp_sampling`), the others through llama.cpp's chain."""
        self.sampled_tokens += len(sampled)
        plain: list[tuple[_Live, int]] = []
        for live, batch_index in sampled:
            sampling = live.spec.sampling
            if not live.out and (live.spec.first_ban or sampling.first_token_boost != 1.0):
                self._steer_first(live.spec, batch_index)
            if live.logprobs is not None:
                live.logprobs.append(self._top_logprobs(batch_index, sampling.logprobs or 0))
            if live.rng is not None:
                plain.append((live, batch_index))
            elif live.grammar is not None:
                self._advance(live, self._constrained(live, batch_index))
            else:
                assert live.sampler is not None
                chain = live.sampler.sampler
                self._advance(
                    live, llama_cpp.llama_sampler_sample(chain, self._ctx.ctx, batch_index)
                )
        if plain:
            tokens = pick_tokens(
                self._rows([batch_index for _, batch_index in plain]),
                [live.spec.sampling.temperature for live, _ in plain],
                [live.rng for live, _ in plain if live.rng is not None],
            )
            for (live, _), token in zip(plain, tokens, strict=True):
                self._advance(live, token)

    def _rows(self, batch_indices: list[int]) -> np.ndarray:
        """The logits rows of these outputs, to be overwritten: llama.cpp's own buffer when they
        are all its rows in order (the usual step), else a copy."""
        ctx = self._ctx.ctx
        pointer = llama_cpp.llama_get_logits(ctx)
        width = self._n_vocab * ctypes.sizeof(ctypes.c_float)
        order = [
            (_address(llama_cpp.llama_get_logits_ith(ctx, i)) - _address(pointer)) // width
            for i in batch_indices
        ]
        whole = np.ctypeslib.as_array(pointer, shape=(max(order) + 1, self._n_vocab))
        return whole if order == list(range(len(whole))) else whole[order]

    def _logits(self, batch_index: int) -> np.ndarray:
        """The logits row of one output (a view of llama.cpp's buffer)."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _advance(self, live: _Live, token: int) -> None:
        """Take the sampled `token` into `live` and apply the stop rules."""
        sampling = live.spec.sampling
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
        row = self._logits(batch_index)
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
        row = self._logits(batch_index).astype(np.float64)
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


def _seq_key(spec: SeqSpec) -> tuple[Any, ...]:
    """What makes two sequences the same: prompt, sampling, seed and first-token ban."""
    return (tuple(spec.tokens), repr(spec.sampling), spec.seed, spec.first_ban)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


_TEXT, _EOG, _CONTROL = 0, 1, 2
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""The memory layout of llama.cpp's `llama_token_data`."""
