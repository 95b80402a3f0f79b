"""Language tag: ISO 639-1 code of each instruction, detected with lingua (no LLM).

Codes are upper-case two-letter strings ("EN", "ZH", ...) as in the published Magpie
`language` column; empty or undetectable text gives None.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lingua import LanguageDetector


@lru_cache(maxsize=2)
def get_detector(low_accuracy: bool = False) -> LanguageDetector:
    """Build (once per mode) a lingua detector over all of its languages.

    Low-accuracy mode uses trigram models only: several times faster and far lighter in memory,
    a little less accurate on short texts. Models load lazily as languages are first needed.
    """
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def detect_languages(
    texts: Sequence[str | None], *, low_accuracy: bool = False
) -> list[str | None]:
    """ISO 639-1 upper-case code per text (e.g. "EN"); None for empty/undetectable text."""
    wanted = [i for i, text in enumerate(texts) if text is not None and text.strip()]
    codes: list[str | None] = [None] * len(texts)
    if not wanted:
        return codes
    found = get_detector(low_accuracy).detect_languages_in_parallel_of([texts[i] for i in wanted])
    for i, language in zip(wanted, found, strict=True):
        if language is not None:
            codes[i] = language.iso_code_639_1.name
    return codes
