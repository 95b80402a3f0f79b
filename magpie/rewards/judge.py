"""LLM-as-judge rewards: a chat model rates each response, and the reward is its expected rating.

The judge sees the instruction and one response (from `magpie.prompts.judge_prompt`, after two
worked examples) and is asked for a single rating from `low` to `high`; the assistant turn is
pre-filled with "Rating: ", so the very next token is the rating. Rather than take the greedy
digit, we read the top-K log-probabilities of that token and return the expected rating under
them, renormalised over the rating tokens: scores are continuous, and ties are rare.

Ratings of one digit are one token. "10" is usually two ("1" then "0"), so the mass of "1" is
split into 1 and 10 with P("0" | "1"), the judge's next-token probability after writing "1". When
"1" is the greedy first token this comes free from a 2-token request; otherwise a second request on
prompt + "1" asks for it (llama.cpp rounds the two ways slightly differently, by about 0.01 in
P("0" | "1"); each item always takes the same way, so scores stay deterministic). Tokenizers
that have "10" as one token are handled too (it counts as 10, and P("0" | "1") is then small).
Whitespace variants (" 7", "7") are merged.

An item whose top-K holds no rating token gets NaN (and is counted in `unscored`), never a made-up
score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magpie.engines.base import Completion, Engine, Request, Sampling, batch_invariant
from magpie.errors import MagpieError
from magpie.prompts import JUDGE_CUT_MARK, JUDGE_LEAD_IN, judge_prompt
from magpie.rewards.classifier import RewardModelError
from magpie.templates import ChatFormat, chat_format_for

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
TopLogprobs = Mapping[str, float]

JUDGE_SPEC = "judge"
JUDGE_KV_TYPE = "f16"
"""The llama.cpp judge's KV cache type unless its engine options name one (the engine's own
default is F16 too, but a judge keeps it even if that changes). A judge only reads prompts, and
llama.cpp's tiled flash attention (a prompt's chunks of 64+ tokens) runs only over an F16 cache:
on the AMX Xeon the CPU demo's 100 judgements took 34.2 s with F16 instead of 43.0 s with Q8_0."""


class JudgeError(RewardModelError, MagpieError):
    """A judge that cannot be loaded or used; the message is one line that says how to fix it."""


# --------------------------------------------------------------------------- rating arithmetic


def rating_masses(step: TopLogprobs, scale: tuple[int, int]) -> dict[str, float]:
    """Probability of each rating token among `step`'s top log-probabilities.

    Keys are the stripped token texts that are ratings on `scale` ("7", and "10" where the
    tokenizer has it as one token); whitespace variants are summed.
    """
    low, high = scale
    ratings = {str(r) for r in range(low, high + 1)}
    if high == 10:
        ratings.add("1")  # the first half of "10", even when 1 itself is off the scale
    masses: dict[str, float] = {}
    for token, logprob in step.items():
        text = token.strip()
        if text in ratings:
            masses[text] = masses.get(text, 0.0) + math.exp(logprob)
    return masses


def ten_after_one(step: TopLogprobs) -> float:
    """P(the rating is 10 | the judge wrote "1"): the mass of next tokens that start with "0".

    "0" followed by a non-digit ("0/", "0.") still makes 10; "00" would make 100, so it does not
    count, and neither does " 0" ("1 0" is not a number).
    """
    total = 0.0
    for token, logprob in step.items():
        if token.startswith("0") and not (len(token) > 1 and token[1].isdigit()):
            total += math.exp(logprob)
    return min(total, 1.0)


