"""The LLM-as-judge reward backend: rating arithmetic by hand, then the real bundled model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from magpie.engines.base import Request, Sampling
from magpie.errors import MagpieError
from magpie.rewards.classifier import RewardModelError
from magpie.rewards.judge import (
    JudgeError,
    JudgeRewardModel,
    expected_rating,
    load_judge,
    parse_conversation,
    parse_judge_spec,
    rating_distribution,
    rating_masses,
    ten_after_one,
)


def logs(probs: dict[str, float]) -> dict[str, float]:
    return {token: math.log(p) for token, p in probs.items()}


def chat(instruction: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


# --------------------------------------------------------------------------- arithmetic


def test_rating_masses_merge_whitespace_variants_and_skip_other_tokens() -> None:
    step = logs(
        {"7": 0.3, " 7": 0.1, "\n7": 0.05, "1": 0.2, "<|im_end|>": 0.1, "7.": 0.1, "x": 0.1}
    )
    masses = rating_masses(step, (1, 10))
    assert masses.keys() == {"7", "1"}
    assert masses["7"] == pytest.approx(0.45)
    assert masses["1"] == pytest.approx(0.2)


def test_ten_after_one_counts_only_a_following_zero() -> None:
    step = logs({"0": 0.2, "0/": 0.1, "0.": 0.05, " 0": 0.1, "00": 0.1, "\n": 0.3, "/": 0.1})
    assert ten_after_one(step) == pytest.approx(0.35)
    assert ten_after_one({}) == 0.0


def test_one_is_split_into_one_and_ten() -> None:
    masses = rating_masses(logs({"1": 0.5, "7": 0.3, " 7": 0.1, "<|im_end|>": 0.05}), (1, 10))
    dist = rating_distribution(masses, p_ten=0.2, scale=(1, 10))
    # 1: 0.5 * 0.8 = 0.4, 10: 0.5 * 0.2 = 0.1, 7: 0.4; total 0.9
    assert dist == pytest.approx({1: 0.4 / 0.9, 7: 0.4 / 0.9, 10: 0.1 / 0.9})
    assert expected_rating(dist) == pytest.approx((0.4 * 1 + 0.4 * 7 + 0.1 * 10) / 0.9)


def test_unsplit_one_is_left_out_and_single_ten_token_counts_as_ten() -> None:
    masses = rating_masses(logs({"1": 0.01, "8": 0.6, "10": 0.2}), (1, 10))
    dist = rating_distribution(masses, p_ten=None, scale=(1, 10))
    assert dist == pytest.approx({8: 0.75, 10: 0.25})


def test_smaller_scales_need_no_split() -> None:
    masses = rating_masses(logs({"1": 0.3, "4": 0.3, "7": 0.4}), (1, 5))
    assert rating_distribution(masses, p_ten=None, scale=(1, 5)) == pytest.approx({1: 0.5, 4: 0.5})
    # On 2..10 a "1" can only be the start of 10.
    masses = rating_masses(logs({"1": 0.4, "5": 0.2}), (2, 10))
    assert rating_distribution(masses, p_ten=0.5, scale=(2, 10)) == pytest.approx({5: 0.5, 10: 0.5})


def test_no_rating_in_top_k_gives_nan_not_a_score() -> None:
    masses = rating_masses(logs({"The": 0.5, "<|im_end|>": 0.3}), (1, 10))
    assert rating_distribution(masses, p_ten=0.1, scale=(1, 10)) == {}
    assert math.isnan(expected_rating({}))


# --------------------------------------------------------------------------- parsing


def test_parse_conversation_system_and_history() -> None:
    judged = parse_conversation(
        [
            {"role": "system", "content": "Be brief."},
            *chat("Hi", "Hello!"),
            *chat("What is 2+2?", "4"),
        ]
    )
    assert (judged.instruction, judged.response, judged.system) == (
        "What is 2+2?",
        "4",
        "Be brief.",
    )
    assert judged.history == (("Hi", "Hello!"),)
    with pytest.raises(JudgeError, match="roles"):
        parse_conversation([{"role": "user", "content": "no answer"}])


def test_parse_judge_spec() -> None:
    assert parse_judge_spec("judge") is None
    assert parse_judge_spec("judge:/models/x.gguf") == Path("/models/x.gguf")
    for bad in ("judges", "judge:", "armorm:judge"):
        with pytest.raises(JudgeError, match="judge:<model.gguf>"):
            parse_judge_spec(bad)


def test_load_judge_missing_gguf_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(JudgeError) as info:
        load_judge(f"judge:{missing}")
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "judge:<path" in message
    assert isinstance(info.value, MagpieError) and isinstance(info.value, RewardModelError)


# --------------------------------------------------------------------------- the real model

GOOD_BAD = [
    (
        "Give me a synonym for 'happy'.",
        "A synonym for 'happy' is 'joyful'.",
        "The train leaves at nine.",
    ),
    (
        "What is the boiling point of water at sea level?",
        "Water boils at 100 degrees Celsius at sea level.",
        "Cats usually sleep for most of the day.",
    ),
    (
        "Suggest a name for a pet goldfish.",
        "How about 'Bubbles'? It's a cheerful name for a goldfish.",
        "The stock market closed lower today.",
    ),
]
CONVERSATIONS = [chat(q, answer) for q, good, bad in GOOD_BAD for answer in (good, bad)]


@pytest.fixture(scope="module")
def judge():
    model = load_judge("judge", n_ctx=1024)
    yield model
    model.close()


@pytest.fixture(scope="module")
def scores(judge: JudgeRewardModel) -> list[float]:
    return judge.score(CONVERSATIONS)


def test_judge_names(judge: JudgeRewardModel) -> None:
    assert judge.model_id == f"judge:{judge.engine.info.model_id}"
    assert judge.model_id.startswith("judge:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert judge.engine.kv_type == "f16"  # whatever generation picks on this CPU: prompts only
    assert "KV" not in judge.model_id
    assert (judge.short_name, judge.column) == ("judge", "rewards_judge")


def test_scores_are_finite_in_range_and_not_all_equal(scores: list[float]) -> None:
    assert len(scores) == len(CONVERSATIONS)
    assert all(isinstance(s, float) and math.isfinite(s) and 1.0 <= s <= 10.0 for s in scores)
    assert len(set(scores)) == len(scores)


def test_scores_are_deterministic_for_the_same_batch(judge: JudgeRewardModel, scores) -> None:
    """The same batch scores the same whatever ran before (batched logits depend on the batch)."""
    first = judge.score([CONVERSATIONS[3], CONVERSATIONS[0]])
    assert judge.score(CONVERSATIONS) == scores
    assert judge.score([CONVERSATIONS[3], CONVERSATIONS[0]]) == first


def test_good_answers_beat_off_topic_ones(scores: list[float]) -> None:
    wins = [scores[2 * i] > scores[2 * i + 1] for i in range(len(GOOD_BAD))]
    assert sum(wins) >= 2, scores


def test_score_is_the_expected_rating_of_the_returned_logprobs(judge: JudgeRewardModel) -> None:
    """Recompute one score by hand from the engine's own top log-probabilities.

    P("0" | "1") comes from the second step of the same greedy request when its first token is
    "1", else from a request on prompt + "1" (llama.cpp's logits differ slightly between the two,
    as single-token and batched evaluation round differently).
    """
    conversation = chat("What colour is grass?", "Grass is green.")
    prompt = judge.prompt(conversation)
    assert prompt is not None and prompt.endswith(
        "Answer: Grass is green.<|im_end|>\n<|im_start|>assistant\nRating: "
    )
    two = Sampling(temperature=0.0, max_tokens=2, logprobs=judge.top_k, exact=judge.exact)
    (first,) = judge.engine.generate([Request(prompt, two)])[0]
    if first.text.startswith("1"):
        after_one = first.top_logprobs[1]
    else:
        (extra,) = judge.engine.generate([Request(prompt + "1", two)])[0]
        after_one = extra.top_logprobs[0]
    probs = {r: 0.0 for r in range(1, 11)}
    for token, logprob in first.top_logprobs[0].items():
        if token.strip() in {"1", "2", "3", "4", "5", "6", "7", "8", "9"}:  # not "²"
            probs[int(token.strip())] += math.exp(logprob)
    p_ten = sum(math.exp(v) for t, v in after_one.items() if t == "0")
    assert 0.0 < p_ten < 1.0
    probs[10], probs[1] = probs[1] * p_ten, probs[1] * (1 - p_ten)
    by_hand = sum(r * p for r, p in probs.items()) / sum(probs.values())
    (score,) = judge.score([conversation])
    assert score == pytest.approx(by_hand, abs=1e-9)


def test_progress_gets_one_increment_per_batch(judge: JudgeRewardModel) -> None:
    small = JudgeRewardModel(judge.engine, judge.chat_format, "smol", batch_size=2)
    calls: list[int] = []
    result = small.score(CONVERSATIONS[:3], progress=calls.append)
    assert calls == [2, 1] and len(result) == 3
    assert small.score([]) == []


def test_long_answers_are_cut_to_fit_and_unfittable_ones_unscored(judge) -> None:
    short = judge.prompt(chat("Describe the sea.", "Blue."))
    limit = judge.engine.count_tokens(short) + 40
    fitted = JudgeRewardModel(judge.engine, judge.chat_format, "smol", max_prompt_tokens=limit)
    long_answer = chat("Describe the sea.", "The sea is wide and deep and blue. " * 60)
    prompt = fitted.prompt(long_answer)
    assert prompt is not None and judge.engine.count_tokens(prompt) <= limit
    assert "cut here" in prompt and fitted.truncated == 1

    tiny = JudgeRewardModel(judge.engine, judge.chat_format, "smol", max_prompt_tokens=20)
    (score,) = tiny.score([long_answer])
    assert math.isnan(score) and tiny.unscored == 1


def test_end_of_turn_step_keeps_its_logprobs(judge: JudgeRewardModel) -> None:
    """llama.cpp engine: the distribution of the step that ended the completion is returned.

    After "Rating: 1" the judge's greedy choice is end-of-turn: llama-cpp-python alone returned
    no logprobs for that request, so P("0" | "1") was lost.
    """
    prompt = judge.prompt(chat("What colour is grass?", "Grass is green."))
    sampling = Sampling(temperature=0.0, max_tokens=1, logprobs=5)
    (completion,) = judge.engine.generate([Request(prompt + "1", sampling)])[0]
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == (
        "",
        "stop",
        0,
    )
    assert completion.top_logprobs is not None and len(completion.top_logprobs) == 1
    step = completion.top_logprobs[0]
    assert len(step) == 5 and max(step, key=step.__getitem__) == "<|im_end|>" and "0" in step


def test_logprobs_come_without_logits_all(engine) -> None:
    """The batched engine reads each sampled step's logits, so any engine gives logprobs."""
    (completion,) = engine.generate([Request("Hi", Sampling(max_tokens=1, logprobs=5))])[0]
    assert completion.top_logprobs is not None and 1 <= len(completion.top_logprobs[0]) <= 5


def test_invalid_scale(judge: JudgeRewardModel) -> None:
    with pytest.raises(JudgeError, match="scale"):
        JudgeRewardModel(judge.engine, judge.chat_format, "smol", scale=(1, 11))
