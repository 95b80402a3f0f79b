"""Tests of the sequence-classification reward backend on tiny models built offline in tmp dirs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from magpie.rewards.classifier import (
    ClassifierRewardModel,
    RewardModelError,
    reward_column,
    short_name,
)

# Nothing here may reach a hub; set before transformers / huggingface_hub are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

requires_torch = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "tokenizers")),
    reason="needs torch, transformers and tokenizers",
)

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "write a short poem about the sea and the sky",
    "what is two plus two ? the answer is four",
    "explain why the sky is blue in simple words",
    "light scatters more at short wavelengths so blue dominates",
    "here is a poem : waves roll under a grey sky",
    "sorry , i can not help with that request",
    "one two three four five six seven eight nine ten",
]


def conv(user: str, assistant: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


CONVERSATIONS = [
    conv("what is two plus two ?", "the answer is four"),
    conv("write a short poem about the sea", "here is a poem : waves roll under a grey sky"),
    conv(
        "explain why the sky is blue", "light scatters more at short wavelengths so blue dominates"
    ),
    conv("explain why the sky is blue", "sorry , i can not help with that request"),
    conv("what is two plus two ?", "four", system="one two three"),
    conv("write a poem", "the quick brown fox jumps over the lazy dog " * 3),
    conv("count", "one two three four five six seven eight nine ten"),
    conv("what is two plus two ?", "five"),
    conv("explain why the sky is blue in simple words", "blue"),
    conv("write a short poem about the sky", "waves roll under a grey sky " * 2),
    conv("hello", "the lazy dog"),
]


# --------------------------------------------------------------------------- builders


def build_tokenizer(with_pad: bool = True) -> Any:
    """A WordLevel tokenizer trained on CORPUS, with BOS/EOS (and pad) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_llama(path: Path, *, with_pad: bool = True, num_labels: int = 1) -> Path:
    """Save a tiny random LlamaForSequenceClassification and its tokenizer under `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer(with_pad)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if with_pad else None,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a unit-scale head, so that scores differ visibly between inputs
        model.score.weight.normal_(std=1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CUSTOM_CONFIG_PY = """
from transformers import PretrainedConfig


