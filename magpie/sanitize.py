"""Instruction clean-up and first-token ban presets of the original Magpie scripts.

`sanitize_instruction` keeps the user's request and drops what a model tends to wrap around it
when it writes a query from the pre-query template alone: a leading list number or label
("Question 3:", "**Task**", "## Problem:"), quotes and emphasis around it, and whatever follows
the request (an "Answer:"/"Solution:" section, "## Step 1", a second paragraph). The rules follow
what magpie-align/magpie's `--sanitize` strips (exp/str_utils.py), written anew and applied to
every model (the original applies them to its Llama-3 and Gemma-2 runs only).
"""

from __future__ import annotations

import re
from pathlib import Path

MARKDOWN_HEADERS = ("#", "##", "###", "####")
"""The tokens the original Llama-3.1 scripts forbid as the first token (ids 2, 567, 14711, 827
of the Llama-3 vocabulary)."""
BAN_PRESETS: dict[str, tuple[str, ...]] = {"markdown-headers": MARKDOWN_HEADERS}

_LABELS = (
    "Original Prompt",
    "Prompt",
    "Task",
    "The Problem",
    "Problem",
    "Question",
    "The Scenario",
    "Scenario",
    "The Situation",
    "Situation",
    "Context",
    "Challenge",
    "Query",
    "Request",
    "Instructions",
    "Instruction",
    "Descriptions",
    "Description",
)
_NAME = "(?:" + "|".join(re.escape(label) for label in _LABELS) + ")"
_LABEL = re.compile(
    rf"^(?:#+\s*{_NAME}\s*:"  # "## Problem:"
    rf"|\*\*{_NAME}\s*:?\*\*\s*:?"  # "**Task**", "**Task:**", "**Task**:"
    rf"|{_NAME}\s*:"  # "Question:"
    r"|(?:Question|Part)\s+\d+\s*[:.]"  # "Question 3:", "Part 2."
    r"|Q\d+\s*[:.])\s*",  # "Q1:", "Q2."
    re.IGNORECASE,
)
_ENUMERATION = re.compile(r"^(?:\d+\.|[A-Za-z0-9]\))\s+")
_ANSWER = re.compile(
    r"(?:The correct answer|Correct answer|The answer is|Answer is|Answers?|Explanation"
    r"|Solution Approach|Solution)\s*:"
)
_STEP = re.compile(r"#{1,3} Step 1\b:?")


def _strip_label(text: str) -> str:
    text = _ENUMERATION.sub("", text.strip(), count=1).strip()
    match = _LABEL.match(text)
    return text[match.end() :].strip() if match else text


def _through_question(text: str) -> str:
    return text.split("?", 1)[0].strip() + "?"


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _cut(text: str) -> str:
    """The request itself, without what follows it."""
    if text.startswith('"'):
        if "?" in text:
            return _through_question(text.replace('"', ""))
        return _first_line(text).replace('"', "").replace("*", "").strip()
    answer = _ANSWER.search(text)
    if answer and answer.start() > 0:
        return text[: answer.start()].strip()
    step = _STEP.search(text)
    if step and step.start() > 0:
        return text[: step.start()].strip()
    if _first_line(text).endswith(":"):  # "Solve the following:" then the problem below
        if "#" in text:
            return text.split("#", 1)[0].strip()
        if "?" in text:
            return _through_question(text)
        return _first_line(text).replace("*", "").strip()
    if "?" in text:
        return _through_question(text)
    return _first_line(text).replace("*", "").strip()


def sanitize_instruction(text: str) -> str:
    """`text` with wrapping labels and anything after the request removed (may become empty)."""
    text = text.strip()
    if text.startswith("*") and "?" in text:  # "**What is ...?** more" -> the question
        return _strip_label(_through_question(text.replace("*", "")))
    cut = _cut(_strip_label(text))
    if cut.startswith("**") and cut.count("**") >= 2:
        cut = cut.replace("**", "")
    return _strip_label(cut)


def count_sanitized(dataset: Path) -> tuple[int, int]:
    """(rows whose instruction differs from its stripped raw text, rows) of an instructions
    dataset made with `sanitize`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(dataset).glob("*.parquet") if not p.name.startswith("."))
    changed = rows = 0
    for path in files:
        table = pq.read_table(path, columns=["instruction", "raw_instruction"])
        raw = pc.utf8_trim_whitespace(table.column("raw_instruction"))
        changed += pc.sum(pc.not_equal(raw, table.column("instruction"))).as_py() or 0
        rows += table.num_rows
    return changed, rows
