"""Published Magpie selection rules on a hand-built Parquet fixture, checked against pandas.

The presets run as DuckDB SQL; the oracles here are direct pandas implementations of the same
rules (from the published notebook and the maintainers' description), not the same SQL.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from magpie.errors import MagpieError
from magpie.filters import filter_dataset
from magpie.selection import Selection, balanced_quotas
from magpie.store import ShardStore

N = 1200
CATEGORIES = {  # skewed on purpose: two categories hold fewer rows than an equal share
    "Information seeking": 0.45,
    "Math": 0.25,
    "Coding & Debugging": 0.2,
    "Planning": 0.06,
    "Role playing": 0.03,
    None: 0.01,
}


def make_frame(seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    uuids = [f"id-{i:05d}" for i in range(N)]
    ends = rng.random(N) < 0.1
    instruction = [
        f"Question {i} about topic {i % 37}" + (":" if end else "?") for i, end in enumerate(ends)
    ]
    reward = rng.choice([-12.0, -10.0, -7.5, -5.0, -4.9, 0.0, 3.0, 8.0], N)
    reward = np.where(rng.random(N) < 0.05, np.nan, reward)
    dup = rng.random(N)
    similar = [
        None if d < 0.8 else (uuids[i] if d < 0.9 else uuids[max(0, i - 1)])
        for i, d in enumerate(dup)
    ]
    lengths = rng.integers(20, 400, N)
    lengths[:50] = 123  # ties in the top-N key
    names = list(CATEGORIES)
    category = rng.choice(len(names), N, p=list(CATEGORIES.values()))
    return pd.DataFrame(
        {
            "uuid": uuids,
            "instruction": instruction,
            "input_quality": rng.choice(
                ["very poor", "poor", "average", "good", "excellent", None], N
            ),
            "difficulty": rng.choice(["very easy", "easy", "medium", "hard", "very hard", None], N),
            "task_category": [names[c] for c in category],
            "instruct_reward": reward,
            "min_similar_uuid": similar,
            "response": ["x" * int(n) for n in lengths],
            "response_length": lengths.astype("int64"),
        }
    )


def write(frame: pd.DataFrame, root: Path, shards: int = 3) -> Path:
    """The frame as `shards` committed shards of one of our datasets."""
    store = ShardStore(root)
    root.mkdir(parents=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    size = -(-table.num_rows // shards)
    for k in range(shards):
        store.commit(k, table.slice(k * size, size), {"shard": k})
    store.update_manifest(stage="fixture", config_hash="f1", config={}, complete=True, rows=N)
    return root


FRAME = make_frame()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(FRAME, tmp_path_factory.mktemp("sel") / "src")


def read(out: Path) -> pd.DataFrame:
    return pq.read_table(out).to_pandas()


# ---- pandas oracles ---------------------------------------------------------------------------


def notebook_filter(df: pd.DataFrame) -> pd.DataFrame:
    """data_filter.ipynb's conditions, written the pandas way."""
    keep = (
        df["input_quality"].isin(["good", "excellent"])
        & (df["instruct_reward"] > -10)
        & ~df["instruction"].str.endswith(":")
        & (df["min_similar_uuid"].isna() | (df["min_similar_uuid"] == df["uuid"]))
    )
    return df[keep]


def dpo_selection(df: pd.DataFrame) -> pd.DataFrame:
    keep = (
        df["difficulty"].isin(["medium", "hard", "very hard"])
        & df["input_quality"].isin(["good", "excellent"])
        & (df["instruct_reward"] >= -5)
    )
    return df[keep]


def round_robin_shares(counts: dict, limit: int) -> dict:
    """Equal shares by dealing one row at a time to each category, in sort order."""
    order = sorted(counts, key=lambda c: (c is None, str(c)))
    taken = dict.fromkeys(order, 0)
    while limit > 0 and any(taken[c] < counts[c] for c in order):
        for c in order:
            if limit > 0 and taken[c] < counts[c]:
                taken[c] += 1
                limit -= 1
    return taken


# ---- presets ----------------------------------------------------------------------------------


