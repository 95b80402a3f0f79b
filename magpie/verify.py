"""`magpie verify D [--repair]`: check every shard against its bookkeeping and the manifest.

A shard is valid when its Parquet footer (and, deep, its data) reads, its recorded row count and
shard number match, and the configuration hash it carries is the manifest's. `--repair` moves
broken shards (with their set-aside rows) into `D/.magpie/broken/` — nothing is deleted — and
rebuilds a manifest that does not parse from `config.yaml` and the shards, so the next run of the
same command redoes only what was moved aside.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import yaml

from magpie import locking
from magpie.errors import MagpieError
from magpie.fs import AnyPath, RemotePath, as_path, file_names, read_metadata, read_table
from magpie.store import (
    META_DIR,
    SHARD_META_KEY,
    SHARD_RE,
    Problem,
    ShardStore,
    classify,
)

READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _manifest(store: ShardStore, problems: list[Problem]) -> dict[str, Any] | None:
    path = store.meta_dir / "manifest.json"
    if not path.is_file():
        if store.shard_indices():
            problems.append(Problem(path, "is missing while shards exist"))
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(Problem(path, f"does not parse ({_first_line(exc)})"))
        return None
    if not isinstance(manifest, dict):
        problems.append(Problem(path, "is not a JSON object"))
        return None
    return manifest


def _shard_problem(
    store: ShardStore,
    index: int,
    path: AnyPath,
    expected_hash: str | None,
    deep: bool,
    rejected_names: set[str],
) -> tuple[str | None, int]:
    """(what is wrong or None, rows) for one Parquet shard."""
    try:
        meta = read_metadata(path)
    except READ_ERRORS as exc:
        return f"is truncated or not Parquet ({_first_line(exc)})", 0
    raw = (meta.metadata or {}).get(SHARD_META_KEY)
    if raw is None:
        return "carries no magpie bookkeeping: it was not committed by magpie", meta.num_rows
    try:
        info = json.loads(raw)
    except ValueError:
        return "has unreadable magpie bookkeeping", meta.num_rows
    if info.get("shard", index) != index:
        return f"is shard {info.get('shard')} of another dataset, not shard {index}", meta.num_rows
    if info.get("rows", meta.num_rows) != meta.num_rows:
        return f"holds {meta.num_rows} rows, its bookkeeping says {info['rows']}", meta.num_rows
    shard_hash = info.get("config_hash")
    if expected_hash and shard_hash and shard_hash != expected_hash:
        return (
            f"belongs to another configuration (config {shard_hash}, this dataset {expected_hash})",
            meta.num_rows,
        )
    if deep:
        try:
            table = read_table(path)
        except READ_ERRORS as exc:
            return f"has garbled data ({_first_line(exc)})", meta.num_rows
        if table.num_rows != meta.num_rows:
            return f"reads {table.num_rows} rows, its footer says {meta.num_rows}", meta.num_rows
    rejected = store.rejected_path(index)
    if rejected.name in rejected_names:
        try:
            read_table(rejected) if deep else read_metadata(rejected)
        except READ_ERRORS as exc:
            return f"has an unreadable set-aside file {rejected} ({_first_line(exc)})", 0
    return None, meta.num_rows


def check_store(store: ShardStore, deep: bool = False) -> list[Problem]:
    """Every problem of one dataset directory (see ShardStore.check)."""
    problems: list[Problem] = []
    manifest = _manifest(store, problems)
    expected = manifest.get("config_hash") if manifest else None
    rows = 0
    indices = store.shard_indices()
    # one listing per folder (each existence check is a request on an object store)
    shards, empty = file_names(store.root), file_names(store.meta_dir / "empty")
    rejected = file_names(store.meta_dir / "rejected")
    for index in indices:
        marker, path = store.empty_marker(index), store.shard_path(index)
        if marker.name in empty and path.name in shards:
            problems.append(Problem(path, "is recorded both with rows and as empty", index))
            continue
        if marker.name in empty:
            try:
                info = json.loads(marker.read_text())
                if not isinstance(info, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as exc:
                problems.append(Problem(marker, f"does not parse ({_first_line(exc)})", index))
                continue
            if expected and info.get("config_hash") not in (None, expected):
                problems.append(Problem(marker, "belongs to another configuration", index))
            continue
        what, n = _shard_problem(store, index, path, expected, deep, rejected)
        if what is not None:
            problems.append(Problem(path, what, index))
        else:
            rows += n
    for gap in sorted(set(range(max(indices, default=-1) + 1)) - set(indices)):
        problems.append(
            Problem(store.shard_path(gap), "is missing between committed shards", gap, gap=True)
        )
    for name in sorted(shards):
        if name.startswith("part-") and not SHARD_RE.match(name):
            problems.append(Problem(store.root / name, "is not a shard name magpie writes"))
    bad = any(p.shard is not None and not p.gap for p in problems)
    if manifest and manifest.get("complete") and not bad and manifest.get("rows", rows) != rows:
        problems.append(
            Problem(
                store.meta_dir / "manifest.json",
                f"counts {manifest.get('rows')} rows, the shards hold {rows}",
                recount=True,
            )
        )
    return problems


# ---- repair -------------------------------------------------------------------------------


def _move_aside(store: ShardStore, path: AnyPath) -> AnyPath:
    broken = store.meta_dir / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    target = broken / path.name
    if target.exists():
        target = broken / f"{path.stem}.{int(time.time() * 1000)}{path.suffix}"
    if isinstance(path, RemotePath) and isinstance(target, RemotePath):
        path.move_to(target)
    else:
        shutil.move(str(path), target)
    return target


def _rebuild_manifest(store: ShardStore) -> str:
    """A new manifest from config.yaml and the shards' bookkeeping (the old one moved aside)."""
    path = store.meta_dir / "manifest.json"
    config_path = store.meta_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        config = None
    hashes = set()
    for index in store.shard_indices():
        try:
            hashes.add(store.shard_info(index).get("config_hash"))
        except MagpieError:
            continue
    hashes.discard(None)
    if not isinstance(config, dict) or len(hashes) != 1:
        return (
            f"cannot rebuild {path}: {config_path} or the shards' config hash is missing; "
            "rerun with --overwrite (our files only are replaced)"
        )
    if path.exists():
        _move_aside(store, path)
    store._write_manifest(
        {
            "stage": config.get("command", "?"),
            "config_hash": hashes.pop(),
            "config": config,
            "complete": False,
            "rebuilt": True,
        }
    )
    return f"rebuilt {path} from {config_path} and the shards"


