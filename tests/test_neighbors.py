"""Neighbour tags with the real packaged all-MiniLM-L6-v2 and FAISS."""

import itertools
import os
import random
import uuid

import numpy as np
import pyarrow as pa
import pytest

from magpie.stages.neighbors import (
    DEFAULT_THRESHOLD,
    NEIGHBOR_COLUMNS,
    default_nlist,
    embed,
    neighbor_stats,
    resolve_index_kind,
    tag_neighbors,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TASKS = [
    "Explain how {} works to a beginner.",
    "Write a short poem about {}.",
    "What are the main risks of {}?",
    "Give me three fun facts about {}.",
    "Summarize the history of {} in one paragraph.",
    "Design a lesson plan for teaching {}.",
    "List common misconceptions about {}.",
    "Compose a tweet announcing a conference on {}.",
    "Compare {} with its closest alternative.",
    "Draft interview questions for an expert in {}.",
]
SUBJECTS = [
    "photosynthesis", "the stock market", "volcanoes", "medieval castles", "quantum computing",
    "beekeeping", "jazz improvisation", "the Roman Empire", "sourdough baking", "glaciers",
    "electric cars", "chess openings", "coral reefs", "cryptocurrency", "origami",
    "black holes", "vaccines", "the printing press", "marathon training", "impressionist painting",
    "rainforests", "public key cryptography", "ancient Egyptian pyramids", "wind turbines",
    "the human immune system", "knitting", "supply chains", "honeybees' waggle dance",
    "the Olympic Games", "desert ecosystems",
]  # fmt: skip
VARIANTS = [
    lambda t: t.lower(),  # case
    lambda t: t.rstrip(".?!") + "!",  # punctuation
    lambda t: "Please " + t[0].lower() + t[1:],  # one word added
    lambda t: t + " Thanks.",  # a trailing word
    lambda t: t.replace(" ", "  "),  # whitespace only: an exact duplicate for the model
]


def _uid(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"row-{i}"))


def _dataset() -> tuple[list[str], list[str], list[set[int]]]:
    """300 distinct instructions plus 20 planted near-duplicates, shuffled; and the groups."""
    rows = [t.format(s) for t, s in itertools.product(TASKS, SUBJECTS)]
    distinct, groups = len(rows), []
    for n in range(20):
        base = n * 17 % distinct  # spread over tasks and subjects
        groups.append({base, len(rows)})
        rows.append(VARIANTS[n % len(VARIANTS)](rows[base]))
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    texts = [rows[old] for old in order]
    return texts, [_uid(i) for i in range(len(texts))], [{where[i] for i in g} for g in groups]


@pytest.fixture(scope="module")
def data() -> tuple[list[str], list[str], list[set[int]], np.ndarray]:
    texts, uuids, groups = _dataset()
    return texts, uuids, groups, embed(texts, batch_size=64)


def _pairs(stats: dict[str, pa.Array]) -> list[tuple[int, str | None]]:
    return list(
        zip(stats["repeat_count"].to_pylist(), stats["min_similar_uuid"].to_pylist(), strict=True)
    )


def test_embeddings_are_normalised_float32(data) -> None:
    texts, _, _, vectors = data
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_reports_progress_and_handles_empty() -> None:
    seen: list[int] = []
    out = embed(["one", "two", "three"], batch_size=1, progress=seen.append)
    assert sum(seen) == 3 and out.shape == (3, 384)
    assert embed([]).shape == (0, 384)


def test_planted_duplicates_found_and_distinct_rows_not_flagged(data) -> None:
    _, uuids, groups, vectors = data
    stats = neighbor_stats(uuids, vectors, index="flat")
    counts = stats["repeat_count"].to_pylist()
    reps = stats["min_similar_uuid"].to_pylist()
    dist = stats["min_neighbor_distance"].to_pylist()
    planted = set().union(*groups)
    for group in groups:
        expected = min(uuids[i] for i in group)
        for i in group:
            assert counts[i] >= 1, uuids[i]
            assert reps[i] == expected
            assert dist[i] < DEFAULT_THRESHOLD
    for i in set(range(len(uuids))) - planted:
        assert counts[i] == 0 and reps[i] is None
        assert dist[i] > DEFAULT_THRESHOLD