class TinyRMConfig(PretrainedConfig):
    model_type = "tiny_rm"

    def __init__(self, vocab_size=32, hidden_size=8, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
"""

CUSTOM_MODELING_PY = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tiny_rm import TinyRMConfig


@dataclass
class TinyRMOutput(ModelOutput):
    """Like ArmoRM's output: per-objective logits plus one preference `score`."""

    logits: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None


class TinyRMForScoring(PreTrainedModel):
    config_class = TinyRMConfig
    base_model_prefix = "tiny_rm"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.objectives = nn.Linear(config.hidden_size, config.num_labels)
        self.gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return TinyRMOutput(logits=self.objectives(pooled), score=self.gate(pooled))
'''


def build_custom(path: Path, model_type: str = "tiny_rm") -> dict[str, Any]:
    """An ArmoRM-style checkpoint whose model class ships as code; returns its weights."""
    import torch
    from safetensors.torch import save_file

    tokenizer = build_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tiny_rm.py").write_text(CUSTOM_CONFIG_PY)
    (path / "modeling_tiny_rm.py").write_text(CUSTOM_MODELING_PY)
    config = {
        "model_type": model_type,
        "architectures": ["TinyRMForScoring"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_rm.TinyRMConfig",
            "AutoModelForSequenceClassification": "modeling_tiny_rm.TinyRMForScoring",
        },
        "vocab_size": len(tokenizer),
        "hidden_size": 8,
        "id2label": {"0": "helpful", "1": "honest", "2": "safe"},
        "label2id": {"helpful": 0, "honest": 1, "safe": 2},
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weights = {
        "embed.weight": torch.randn(len(tokenizer), 8, generator=generator),
        "objectives.weight": torch.randn(3, 8, generator=generator),
        "objectives.bias": torch.zeros(3),
        "gate.weight": torch.randn(1, 8, generator=generator),
        "gate.bias": torch.tensor([0.5]),
    }
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return weights


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("rm") / "Tiny-Reward-Llama-0.1")


@pytest.fixture(scope="module")
def nopad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("rm") / "tiny-nopad", with_pad=False)


@pytest.fixture(scope="module")
def rm(llama_dir: Path) -> ClassifierRewardModel:
    return ClassifierRewardModel(llama_dir, device="cpu", batch_size=4)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("RLHFlow/ArmoRM-Llama3-8B-v0.1", "armorm"),
        ("Skywork/Skywork-Reward-V2-Llama-3.1-8B", "skywork_reward_v2_llama_3_1_8b"),
        ("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2", "skywork"),
        ("sfairXC/FsfairX-LLaMA3-RM-v0.1", "fsfairx"),
        ("infly/INF-ORM-Llama3.1-70B", "inf_orm"),
        ("/models/My Reward.Model-v2/", "my_reward_model_v2"),
        ("/models/ArmoRM-Llama3-8B-v0.1", "armorm"),
        ("/hf/hub/models--RLHFlow--ArmoRM-Llama3-8B-v0.1/snapshots/abc123", "armorm"),
        ("./--", "reward_model"),
    ],
)
def test_short_name(model_id: str, expected: str) -> None:
    assert short_name(model_id) == expected
    assert reward_column(model_id) == f"rewards_{expected}"


# --------------------------------------------------------------------------- scoring


@requires_torch
def test_scores_finite_deterministic_and_in_order(rm: ClassifierRewardModel) -> None:
    scores = rm.score(CONVERSATIONS)
    assert len(scores) == len(CONVERSATIONS)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len({round(s, 4) for s in scores}) == len(scores), "scores should differ by input"
    assert rm.score(CONVERSATIONS) == scores
    assert rm.score(CONVERSATIONS[::-1]) == pytest.approx(scores[::-1], abs=1e-5)
    assert rm.score([]) == []
    assert rm.model_id == str(rm.model_id) and rm.short_name == "tiny_reward_llama_0_1"
    assert rm.column == "rewards_tiny_reward_llama_0_1"


@requires_torch
@pytest.mark.parametrize("which", ["llama_dir", "nopad_dir"])
def test_batched_equals_one_at_a_time(which: str, request: pytest.FixtureRequest) -> None:
    """Right padding in sorted batches gives the original Magpie's batch-size-1 scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = request.getfixturevalue(which)
    single = ClassifierRewardModel(path, device="cpu", dtype="float32", batch_size=1)
    batched = ClassifierRewardModel(path, device="cpu", dtype="float32", batch_size=8)
    reference = single.score(CONVERSATIONS)
    assert batched.score(CONVERSATIONS) == pytest.approx(reference, abs=1e-4)
    assert batched.model.config.pad_token_id == batched.pad_token_id

    # The original way: tokenize through the template itself, score unpadded, stock config.
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for conversation, expected in zip(CONVERSATIONS[:3], reference[:3], strict=True):
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
        with torch.inference_mode():
            logit = model(torch.tensor([ids["input_ids"]])).logits[0, 0].item()
        assert logit == pytest.approx(expected, abs=1e-4)


@requires_torch
def test_pad_token_ending_inputs_warns_and_still_matches(
    nopad_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """EOS pads when there is no pad token; inputs ending in EOS are flagged, scores still agree."""
    models = [ClassifierRewardModel(nopad_dir, device="cpu", batch_size=n) for n in (1, 8)]
    for model in models:
        model.tokenizer.chat_template = CHAT_TEMPLATE + "{{ eos_token }}"
    with caplog.at_level("WARNING", logger="magpie.rewards.classifier"):
        single, batched = (model.score(CONVERSATIONS) for model in models)
    assert "end with its pad token" in caplog.text
    assert batched == pytest.approx(single, abs=1e-4)


@requires_torch
def test_progress_counts_every_conversation(llama_dir: Path) -> None:
    model = ClassifierRewardModel(llama_dir, device="cpu", batch_size=3)
    calls: list[int] = []
    model.score(CONVERSATIONS, progress=calls.append)
    assert calls == [3, 3, 3, 2]


@requires_torch
def test_truncation_keeps_the_first_max_length_tokens(llama_dir: Path) -> None:
    long = conv("write a poem", "the quick brown fox jumps over the lazy dog " * 4)
    longer = conv("write a poem", "the quick brown fox jumps over the lazy dog " * 4 + "sky blue")
    full = ClassifierRewardModel(llama_dir, device="cpu")
    cut = ClassifierRewardModel(llama_dir, device="cpu", max_length=12)
    assert all(len(ids) == 12 for ids in cut.encode([long, longer]))
    a, b = cut.score([long, longer])
    assert a == pytest.approx(b, abs=1e-5)
    a, b = full.score([long, longer])
    assert abs(a - b) > 1e-4
    capped = ClassifierRewardModel(llama_dir, device="cpu", max_length=100_000)
    assert capped.max_length == 256  # the model's max_position_embeddings


@requires_torch
def test_template_tokens_are_not_doubled(rm: ClassifierRewardModel) -> None:
    """The template writes BOS itself; encoding must not add another."""
    ids = rm.encode([CONVERSATIONS[0]])[0]
    bos = rm.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert rm.tokenizer.unk_token_id not in ids


@requires_torch
def test_several_labels_need_label_index(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "multi", num_labels=3)
    with pytest.raises(RewardModelError, match="label_index"):
        ClassifierRewardModel(path, device="cpu")
    with pytest.raises(RewardModelError, match="out of range"):
        ClassifierRewardModel(path, device="cpu", label_index=3)
    scores = ClassifierRewardModel(path, device="cpu", label_index=2).score(CONVERSATIONS[:2])
    assert all(math.isfinite(s) for s in scores)


# --------------------------------------------------------------------------- custom code


@requires_torch
@pytest.mark.parametrize("model_type", ["tiny_rm", "llama"])
def test_custom_code_needs_trust(tmp_path: Path, model_type: str) -> None:
    """Also when transformers knows the model_type (ArmoRM says "llama") and would load silently."""
    path = tmp_path / "TinyArmo"
    build_custom(path, model_type)
    with pytest.raises(RewardModelError, match="--trust-remote-code") as info:
        ClassifierRewardModel(path, device="cpu")
    assert "\n" not in str(info.value)


@requires_torch
def test_custom_code_score_attribute_is_used(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "TinyArmo"
    weights = build_custom(path)
    model = ClassifierRewardModel(path, device="cpu", batch_size=4, trust_remote_code=True)
    assert model.custom_code
    scores = model.score(CONVERSATIONS)  # logits have 3 labels: only `.score` makes this work
    expected = []
    for ids in model.encode(CONVERSATIONS):
        pooled = weights["embed.weight"][torch.tensor(ids)].mean(0)
        expected.append((weights["gate.weight"][0] @ pooled + weights["gate.bias"][0]).item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert ClassifierRewardModel(path, device="cpu", batch_size=1, trust_remote_code=True).score(
        CONVERSATIONS
    ) == pytest.approx(scores, abs=1e-5)


# --------------------------------------------------------------------------- errors


@requires_torch
def test_missing_path_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(RewardModelError) as info:
        ClassifierRewardModel(missing)
    message = str(info.value)
    assert str(missing) in message and "\n" not in message


@requires_torch
def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(RewardModelError, match="config.json"):
        ClassifierRewardModel(tmp_path)


@requires_torch
def test_uncached_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RewardModelError, match="nobody-xyz/no-such-reward-model") as info:
        ClassifierRewardModel("nobody-xyz/no-such-reward-model")
    assert "\n" not in str(info.value)


@requires_torch
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8"}, "unknown dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_bad_arguments(llama_dir: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RewardModelError, match=match):
        ClassifierRewardModel(llama_dir, device="cpu", **kwargs)