def rating_distribution(
    masses: Mapping[str, float], p_ten: float | None, scale: tuple[int, int]
) -> dict[int, float]:
    """Normalised probability of each rating, or {} when no rating has any mass.

    `p_ten` = P(10 | "1") splits the mass of "1" between 1 and 10; None leaves "1" out (used when
    its share is too small to be worth a second request). Ignored when 10 is off the scale.
    """
    low, high = scale
    dist: dict[int, float] = {}
    for text, mass in masses.items():
        value = int(text)
        if text == "1" and high == 10:
            if p_ten is None:
                continue
            if low <= 1:
                dist[1] = dist.get(1, 0.0) + mass * (1.0 - p_ten)
            dist[10] = dist.get(10, 0.0) + mass * p_ten
        elif low <= value <= high:
            dist[value] = dist.get(value, 0.0) + mass
    total = sum(dist.values())
    if total <= 0.0:
        return {}
    return {rating: mass / total for rating, mass in sorted(dist.items()) if mass > 0.0}


def expected_rating(dist: Mapping[int, float]) -> float:
    """Mean rating of a normalised distribution; NaN when it is empty."""
    if not dist:
        return math.nan
    return sum(rating * p for rating, p in dist.items())


# --------------------------------------------------------------------------- conversations


@dataclass(frozen=True)
class Judged:
    """The parts of a conversation the judge sees: the last answer and what it answers."""

    instruction: str
    response: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()


def parse_conversation(conversation: Conversation) -> Judged:
    """Split [system?, user, assistant, ..., user, assistant] into what the judge is shown."""
    messages = list(conversation)
    system = None
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0).get("content") or ""
    roles = [m.get("role") for m in messages]
    if len(messages) < 2 or len(messages) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise JudgeError(
            "a judged conversation must be [system?, user, assistant, ...] ending with the "
            f"assistant turn to rate; got roles {roles}"
        )
    texts = [m.get("content") or "" for m in messages]
    history = tuple(zip(texts[:-2:2], texts[1:-2:2], strict=True))
    return Judged(texts[-2], texts[-1], system, history)


# --------------------------------------------------------------------------- the judge


