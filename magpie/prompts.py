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


# ---- unitag prompts: each asks for one JSON object, decoded under that tag's JSON schema ----

TAG_DIFFICULTY_PROMPT = """\
Below is a request a user sent to an AI assistant. Describe it as a JSON object with:
- "intent": one sentence, starting with "The user wants to", saying what the user is after;
- "knowledge": one sentence, starting with "To solve this problem, the models need to know",
  naming what an assistant must know to answer well;
- "difficulty": how hard the request is to answer well, one of "very easy", "easy", "medium",
  "hard", "very hard".

User request:
{instruction}"""

TAG_QUALITY_PROMPT = """\
Below is a request a user sent to an AI assistant. Judge how well it is written: is it clear,
specific, and does it give the context needed to answer it? Reply with a JSON object with:
- "explanation": two or three sentences on its strengths and weaknesses;
- "input_quality": one of "very poor", "poor", "average", "good", "excellent".

User request:
{instruction}"""

TAG_CATEGORY_PROMPT = """\
Below is a request a user sent to an AI assistant. Classify the task it asks for. The categories
are: {categories}. Reply with a JSON object with:
- "primary_tag": the one category that fits best;
- "other_tags": a list of further categories that also apply (may be empty).

User request:
{instruction}"""

TAG_SAFETY_PROMPT = """\
You check requests sent to an AI assistant for safety. Decide whether the request below asks
for harmful content in any of these hazard categories:
{hazards}
Reply with a JSON object with:
- "verdict": "safe" or "unsafe";
- "categories": the codes (like "S2") of every category it falls under; empty when safe.

User request:
{instruction}"""


def tag_prompt(template: str, instruction: str, **fields: str) -> str:
    """Fill a tag prompt with the instruction (and any other fields the template names)."""
    return template.format(instruction=instruction.strip(), **fields)


# ---- multi-turn extension (`magpie extend`) ----

FOLLOWUP_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. The user talks with you over several rounds: after each of "
    "your answers they come back with a follow-up question or request that builds on what was "
    "said so far, digging deeper, asking for clarification, or taking the topic a step further."
)
"""System turn of the prompt that makes the model write the *next user message* of a
conversation (the pre-query continuation); replies use the model's normal chat template."""

# ---- safety of a whole exchange (judge safety tag on a conversation) ----

TAG_SAFETY_CONVERSATION_PROMPT = """\
You check conversations between a user and an AI assistant for safety. Decide whether the
assistant's last reply below contains or helps with harmful content in any of these hazard
categories:
{hazards}
Reply with a JSON object with:
- "verdict": "safe" or "unsafe";
- "categories": the codes (like "S2") of every category it falls under; empty when safe.

Conversation:
{conversation}"""


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """A [{role, content}] conversation as `User: ...` / `Assistant: ...` paragraphs."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(
        f"{names.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in messages
    )
