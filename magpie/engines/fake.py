"""A deterministic fake engine for fast executor tests: text derived from (prompt, seed, sample).

It speaks ChatML, writes a few words drawn from a fixed vocabulary by a hash of the prompt and
seed (some requests repeat a stock sentence, so deduplication has work to do), and counts one
token per word. Options make it behave like a real backend under stress:
  delay          seconds slept per request (spreads completion order across workers)
  slow_prompts   prompts containing this text sleep 10 x delay (out-of-order completion)
  crash_once     a path: the first request after it is created kills the process (os._exit),
                 the way an actor dies on a lost node; later requests run normally
  crash_on       only crash on a prompt containing this text (with crash_once)
  fail_on        a request whose prompt contains this text raises EngineError (user-fixable)
  headers        texts start with a markdown header line ("## ...\n" then more words), the
                 habit the first-token ban of the Llama-3.1 recipe is for
Sampling is honoured the way a model would: stop strings cut the text, banned first tokens
(words here) are not the first word, a first-token boost redraws the first word.
Not for real data: `--engine fake` is documented as a test engine.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magpie.engines.base import (
    Completion,
    EngineError,
    ModelInfo,
    ProgressCallback,
    Request,
    StopWhen,
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "explain",
    "write",
    "list",
    "compare",
    "describe",
    "summarize",
    "plan",
    "design",
    "translate",
    "outline",
    "the",
    "a",
    "of",
    "how",
    "why",
    "what",
    "which",
    "steps",
    "poem",
    "story",
    "recipe",
    "function",
    "proof",
    "table",
    "garden",
    "river",
    "market",
    "python",
    "history",
    "music",
    "physics",
    "budget",
    "travel",
    "letter",
    "essay",
    "small",
    "quick",
    "detailed",
    "simple",
)
STOCK = ("Write a short poem about the sea.", "Explain how rainbows form.")


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


class FakeEngine:
    """Text depends only on (prompt, seed, sample index, max_tokens): any process, any order."""

    name = "fake"
    batch_invariant = True

    def __init__(
        self,
        model: str | None = None,
        delay: float = 0.0,
        slow_prompts: str | None = None,
        crash_once: str | None = None,
        crash_on: str | None = None,
        fail_on: str | None = None,
        headers: bool = False,
        **_: Any,
    ) -> None:
        self.model_id = f"fake/{model or 'default'}"
        self.delay = delay
        self.slow_prompts = slow_prompts
        self.crash_once = Path(crash_once) if crash_once else None
        self.crash_on = crash_on
        self.fail_on = fail_on
        self.headers = headers

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id, chat_template=CHATML, bos_token="", eos_token="<|im_end|>"
        )

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _text(self, request: Request, sample: int) -> tuple[str, str]:
        text, reason = self._draw(request, sample)
        sampling = request.sampling
        digest = _digest(request.prompt, request.seed, sample, "steer")
        if self.headers:
            text = f"## {text}\nSome more detail {WORDS[digest[0] % len(WORDS)]}."
        if sampling.first_token_boost != 1.0:
            redraw = _digest(digest, sampling.first_token_boost)[0] % len(WORDS)
            first, _, rest = text.partition(" ")
            text = f"{WORDS[redraw].capitalize()} {rest}" if rest else first
        while text.split() and text.split()[0] in sampling.first_token_ban:
            text = text.split(None, 1)[1] if len(text.split()) > 1 else ""
        cuts = [text.index(s) for s in sampling.stop if s and s in text]
        if cuts:
            return text[: min(cuts)], "stop"
        return text, reason

    def _draw(self, request: Request, sample: int) -> tuple[str, str]:
        digest = _digest(request.prompt, request.seed, sample)
        if digest[0] < 64:  # one request in four repeats a stock sentence
            return STOCK[digest[1] % len(STOCK)], "stop"
        length = 3 + digest[2] % 10
        words = [WORDS[b % len(WORDS)] for b in _digest(digest, "words")[:length]]
        text = " ".join(words).capitalize() + "."
        if len(words) > request.sampling.max_tokens:
            return " ".join(words[: request.sampling.max_tokens]), "length"
        return text, "stop"

    def _stress(self, request: Request) -> None:
        if self.fail_on and self.fail_on in request.prompt:
            raise EngineError(f"fake engine refused a prompt containing {self.fail_on!r}")
        crash = self.crash_once is not None and not self.crash_once.exists()
        if crash and (self.crash_on is None or self.crash_on in request.prompt):
            self.crash_once.write_text(str(os.getpid()))
            os._exit(3)
        if self.delay:
            slow = self.slow_prompts is not None and self.slow_prompts in request.prompt
            time.sleep(self.delay * (10 if slow else 1))

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        return [r if r is not None else [] for r in self.generate_until(requests, on_done, None)]

    def generate_until(
        self,
        requests: Sequence[Request],
        on_done: ProgressCallback | None,
        until: StopWhen | None,
    ) -> list[list[Completion] | None]:
        """Requests in order until `until` says stop; the rest come back None."""
        results: list[list[Completion] | None] = [None] * len(requests)
        for number, request in enumerate(requests):
            self._stress(request)
            prompt_tokens = self.count_tokens(request.prompt)
            completions = []
            for sample in range(request.n):
                text, reason = self._text(request, sample)
                completions.append(
                    Completion(
                        text=text,
                        finish_reason=reason,  # type: ignore[arg-type]
                        prompt_tokens=prompt_tokens,
                        completion_tokens=self.count_tokens(text),
                    )
                )
            results[number] = completions
            if on_done is not None:
                on_done(1, sum(c.completion_tokens for c in completions))
            if until is not None and until(number, completions):
                break
        return results

    def close(self) -> None:
        return None