class JudgeRewardModel:
    """Rewards from a chat model acting as a judge; one float (or NaN) per conversation.

    Args:
        engine: any engine whose completions carry `top_logprobs` (llama.cpp: `logits_all=True`).
        chat_format: the judge model's chat format (`chat_format_for(info.chat_template, ...)`).
        model_id: the judge model's id; `model_id` becomes "judge:<model_id>".
        scale: (low, high) of the rating, whole numbers with 0 <= low < high <= 10.
        batch_size: conversations per engine call; `progress` is told after each batch. Large,
            so a batching engine (llama.cpp) decodes a whole shard's judgements together.
        top_k: how many top log-probabilities to request per token.
        split_min_share: when "1" holds less than this share of the rating mass and is not the
            greedy token, skip the extra request that splits it into 1 and 10 and leave it out;
            this moves the score by at most `split_min_share * (high - low)`. 0 always splits.
        max_prompt_tokens: cut responses so the judge prompt fits in this many tokens (the
            context window minus the rating tokens); None does not check.
        owns_engine: `close()` closes the engine too.
        exact: decode exactly (a score then depends only on its conversation, and shards may
            be pooled); None: where the engine says exact requests cost no more
            (`exact_prompts_cheap`: llama.cpp with our attention kernel). Otherwise llama.cpp
            evaluates the long prompts with its tiled attention, ~25% faster there, and a score
            depends on the conversations scored with it.
    """

    short_name = JUDGE_SPEC
    column = f"rewards_{JUDGE_SPEC}"

    def __init__(
        self,
        engine: Engine,
        chat_format: ChatFormat,
        model_id: str,
        scale: tuple[int, int] = (1, 10),
        batch_size: int = 256,
        *,
        top_k: int = 20,
        split_min_share: float = 0.01,
        max_prompt_tokens: int | None = None,
        owns_engine: bool = False,
        exact: bool | None = None,
    ) -> None:
        low, high = (int(scale[0]), int(scale[1]))
        if not 0 <= low < high <= 10:
            raise JudgeError(f"judge scale must satisfy 0 <= low < high <= 10, got {scale}")
        if batch_size < 1:
            raise JudgeError(f"batch_size must be >= 1, got {batch_size}")
        if top_k < 1:
            raise JudgeError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= split_min_share <= 1.0:
            raise JudgeError(f"split_min_share must be in [0, 1], got {split_min_share}")
        chat_format.require_assistant_prefix()
        self.engine = engine
        self.chat_format = chat_format
        self.judge_model_id = model_id
        self.model_id = f"{JUDGE_SPEC}:{model_id}"
        self.scale = (low, high)
        self.batch_size = batch_size
        self.top_k = top_k
        self.split_min_share = split_min_share
        self.max_prompt_tokens = max_prompt_tokens
        self.owns_engine = owns_engine
        self.exact = bool(getattr(engine, "exact_prompts_cheap", False) if exact is None else exact)
        self.unscored = 0
        """Conversations given NaN so far: no rating token in the top-K, or a prompt too long."""
        self.truncated = 0
        """Responses cut so far to fit `max_prompt_tokens`."""

    @property
    def batch_invariant(self) -> bool:
        """Whether a score is the same whatever it is scored with (exact decoding on an engine
        whose exact requests do not depend on their batch): shards may then be pooled."""
        return self.exact and batch_invariant(self.engine)

    @property
    def splits_ten(self) -> bool:
        """Whether "1" may be the start of "10" on this scale."""
        return self.scale[1] == 10

    def prompt(self, conversation: Conversation) -> str | None:
        """The judge's full prompt for one conversation, ending just before the rating.

        None when it cannot fit `max_prompt_tokens` even with the response cut to nothing.
        """
        judged = parse_conversation(conversation)
        text = self._render(judged, judged.response)
        if self.max_prompt_tokens is None:
            return text
        return self._fit(judged, text)

    def _render(self, judged: Judged, response: str) -> str:
        low, high = self.scale
        user = judge_prompt(
            judged.instruction,
            response,
            system=judged.system,
            history=judged.history,
            low=low,
            high=high,
        )
        return self.chat_format.response_prompt([], user) + JUDGE_LEAD_IN

    def _fit(self, judged: Judged, text: str) -> str | None:
        """Cut the response (keeping its start) until the prompt fits `max_prompt_tokens`."""
        limit = self.max_prompt_tokens or 0
        response = judged.response
        count = self.engine.count_tokens(text)
        if count <= limit:
            return text
        for _ in range(12):
            excess = count - limit
            response_tokens = max(self.engine.count_tokens(response), 1)
            keep = int(len(response) * (1.0 - excess / response_tokens) * 0.97) - 1
            if keep <= 0:
                break
            response = response[:keep]
            text = self._render(judged, response + JUDGE_CUT_MARK)
            count = self.engine.count_tokens(text)
            if count <= limit:
                self.truncated += 1
                return text
        return None

    def score(
        self,
        conversations: Sequence[Conversation],
        progress: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Expected rating of each conversation's last answer, in order; NaN where unscored.

        `progress`, when given, is called after each batch with the number it scored.
        """
        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            scores.extend(self._score_batch([self.prompt(c) for c in batch]))
            if progress is not None:
                progress(len(batch))
        missing = sum(math.isnan(s) for s in scores)
        if missing:
            self.unscored += missing
            logger.warning(
                "judge %s: %d of %d responses unscored (no rating among the top-%d tokens, "
                "or the prompt does not fit %s tokens)",
                self.judge_model_id,
                missing,
                len(scores),
                self.top_k,
                self.max_prompt_tokens,
            )
        return scores

    def distributions(self, prompts: Sequence[str]) -> list[dict[int, float]]:
        """The judge's normalised rating distribution for each prompt ({} when unscored)."""
        if not prompts:
            return []
        max_tokens = 2 if self.splits_ten else 1
        firsts = self._complete(prompts, max_tokens)
        masses = [
            rating_masses(c.top_logprobs[0], self.scale) if c.top_logprobs else {} for c in firsts
        ]
        p_ten: list[float | None] = [None] * len(prompts)
        second: list[int] = []
        for i, (completion, mass) in enumerate(zip(firsts, masses, strict=True)):
            if not self.splits_ten or "1" not in mass:
                continue
            if _greedy_is_one(completion):
                p_ten[i] = ten_after_one(completion.top_logprobs[1])  # type: ignore[index]
            elif mass["1"] >= self.split_min_share * sum(mass.values()):
                second.append(i)
        if second:
            for i, completion in zip(
                second, self._complete([prompts[i] + "1" for i in second], 1), strict=True
            ):
                if completion.top_logprobs:
                    p_ten[i] = ten_after_one(completion.top_logprobs[0])
        return [
            rating_distribution(mass, p, self.scale) for mass, p in zip(masses, p_ten, strict=True)
        ]

    def _score_batch(self, prompts: Sequence[str | None]) -> list[float]:
        """Expected ratings; NaN for prompts that did not fit (None)."""
        fitting = [p for p in prompts if p is not None]
        values = iter(expected_rating(d) for d in self.distributions(fitting))
        return [math.nan if p is None else next(values) for p in prompts]

    def _complete(self, prompts: Sequence[str], max_tokens: int) -> list[Completion]:
        sampling = Sampling(
            temperature=0.0, max_tokens=max_tokens, logprobs=self.top_k, exact=self.exact
        )
        results = self.engine.generate([Request(p, sampling) for p in prompts])
        completions = [r[0] for r in results]
        if any(c.top_logprobs is None for c in completions):
            raise JudgeError(
                f"engine {self.engine.name} returned no logprobs: the judge needs them "
                "(for llama.cpp, create the engine with logits_all=True)"
            )
        return completions

    def close(self) -> None:
        """Release the engine when this judge created it."""
        if self.owns_engine:
            self.engine.close()

    def __repr__(self) -> str:
        return (
            f"JudgeRewardModel({self.model_id!r}, column={self.column!r}, scale={self.scale}, "
            f"batch_size={self.batch_size}, top_k={self.top_k})"
        )


def _greedy_is_one(completion: Completion) -> bool:
    """Whether the greedy first token was "1" and the next step's distribution came back."""
    top = completion.top_logprobs or []
    if len(top) < 2 or not top[0]:
        return False
    return max(top[0], key=lambda t: top[0][t]).strip() == "1"


# --------------------------------------------------------------------------- loading


def parse_judge_spec(spec: str) -> Path | None:
    """`judge` -> None (the bundled model); `judge:<path.gguf>` -> that path."""
    name, sep, model = spec.strip().partition(":")
    if name != JUDGE_SPEC or (sep and not model.strip()):
        raise JudgeError(f"judge spec must be 'judge' or 'judge:<model.gguf>', got {spec!r}")
    return Path(model.strip()).expanduser() if sep else None


def load_judge(spec: str, engine_name: str = "llamacpp", **engine_options: Any) -> JudgeRewardModel:
    """A judge from `judge` (the bundled SmolLM2) or `judge:<model>` on any engine.

    On llama.cpp `<model>` is a .gguf path; on vllm or openai it is what that engine's `--model`
    takes. `engine_options` go to the engine (n_ctx, base_url, ...); the chat format comes from
    the model's own chat template (or the engine's `chat_template` / `tokenizer` option).
    """
    from magpie.engines.base import create_engine

    path = parse_judge_spec(spec)
    if engine_name != "llamacpp":
        model = None if path is None else spec.strip().partition(":")[2].strip()
        engine = create_engine(engine_name, model=model, **engine_options)
        max_prompt = None
    else:
        if path is not None and not path.is_file():
            raise JudgeError(f"judge model not found: {path}: use judge:<path to a .gguf file>")
        options = {"n_ctx": 4096, "kv_type": JUDGE_KV_TYPE, **engine_options, "logits_all": True}
        if path is not None:
            options["model"] = str(path)
        engine = create_engine("llamacpp", **options)
        max_prompt = int(options["n_ctx"]) - 2
    try:
        info = engine.info
        fmt = chat_format_for(
            info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
        )
        return JudgeRewardModel(
            engine,
            fmt,
            info.model_id,
            max_prompt_tokens=max_prompt,
            owns_engine=True,
        )
    except Exception:
        engine.close()
        raise
