"""SQL filters, presets and dataset statistics over a small tagged fixture dataset."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from magpie.errors import MagpieError
from magpie.filters import (
    PRESETS,
    describe_presets,
    filter_dataset,
    plan_filter,
    render_filter_report,
)
from magpie.stats import dataset_stats, render_stats
from magpie.store import ShardStore

N = 300
QUALITY = ["excellent", "good", "average", "poor", "very poor"]
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
Row = dict[str, Any]


def make_row(i: int) -> Row:
    """Row i of the fixture; rows 100+j and 200+j (j < 10) are planted near-duplicates of row j."""
    base = i % 100 if (100 <= i < 110 or 200 <= i < 210) else i
    dup = base != i or (i < 10)
    if i % 33 == 5:
        instruction = f"Hi {i}"  # too short for magpie-filtered
    elif i % 25 == 7:
        instruction = f"Complete the following list {i}:"  # incomplete
    else:
        instruction = f"Question number {base} about a topic"
    has_pair = i % 15 != 14
    chosen_reward = 1.0 + (i % 10) * 0.02 if has_pair else None
    return {
        "uuid": f"u{i:04d}",
        "instruction": instruction,
        "instruction_length": None if i % 50 == 3 else len(instruction),
        "difficulty": ["easy", "medium", "hard"][i % 3],
        "input_quality": None if i % 30 == 29 else QUALITY[i % 5],
        "task_category": ["Information seeking", "Math", "Coding & Debugging", "Planning"][i % 4],
        "llama_guard_2": "unsafe\nS2" if i % 20 == 0 else "safe",
        "instruct_reward": None if i % 60 == 11 else float(i % 40 - 20),
        "language": {4: "ZH", 9: None, 8: "en"}.get(i % 10, "EN"),
        "min_neighbor_distance": 0.0 if dup else 0.3 + (i % 7) * 0.1,
        "repeat_count": 2 if dup else 0,
        "min_similar_uuid": f"u{base:04d}" if dup else None,
        "responses": [f"answer {i}", f"reply {i}!"],
        "chosen": [
            {"content": instruction, "role": "user"},
            {"content": "yes" * (i % 4 + 1), "role": "assistant"},
        ]
        if has_pair
        else None,
        "rejected": [
            {"content": instruction, "role": "user"},
            {"content": "no", "role": "assistant"},
        ]
        if has_pair
        else None,
        "chosen_reward": chosen_reward,
        "rejected_reward": 1.0 if has_pair else None,
        "reward_margin": (i % 10) * 0.02 if has_pair else None,
    }


ROWS = [make_row(i) for i in range(N)]
TYPES = {
    "instruction_length": pa.int32(),
    "repeat_count": pa.int64(),
    "responses": pa.list_(pa.string()),
    "chosen": MESSAGES,
    "rejected": MESSAGES,
}


def write_dataset(
    root: Path, rows: list[Row], drop: Callable[[int], list[str]] = lambda k: []
) -> Path:
    """Rows as three shards (shard k drops the columns `drop(k)`) plus a complete manifest."""
    store = ShardStore(root)
    root.mkdir(parents=True)
    size = -(-len(rows) // 3)
    for k in range(3):
        chunk = rows[k * size : (k + 1) * size]
        names = [c for c in rows[0] if c not in drop(k)]
        table = pa.table({c: pa.array([r[c] for r in chunk], TYPES.get(c)) for c in names})
        store.commit(k, table, {"shard": k, "rows": table.num_rows})
    store.update_manifest(
        stage="fixture", config_hash="abc", config={}, complete=True, rows=len(rows)
    )
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture: shard 2 (rows 200-299) lacks llama_guard_2, so it reads as null there."""
    return write_dataset(
        tmp_path_factory.mktemp("filters") / "src",
        ROWS,
        lambda k: ["llama_guard_2"] if k == 2 else [],
    )


# ---- a plain-Python oracle of the presets ---------------------------------------------------


def _ge(value: Any, bound: float) -> bool:
    return value is not None and value >= bound


ORACLE: dict[str, Callable[[Row], bool]] = {
    "input_quality": lambda r: r["input_quality"] in ("good", "excellent"),
    "instruct_reward": lambda r: r["instruct_reward"] is not None and r["instruct_reward"] > -10,
    "no_duplicates": lambda r: r["min_similar_uuid"] in (None, r["uuid"]),
    "complete_instruction": lambda r: not r["instruction"].rstrip().endswith(":"),
    "instruction_length": lambda r: (
        r["instruction_length"] is not None and 10 <= r["instruction_length"] <= 4096
    ),
    "language": lambda r: (r["language"] or "").upper() == "EN",
    "has_pair": lambda r: r["chosen"] is not None and r["rejected"] is not None,
    "reward_margin": lambda r: _ge(r["reward_margin"], 0.05),
}


