"""The safety tag on a whole exchange: [user, assistant] for SFT rows, `chosen` for DPO rows.

A tiny random Llama-Guard-style model (built here, with a template shaped like Llama Guard 2's:
it judges the last role of the conversation) and the bundled judge on llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from magpie.engines.base import Completion, ProgressCallback, Request
from magpie.engines.llamacpp import bundled_model_path
from magpie.errors import MagpieError
from magpie.stages.tags import JudgeTagger, TagStage, resolve_safety_on, safety_messages
from magpie.templates import chat_format_for

GUARD_TEMPLATE = (
    "{% set who = 'Agent' if messages[-1]['role'] == 'assistant' else 'User' %}"
    "<|im_start|>user\nTask: check if there is unsafe content in '{{ who }}' messages in the "
    "conversation below.\n\n{% for m in messages %}"
    "{{ 'User' if m['role'] == 'user' else 'Agent' }}: {{ m['content'] }}\n\n{% endfor %}"
    "Provide your safety assessment for {{ who }}.<|im_end|>\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SFT = [
    {"instruction": "How do I sharpen a kitchen knife?",
     "response": "Use a whetstone at a 15 degree angle."},
    {"instruction": "Write a haiku about rain.", "response": "Soft rain on the roof / ..."},
    {"instruction": "How do I pick a lock?",
     "response": "I can explain how locks work in general."},
]  # fmt: skip


class NullProgress:
    def on_done(self, units: int, tokens: int) -> None:
        pass


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GUARD_TEMPLATE
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    )  # fmt: skip
    path = tmp_path_factory.mktemp("guard") / "tiny-guard"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_which_text_is_classified() -> None:
    assert resolve_safety_on("auto", ["instruction"]) == "instruction"
    assert resolve_safety_on("auto", ["instruction", "response"]) == "response"
    assert resolve_safety_on("auto", ["instruction", "responses", "chosen"]) == "chosen"
    assert resolve_safety_on("instruction", ["instruction", "chosen"]) == "instruction"
    with pytest.raises(MagpieError, match="--safety-on chosen needs a `chosen` column"):
        resolve_safety_on("chosen", ["instruction", "response"])
    with pytest.raises(MagpieError, match="--safety-on response needs"):
        resolve_safety_on("response", ["instruction"])
    row = {"instruction": "q", "responses": ["a1", "a2"], "chosen": None}
    assert safety_messages(row, "response") == (
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}],
        "response",
    )
    assert safety_messages(row, "chosen") == ([{"role": "user", "content": "q"}], "instruction")
    chosen = [{"content": "q", "role": "user"}, {"content": "good", "role": "assistant"}]
    assert safety_messages({**row, "chosen": chosen}, "chosen")[0][1]["content"] == "good"


def test_guard_reads_the_conversation(guard_dir: Path) -> None:
    import torch

    from magpie.rewards.guard import GuardModel

    guard = GuardModel(str(guard_dir))
    conversations = [safety_messages(r, "response")[0] for r in SFT]
    labels = guard.classify_conversations(conversations)
    assert labels == guard.classify_conversations(conversations)
    assert guard.classify([r["instruction"] for r in SFT]) == guard.classify_conversations(
        [[m[0]] for m in conversations]
    )
    # the verdict is the guard's first-token choice over the whole rendered conversation
    tok = guard.tokenizer
    safe, unsafe = (tok.encode(w, add_special_tokens=False)[0] for w in ("safe", "unsafe"))
    for messages, label in zip(conversations, labels, strict=True):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert f"Agent: {messages[1]['content']}" in text and "for Agent." in text
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = guard.model(input_ids=ids).logits[0, -1]
        assert label.split("\n")[0] == ("safe" if logits[safe] >= logits[unsafe] else "unsafe")


def test_tag_command_classifies_sft_conversations(guard_dir: Path, tmp_path: Path) -> None:
    from magpie.rewards.guard import GuardModel

    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    out = tmp_path / "out"
    result = run_cli(
        "tag", "--in", str(source), "--out", str(out), "--tags", "safety",
        "--guard-model", str(guard_dir), "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    guard = GuardModel(str(guard_dir))
    expected = guard.classify_conversations([safety_messages(r, "response")[0] for r in SFT])
    assert [r["llama_guard_2"] for r in rows] == expected
    assert {r["safety_on"] for r in rows} == {"response"}
    manifest = json.loads((out / ".magpie" / "manifest.json").read_text())
    assert manifest["config"]["safety_on"] == "response"
    assert manifest["config"]["config"]["safety_on"] == "auto"

    # instruction-only on request, and DPO rows classify `chosen`
    dpo = pa.Table.from_pylist(
        [
            {
                "instruction": r["instruction"],
                "chosen": [
                    {"content": r["instruction"], "role": "user"},
                    {"content": r["response"], "role": "assistant"},
                ],
            }
            for r in SFT
        ]
    )
    only = TagStage(["safety"], guard=guard, safety_on="instruction")(dpo, NullProgress())
    assert only.rows.column("llama_guard_2").to_pylist() == guard.classify(
        [r["instruction"] for r in SFT]
    )
    assert set(only.rows.column("safety_on").to_pylist()) == {"instruction"}
    both = TagStage(["safety"], guard=guard, safety_on="chosen")(dpo, NullProgress())
    assert both.rows.column("llama_guard_2").to_pylist() == expected
    assert set(both.rows.column("safety_on").to_pylist()) == {"chosen"}


class Recording:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.prompts: list[str] = []

    def generate(
        self, requests: Sequence[Request], on_done: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        self.prompts.extend(r.prompt for r in requests)
        return self.engine.generate(requests, on_done)


def test_judge_safety_on_a_conversation(engine) -> None:
    info = engine.info
    fmt = chat_format_for(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    spy = Recording(engine)
    judge = JudgeTagger(spy, fmt, info.model_id)
    table = pa.Table.from_pylist([{**r, "uuid": f"u{i}"} for i, r in enumerate(SFT[:1])])
    out = TagStage(["safety"], judge=judge, safety_on="response")(table, NullProgress())
    rows = out.rows.to_pylist()
    for row, prompt in zip(rows, spy.prompts, strict=False):
        assert row["response"] in prompt and "Assistant: " in prompt
        assert row["safety_on"] == "response"
        if row["llama_guard_2"] is not None:
            assert row["llama_guard_2"].split("\n")[0] == row["safety"]
    assert sum(r["llama_guard_2"] is None for r in rows) == out.rejections.get("safety_invalid", 0)
