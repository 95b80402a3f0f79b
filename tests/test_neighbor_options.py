"""Neighbour options: any sentence-transformers directory (`--embedding-model`) and `--k`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from magpie.stages.neighbors import default_model_path, embed, load_encoder, tag_neighbors

TEXTS = [
    "How do volcanoes form?",
    "how do volcanoes form",
    "Write a haiku about winter.",
    "What is the capital of Peru?",
    "What is the capital city of Peru?",
    "Explain photosynthesis to a child.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 16-dimension BERT encoder with mean pooling, saved as sentence-transformers."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("st")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=128,
        )
    )  # fmt: skip
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"), max_seq_length=64)
    model = SentenceTransformer(modules=[word, models.Pooling(16, pooling_mode="mean")])
    model.save(str(root / "tiny-st"))
    return root / "tiny-st"


def test_a_saved_copy_of_the_default_embeds_the_same(tmp_path: Path) -> None:
    copy = tmp_path / "minilm-copy"
    load_encoder().save(str(copy))
    np.testing.assert_allclose(embed(TEXTS, str(copy)), embed(TEXTS), atol=1e-5)


def test_cli_uses_the_given_model_and_k(tiny_model: Path, tmp_path: Path) -> None:
    assert embed(TEXTS, str(tiny_model)).shape == (len(TEXTS), 16)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    result = run_cli(
        "tag", "--in", str(source), "--out", str(out), "--tags", "neighbors",
        "--embedding-model", str(tiny_model), "--k", "2", "--neighbor-threshold", "0.3", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = pq.read_table(out)
    table = pa.table({"uuid": got.column("uuid"), "instruction": TEXTS})
    expected = tag_neighbors(table, model=str(tiny_model), k=2, distance_threshold=0.3)
    for name in ("repeat_count", "min_similar_uuid"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist()
    np.testing.assert_allclose(
        got.column("min_neighbor_distance").to_numpy(),
        expected.column("min_neighbor_distance").to_numpy(),
        atol=1e-5,
    )
    config = json.loads((out / ".magpie" / "manifest.json").read_text())["config"]["config"]
    assert (config["embedding_model"], config["neighbor_k"]) == (str(tiny_model), 2)


def test_an_unloadable_model_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"instruction": "hello there"}) + "\n")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = run_cli(
        "tag", "--in", str(source), "--out", str(tmp_path / "o"), "--tags", "neighbors",
        "--embedding-model", str(empty), "-q",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--embedding-model" in result.stderr and "Traceback" not in result.stderr