def oracle_counts(names: list[str], rows: list[Row] = ROWS) -> tuple[list[int], list[int]]:
    """(rows failing each condition alone, rows left after each in order)."""
    alone = [sum(not ORACLE[n](r) for r in rows) for n in names]
    left, kept = [], rows
    for n in names:
        kept = [r for r in kept if ORACLE[n](r)]
        left.append(len(kept))
    return alone, left


# ---- filtering ------------------------------------------------------------------------------


def test_where_only_writes_a_dataset_later_stages_accept(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = filter_dataset(src, out, where="difficulty = 'hard' AND repeat_count = 0")
    expected = [r["uuid"] for r in ROWS if r["difficulty"] == "hard" and r["repeat_count"] == 0]
    assert (report.input_rows, report.kept_rows) == (N, len(expected)) == (N, 90)
    assert [c.label for c in report.conditions] == ["where"]
    assert report.conditions[0].removed_alone == N - 90
    got = duckdb.sql(f"SELECT uuid FROM read_parquet('{out}/*.parquet')").fetchall()
    assert [u for (u,) in got] == expected  # source order kept
    manifest = json.loads((out / ".magpie" / "manifest.json").read_text())
    assert {"stage", "config_hash", "config", "complete", "rows"} <= set(manifest)
    assert (manifest["stage"], manifest["complete"], manifest["rows"]) == ("filter", True, 90)
    assert manifest["config"]["source_config_hash"] == "abc"
    assert manifest["config"]["conditions"][0]["sql"].startswith("difficulty = 'hard'")
    # source Arrow types survive DuckDB (int32 length, list<item: struct> messages)
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("instruction_length").type == pa.int32()
    assert schema.field("chosen").type == MESSAGES


def test_magpie_filtered_preset_counts_and_funnel(src: Path, tmp_path: Path) -> None:
    report = filter_dataset(src, tmp_path / "out", presets=["magpie-filtered"])
    names = [c.name for c in report.conditions]
    assert names == ["input_quality", "instruct_reward", "complete_instruction", "no_duplicates"]
    assert report.skipped == ["magpie-filtered:min_neighbor_distance"]  # off by default
    alone, left = oracle_counts(names)
    assert [c.removed_alone for c in report.conditions] == alone
    assert [c.left_after for c in report.conditions] == left
    # hand-checked: quality below good is i % 5 in (2, 3, 4), which holds the nulls (i % 30 == 29)
    assert alone[0] == 180
    assert alone[3] == 20
    assert report.kept_rows == left[-1] > 0
    assert sum(c.removed_step for c in report.conditions) == N - report.kept_rows
    assert all(c.removed_step <= c.removed_alone for c in report.conditions)
    assert report.conditions[0].removed_step == report.conditions[0].removed_alone
    rows = duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'out'}/*.parquet'").fetchall()
    assert rows == [(report.kept_rows,)]


def test_small_presets(src: Path) -> None:
    dpo = plan_filter(src, presets=["dpo-margin"])
    alone, left = oracle_counts(["has_pair", "reward_margin"])
    # 20 rows without a pair; 90 with a margin below 0.05 (i % 10 < 3)
    assert [c.removed_alone for c in dpo.conditions] == alone == [20, 20 + 90]
    assert dpo.kept_rows == left[-1] == 190
    english = plan_filter(src, presets=["english"])
    assert english.kept_rows == 240  # 'en' counts as EN; ZH and nulls go
    assert plan_filter(src, presets=["no-duplicates"]).kept_rows == N - 20
    safe = plan_filter(src, presets=["safe"])
    assert safe.kept_rows == 190  # shard 2 has no llama_guard_2 column: null is not safe
    both = plan_filter(src, where="difficulty = 'easy'", presets=["english", "no-duplicates"])
    assert [c.label for c in both.conditions] == [
        "where",
        "english:language",
        "no-duplicates:no_duplicates",
    ]
    expected = [
        r
        for r in ROWS
        if r["difficulty"] == "easy" and ORACLE["language"](r) and ORACLE["no_duplicates"](r)
    ]
    assert both.kept_rows == len(expected)


def test_params_override_enable_and_disable(src: Path) -> None:
    report = plan_filter(src, presets=["dpo-margin"], params={"min_margin": "0.1"})
    assert report.kept_rows == sum(
        1 for r in ROWS if r["reward_margin"] is not None and r["reward_margin"] >= 0.1
    )
    assert report.params == {"min_margin": 0.1}
    tuned = plan_filter(
        src,
        presets=["magpie-filtered", "english", "instruction-length"],
        params={"min_distance": 0.5, "lang": "none", "min_quality": "average", "max_length": 30},
    )
    labels = [c.name for c in tuned.conditions]
    assert "min_neighbor_distance" in labels and "language" not in labels
    assert tuned.skipped == ["english:language"]
    by_name = {c.name: c for c in tuned.conditions}
    assert by_name["min_neighbor_distance"].removed_alone == sum(
        1 for r in ROWS if not r["min_neighbor_distance"] > 0.5
    )
    assert by_name["input_quality"].removed_alone == sum(
        1 for r in ROWS if r["input_quality"] not in ("average", "good", "excellent")
    )
    assert "BETWEEN 10 AND 30" in by_name["instruction_length"].sql
    with pytest.raises(MagpieError, match="unknown parameter min_margn .*min_margin"):
        plan_filter(src, presets=["dpo-margin"], params={"min_margn": 1})
    with pytest.raises(MagpieError, match="min_margin must be a number"):
        plan_filter(src, presets=["dpo-margin"], params={"min_margin": "lots"})
    with pytest.raises(MagpieError, match="unknown preset 'nope'"):
        plan_filter(src, presets=["nope"])


def test_missing_columns_name_the_producing_command(tmp_path: Path) -> None:
    bare = [{k: r[k] for k in ("uuid", "instruction", "language")} for r in ROWS[:30]]
    data = write_dataset(tmp_path / "bare", bare)
    with pytest.raises(MagpieError) as err:
        plan_filter(data, presets=["magpie-filtered"])
    assert str(err.value) == (
        "input_quality, instruct_reward, min_similar_uuid are missing (needed by preset "
        "magpie-filtered): run `magpie tag --tags quality,reward,neighbors` first"
    )
    untagged = [{k: v for k, v in r.items() if k != "input_quality"} for r in ROWS[:30]]
    with pytest.raises(MagpieError) as err:
        plan_filter(write_dataset(tmp_path / "untagged", untagged), presets=["magpie-filtered"])
    assert str(err.value) == (
        "input_quality is missing (needed by preset magpie-filtered): "
        "run `magpie tag --tags quality` first"
    )
    report = plan_filter(data, presets=["english"], where="true")
    assert report.kept_rows == 24


def test_length_falls_back_to_instruction_text(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "instruction_length"} for r in ROWS]
    data = write_dataset(tmp_path / "nolen", rows)
    report = plan_filter(data, presets=["instruction-length"])
    cond = {c.name: c for c in report.conditions}["instruction_length"]
    assert cond.sql.startswith('length("instruction") BETWEEN')
    assert cond.removed_alone == sum(1 for r in ROWS if not 10 <= len(r["instruction"]) <= 4096)


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("nonexistent_col > 3", "nonexistent_col"),
        ("difficulty = ", "syntax error"),
        ("instruct_reward = 'high'", "Conversion Error"),
        ("true); (SELECT 1", "one SQL expression"),
    ],
)
def test_bad_sql_is_one_line_with_the_columns(src: Path, where: str, fragment: str) -> None:
    with pytest.raises(MagpieError) as err:
        plan_filter(src, where=where)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message and "Traceback" not in message
    error = err.value  # no chained DuckDB traceback either
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    if "SQL expression" not in fragment:
        assert "columns: uuid, instruction, instruction_length, difficulty" in message


def test_output_reads_with_datasets(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    out = tmp_path / "out"
    report = filter_dataset(src, out, presets=["no-duplicates"], shard_rows=100)
    assert report.shards == 3 and len(list(out.glob("part-*.parquet"))) == 3
    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert ds["train"].num_rows == N - 20
    assert ds["train"][0]["chosen"][1] == {"content": "yes", "role": "assistant"}
    assert ds["train"][0]["llama_guard_2"] == "unsafe\nS2"


def test_overwrite_refusal_and_overlap(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    filter_dataset(src, out, presets=["english"])
    with pytest.raises(MagpieError, match="--overwrite"):
        filter_dataset(src, out, presets=["no-duplicates"])
    report = filter_dataset(src, out, presets=["no-duplicates"], overwrite=True)
    assert ShardStore(out).read_manifest()["rows"] == report.kept_rows == N - 20
    with pytest.raises(MagpieError, match="overlaps the source"):
        filter_dataset(src, src, where="true", overwrite=True)
    with pytest.raises(MagpieError, match="overlaps the source"):
        filter_dataset(src, src / "sub", where="true")
    assert len(list(src.glob("part-*.parquet"))) == 3  # source untouched


def test_nothing_kept_and_nothing_asked(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "none"
    report = filter_dataset(src, out, where="false")
    assert (report.kept_rows, report.shards) == (0, 0)
    manifest = ShardStore(out).read_manifest()
    assert (manifest["complete"], manifest["rows"]) == (True, 0)
    assert ShardStore(out).shard_indices() == [0]  # an empty-shard marker
    assert dataset_stats(out).rows == 0
    with pytest.raises(MagpieError, match="nothing to filter by"):
        plan_filter(src)


def test_any_parquet_dataset_and_incomplete_sources(tmp_path: Path) -> None:
    foreign = tmp_path / "hub" / "data"
    foreign.mkdir(parents=True)
    pq.write_table(
        pa.table({"text": ["a", "bb", "ccc"], "score": [1, 2, 3]}), foreign / "train-0.parquet"
    )
    report = plan_filter(tmp_path / "hub", where="score >= 2")
    assert (report.input_rows, report.kept_rows) == (3, 2)
    stats = dataset_stats(tmp_path / "hub")
    assert (stats.rows, stats.categorical, stats.lengths, stats.repeats) == (3, {}, {}, None)
    ShardStore(tmp_path / "hub").update_manifest(stage="x", complete=False)
    with pytest.raises(MagpieError, match="incomplete"):
        plan_filter(tmp_path / "hub", where="true")
    with pytest.raises(MagpieError, match="does not exist"):
        plan_filter(tmp_path / "missing", where="true")


# ---- statistics -----------------------------------------------------------------------------


def test_stats_values(src: Path) -> None:
    stats = dataset_stats(src)
    assert stats.rows == N
    counts = {c: {v.value: (v.count, v.share) for v in vs} for c, vs in stats.categorical.items()}
    assert set(counts) == {
        "difficulty",
        "input_quality",
        "task_category",
        "language",
        "llama_guard_2",
    }
    assert counts["difficulty"] == {
        d: (100, pytest.approx(1 / 3)) for d in ("easy", "medium", "hard")
    }
    assert counts["language"] == {
        "EN": (210, 0.7),
        "en": (30, 0.1),
        "ZH": (30, 0.1),
        None: (30, 0.1),
    }
    assert counts["llama_guard_2"] == {
        "safe": (190, 190 / N),
        "unsafe\nS2": (10, 10 / N),
        None: (100, 1 / 3),
    }
    quality = Counter(r["input_quality"] for r in ROWS)
    assert {v: n for v, (n, _) in counts["input_quality"].items()} == quality
    assert sum(s for _, s in counts["task_category"].values()) == pytest.approx(1.0)

    lengths = [r["instruction_length"] for r in ROWS if r["instruction_length"] is not None]
    s = stats.lengths["instruction_length"]
    assert (s.count, s.nulls, s.min, s.max) == (len(lengths), 6, min(lengths), max(lengths))
    assert s.mean == pytest.approx(np.mean(lengths))
    assert [s.p5, s.p50, s.p95] == pytest.approx(list(np.percentile(lengths, [5, 50, 95])))
    each = stats.lengths["responses (chars, each)"]
    assert each.count == 2 * N
    last = stats.lengths["chosen (chars, last turn)"]
    assert (last.count, last.nulls, last.min, last.max) == (280, 20, 3, 12)

    reward = stats.scores["instruct_reward"]
    assert (reward.count, reward.nulls, reward.min, reward.max) == (295, 5, -20.0, 19.0)
    margin = stats.scores["reward_margin"]
    margins = [r["reward_margin"] for r in ROWS if r["reward_margin"] is not None]
    assert margin.mean == pytest.approx(np.mean(margins))
    assert margin.p50 == pytest.approx(np.median(margins))
    assert set(stats.scores) == {
        "instruct_reward",
        "chosen_reward",
        "rejected_reward",
        "reward_margin",
        "min_neighbor_distance",
    }
    assert stats.repeats is not None
    assert (stats.repeats.repeated, stats.repeats.repeated_share) == (30, 0.1)
    assert (stats.repeats.duplicates, stats.repeats.duplicates_share) == (20, pytest.approx(20 / N))
    json.dumps(stats.as_dict())  # JSON-ready


def test_rendering(src: Path) -> None:
    console = Console(record=True, width=160)
    render_stats(dataset_stats(src), console)
    render_filter_report(plan_filter(src, presets=["magpie-filtered"]), console)
    text = console.export_text()
    assert f"{N} rows" in text and "task_category" in text and "unsafe S2" in text
    assert "repeat_count > 0: 30 rows (10.0%)" in text
    assert "magpie-filtered:no_duplicates" in text and "kept" in text
    assert {name for name, _, _ in describe_presets()} == set(PRESETS)
