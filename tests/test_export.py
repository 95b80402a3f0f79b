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
    MAGPIE_DPO_LAYOUT,
    MAGPIE_SFT_LAYOUT,
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


# The published layouts, spelled out from the datasets' `dataset_info` (independent of the code).
PUBLISHED_DPO = [
    ("uuid", "string"),
    ("instruction", "string"),
    (
        "gen_input_configs",
        "struct<input_generator: string, temperature: double, top_p: double>",
    ),
    ("intent", "string"),
    ("knowledge", "string"),
    ("difficulty", "string"),
    ("input_quality", "string"),
    ("quality_explanation", "string"),
    ("task_category", "string"),
    ("input_length", "int64"),
    ("responses", "list<item: string>"),
    (
        "gen_response_configs",
        "struct<engine: string, max_tokens: int64, output_generator: string, prompt: string, "
        "repetition_penalty: double, stop_tokens: list<item: string>, temperature: double, "
        "top_p: double>",
    ),
    ("rewards_armorm", "list<item: struct<score: double>>"),
    ("chosen", "list<item: struct<content: string, role: string>>"),
    ("rejected", "list<item: struct<content: string, role: string>>"),
]
PUBLISHED_SFT = [
    ("uuid", "string"),
    ("model", "string"),
    (
        "gen_input_configs",
        "struct<temperature: double, top_p: double, input_generator: string, seed: int64, "
        "pre_query_template: string>",
    ),
    ("instruction", "string"),
    ("response", "string"),
    ("conversations", "list<item: struct<from: string, value: string>>"),
    ("task_category", "string"),
    ("other_task_category", "list<item: string>"),
    ("task_category_generator", "string"),
    ("difficulty", "string"),
    ("intent", "string"),
    ("knowledge", "string"),
    ("difficulty_generator", "string"),
    ("input_quality", "string"),
    ("quality_explanation", "string"),
    ("quality_generator", "string"),
    ("llama_guard_2", "string"),
    ("reward_model", "string"),
    ("instruct_reward", "double"),
    ("min_neighbor_distance", "double"),
    ("repeat_count", "int64"),
    ("min_similar_uuid", "string"),
    ("instruction_length", "int64"),
    ("response_length", "int64"),
    ("language", "string"),
]


def _fields(schema: pa.Schema) -> list[tuple[str, str]]:
    """(name, type) of each field; Parquet names a list's item `element`, Arrow `item`."""
    return [(f.name, str(f.type).replace("list<element: ", "list<item: ")) for f in schema]


def _scored_with_configs() -> pa.Table:
    """Pairs as our stages leave them: our struct layouts, int32 lengths, extra columns."""
    pairs = _pairs()
    configs = [
        {
            "prompt": "{instruction}",
            "temperature": 0.8,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "max_tokens": 64,
            "stop_tokens": ["<|im_end|>"],
            "output_generator": "m/resp",
            "engine": "llamacpp",
            "n": 3,
            "seed": 7,
        }
    ] * pairs.num_rows
    inputs = [
        {
            "temperature": 1.0,
            "top_p": 1.0,
            "input_generator": "m/ins",
            "seed": 3,
            "pre_query_template": "<q>",
        }
    ] * pairs.num_rows
    pairs = pairs.drop_columns(["gen_input_configs"])
    pairs = pairs.append_column("gen_input_configs", pa.array(inputs))
    pairs = pairs.append_column("gen_response_configs", pa.array(configs))
    lengths = pa.array([len(t) for t in pairs.column("instruction").to_pylist()], pa.int32())
    return pairs.append_column("instruction_length", lengths)


