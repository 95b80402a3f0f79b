"""GGUF -> Hugging Face directory export of the bundled SmolLM2 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magpie.engines.hf import export_gguf_to_hf, hf_model_info
from magpie.engines.llamacpp import bundled_model_path
from magpie.errors import MagpieError

pytest.importorskip("gguf", reason="GGUF export needs `pip install gguf accelerate`")

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "smollm2"
    assert export_gguf_to_hf(bundled_model_path(), out) == out
    return out


def test_config_is_a_plain_model(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert any(exported.glob("*.safetensors"))
    assert not list(exported.parent.glob(".*tmp*")), "the temporary directory was left behind"


def test_tokenizer_keeps_template_and_special_tokens(exported: Path) -> None:
    info = hf_model_info(str(exported))
    assert info.bos_token == "<|im_start|>"
    assert info.eos_token == "<|im_end|>"
    assert "<|im_start|>" in (info.chat_template or "")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    ids = tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode(
        "hi", add_special_tokens=False
    ), "SmolLM2 adds no BOS of its own"


def test_transformers_loads_and_generates(exported: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert getattr(model, "hf_quantizer", None) is None
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_refuses_existing_directory_and_missing_file(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(MagpieError, match="already exists"):
        export_gguf_to_hf(bundled_model_path(), exported)
    with pytest.raises(MagpieError, match="does not exist"):
        export_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
