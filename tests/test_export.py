"""Export formats: conversions, atomic directory export, `datasets` loading, TRL DPO training."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from magpie.errors import MagpieError  # noqa: E402
from magpie.export import (  # noqa: E402
    FORMATS,
    JSONL_NAME,
    MAGPIE_DPO_COLUMNS,
    MANIFEST_PATH,
    ExportError,
    export_dataset,
    to_format,
)
from magpie.stages.pairs import make_pairs  # noqa: E402

QUESTIONS = [
    "what is two plus two",
    "name a red fruit",
    "say hello in french",
    "what color is the sky",
]
ANSWERS = [
    ["four", "it is four", "five maybe"],
    ["an apple", "a red apple", "a banana"],
    ["bonjour", "hello", "bonjour friend"],
    ["blue", "the sky is blue", "green"],
]


def _scored(system: bool = False) -> pa.Table:
    """A scored table as the rewards stage leaves it (one row without a usable pair)."""
    rows = []
    for i, (q, answers) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        rows.append(
            {
                "uuid": f"u{i}",
                "instruction": q,
                "responses": answers,
                "rewards": [0.5, 1.0 + i, -1.0] if i < 3 else [None, None, 0.1],
                "reward_model": "test/rm",
                "gen_input_configs": {"temperature": 1.0, "top_p": 1.0},
                "response_finish_reasons": ["stop", "stop", "stop"],
                "task_category": "Math",
                "system_prompt": ("you are a kind tutor" if system and i == 0 else None),
            }
        )
    return pa.Table.from_pylist(rows)


def _pairs(system: bool = False) -> pa.Table:
    pairs, aside = make_pairs(_scored(system))
    assert pairs.num_rows == 3 and aside.num_rows == 1
    return pairs


def _sft() -> pa.Table:
    return pa.table(
        {
            "uuid": ["s0", "s1"],
            "instruction": ["what is two plus two", "name a red fruit"],
            "responses": [["four"], ["", "an apple"]],
        }
    )


def _write_shards(src: Path, table: pa.Table, sizes: list[int]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        pq.write_table(table.slice(start, size), src / f"shard-{i:05d}.parquet")
        start += size


def _load(out: Path, fmt: str, cache: Path):
    import datasets

    builder = "json" if fmt == "jsonl" else "parquet"
    return datasets.load_dataset(builder, data_dir=str(out), split="train", cache_dir=str(cache))


# ----------------------------------------------------------------------------- pure conversions


def test_magpie_format_schema() -> None:
    out = to_format(_pairs(), "magpie")
    assert out.column_names == list(MAGPIE_DPO_COLUMNS)
    for name in ("intent", "difficulty_generator", "repeat_count", "response_length"):
        assert out.schema.field(name).type == MAGPIE_DPO_COLUMNS[name]
        assert out.column(name).null_count == out.num_rows
    assert out.schema.field("rewards_armorm").type == MAGPIE_DPO_COLUMNS["rewards_armorm"]
    row = out.to_pylist()[0]
    assert row["rewards_armorm"] == [{"score": 0.5}, {"score": 1.0}, {"score": -1.0}]
    assert row["chosen"][1] == {"content": "it is four", "role": "assistant"}
    assert row["task_category"] == "Math"


def test_magpie_keeps_existing_rewards_armorm() -> None:
    pairs = _pairs()
    scores = pa.array(
        [[{"score": 9.0}]] * pairs.num_rows, type=MAGPIE_DPO_COLUMNS["rewards_armorm"]
    )
    out = to_format(pairs.append_column("rewards_armorm", scores), "magpie")
    assert out.column("rewards_armorm").to_pylist()[0] == [{"score": 9.0}]


def test_trl_format_with_system_prompt() -> None:
    rows = to_format(_pairs(system=True), "trl").to_pylist()
    assert rows[0] == {
        "prompt": [
            {"content": "you are a kind tutor", "role": "system"},
            {"content": "what is two plus two", "role": "user"},
        ],
        "chosen": [{"content": "it is four", "role": "assistant"}],
        "rejected": [{"content": "five maybe", "role": "assistant"}],
    }
    assert rows[1]["prompt"] == [{"content": "name a red fruit", "role": "user"}]


def test_trl_needs_pairs() -> None:
    with pytest.raises(ExportError, match="magpie pairs"):
        to_format(_sft(), "trl")


def test_sharegpt_dpo_and_sft() -> None:
    dpo = to_format(_pairs(system=True), "sharegpt").to_pylist()[0]
    assert dpo == {
        "conversations": [
            {"from": "system", "value": "you are a kind tutor"},
            {"from": "human", "value": "what is two plus two"},
        ],
        "chosen": {"from": "gpt", "value": "it is four"},
        "rejected": {"from": "gpt", "value": "five maybe"},
    }
    sft = to_format(_sft(), "sharegpt").to_pylist()
    assert sft[1]["conversations"] == [
        {"from": "human", "value": "name a red fruit"},
        {"from": "gpt", "value": "an apple"},  # first non-blank response
    ]
    convs = pa.table(
        {"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]}
    )
    assert to_format(convs, "sharegpt").to_pylist()[0]["conversations"][1]["from"] == "gpt"


def test_openai_dpo_and_sft() -> None:
    msgs = to_format(_pairs(system=True), "openai").to_pylist()[0]["messages"]
    assert msgs == [
        {"role": "system", "content": "you are a kind tutor"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "it is four"},
    ]
    table = pa.table({"instruction": ["q"], "response": ["a"], "system_prompt": [None]})
    assert to_format(table, "openai").to_pylist()[0]["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_sft_row_without_response_is_an_error() -> None:
    table = pa.table({"uuid": ["x"], "instruction": ["q"], "responses": [["  "]]})
    with pytest.raises(ExportError, match="uuid=x"):
        to_format(table, "openai")


def test_unknown_format() -> None:
    with pytest.raises(ExportError, match="unknown format"):
        to_format(_pairs(), "alpaca")


def test_jsonl_is_identity() -> None:
    pairs = _pairs()
    assert to_format(pairs, "jsonl").equals(pairs)


# ----------------------------------------------------------------------------- directories


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_dataset_loads_with_datasets(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _pairs(system=True), [2, 0, 1])
    report = export_dataset(src, out, fmt)
    assert report.rows == 3 and report.source_files == 3
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".magpie"]  # no temps
    manifest = json.loads((out / MANIFEST_PATH).read_text())
    assert manifest["format"] == fmt and manifest["rows"] == 3
    ds = _load(out, fmt, tmp_path / "cache")
    assert ds.num_rows == 3
    first = ds[0]
    if fmt == "jsonl":
        assert first["uuid"] == "u0" and first["chosen"][1]["content"] == "it is four"
        assert (out / JSONL_NAME).is_file()
    else:
        names = sorted(p.name for p in out.glob("*.parquet"))  # the empty source is skipped
        assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    if fmt == "trl":
        assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
        assert first["prompt"][0]["role"] == "system"
    if fmt == "magpie":
        assert ds.column_names == list(MAGPIE_DPO_COLUMNS)


@pytest.mark.parametrize("fmt", ["sharegpt", "openai"])
def test_export_sft_loads_with_datasets(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _sft(), [2])
    export_dataset(src, out, fmt)
    ds = _load(out, fmt, tmp_path / "cache")
    assert ds.num_rows == 2


def test_all_empty_source_keeps_one_typed_shard(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _pairs().slice(0, 0), [0, 0])
    report = export_dataset(src, out, "trl")
    assert report.rows == 0 and len(report.files) == 1
    assert pq.read_table(report.files[0]).column_names == ["prompt", "chosen", "rejected"]


def test_jsonl_nan_becomes_null(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, pa.table({"uuid": ["a"], "score": [math.nan], "t": [[1.0, math.inf]]}), [1])
    export_dataset(src, out, "jsonl")
    assert json.loads((out / JSONL_NAME).read_text()) == {
        "uuid": "a",
        "score": None,
        "t": [1.0, None],
    }


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _pairs(), [3])
    out.mkdir()
    (out / "old.parquet").write_bytes(b"stale")
    with pytest.raises(MagpieError, match="did not write") as err:  # not ours: never replaced
        export_dataset(src, out, "trl", overwrite=True)
    assert (out / "old.parquet").read_bytes() == b"stale"
    (out / "old.parquet").unlink()
    export_dataset(src, out, "jsonl")
    (out / "README.md").write_text("card")
    with pytest.raises(MagpieError, match="--overwrite") as err:
        export_dataset(src, out, "trl")
    assert "\n" not in str(err.value)
    export_dataset(src, out, "trl", overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".magpie", "README.md", "train-00000-of-00001.parquet"]


def test_failed_export_leaves_no_temp_files(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    pq.write_table(_pairs(), src / "a.parquet")
    pq.write_table(_sft(), src / "b.parquet")  # rows without pairs: fails after a.parquet
    with pytest.raises(ExportError, match="magpie pairs"):
        export_dataset(src, out, "trl")
    assert list(out.iterdir()) == []


def test_refuses_src_as_out_and_empty_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_shards(src, _pairs(), [3])
    with pytest.raises(ExportError, match="source directory"):
        export_dataset(src, src, "trl", overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no \\*.parquet"):
        export_dataset(tmp_path / "empty", tmp_path / "out", "trl")


# ----------------------------------------------------------------------------- TRL


def _tiny_tokenizer(path: Path):
    """A WordLevel tokenizer over the fixture words, with a chat template, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = {
        w for text in [*QUESTIONS, *sum(ANSWERS, []), "you are a kind tutor"] for w in text.split()
    }
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=specials[3:],
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tok.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # TRL internals
def test_trl_export_trains_with_dpo_trainer(tmp_path: Path) -> None:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _pairs(system=True), [3])
    export_dataset(src, out, "trl")
    train = datasets.load_dataset(
        "parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )

    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    # loaded from disk: TRL builds the reference model from the policy's `_name_or_path`
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=64,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # transformers 5 name; TRL defaults it on
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
