"""The llama.cpp engine on the real bundled SmolLM2 model."""

from __future__ import annotations

import pytest

from magpie.engines.base import (
    Engine,
    EngineError,
    Request,
    Sampling,
    create_engine,
    generate_until,
)
from magpie.engines.llamacpp import bundled_model_path
from magpie.engines.llamacpp_batch import SeqSpec, batch_layout, common_prefix, micro_batches

PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n"
)
SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_tokens=48, stop=("<|im_end|>",))


def test_bundled_model_ships_with_the_package() -> None:
    path = bundled_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_engine_protocol_and_model_info(engine) -> None:
    assert isinstance(engine, Engine)
    assert engine.info.bos_token == "<|im_start|>"
    assert engine.info.eos_token == "<|im_end|>"
    assert "<|im_start|>" in (engine.info.chat_template or "")
    assert engine.count_tokens(PRE_QUERY) == len(engine.tokenize(PRE_QUERY)) > 10


def test_same_seed_same_text_whatever_ran_before(engine) -> None:
    first = engine.generate([Request(PRE_QUERY, SAMPLING, seed=11)])[0][0]
    engine.generate([Request("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", SAMPLING, seed=5)])
    engine.generate([Request(PRE_QUERY, SAMPLING, seed=12)])
    again = engine.generate([Request(PRE_QUERY, SAMPLING, seed=11)])[0][0]
    assert first.text == again.text
    assert first.completion_tokens == again.completion_tokens > 0
    other = engine.generate([Request(PRE_QUERY, SAMPLING, seed=12)])[0][0]
    assert other.text != first.text


def test_n_samples_and_progress(engine) -> None:
    calls: list[tuple[int, int]] = []
    (samples,) = engine.generate(
        [Request(PRE_QUERY, SAMPLING, n=3, seed=1)], on_done=lambda r, t: calls.append((r, t))
    )
    assert len(samples) == 3
    assert len({s.text for s in samples}) == 3
    assert calls == [(1, sum(s.completion_tokens for s in samples))]