@pytest.mark.parametrize(
    "options",
    [
        {"index": "ivf", "nlist": 16, "nprobe": 4},
        {"index": "hnsw", "hnsw_m": 16, "ef_search": 32},
        {"index": "auto", "approx_min_rows": 100},  # IVF with default nlist / nprobe
    ],
)
def test_approximate_indexes_match_flat(data, options) -> None:
    _, uuids, _, vectors = data
    exact = neighbor_stats(uuids, vectors, index="flat")
    approx = neighbor_stats(uuids, vectors, **options)
    assert _pairs(approx) == _pairs(exact)
    flagged = np.array(exact["repeat_count"].to_pylist()) > 0
    np.testing.assert_allclose(
        approx["min_neighbor_distance"].to_numpy()[flagged],
        exact["min_neighbor_distance"].to_numpy()[flagged],
        atol=1e-5,
    )


def test_exact_duplicates_exclude_self() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors[[3, 9, 17, 30]] = vectors[5]  # five identical rows: 3, 5, 9, 17, 30
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    uuids = [f"u{i:03d}" for i in range(40)]
    stats = neighbor_stats(uuids, vectors, k=10, distance_threshold=1e-4, index="flat")
    for i in (3, 5, 9, 17, 30):
        assert stats["repeat_count"][i].as_py() == 4
        assert stats["min_similar_uuid"][i].as_py() == "u003"
        assert stats["min_neighbor_distance"][i].as_py() == pytest.approx(0.0, abs=1e-6)
    assert sum(stats["repeat_count"].to_pylist()) == 5 * 4


def test_two_identical_rows_with_k1() -> None:
    vectors = np.tile(np.eye(1, 8, dtype=np.float32), (2, 1))
    stats = neighbor_stats(["b", "a"], vectors, k=1)
    assert _pairs(stats) == [(1, "a"), (1, "a")]
    assert stats["min_neighbor_distance"].to_pylist() == [0.0, 0.0]


def test_tiny_inputs() -> None:
    one = neighbor_stats(["x"], np.ones((1, 4), np.float32) / 2)
    assert one["min_neighbor_distance"].to_pylist() == [None]
    assert _pairs(one) == [(0, None)]
    empty = neighbor_stats([], np.zeros((0, 4), np.float32))
    assert all(len(column) == 0 for column in empty.values())
    with pytest.raises(ValueError, match="uuids"):
        neighbor_stats(["a"], np.zeros((2, 4), np.float32))


def test_index_kind_resolution() -> None:
    assert resolve_index_kind("auto", 10) == "flat"
    assert resolve_index_kind("auto", 2_000_000) == "ivf"
    assert resolve_index_kind("hnsw", 10) == "hnsw"
    with pytest.raises(ValueError, match="index"):
        resolve_index_kind("annoy", 10)  # type: ignore[arg-type]
    assert default_nlist(100) == 2 and default_nlist(1_000_000) == 4000


def test_tag_neighbors_table() -> None:
    texts = [
        "How do volcanoes form?",
        "how do volcanoes form",
        None,
        "Write a haiku about winter.",
        "What is the capital of Peru?",
    ]
    table = pa.table({"uuid": ["e", "d", "c", "b", "a"], "instruction": texts, "n": range(5)})
    tagged = tag_neighbors(table)
    assert tagged.column_names == ["uuid", "instruction", "n", *NEIGHBOR_COLUMNS]
    assert tagged.schema.field("min_neighbor_distance").type == pa.float64()
    assert tagged.schema.field("repeat_count").type == pa.int64()
    assert tagged.column("repeat_count").to_pylist() == [1, 1, None, 0, 0]
    assert tagged.column("min_similar_uuid").to_pylist() == ["d", "d", None, None, None]
    assert tagged.column("min_neighbor_distance")[2].as_py() is None
    again = tag_neighbors(tagged, index="hnsw")
    assert again.column_names == tagged.column_names
    assert again.equals(tagged)