def test_magpie_filtered_matches_the_notebook(src: Path, tmp_path: Path) -> None:
    report = filter_dataset(src, tmp_path / "out", presets=["magpie-filtered"])
    expected = notebook_filter(FRAME)
    got = read(tmp_path / "out")
    assert list(got["uuid"]) == list(expected["uuid"])  # source order kept
    assert report.kept_rows == len(expected) > 100
    assert [c.name for c in report.conditions] == [
        "input_quality",
        "instruct_reward",
        "complete_instruction",
        "no_duplicates",
    ]
    # the boundary value -10 is dropped (the notebook uses >), -5 kept by the DPO rule below
    assert (FRAME["instruct_reward"] == -10).sum() > 0 and (
        got["instruct_reward"] == -10
    ).sum() == 0


def test_dpo_selection_matches_pandas(src: Path, tmp_path: Path) -> None:
    report = filter_dataset(src, tmp_path / "out", presets=["magpie-dpo-selection"])
    expected = dpo_selection(FRAME)
    assert list(read(tmp_path / "out")["uuid"]) == list(expected["uuid"])
    assert report.kept_rows == len(expected)
    assert (expected["instruct_reward"] == -5).sum() > 0
    tightened = filter_dataset(
        src,
        tmp_path / "hard",
        presets=["magpie-dpo-selection"],
        params={"min_difficulty": "very hard"},
    )
    assert tightened.kept_rows == int((expected["difficulty"] == "very hard").sum())
    with pytest.raises(MagpieError, match="min_difficulty must be a level, got .x.: use one of"):
        filter_dataset(
            src, tmp_path / "bad", presets=["magpie-dpo-selection"], params={"min_difficulty": "x"}
        )


def test_length_preset_stands_alone(src: Path, tmp_path: Path) -> None:
    report = filter_dataset(
        src, tmp_path / "out", presets=["instruction-length"], params={"max_length": 30}
    )
    lengths = FRAME["instruction"].str.len()
    assert report.kept_rows == int(((lengths >= 10) & (lengths <= 30)).sum())


# ---- top-N and shuffling ----------------------------------------------------------------------


def test_top_n_by_response_length_then_shuffle(src: Path, tmp_path: Path) -> None:
    top = Selection(order_by="response_length desc", limit=150)
    report = filter_dataset(src, tmp_path / "top", presets=["magpie-filtered"], selection=top)
    expected = notebook_filter(FRAME).sort_values("response_length", ascending=False, kind="stable")
    got = read(tmp_path / "top")
    assert list(got["uuid"]) == list(expected["uuid"][:150])  # ties keep source order
    assert (report.selected_rows, report.kept_rows) == (150, len(expected))
    manifest = ShardStore(tmp_path / "top").read_manifest()
    assert manifest["rows"] == 150 and manifest["config"]["selection"]["limit"] == 150

    shuffled = Selection(order_by="response_length desc", limit=150, shuffle_seed=42)
    filter_dataset(src, tmp_path / "s1", presets=["magpie-filtered"], selection=shuffled)
    filter_dataset(src, tmp_path / "s2", presets=["magpie-filtered"], selection=shuffled)
    other = Selection(order_by="response_length desc", limit=150, shuffle_seed=43)
    filter_dataset(src, tmp_path / "s3", presets=["magpie-filtered"], selection=other)
    one, two, three = (list(read(tmp_path / s)["uuid"]) for s in ("s1", "s2", "s3"))
    assert one == two != list(got["uuid"])
    assert set(one) == set(three) == set(got["uuid"]) and one != three


# ---- balanced sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 100, 450, 10_000])
def test_balanced_quotas_equal_round_robin(limit: int) -> None:
    counts = {"b": 300, "a": 120, "c": 9, None: 4, "d": 60}
    quotas = balanced_quotas(list(counts.items()), limit)
    assert dict(zip(counts, quotas, strict=True)) == round_robin_shares(counts, limit)
    assert sum(quotas) == min(limit, sum(counts.values()))