def test_max_tokens_gives_length_finish(engine) -> None:
    short = Sampling(temperature=1.0, max_tokens=3)
    (completion,) = engine.generate([Request(PRE_QUERY, short, seed=3)])[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 3


def test_greedy_reply_stops_at_end_of_turn(engine) -> None:
    prompt = PRE_QUERY + "Say hello.<|im_end|>\n<|im_start|>assistant\n"
    greedy = Sampling(temperature=0.0, max_tokens=64, stop=("<|im_end|>",))
    (completion,) = engine.generate([Request(prompt, greedy)])[0]
    assert completion.finish_reason == "stop"
    assert completion.text.strip()
    assert "<|im_end|>" not in completion.text


def test_json_schema_constrained_output(engine) -> None:
    schema = {
        "type": "object",
        "properties": {"difficulty": {"enum": ["easy", "medium", "hard"]}},
        "required": ["difficulty"],
    }
    prompt = (
        "<|im_start|>user\nRate the difficulty of 'what is 2+2' as JSON.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    sampling = Sampling(temperature=0.0, max_tokens=32, json_schema=schema)
    (completion,) = engine.generate([Request(prompt, sampling)])[0]
    import json

    assert json.loads(completion.text)["difficulty"] in {"easy", "medium", "hard"}


def test_unknown_engine_and_missing_model_are_clear_errors(tmp_path) -> None:
    with pytest.raises(EngineError, match="unknown engine 'nope'"):
        create_engine("nope")
    with pytest.raises(EngineError, match="--model"):
        create_engine("llamacpp", model=str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(EngineError, match="GGUF"):
        create_engine("llamacpp", model=str(bad))


def test_batched_call_is_reproducible_across_runs_and_thread_counts(engine) -> None:
    """More sequences than slots, prompts shared and not: same call, same texts, 1 or 2 threads."""
    from magpie.engines.llamacpp import LlamaCppEngine

    short = Sampling(temperature=1.0, max_tokens=10, stop=("<|im_end|>",))
    reply = PRE_QUERY + "Name a colour.<|im_end|>\n<|im_start|>assistant\n"
    requests = [Request(PRE_QUERY, short, seed=s) for s in range(3)]
    requests += [Request(reply, short, n=3, seed=40), Request(reply + "Blue", short, seed=9)]
    texts = []
    for threads in (1, 2):
        small = LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=threads)
        try:
            first = small.generate(requests)
            small.generate([Request("<|im_start|>user\nHi<|im_end|>\n", short, seed=1)])
            again = small.generate(requests)
        finally:
            small.close()
        assert [len(r) for r in first] == [1, 1, 1, 3, 1]
        assert [[c.text for c in r] for r in first] == [[c.text for c in r] for r in again]
        assert all(c.finish_reason in {"stop", "length"} for r in first for c in r)
        texts.append([[c.text for c in r] for r in first])
    assert texts[0] == texts[1]
    assert len(set(texts[0][3])) == 3  # the n samples of a request differ


def test_engine_exposes_runtime_and_batch_size(engine) -> None:
    assert engine.runtime.name and engine.runtime.max_batch_tokens >= 1
    assert engine.batch_size >= 1


def test_prompts_sharing_a_long_prefix_are_evaluated_once_with_the_same_results(engine) -> None:
    """A judge's prompts for the answers to one question share the question: they form one
    group whose prefix is evaluated once, and each still gets what it gets when run alone."""
    decoder = engine._decoder
    question = "Explain in two sentences why the sky is blue and why sunsets are red."
    answers = ["Light scatters.", "Because of the sea.", "I like cake.", "Rayleigh scattering."]
    prompts = [
        f"{PRE_QUERY}Rate the answer.\nQuestion: {q}\nAnswer: {a}<|im_end|>\n"
        "<|im_start|>assistant\nRating: "
        for q in (question, "What is the capital of France, and how many people live there?")
        for a in answers
    ]
    greedy = Sampling(temperature=0.0, max_tokens=2, logprobs=5)
    specs = [SeqSpec(engine.tokenize(p), greedy, 0) for p in prompts]
    groups = decoder._groups(specs, list(range(8)), common_prefix([s.tokens for s in specs]))
    # one group per question, sharing the question's tokens
    assert [g.members for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(g.shared >= 16 for g in groups)
    together = engine.generate([Request(p, greedy, seed=0) for p in prompts])
    for prompt, result in zip(prompts, together, strict=True):
        alone = engine.generate([Request(prompt, greedy, seed=0)])[0][0]
        assert result[0].text == alone.text
        assert result[0].top_logprobs == alone.top_logprobs


def test_admission_held_back_runs_sequences_one_after_another(engine) -> None:
    """`admit` False while others run: a sequence starts only when the one before it ended, so
    a short one queued after a long one finishes after it, with the text it has alone."""
    decoder = engine._decoder
    long = Sampling(temperature=0.0, max_tokens=24)
    short = Sampling(temperature=0.0, max_tokens=2)
    prompt = engine.tokenize(f"{PRE_QUERY}Count to ten.<|im_end|>\n<|im_start|>assistant\n")
    specs = [SeqSpec(prompt, long, 0), SeqSpec(prompt, short, 0)]
    free_order: list[int] = []
    decoder.run(specs, lambda index, result: free_order.append(index))
    assert free_order == [1, 0]  # together, the short one ends first
    held: list[int] = []
    results = decoder.run(specs, lambda index, result: held.append(index), lambda index: False)
    assert held == [0, 1]
    alone = decoder.run(specs[1:])[0]
    assert results[1] is not None and alone is not None and results[1].text == alone.text


def test_decodes_are_cut_as_llama_cpp_cuts_them_and_never_leave_a_token_alone() -> None:
    # three streams, the third with a prompt chunk: one token each, then the chunk's rest
    assert micro_batches({0: 1, 1: 1, 2: 3}, 512) == [
        [(0, 0, 1), (1, 0, 1), (2, 0, 1)],
        [(2, 1, 2)],
    ]
    # a gap in the ids starts a new micro-batch; n_ubatch caps tokens per micro-batch
    assert micro_batches({0: 2, 2: 2}, 512) == [[(0, 0, 2)], [(2, 0, 2)]]
    assert micro_batches({0: 4, 1: 4}, 4) == [[(0, 0, 2), (1, 0, 2)], [(0, 2, 2), (1, 2, 2)]]
    # a chunk of two beside generating streams would leave its second token alone: it waits
    assert batch_layout({0: 1, 1: 2}, 512) == [[(0, 0, 1), (1, 0, 1)]]
    assert batch_layout({0: 1, 1: 5, 2: 3}, 512) == micro_batches({0: 1, 1: 5, 2: 3}, 512)
    for cut in batch_layout({0: 1, 1: 2, 2: 4, 3: 2}, 512):
        assert sum(take for _, _, take in cut) >= 2


def test_a_sequence_gets_the_same_text_whatever_it_is_batched_with() -> None:
    """Each request alone, all together, with 3 slots, with 16 tokens per decode: the same
    texts and log-probabilities, sampled or greedy, for a prompt that shares nothing but the
    template, n samples sharing a prompt, and a prompt with more than 63 tokens of its own."""
    from magpie.engines.llamacpp import LlamaCppEngine

    story = "Tell me about the sea, its ships and the sailors who crossed it long ago. " * 6
    prompts = [
        PRE_QUERY + q + "<|im_end|>\n<|im_start|>assistant\n"
        for q in ("Name a colour.", "Why is the sky blue?", story)
    ]
    sampled = Sampling(temperature=1.0, max_tokens=16, stop=("<|im_end|>",), logprobs=2)
    greedy = Sampling(temperature=0.0, max_tokens=16, logprobs=2)
    requests = [Request(PRE_QUERY, sampled, seed=3), Request(prompts[0], sampled, n=3, seed=7)]
    requests += [Request(p, greedy, seed=0) for p in prompts[1:]]

    def outcome(results) -> list:
        return [[(c.text, c.top_logprobs) for c in r] for r in results]

    runs = {}
    for label, options in (
        ("32", {}),
        ("3 slots", {"batch_size": 3}),
        ("n_batch 16", {"n_batch": 16}),
    ):
        llm = LlamaCppEngine(n_ctx=1024, **options)
        try:
            runs[label] = outcome(llm.generate(requests))
            if label == "32":
                runs["alone"] = [outcome(llm.generate([r]))[0] for r in requests]
        finally:
            llm.close()
    assert runs["alone"] == runs["32"] == runs["3 slots"] == runs["n_batch 16"]
    assert len({text for text, _ in runs["32"][1]}) == 3


def test_spare_requests_run_ahead_and_the_next_call_takes_them_over(engine) -> None:
    """Spare requests fill the slots a call leaves free; the next call that asks for them gets
    the finished ones at once and continues the running ones, with the texts they get alone."""
    decoder = engine._decoder
    sampling = Sampling(temperature=1.0, max_tokens=40, stop=())
    short = Sampling(temperature=1.0, max_tokens=6, stop=())
    own = [Request(PRE_QUERY, sampling, seed=1), Request(PRE_QUERY, short, seed=2)]
    ahead = [Request(PRE_QUERY, s, seed=10 + i) for i, s in enumerate([short] * 3 + [sampling])]
    # one still running when the call ends: the first of 32 seeds whose text passes 100 tokens
    # (texts depend on the CPU's weights and kernels; any batch gives each its text alone)
    long = Sampling(temperature=1.0, max_tokens=300, stop=())
    candidates = [Request(PRE_QUERY, long, seed=seed) for seed in range(20, 52)]
    runs = [c.completion_tokens for (c,) in engine.generate(candidates)]
    ahead.append(next(r for r, n in zip(candidates, runs, strict=True) if n >= 100))
    alone = [engine.generate([r])[0][0].text for r in ahead]
    expected = [c.text for (c,) in engine.generate(own)]

    results = generate_until(engine, own, None, lambda i, c: False, spare=ahead)
    assert [c.text for (c,) in results] == expected  # type: ignore[misc]
    assert len(decoder._kept_results) >= 3  # the short ones finished in the call's slots
    assert len(decoder._kept) >= 1  # the long one was still running
    sampled = decoder.sampled_tokens
    again = engine.generate(ahead)
    assert [c.text for (c,) in again] == alone
    assert decoder.sampled_tokens - sampled < sum(c.completion_tokens + 1 for (c,) in again)
    assert decoder._kept == [] and decoder._kept_results == {}

    generate_until(engine, own, None, lambda i, c: False, spare=ahead)
    assert [c.text for (c,) in engine.generate(own)] == expected  # what was kept is dropped
    assert decoder._kept == [] and decoder._kept_results == {}
