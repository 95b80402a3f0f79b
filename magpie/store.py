"""A dataset on disk: a directory of Parquet shards plus a manifest of how it was made.

Layout of a dataset directory `D`:
  D/part-00000.parquet ...   the rows (what `datasets`, DuckDB and pandas read)
  D/.magpie/manifest.json    stage, resolved config and its hash, package version, counts
  D/.magpie/config.yaml      the resolved config, to rerun or edit
  D/.magpie/rejected/        rows set aside, with the reason (same shard numbers)
  D/.magpie/lock             who writes D now (see magpie.locking)
  D/.magpie/broken/          shards `magpie verify --repair` moved aside (never deleted)

`D` may also be an object-store prefix (`s3://bucket/d`, a `magpie.fs.RemotePath`): the same
layout and rules, each file written by one PUT, which the store makes visible whole or not at all,
and a lock object with a heartbeat (magpie.objectlock) in place of the OS lock.

A shard is committed atomically (temp file, fsync, rename), so it is either whole or absent; each
shard carries its own bookkeeping (rows, config hash) in the Parquet key-value metadata, so the
manifest can always be rebuilt from the shards and a crash between the two loses nothing.

Only what magpie wrote is ever removed: `--overwrite` deletes our shards, our `.magpie/`
bookkeeping and files recorded as ours (`written_files`), and leaves everything else.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from magpie import __version__, locking
from magpie.errors import MagpieError
from magpie.fs import AnyPath, RemotePath, as_path, read_schema, read_table, table_bytes

META_DIR = ".magpie"
SHARD_META_KEY = b"magpie"
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")
PROBE_RE = re.compile(r"^\.magpie-write-test-\d+$")
EXPORT_RE = re.compile(r"^(train-\d{5}-of-\d{5}\.parquet|data\.jsonl|\.tmp-.*)$")
RUN_STAGE_DIRS = ("instructions", "responses", "scored", "pairs", "export")
RUN_FILE = "run.json"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(MagpieError):
    """The disk (or a file-size limit) ran out during a write; the previous state is intact."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return isinstance(exc, OSError) and (
        "No space left" in text or "File too large" in text or "Disk quota" in text
    )


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace_from_temp(path: Path, write: Any) -> None:
    """Write through a temp file, fsync, rename; the temp file never outlives a failure."""
    tmp = _temp_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise DiskFullError(
                f"disk full while writing {path}: nothing committed before it was touched and "
                "every earlier shard is valid; free space, then rerun the same command to resume"
            ) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: AnyPath, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.

    Local: temp file, fsync, rename. Object store: one put, which is whole or absent.
    """
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    _replace_from_temp(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_table(path: AnyPath, table: pa.Table) -> None:
    """Write a Parquet file atomically (temp file, fsync, rename; one put on an object store).
    The table is made one chunk per column first: the file's bytes then depend on its rows only,
    not on how the table was sliced from others."""
    table = table.combine_chunks()
    if isinstance(path, RemotePath):
        path.write_bytes(table_bytes(table))
        return
    _replace_from_temp(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


# ---- what a directory is, and what in it is ours ------------------------------------------------


def classify(root: AnyPath) -> str:
    """'missing', 'empty', 'dataset' (has .magpie/), 'run' (a `magpie run` output) or 'foreign'."""
    if not root.exists():
        return "missing"
    if not root.is_dir():
        return "file"
    names = [p.name for p in root.iterdir() if not _is_transient(p.name)]
    if not names:
        return "empty"
    if (root / META_DIR / RUN_FILE).is_file():
        return "run"
    if (root / META_DIR).is_dir():
        return "dataset"
    if "recipe.yaml" in names and any((root / d / META_DIR).is_dir() for d in RUN_STAGE_DIRS):
        return "run"  # made before runs recorded themselves
    return "foreign"


def _is_transient(name: str) -> bool:
    return bool(TEMP_RE.match(name) or PROBE_RE.match(name))


def _list_names(paths: list[AnyPath], limit: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more


def refuse_foreign(root: AnyPath, what: str = "--out") -> None:
    """Raise for a directory that holds files magpie did not write (or is a file)."""
    kind = classify(root)
    if kind == "file":
        raise MagpieError(f"{what} {root} is a file: pass a directory")
    if kind == "foreign":
        raise MagpieError(
            f"{root} holds files magpie did not write ({_list_names(sorted(root.iterdir()))}); "
            f"they are left alone: pass a new {what} directory"
        )


def _recorded(meta: AnyPath) -> list[str]:
    """Names recorded as written by us (manifest or run record), read leniently."""
    names: list[str] = []
    for record in (meta / "manifest.json", meta / RUN_FILE, meta / "export.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            names += [n for n in data.get("written_files", []) if isinstance(n, str)]
    return names


def _is_ours(name: str, recorded: set[str], is_export: bool) -> bool:
    """A top-level file we wrote: a shard, a temp file, a recorded file, an export file."""
    if SHARD_RE.match(name) or _is_transient(name) or name in recorded:
        return True
    return is_export and bool(EXPORT_RE.match(name))


def _remove(path: AnyPath) -> None:
    if isinstance(path, RemotePath):
        path.rmtree()  # an object, or every object under a prefix
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_ours(root: AnyPath) -> list[AnyPath]:
    """Delete what magpie wrote in `root`; return the foreign paths that were left in place.

    Ours: shards, export files of an export directory, temp files, files recorded in
    `written_files`, run stage subdirectories (recursively, by the same rule) and `.magpie/`
    (its lock file stays, emptied by its holder).
    """
    meta = root / META_DIR
    recorded = set(_recorded(meta))
    is_export = (meta / "export.json").is_file()
    is_run = classify(root) == "run"
    foreign: list[AnyPath] = []
    for child in sorted(root.iterdir()):
        name = child.name
        if name == META_DIR:
            for inner in child.iterdir():
                if inner.name != locking.LOCK_NAME:
                    _remove(inner)
        elif _is_ours(name, recorded, is_export):
            _remove(child)
        elif is_run and name == "recipe.yaml" and child.is_file():
            child.unlink()
        elif is_run and name == "export" and child.is_dir():
            left = _clear_exports(child)
            foreign += left
            if not left:
                _remove(child)
        elif is_run and name in RUN_STAGE_DIRS and (child / META_DIR).is_dir():
            foreign += clear_inner_dataset(child)
        else:
            foreign.append(child)
    return foreign


def clear_inner_dataset(child: AnyPath) -> list[AnyPath]:
    """A dataset inside a run (a stage or an export): our files go, under its lock; the folder
    goes too when nothing foreign is left. Returns the foreign paths left."""
    with locking.locked(child, "--overwrite of the run that holds it"):
        left = remove_ours(child)
    if not left:
        _remove(child)
    return left


def _clear_exports(root: AnyPath) -> list[AnyPath]:
    """The `export/` folder of a run: one export directory per format."""
    foreign: list[AnyPath] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / META_DIR).is_dir():
            foreign += clear_inner_dataset(child)
        else:
            foreign.append(child)
    return foreign


def clear_for_overwrite(root: AnyPath) -> None:
    """--overwrite: remove what we wrote; name what stays."""
    foreign = remove_ours(root)
    if foreign:
        locking.warn(
            f"--overwrite kept {len(foreign)} file(s) magpie did not write: {_list_names(foreign)}"
        )


def prepare_output_dir(
    out: AnyPath, overwrite: bool, what: str = "--out", lock: bool = False
) -> None:
    """Make `out` ready for a command that writes whole files (export, card, view).

    Missing or empty: created. Ours: refused unless `overwrite`, which removes only our files.
    Foreign: always refused. `lock` holds the directory's write lock until the command ends.
    """
    refuse_foreign(out, what)
    kind = classify(out)
    if kind in ("dataset", "run") and not overwrite:
        raise MagpieError(
            f"{what} {out} already holds magpie output: pass --overwrite to replace it, "
            "or pick another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    if lock or kind in ("dataset", "run"):
        locking.acquire(out)
    if kind in ("dataset", "run"):
        clear_for_overwrite(out)


def remove_stale_temps(root: AnyPath) -> list[AnyPath]:
    """Delete temp files left by killed writers (we hold the lock, so no one else writes)."""
    removed = []
    dirs = [root, root / META_DIR, root / META_DIR / "rejected", root / META_DIR / "empty"]
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = TEMP_RE.match(path.name) or PROBE_RE.match(path.name)
            if match and path.is_file() and not path.name.endswith(f"-{os.getpid()}"):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---- problems found by check() ------------------------------------------------------------------


@dataclass
class Problem:
    """Something wrong in a dataset directory; `shard` is set when one shard is at fault."""

    path: AnyPath
    what: str
    shard: int | None = None
    gap: bool = False  # a shard index missing between committed ones: the executor redoes it
    recount: bool = False  # manifest counts off: a resumed run recounts them

    def line(self) -> str:
        return f"{self.path}: {self.what}"


class ShardStore:
    """The shards and manifest of one dataset directory."""

    def __init__(self, root: AnyPath | str) -> None:
        self.root = as_path(root)
        self.meta_dir = self.root / META_DIR
        self.config_hash: str | None = None
        self._lock: locking.DatasetLock | None = None

    # ---- opening -------------------------------------------------------------------------
    def open_for_write(
        self, stage: str, config: dict[str, Any], config_hash: str, overwrite: bool
    ) -> None:
        """Prepare the directory for a run and lock it.

        Refuses a directory holding files we did not write, one made by a different
        configuration (unless `overwrite`), and a dataset whose shards or manifest are broken.
        """
        refuse_foreign(self.root)
        if classify(self.root) == "run":
            raise MagpieError(
                f"{self.root} is the output of `magpie run`: pass one of its stage "
                "subdirectories or a new --out"
            )
        self.check_writable()
        self._lock = locking.acquire(self.root, None)
        remove_stale_temps(self.root)
        if overwrite:
            clear_for_overwrite(self.root)
            manifest = None
        else:
            manifest = self.read_manifest()
            if manifest is not None and manifest.get("config_hash") != config_hash:
                raise MagpieError(
                    f"{self.root} holds a dataset made with a different configuration "
                    f"(stage {manifest.get('stage')}, config {manifest.get('config_hash')}): "
                    "rerun with the same flags to resume, pick another --out, or pass --overwrite"
                )
        self.config_hash = config_hash
        if manifest is None and self.shard_indices():
            raise MagpieError(
                f"{self.meta_dir / 'manifest.json'} is missing but shards exist: run "
                f"`magpie verify {self.root} --repair` to rebuild it, or pass --overwrite"
            )
        if manifest is not None:
            problems = [p for p in self.check() if not (p.gap or p.recount)]
            if problems:
                raise MagpieError(
                    f"{problems[0].path} {problems[0].what} ({len(problems)} problem(s)): run "
                    f"`magpie verify {self.root} --repair` to move broken shards aside, "
                    "then rerun to redo only them"
                )
        (self.meta_dir / "rejected").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.meta_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode()
        )
        if manifest is None:
            self._write_manifest(
                {"stage": stage, "config_hash": config_hash, "config": config, "complete": False}
            )

    def close(self) -> None:
        """Release the write lock (also released when the process exits)."""
        if self._lock is not None:
            locking.release(self._lock)
            self._lock = None

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """Fail early, with the fix: a foreign, locked or unwritable directory is refused."""
        if not isinstance(self.root, RemotePath):
            self._check_writable()
            return
        try:
            self._check_writable()
        except MagpieError:
            raise
        except Exception as exc:  # the store's own errors: no bucket, no credentials, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MagpieError(
                f"cannot write to {self.root} ({type(exc).__name__}: {reason}): check that the "
                "bucket exists and the store's credentials and endpoint are set (e.g. AWS_* or "
                "FSSPEC_S3_ENDPOINT_URL)"
            ) from None

    def _check_writable(self) -> None:
        refuse_foreign(self.root)
        holder = locking.holder_of(self.root)
        if holder is not None and holder.get("pid") != os.getpid():
            raise MagpieError(
                f"{self.root} is being written by {locking.describe_holder(holder)}: wait for it "
                "to finish, or use another --out"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".magpie-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise MagpieError(
                f"cannot write to {self.root} ({exc.strerror}): pass a writable --out directory"
            ) from exc

    def clear(self) -> None:
        """Remove what magpie wrote here (for --overwrite); foreign files stay, with a warning."""
        clear_for_overwrite(self.root)

    def record_written(self, name: str) -> None:
        """Record a file or folder (relative to the root) as ours, so --overwrite may remove it."""
        manifest = self.read_manifest()
        if manifest is None and classify(self.root) == "run":
            record = self.meta_dir / RUN_FILE
            record.parent.mkdir(parents=True, exist_ok=True)  # runs made before run.json existed
            data = json.loads(record.read_text()) if record.is_file() else {"kind": "magpie run"}
            names = list(dict.fromkeys([*data.get("written_files", []), name]))
            atomic_write_bytes(record, json.dumps({**data, "written_files": names}).encode())
            return
        names = list(dict.fromkeys([*(manifest or {}).get("written_files", []), name]))
        self.update_manifest(written_files=names)

    # ---- shards --------------------------------------------------------------------------
    def shard_path(self, index: int) -> AnyPath:
        return self.root / f"part-{index:05d}.parquet"

    def rejected_path(self, index: int) -> AnyPath:
        return self.meta_dir / "rejected" / f"part-{index:05d}.parquet"

    def empty_marker(self, index: int) -> AnyPath:
        return self.meta_dir / "empty" / f"part-{index:05d}.json"

    def shard_indices(self) -> list[int]:
        """Indices of the committed shards (with rows or empty), in order."""
        paths = [*self.root.glob("part-*.parquet"), *(self.meta_dir / "empty").glob("part-*.json")]
        return sorted({int(p.stem.split("-")[1]) for p in paths if p.stem.split("-")[1].isdigit()})

    def commit(
        self,
        index: int,
        table: pa.Table,
        info: dict[str, Any],
        rejected: pa.Table | None = None,
    ) -> None:
        """Commit shard `index` with its bookkeeping; the rows file is written last.

        A shard without rows is recorded by a marker file instead of an empty Parquet file
        (which `datasets` cannot read).
        """
        if self.config_hash is not None:
            info = {**info, "config_hash": self.config_hash}
        if self._lock is not None:
            self._lock.check()  # an object-store lock taken over while we were stalled
        try:
            if rejected is not None:
                atomic_write_table(self.rejected_path(index), rejected)
            if table.num_rows == 0:
                self.empty_marker(index).parent.mkdir(parents=True, exist_ok=True)
                data = json.dumps(info, sort_keys=True).encode()
                atomic_write_bytes(self.empty_marker(index), data)
                return
            meta = dict(table.schema.metadata or {})
            meta[SHARD_META_KEY] = json.dumps(info, sort_keys=True).encode()
            atomic_write_table(self.shard_path(index), table.replace_schema_metadata(meta))
        except DiskFullError:
            committed = len(self.shard_indices())
            raise DiskFullError(
                f"disk full while committing shard {index} of {self.root}: the {committed} "
                "shard(s) committed before it are valid; free space, then rerun the same "
                "command to resume"
            ) from None

    def _broken(self, path: AnyPath, exc: Exception) -> MagpieError:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return MagpieError(
            f"{path} is unreadable ({reason}): run `magpie verify {self.root} --repair` to move "
            "it aside, then rerun the command that wrote it"
        )

    def read_shard(self, index: int) -> pa.Table | None:
        """Rows of a committed shard; None for a shard committed without rows."""
        path = self.shard_path(index)
        if not path.is_file():
            return None
        try:
            return read_table(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._broken(path, exc) from None

    def shard_info(self, index: int) -> dict[str, Any]:
        """The bookkeeping committed with a shard."""
        path = self.empty_marker(index)
        try:
            if isinstance(path, RemotePath):  # one request for the common case, a shard
                return self._remote_shard_info(index)
            if path.is_file():
                return json.loads(path.read_text())
            path = self.shard_path(index)
            meta = read_schema(path).metadata or {}
            return json.loads(meta.get(SHARD_META_KEY, b"{}"))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._broken(path, exc) from None

    def _remote_shard_info(self, index: int) -> dict[str, Any]:
        try:
            meta = read_schema(self.shard_path(index)).metadata or {}
        except FileNotFoundError:
            return json.loads(self.empty_marker(index).read_text())
        return json.loads(meta.get(SHARD_META_KEY, b"{}"))

    def iter_shards(self) -> Iterator[tuple[int, pa.Table]]:
        """The shards that hold rows, in order."""
        for index in self.shard_indices():
            table = self.read_shard(index)
            if table is not None:
                yield index, table

    def read_all(self) -> pa.Table:
        tables = [table for _, table in self.iter_shards()]
        if not tables:
            raise MagpieError(f"{self.root} holds no shards: run the stage that writes it first")
        return pa.concat_tables(tables, promote_options="default")

    # ---- checks --------------------------------------------------------------------------
    def check(self, deep: bool = False) -> list[Problem]:
        """Every problem of the directory: unreadable manifest, broken or foreign shards, gaps.

        `deep` reads every shard's data (slow); otherwise only footers and bookkeeping.
        """
        from magpie.verify import check_store

        return check_store(self, deep)

    def committed(self, deep: bool = False) -> list[int]:
        """Indices of the shards that are committed and valid."""
        bad = {p.shard for p in self.check(deep) if p.shard is not None}
        return [i for i in self.shard_indices() if i not in bad]

    # ---- manifest ------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.meta_dir / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise MagpieError(
                f"{path} does not parse ({str(exc).splitlines()[0]}): run "
                f"`magpie verify {self.root} --repair` to rebuild it from the shards"
            ) from None
        if not isinstance(manifest, dict):
            raise MagpieError(
                f"{path} is not a manifest: run `magpie verify {self.root} --repair` to rebuild it"
            )
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "magpie_version": __version__, "updated_at": time.time()}
        atomic_write_bytes(
            self.meta_dir / "manifest.json", json.dumps(manifest, indent=2).encode() + b"\n"
        )

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the manifest and write it atomically."""
        manifest = self.read_manifest() or {}
        manifest.update(fields)
        self._write_manifest(manifest)
        return manifest


def open_run_root(out: AnyPath, overwrite: bool) -> None:
    """Lock the output folder of `magpie run` and, with `overwrite`, clear what runs wrote there."""
    refuse_foreign(out)
    if classify(out) == "dataset":
        raise MagpieError(
            f"{out} holds a single-stage dataset, not a `magpie run` output: pass a new --out"
        )
    ShardStore(out).check_writable()
    locking.acquire(out, None)
    remove_stale_temps(out)
    if overwrite and classify(out) == "run":
        clear_for_overwrite(out)
    record = out / META_DIR / RUN_FILE
    if not record.is_file():
        atomic_write_bytes(record, json.dumps({"kind": "magpie run", "written_files": []}).encode())
