"""`magpie card`: Hub YAML header checked by `datasets` itself, body tables, PNG plots."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from datasets_for_reports import make_pairs_dataset

from magpie.card import PLOT_SIZE, read_front_matter, write_card


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return make_pairs_dataset(tmp_path_factory.mktemp("card"))


@pytest.fixture(scope="module")
def carded(pairs_dir: Path) -> Path:
    result = run_cli("card", str(pairs_dir))
    assert result.returncode == 0, result.stderr
    assert "README.md" in result.stdout
    return pairs_dir


def _load(path: Path, cache: Path):
    import datasets

    return datasets.load_dataset(str(path), cache_dir=str(cache))


def test_front_matter_is_what_datasets_reads(carded: Path, tmp_path: Path) -> None:
    from datasets import load_dataset_builder
    from huggingface_hub import DatasetCard

    header = read_front_matter(carded / "README.md")
    table = pq.read_table(sorted(carded.glob("part-*.parquet")))
    ds = _load(carded, tmp_path / "cache")
    assert list(ds) == ["train"] and ds["train"].num_rows == table.num_rows
    # the features the card declares are the ones `datasets` gives the loaded rows
    assert header["dataset_info"]["features"] == ds["train"].features._to_yaml_list()
    split = header["dataset_info"]["splits"][0]
    assert split["name"] == "train" and split["num_examples"] == table.num_rows
    assert split["num_bytes"] > 0 and header["dataset_info"]["download_size"] == sum(
        p.stat().st_size for p in carded.glob("part-*.parquet")
    )
    # the configs come from the card (not guessed by datasets): they name our shards
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}
    ]
    builder = load_dataset_builder(str(carded), cache_dir=str(tmp_path / "cache"))
    files = sorted(Path(f).name for f in builder.config.data_files["train"])
    assert files == sorted(p.name for p in carded.glob("part-*.parquet"))
    # the Hub's own card parser accepts the header
    card = DatasetCard.load(carded / "README.md")
    assert card.data.size_categories == ["n<1K"]
    assert card.data.task_categories == ["text-generation"]
    assert {"synthetic", "magpie", "dpo"} <= set(card.data.tags)
    assert card.data.language == ["en", "zh"]  # most frequent first, lower case
    assert card.data.license is None
    assert "# license: set this before publishing" in (carded / "README.md").read_text()


def test_body_counts_match_the_data(carded: Path) -> None:
    text = (carded / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    table = pq.read_table(sorted(carded.glob("part-*.parquet")))
    # how it was made: the pairs stage with its input and set-aside counts from the manifest
    set_aside = pq.read_table(carded / ".magpie" / "rejected").column("set_aside_reason")
    reasons = Counter(set_aside.to_pylist())
    assert reasons["all_tied"] > 0
    stage_row = next(line for line in body.splitlines() if line.startswith("| pairs |"))
    assert f"all\\_tied {reasons['all_tied']}" in stage_row
    assert f"| {table.num_rows} |" in stage_row
    # a distribution table holds the real counts
    counts = Counter(table.column("input_quality").to_pylist())
    for value, n in counts.items():
        assert f"| {value} | {n} | {n / table.num_rows:.1%} |" in body
    # the margins summary
    margins = table.column("reward_margin").to_pylist()
    assert f"{min(margins):,.3f}" in body and f"{max(margins):,.3f}" in body
    assert "Near-duplicates:" in body
    assert "arXiv" in body or "abs/2406.08464" in body
    # model text is escaped: the injected category is shown, not turned into markup
    assert "<img" not in body
    assert "&lt;img src=x onerror=\\=&quot;" in body or "&lt;img src=x onerror" in body


def test_plots_are_pngs_of_the_expected_size(carded: Path) -> None:
    from PIL import Image

    body = (carded / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", body)
    expected = {
        "task_category",
        "difficulty",
        "input_quality",
        "language",
        "lengths",
        "rewards",
        "reward_margin",
        "instruct_reward",
        "min_neighbor_distance",
    }
    assert {Path(link).stem for link in links} == expected
    for link in links:
        with Image.open(carded / link) as image:
            image.verify()
        with Image.open(carded / link) as image:
            assert image.format == "PNG" and image.size == PLOT_SIZE
            assert len(image.getcolors(1 << 20) or []) > 10  # something was drawn


def test_test_split_is_declared_and_loaded(pairs_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "with-test"
    d.mkdir()
    shards = sorted(pairs_dir.glob("part-*.parquet"))
    for shard in shards[:-1]:
        shutil.copy(shard, d / shard.name)
    (d / "test").mkdir()
    shutil.copy(shards[-1], d / "test" / "part-00000.parquet")
    write_card(d, plots=False)
    header = read_front_matter(d / "README.md")
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": "part-*.parquet"},
        {"split": "test", "path": "test/*.parquet"},
    ]
    ds = _load(d, tmp_path / "cache")
    assert ds["test"].num_rows == pq.read_table(shards[-1]).num_rows
    assert ds["train"].num_rows == sum(pq.read_table(s).num_rows for s in shards[:-1])
    assert not (d / "plots").exists()


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    result = run_cli("card", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "not a dataset directory" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("card", str(empty))
    assert result.returncode == 2 and "holds no .parquet shards" in result.stderr


def test_filter_stage_and_its_condition_counts(pairs_dir: Path, tmp_path: Path) -> None:
    import json

    from magpie.filters import filter_dataset

    out = tmp_path / "filtered"
    presets = ["dpo-margin", "english"]
    filter_dataset(pairs_dir, out, presets=presets, params={"min_margin": 2.0})
    write_card(out)
    body = (out / "README.md").read_text().split("\n---\n", 1)[1]
    manifest = json.loads((out / ".magpie" / "manifest.json").read_text())
    stages = [line.split(" | ")[0] for line in body.splitlines() if line.startswith("| ")]
    assert stages[:3] == ["| stage", "| pairs", "| filter"]  # the chain, oldest first
    conditions = manifest["filter"]["conditions"]
    assert len(conditions) == 3
    for c in conditions:
        name = c["name"].replace("_", "\\_")
        row = next(line for line in body.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-3:] == [str(c["removed_alone"]), str(c["removed_step"]), str(c["left_after"])]
    assert (
        read_front_matter(out / "README.md")["dataset_info"]["splits"][0]["num_examples"]
        == (manifest["rows"])
    )


def test_run_reports_sit_beside_the_final_dataset(tmp_path: Path) -> None:
    """The hook at the end of `magpie run`: card, plots and viewer in RUN/, shards untouched."""
    from magpie import pipeline

    run = tmp_path / "run"
    pairs = make_pairs_dataset(run, rows=20, shard_size=10)
    (run / "recipe.yaml").write_text("out: run\nnum: 20\n")
    written = pipeline.reports(run)
    assert [r.summary().split()[0] for r in written] == ["card", "view"]
    assert sorted(p.name for p in pairs.iterdir()) == [
        ".magpie",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    header = read_front_matter(run / "README.md")
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": "pairs/part-*.parquet"}
    ]
    assert "### The resolved recipe" in (run / "README.md").read_text()
    assert (run / "view.html").is_file() and (run / "plots" / "rewards.png").is_file()
    ds = _load(run, tmp_path / "cache")
    assert ds["train"].num_rows == pq.read_table(pairs).num_rows  # the shard dir reads as before