def test_magpie_dpo_layout_field_by_field() -> None:
    dropped: dict[str, None] = {}
    out = to_format(_scored_with_configs(), "magpie", dropped=dropped)
    assert _fields(out.schema) == PUBLISHED_DPO
    assert dict(MAGPIE_DPO_LAYOUT) == {f.name: f.type for f in out.schema}
    row = out.to_pylist()[0]
    assert row["rewards_armorm"] == [{"score": 0.5}, {"score": 1.0}, {"score": -1.0}]
    assert row["chosen"][1] == {"content": "it is four", "role": "assistant"}
    assert row["task_category"] == "Math" and row["intent"] is None
    assert row["input_length"] == len("what is two plus two")
    assert row["gen_input_configs"] == {
        "input_generator": "m/ins",
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert row["gen_response_configs"]["stop_tokens"] == ["<|im_end|>"]
    assert row["gen_response_configs"]["max_tokens"] == 64
    assert "reward_margin" in dropped and "gen_input_configs" not in dropped
    assert "rewards" not in dropped and "instruction_length" not in dropped  # carried over


def test_magpie_extra_columns_follow_the_published_ones() -> None:
    out = to_format(_scored_with_configs(), "magpie", extra_columns=True)
    names = out.column_names
    assert names[: len(PUBLISHED_DPO)] == [n for n, _ in PUBLISHED_DPO]
    extra = names[len(PUBLISHED_DPO) :]
    assert {"reward_margin", "rewards", "system_prompt", "instruction_length"} <= set(extra)
    assert out.schema.field("instruction_length").type == pa.int32()  # ours, untouched


def test_magpie_sft_layout_field_by_field() -> None:
    table = pa.table(
        {
            "uuid": ["s0", "s1"],
            "instruction": ["what is two plus two", "name a red fruit"],
            "gen_input_configs": [
                {
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "input_generator": "m/ins",
                    "seed": 1,
                    "pre_query_template": "<q>",
                }
            ]
            * 2,
            "instruction_length": pa.array([20, 16], pa.int32()),
            "responses": [["four"], ["an apple"]],
            "response": ["four", "an apple"],
            "gen_response_configs": [{"output_generator": "m/resp", "temperature": 0.6}] * 2,
            "task_category": ["Math", "Information seeking"],
            "repeat_count": pa.array([0, 2], pa.int32()),
            "response_finish_reasons": [["stop"], ["stop"]],
        }
    )
    dropped: dict[str, None] = {}
    out = to_format(table, "magpie", dropped=dropped)
    assert _fields(out.schema) == PUBLISHED_SFT
    assert dict(MAGPIE_SFT_LAYOUT) == {f.name: f.type for f in out.schema}
    row = out.to_pylist()[1]
    assert row["model"] == "m/resp" and row["response"] == "an apple"
    assert row["conversations"] == [
        {"from": "human", "value": "name a red fruit"},
        {"from": "gpt", "value": "an apple"},
    ]
    assert row["response_length"] == len("an apple") and row["instruction_length"] == 16
    assert row["repeat_count"] == 2 and row["language"] is None
    assert set(dropped) == {"responses", "gen_response_configs", "response_finish_reasons"}


def test_magpie_sft_from_instructions_and_mt_columns() -> None:
    """Instruction-only rows keep the SFT layout (null replies); follow-up columns stay."""
    ins = pa.table({"uuid": ["a"], "instruction": ["hi there"]})
    out = to_format(ins, "magpie")
    assert _fields(out.schema) == PUBLISHED_SFT
    assert out.to_pylist()[0]["response"] is None and out.to_pylist()[0]["instruction_length"] == 8
    mt = pa.table(
        {
            "instruction": ["q1"],
            "response": ["r1"],
            "instruction_2": ["q2"],
            "response_2": ["r2"],
            "conversations": [
                [
                    {"from": "human", "value": v} if i % 2 == 0 else {"from": "gpt", "value": v}
                    for i, v in enumerate(["q1", "r1", "q2", "r2"])
                ]
            ],
        }
    )
    names = to_format(mt, "magpie").column_names
    at = names.index("conversations")
    assert names[at + 1 : at + 3] == ["instruction_2", "response_2"]


def test_magpie_refuses_a_column_of_another_type() -> None:
    table = _pairs().set_column(
        _pairs().column_names.index("task_category"), "task_category", pa.array([[1]] * 3)
    )
    with pytest.raises(ExportError, match="'task_category' is list<item: int64>"):
        to_format(table, "magpie")


def test_magpie_keeps_existing_rewards_armorm() -> None:
    pairs = _pairs()
    scores = pa.array([[{"score": 9.0}]] * pairs.num_rows, type=MAGPIE_DPO_LAYOUT["rewards_armorm"])
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
        assert ds.column_names == list(MAGPIE_DPO_LAYOUT)


@pytest.mark.parametrize("fmt", ["sharegpt", "openai"])
def test_export_sft_loads_with_datasets(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _sft(), [2])
    export_dataset(src, out, fmt)
    ds = _load(out, fmt, tmp_path / "cache")
    assert ds.num_rows == 2


def _many_pairs(copies: int) -> pa.Table:
    """`copies` x the fixture pairs with distinct uuids."""
    tables = []
    for k in range(copies):
        part = _pairs()
        uuids = [f"{u}-{k}" for u in part.column("uuid").to_pylist()]
        tables.append(part.set_column(part.column_names.index("uuid"), "uuid", pa.array(uuids)))
    return pa.concat_tables(tables)


@pytest.mark.parametrize("fmt", ["magpie", "trl", "jsonl"])
def test_test_split_loads_as_two_splits(tmp_path: Path, fmt: str) -> None:
    import datasets

    from magpie.card import write_card
    from magpie.stats import dataset_stats

    src = tmp_path / "src"
    table = _many_pairs(20)  # 60 rows over 3 shards
    _write_shards(src, table, [25, 5, 30])
    first = export_dataset(src, tmp_path / "a", fmt, test_size=0.05, split_seed=3)
    assert dict(first.splits) == {"train": 57, "test": 3} and "test 3" in first.summary()
    manifest = json.loads((tmp_path / "a" / MANIFEST_PATH).read_text())
    assert manifest["splits"] == {"train": 57, "test": 3} and manifest["split_seed"] == 3
    ds = datasets.load_dataset(str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "test"}
    assert (ds["train"].num_rows, ds["test"].num_rows) == (57, 3)
    again = export_dataset(src, tmp_path / "b", fmt, test_size=0.05, split_seed=3)
    other = export_dataset(src, tmp_path / "c", fmt, test_size=0.05, split_seed=4)

    def test_files(report) -> list[bytes]:
        return [p.read_bytes() for p in report.files if p.name.startswith("test")]

    assert test_files(first) == test_files(again)  # same seed, same split
    assert test_files(first) != test_files(other)
    if fmt == "magpie":
        ids = set(ds["train"]["uuid"]) | set(ds["test"]["uuid"])
        assert ids == set(table.column("uuid").to_pylist())  # every row exactly once
        assert dataset_stats(tmp_path / "a").rows == 60
        card = write_card(tmp_path / "a", plots=False)
        assert card.splits == {"train": 57, "test": 3}
        for path in first.files:  # every shard of both splits has the published layout
            assert _fields(pq.read_schema(path)) == PUBLISHED_DPO


@pytest.mark.parametrize("fmt", ["magpie", "jsonl"])
def test_overwrite_removes_an_earlier_test_split(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_shards(src, _many_pairs(10), [30])
    export_dataset(src, out, fmt, test_size=0.1)
    assert any(p.name.startswith("test") for p in out.iterdir())
    report = export_dataset(src, out, fmt, overwrite=True)  # no split this time
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".magpie", *(p.name for p in report.files)])


