"""A dataset on disk: a directory of Parquet shards plus a manifest of how it was made.

Layout of a dataset directory `D`:
  D/part-00000.parquet ...   the rows (what `datasets`, DuckDB and pandas read)
  D/.magpie/manifest.json    stage, resolved config and its hash, package version, counts
  D/.magpie/config.yaml      the resolved config, to rerun or edit
  D/.magpie/rejected/        rows set aside, with the reason (same shard numbers)

A shard is committed atomically (temp file, fsync, rename), so it is either whole or absent; each
shard carries its own bookkeeping in the Parquet key-value metadata, so the manifest can always be
rebuilt from the shards and a crash between the two loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from magpie import __version__
from magpie.errors import MagpieError

META_DIR = ".magpie"
SHARD_META_KEY = b"magpie"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ShardStore:
    """The shards and manifest of one dataset directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.meta_dir = self.root / META_DIR

    # ---- opening -------------------------------------------------------------------------
    def open_for_write(
        self, stage: str, config: dict[str, Any], config_hash: str, overwrite: bool
    ) -> None:
        """Prepare the directory for a run; refuse one made by a different configuration."""
        self.check_writable()
        manifest = self.read_manifest()
        if overwrite:
            self.clear()
        elif manifest is not None and manifest.get("config_hash") != config_hash:
            raise MagpieError(
                f"{self.root} holds a dataset made with a different configuration "
                f"(stage {manifest.get('stage')}, config {manifest.get('config_hash')}): rerun "
                "with the same flags to resume, pick another --out, or pass --overwrite"
            )
        elif manifest is None and any(self.root.iterdir()):
            raise MagpieError(
                f"{self.root} is not empty and is not a magpie dataset: pick another --out, "
                "or pass --overwrite to replace its contents"
            )
        (self.meta_dir / "rejected").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.meta_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode()
        )
        if manifest is None or overwrite:
            self._write_manifest(
                {"stage": stage, "config_hash": config_hash, "config": config, "complete": False}
            )

    def check_writable(self) -> None:
        """Fail early, with the fix, when the directory cannot be created or written."""
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
        """Remove everything in the directory (for --overwrite)."""
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ---- shards --------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.root / f"part-{index:05d}.parquet"

    def rejected_path(self, index: int) -> Path:
        return self.meta_dir / "rejected" / f"part-{index:05d}.parquet"

    def empty_marker(self, index: int) -> Path:
        return self.meta_dir / "empty" / f"part-{index:05d}.json"

    def shard_indices(self) -> list[int]:
        """Indices of the committed shards (with rows or empty), in order."""
        paths = [*self.root.glob("part-*.parquet"), *(self.meta_dir / "empty").glob("part-*.json")]
        return sorted({int(p.stem.split("-")[1]) for p in paths})

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
        if rejected is not None:
            atomic_write_table(self.rejected_path(index), rejected)
        if table.num_rows == 0:
            self.empty_marker(index).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.empty_marker(index), json.dumps(info, sort_keys=True).encode())
            return
        meta = dict(table.schema.metadata or {})
        meta[SHARD_META_KEY] = json.dumps(info, sort_keys=True).encode()
        atomic_write_table(self.shard_path(index), table.replace_schema_metadata(meta))

    def read_shard(self, index: int) -> pa.Table | None:
        """Rows of a committed shard; None for a shard committed without rows."""
        path = self.shard_path(index)
        return pq.read_table(path) if path.is_file() else None

    def shard_info(self, index: int) -> dict[str, Any]:
        """The bookkeeping committed with a shard."""
        if self.empty_marker(index).is_file():
            return json.loads(self.empty_marker(index).read_text())
        meta = pq.read_schema(self.shard_path(index)).metadata or {}
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

    # ---- manifest ------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.meta_dir / "manifest.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

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
