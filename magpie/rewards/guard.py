"""Llama-Guard-style safety classification of instructions or conversations (transformers).

A guard model's chat template turns a conversation into its classification prompt; the model
then writes "safe", or "unsafe" and the hazard codes on the next line. We read the verdict from
the first token's logits ("safe" against "unsafe", so it is never unparseable) and, for unsafe
ones, decode the hazard codes greedily after "unsafe\\n".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from magpie.rewards.classifier import RewardModelError, load_guarded, resolve_device, resolve_dtype
from magpie.stages.tags import guard_label

_CODE = re.compile(r"S\d{1,2}")


class GuardModel:
    """A causal LM guard (Llama Guard 2/3 or one of the same shape) used as a classifier."""

    def __init__(
        self,
        model_id: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        max_code_tokens: int = 12,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model_id
        self.device = resolve_device(device)
        self.max_code_tokens = max_code_tokens
        self.tokenizer = load_guarded(
            model_id,
            lambda: AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code),
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise RewardModelError(
                f"guard model {model_id} has no chat template to build its classification prompt"
            )
        model = load_guarded(
            model_id,
            lambda: AutoModelForCausalLM.from_pretrained(
                model_id,
                dtype=resolve_dtype(dtype, self.device),
                trust_remote_code=trust_remote_code,
            ),
        )
        self.model = model.to(self.device).eval()
        self._safe = self._first_token("safe")
        self._unsafe = self._first_token("unsafe")
        if self._safe == self._unsafe:
            raise RewardModelError(
                f"guard model {model_id}: 'safe' and 'unsafe' start with the same token"
            )

    def _first_token(self, word: str) -> int:
        return self.tokenizer.encode(word, add_special_tokens=False)[0]

    def _prompt_ids(self, messages: list[dict[str, str]], suffix: str = "") -> Any:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text + suffix, add_special_tokens=False, return_tensors="pt")
        return ids["input_ids"].to(self.device)

    def classify(self, instructions: Sequence[str]) -> list[str]:
        """The `llama_guard_2` label of each instruction: "safe" or "unsafe\\nS1,S9"."""
        return self.classify_conversations([[{"role": "user", "content": i}] for i in instructions])

    def classify_conversations(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        """The label of each [{role, content}] conversation; the guard judges its last turn.

        With a [user, assistant] pair the guard's chat template asks about the assistant's
        reply (as unitag ran Llama Guard 2); with a lone user message, about the request.
        """
        import torch

        labels = []
        with torch.inference_mode():
            for messages in conversations:
                logits = self.model(input_ids=self._prompt_ids(messages)).logits[0, -1]
                if logits[self._safe] >= logits[self._unsafe]:
                    labels.append("safe")
                    continue
                ids = self._prompt_ids(messages, "unsafe\n")
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_code_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
                text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                codes = list(dict.fromkeys(_CODE.findall(text.split("\n")[0])))
                labels.append(guard_label("unsafe", codes))
        return labels