def test_test_size_is_checked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_shards(src, _pairs(), [3])
    for bad in (0.0, 1.0, 2):
        with pytest.raises(ExportError, match="--test-size"):
            export_dataset(src, tmp_path / "out", "trl", test_size=bad)
    assert not (tmp_path / "out").exists()
    report = export_dataset(src, tmp_path / "out", "trl", test_size=0.9)  # 3 rows: train keeps 1
    assert dict(report.splits) == {"train": 1, "test": 2}


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


# ----------------------------------------------------------------------------- CLI


def test_cli_export_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from magpie import cli

    src = tmp_path / "src"
    _write_shards(src, _many_pairs(10), [30])
    args = ["export", "--in", str(src), "-f", "magpie", "--test-size", "0.1", "--split-seed", "1"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "a")])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "(train 27, test 3)" in text and "--extra-columns keeps them" in text
    assert (
        "reward_margin" not in pq.read_schema(tmp_path / "a" / "test-00000-of-00001.parquet").names
    )
    extra = [*args, "--extra-columns", "--out", str(tmp_path / "b")]
    assert CliRunner().invoke(cli.app, extra).exit_code == 0
    assert "reward_margin" in pq.read_schema(tmp_path / "b" / "test-00000-of-00001.parquet").names
    bad = CliRunner().invoke(
        cli.app, [*args[:-2], "--test-size", "5", "--out", str(tmp_path / "c")]
    )
    assert bad.exit_code == 2 and "--test-size 5.0 is not a fraction" in " ".join(
        bad.output.split()
    )


def test_sft_export_of_our_own_stages(tmp_path: Path) -> None:
    """instructions -> responses --n 1 (fake engine) -> --format magpie: the published SFT
    layout, field for field, with both splits readable by `datasets`."""
    import io

    import datasets
    from rich.console import Console

    from magpie import pipeline
    from magpie.config import InstructionsConfig, ResponsesConfig
    from magpie.executors.base import ProgressView

    view = ProgressView(Console(file=io.StringIO()), enabled=False)
    fake = {"name": "fake"}
    ins = InstructionsConfig.model_validate({"engine": fake, "num": 20, "max_tokens": 20})
    pipeline.instructions(ins, tmp_path / "ins", view)
    res = ResponsesConfig.model_validate({"engine": fake, "n": 1, "max_tokens": 20})
    pipeline.responses(res, tmp_path / "ins", tmp_path / "res", view)
    report = pipeline.export(tmp_path / "res", tmp_path / "sft", "magpie", test_size=0.1)
    assert dict(report.splits) == {"train": 18, "test": 2}
    for path in report.files:
        assert _fields(pq.read_schema(path)) == PUBLISHED_SFT
    ds = datasets.load_dataset(str(tmp_path / "sft"), cache_dir=str(tmp_path / "cache"))
    row = ds["test"][0]
    assert row["model"] == "fake/default" and row["response"]
    assert row["conversations"][1] == {"from": "gpt", "value": row["response"]}
    assert row["response_length"] == len(row["response"])
    assert row["gen_input_configs"]["input_generator"] == "fake/default"
