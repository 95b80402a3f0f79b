"""The LLM prompts this project sends to models, kept in one place so they are easy to review.

Each prompt is a `str.format` template; the function beside it fills it in.
"""

from __future__ import annotations

from collections.abc import Sequence

JUDGE_PROMPT = """\
Rate how well the answer responds to the question, from {low} (useless) to {high} (perfect).

Question: What colour is the sky on a clear day?
Answer: The sky is blue on a clear day.
Rating: {good}

Question: What colour is the sky on a clear day?
Answer: I enjoy eating pizza on Fridays.
Rating: {low}
{context}
Question: {instruction}
Answer: {response}"""
"""Asks for one overall rating of an answer; the judge's reply starts with `JUDGE_LEAD_IN`.

Two worked examples (one good answer, one off-topic) come first: without them the bundled 135M
model rated good and off-topic answers alike (1 of 6 test pairs ordered right; 17 of 20 with)."""

JUDGE_SYSTEM_SECTION = """
The assistant was told: {system}
"""
"""Shown when the judged conversation had a system turn."""

JUDGE_HISTORY_SECTION = """
Earlier in the conversation (rate only the last answer):
{turns}
"""
"""Shown when the judged answer is a later turn of a multi-turn conversation."""

JUDGE_HISTORY_TURN = "Question: {user}\nAnswer: {assistant}"

JUDGE_CUT_MARK = "\n[... the answer goes on, but is cut here because it is too long to show]"
"""Appended to an answer shortened to fit the judge's context window."""

JUDGE_LEAD_IN = "Rating: "
"""Written after the assistant header, so the judge's very next token is the rating.

It ends in a space because tokenizers like SmolLM2's write the space before a number as a token of
its own: the digit then comes next, not " 7" as one token."""


def judge_prompt(
    instruction: str,
    response: str,
    *,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    low: int = 1,
    high: int = 10,
) -> str:
    """The judge's user message for one answer to `instruction`, rated on `low`..`high`.

    `history` holds earlier (user, assistant) turns of a multi-turn conversation.
    """
    context = ""
    if system and system.strip():
        context += JUDGE_SYSTEM_SECTION.format(system=system.strip())
    if history:
        turns = "\n\n".join(
            JUDGE_HISTORY_TURN.format(user=u.strip(), assistant=a.strip()) for u, a in history
        )
        context += JUDGE_HISTORY_SECTION.format(turns=turns)
    return JUDGE_PROMPT.format(
        context=context,
        instruction=instruction.strip(),
        response=response.strip(),
        low=low,
        high=high,
        good=round(low + 0.9 * (high - low)),
    )