def test_balanced_sampling_shares_and_determinism(src: Path, tmp_path: Path) -> None:
    pick = Selection(balance="task_category", limit=80, seed=0)
    report = filter_dataset(src, tmp_path / "a", presets=["magpie-dpo-selection"], selection=pick)
    pool = dpo_selection(FRAME)
    available = Counter(None if pd.isna(v) else v for v in pool["task_category"])
    got = read(tmp_path / "a")
    taken = Counter(None if pd.isna(v) else v for v in got["task_category"])
    assert dict(taken) == {k: v for k, v in round_robin_shares(available, 80).items() if v}
    assert len(got) == report.selected_rows == 80 < len(pool)
    assert set(got["uuid"]) <= set(pool["uuid"])  # every pick passes the preset
    small = [c for c in available if available[c] < 80 / len(available)]
    assert small and all(taken[c] == available[c] for c in small)  # they gave their remainder
    shares = {
        c["value"]: (c["available"], c["taken"]) for c in report.selection["balance"]["categories"]
    }
    assert shares == {c: (available[c], taken[c]) for c in available}
    positions = {u: i for i, u in enumerate(FRAME["uuid"])}
    assert list(got["uuid"]) == sorted(got["uuid"], key=positions.get)  # written in source order

    filter_dataset(src, tmp_path / "b", presets=["magpie-dpo-selection"], selection=pick)
    assert read(tmp_path / "b").equals(got)
    reseeded = Selection(balance="task_category", limit=80, seed=1)
    filter_dataset(src, tmp_path / "c", presets=["magpie-dpo-selection"], selection=reseeded)
    other = read(tmp_path / "c")
    assert set(other["uuid"]) != set(got["uuid"])
    assert Counter(other["task_category"].fillna("-")) == Counter(got["task_category"].fillna("-"))
    # the same rows in other shards give the same sample (keys come from the uuid)
    resharded = write(FRAME, tmp_path / "src7", shards=7)
    filter_dataset(resharded, tmp_path / "d", presets=["magpie-dpo-selection"], selection=pick)
    assert list(read(tmp_path / "d")["uuid"]) == list(got["uuid"])


def test_plain_limit_is_a_seeded_sample_and_needs_no_condition(src: Path, tmp_path: Path) -> None:
    report = filter_dataset(src, tmp_path / "a", selection=Selection(limit=50, seed=3))
    again = filter_dataset(src, tmp_path / "b", selection=Selection(limit=50, seed=3))
    assert report.selected_rows == again.selected_rows == 50 and report.kept_rows == N
    assert read(tmp_path / "a").equals(read(tmp_path / "b"))
    assert list(read(tmp_path / "a")["uuid"]) != list(FRAME["uuid"][:50])


def test_selection_errors_are_one_line(src: Path, tmp_path: Path) -> None:
    with pytest.raises(MagpieError, match="--balance needs --limit"):
        Selection(balance="task_category")
    with pytest.raises(MagpieError, match="--balance nope: no such column"):
        filter_dataset(src, tmp_path / "a", selection=Selection(balance="nope", limit=3))
    with pytest.raises(MagpieError) as err:
        filter_dataset(src, tmp_path / "b", selection=Selection(order_by="no_such desc", limit=3))
    assert "no_such" in str(err.value) and "columns: uuid, instruction" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(MagpieError, match="--order-by") as err:
        filter_dataset(src, tmp_path / "c", selection=Selection(order_by="uuid; SELECT 1", limit=3))
    assert "\n" not in str(err.value) and not (tmp_path / "c" / "part-00000.parquet").exists()


def test_cli_dpo_selection(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "filter", "--in", str(src), "--out", str(out), "--preset", "magpie-dpo-selection",
        "--balance", "task_category", "--limit", "60", "--seed", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "balanced by task_category" in result.stdout and "selected 60" in result.stdout
    manifest = json.loads((out / ".magpie" / "manifest.json").read_text())
    assert manifest["rows"] == 60 and manifest["filter"]["selected_rows"] == 60
    bad = run_cli(
        "filter", "--in", str(src), "--out", str(tmp_path / "x"), "--balance", "task_category"
    )
    assert bad.returncode == 2 and "--balance needs --limit" in bad.stderr
    assert "Traceback" not in bad.stderr