def repair(store: ShardStore, problems: list[Problem]) -> list[str]:
    """Move broken shards aside and rebuild a broken manifest; return what was done."""
    done: list[str] = []
    manifest_path = store.meta_dir / "manifest.json"
    for problem in problems:
        if problem.gap:
            continue
        if problem.path == manifest_path:
            if problem.recount:
                store.update_manifest(complete=False)
                done.append(f"marked {manifest_path} incomplete: the next run recounts")
            else:
                done.append(_rebuild_manifest(store))
            continue
        if problem.shard is None:
            continue
        for path in (
            store.shard_path(problem.shard),
            store.empty_marker(problem.shard),
            store.rejected_path(problem.shard),
        ):
            if path.is_file():
                done.append(f"moved {path} to {_move_aside(store, path)}")
    if done and manifest_path.is_file():
        with contextlib.suppress(MagpieError):
            store.update_manifest(complete=False)
    return done


# ---- the command ----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What `magpie verify` found in each dataset directory, and what --repair did."""

    datasets: list[AnyPath] = field(default_factory=list)
    problems: dict[AnyPath, list[Problem]] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())


def _datasets(path: AnyPath) -> list[AnyPath]:
    kind = classify(path)
    if kind == "dataset":
        return [path]
    if kind == "run":
        steps = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [p for p in steps if (p / META_DIR).is_dir()]  # every step's dataset
        for folder in (p for p in steps if not (p / META_DIR).is_dir()):  # export folders
            found += sorted(p for p in folder.iterdir() if (p / META_DIR).is_dir())
        return found
    raise MagpieError(
        f"{path} is not a magpie dataset (no {META_DIR}/ inside): pass a directory magpie wrote"
    )


def verify_path(path: AnyPath, repair_it: bool = False, deep: bool = True) -> VerifyReport:
    """Check a dataset directory (or every stage of a `magpie run` output); optionally repair."""
    path = as_path(path)
    if not path.is_dir():
        raise MagpieError(f"{path} is not a directory: pass a dataset directory")
    report = VerifyReport()
    for root in _datasets(path):
        store = ShardStore(root)
        report.datasets.append(root)
        if (root / META_DIR / "export.json").is_file():
            report.problems[root] = []
            continue  # an export: whole files written atomically, no shards to check
        report.shards += len(store.shard_indices())
        problems = check_store(store, deep)
        if repair_it and problems:
            with locking.locked(root, "magpie verify --repair"):
                report.actions += repair(store, problems)
                problems = [p for p in check_store(store, deep) if not p.gap]
        report.problems[root] = problems
    return report


def render_report(report: VerifyReport, console: Any) -> None:
    """One line per problem and per repair action, then a one-line verdict."""
    for action in report.actions:
        console.print(f"repaired: {action}", highlight=False, soft_wrap=True)
    for problems in report.problems.values():
        for problem in problems:
            console.print(f"problem: {problem.line()}", highlight=False, soft_wrap=True)
    count = sum(len(p) for p in report.problems.values())
    where = ", ".join(str(d) for d in report.datasets)
    if count == 0:
        redo = " — rerun the same command to redo what was moved aside" if report.actions else ""
        console.print(f"ok: {report.shards} shard(s) valid in {where}{redo}", highlight=False)
    else:
        console.print(
            f"{count} problem(s) in {where}: run `magpie verify "
            f"{report.datasets[0] if len(report.datasets) == 1 else '<dir>'} --repair`"
            " to move broken shards aside (nothing is deleted)",
            highlight=False,
        )
