"""The vectorized sampler of plain requests: the right distribution, per-sequence determinism."""

from __future__ import annotations

import numpy as np

from magpie.engines.base import Sampling
from magpie.engines.llamacpp_sampling import BLOCK, is_plain, new_generator, pick_tokens


def _logits(rows: int, vocab: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * 2).astype(np.float32)


def test_temperature_zero_is_argmax_with_first_index_on_ties():
    logits = _logits(3, 5000)
    logits[1, [7, 4000]] = 100.0  # a tie: the first index wins, as llama.cpp's greedy sampler
    tokens = pick_tokens(logits.copy(), [0.0, 0.0, 0.0], [new_generator(i) for i in range(3)])
    assert tokens == [int(np.argmax(logits[0])), 7, int(np.argmax(logits[2]))]


def test_draws_follow_softmax_over_temperature():
    vocab = 3 * BLOCK + 17  # several blocks and a short last one
    row = np.full(vocab, -30.0, dtype=np.float32)
    hot = {5: 2.0, BLOCK + 3: 1.0, 2 * BLOCK + 900: 0.0, 3 * BLOCK + 16: 1.5}
    for token, logit in hot.items():
        row[token] = logit
    temperature = 0.8
    weights = np.exp(np.array(list(hot.values())) / temperature)
    expected = dict(zip(hot, weights / weights.sum(), strict=True))
    rng = new_generator(123)
    draws = 4000
    counts: dict[int, int] = {}
    for _ in range(draws):
        token = pick_tokens(row[None, :].copy(), [temperature], [rng])[0]
        counts[token] = counts.get(token, 0) + 1
    assert set(counts) <= set(hot)  # tokens 30 logits below never come up
    for token, p in expected.items():
        assert abs(counts.get(token, 0) / draws - p) < 4 * np.sqrt(p * (1 - p) / draws)


def test_a_sequences_tokens_depend_on_its_seed_and_logits_not_on_its_neighbours():
    logits = _logits(4, 2 * BLOCK)
    alone = pick_tokens(logits[2:3].copy(), [1.0], [new_generator(42)])[0]
    mixed = pick_tokens(
        logits[[0, 2, 3]].copy(),
        [0.0, 1.0, 0.7],
        [new_generator(1), new_generator(42), new_generator(3)],
    )
    assert mixed[1] == alone
    again = pick_tokens(logits[2:3].copy(), [1.0], [new_generator(42)])[0]
    assert again == alone
    other_seeds = {pick_tokens(logits[2:3].copy(), [1.0], [new_generator(s)])[0] for s in range(20)}
    assert len(other_seeds) > 1  # the seed matters at temperature 1


def test_only_plain_settings_take_the_vectorized_path():
    assert is_plain(Sampling(temperature=1.0, top_p=1.0))
    assert is_plain(Sampling(temperature=0.0, top_p=0.9))  # greedy ignores top_p
    assert not is_plain(Sampling(temperature=1.0, top_p=0.9))
    assert not is_plain(Sampling(repetition_penalty=1.1))
    assert not is_plain(Sampling(temperature=0.0, json_schema={"type": "object"}))


def test_each_sequence_samples_from_its_own_logits_row_in_a_mixed_batch(engine, monkeypatch):
    """Plain, greedy, top-p and JSON-schema requests decoded together: the rows handed to the
    vectorized sampler are exactly those sequences' logits (llama.cpp's buffer or a copy)."""
    from magpie.engines import llamacpp_batch
    from magpie.engines.base import Request

    decoder = engine._decoder
    checked = {"steps": 0, "in_place": 0}
    real_rows = llamacpp_batch.BatchDecoder._rows

    def rows(self, batch_indices):
        got = real_rows(self, batch_indices)
        for row, index in zip(got, batch_indices, strict=True):
            assert np.array_equal(row, self._logits(index))
        checked["steps"] += 1
        checked["in_place"] += int(got.base is not None or not got.flags.owndata)
        return got

    monkeypatch.setattr(llamacpp_batch.BatchDecoder, "_rows", rows)
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}},
        "required": ["colour"],
    }
    requests = [
        Request(prompt, Sampling(temperature=1.0, max_tokens=12), seed=1),
        Request(prompt, Sampling(temperature=0.0, max_tokens=12, json_schema=schema), seed=2),
        Request(prompt, Sampling(temperature=0.0, max_tokens=12), seed=3),
        Request(prompt, Sampling(temperature=0.9, top_p=0.8, max_tokens=12), seed=4),
        Request(prompt, Sampling(temperature=0.7, max_tokens=12), seed=5, n=2),
    ]
    outputs = engine.generate(requests)
    assert decoder is engine._decoder and checked["steps"] > 0
    assert all(c.completion_tokens > 0 for out in outputs for c in out)
    plain_only = engine.generate([Request(prompt, Sampling(max_tokens=6), seed=9, n=3)])
    assert len(plain_only[0]) == 3 and checked["in_place"] > 0


def test_greedy_under_a_grammar_looks_at_top_tokens_first_and_picks_as_the_whole_grammar(engine):
    """The best allowed token found among the top tokens is the one the grammar applied to the
    whole vocabulary gives, for logits whose best tokens the grammar refuses."""
    import ctypes

    import llama_cpp

    decoder = engine._decoder
    schema = {"type": "object", "properties": {"verdict": {"enum": ["safe", "unsafe"]}}}
    spec = type("Spec", (), {"sampling": Sampling(temperature=0.0, json_schema=schema)})()
    grammar = decoder._grammar(spec)
    try:
        vocab = decoder._n_vocab
        rng = np.random.default_rng(0)
        brace = engine.tokenize("{")[0]
        for trial in range(12):
            logits = rng.standard_normal(vocab).astype(np.float32)
            if trial % 4 == 1:
                logits[brace] = logits.max() - 0.01  # allowed, second best (top 16)
            if trial % 4 == 2:
                logits[brace] = logits.max() + 1.0  # the best is allowed
            if trial % 4 == 3:
                logits[brace] = np.sort(logits)[-200] + 1e-4  # in the top 512
            whole = decoder._candidates(logits)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(whole[0]))
            expected = int(np.argmax(whole[1]["logit"]))
            assert decoder._greedy_allowed(grammar, logits) == expected
    finally:
        llama_cpp.llama_sampler_free(grammar)
