"""Where a dataset lives: a local folder (`pathlib.Path`) or a prefix in an object store.

`as_path("s3://bucket/x")` gives a `RemotePath`: the part of the pathlib API the store, the
inputs and the locks use (`/`, name, exists, is_dir, iterdir, glob, read/write bytes, unlink),
over an fsspec filesystem (`s3://` needs s3fs, `gs://` gcsfs, `memory://` is built in). Local
paths stay `pathlib.Path`, so everything local behaves exactly as before.

An object store has no folders, no rename and no fsync: one PUT makes an object whole or not at
all, so a remote write is a single put (no temp object); there are no empty folders, so
`mkdir` does nothing. Store settings come from fsspec's configuration, e.g.
`FSSPEC_S3='{"endpoint_url": "http://127.0.0.1:9000"}'`, or the usual AWS_* variables.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from magpie.errors import MagpieError

URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
# typer's Path type folds "s3://b/x" into "s3:/b/x"; such a first part is read back as a URI
FOLDED_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/([^/].*)$")
LOCAL = {"file", "local"}
# stores whose directory listings fsspec would otherwise cache (another writer's objects)
NO_LISTING_CACHE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}


class _Stat:
    def __init__(self, size: int) -> None:
        self.st_size = size


class RemotePath:
    """A file or prefix in an fsspec filesystem, addressed as `protocol://path`.

    A URI whose filesystem cannot be had (no backend installed, unknown protocol) still makes a
    RemotePath, so that parsing a flag never fails; its first use raises the one-line error.
    """

    __slots__ = ("_error", "_fs", "path", "protocol")

    def __init__(self, fs: Any, path: str, protocol: str, error: str | None = None) -> None:
        self._fs = fs
        self._error = error
        self.path = path.rstrip("/")
        self.protocol = protocol

    @property
    def fs(self) -> Any:
        if self._fs is None:
            raise MagpieError(self._error or f"{self}: no filesystem")
        return self._fs

    @classmethod
    def from_uri(cls, uri: str) -> RemotePath:
        import fsspec

        protocol, rest = uri.split("://", 1)
        protocol = protocol.lower()
        options = {"use_listings_cache": False} if protocol in NO_LISTING_CACHE else {}
        try:
            fs, path = fsspec.core.url_to_fs(uri, **options)
        except ImportError as exc:
            package = PACKAGES.get(protocol, f"the fsspec backend of {protocol}://")
            error = f"{uri}: {protocol}:// needs {package} (pip install {package}): {exc}"
            return cls(None, rest, protocol, error)
        except ValueError as exc:
            error = f"{uri} is not a storage address fsspec knows ({exc}): pass a folder or URI"
            return cls(None, rest, protocol, error)
        return cls(fs, path, protocol)

    # ---- names ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __fspath__(self) -> str:
        """Code that needs a local file (DuckDB, the card, the viewer) gets one line, not a
        folder named `s3:` in the working directory."""
        raise MagpieError(
            f"{self} is in an object store, and this command reads and writes local folders "
            "only: copy it to a local folder first (the stage commands and `magpie run` accept "
            "object-store paths)"
        )

    def __truediv__(self, name: str | os.PathLike[str]) -> RemotePath:
        path = f"{self.path}/{str(name).strip('/')}"
        return RemotePath(self._fs, path, self.protocol, self._error)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        head = self.path.rsplit("/", 1)[0] if "/" in self.path else self.path
        return RemotePath(self._fs, head, self.protocol, self._error)

    def resolve(self) -> RemotePath:
        return self

    def is_relative_to(self, other: object) -> bool:
        if not isinstance(other, RemotePath) or other.protocol != self.protocol:
            return False
        return self.path == other.path or self.path.startswith(other.path + "/")

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self.path[len(other.path) :].lstrip("/") or ".")

    # ---- queries -------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        for entry in sorted(entries):
            entry = entry.rstrip("/")
            if entry != self.path:  # some stores list a file as itself
                yield RemotePath(self.fs, entry, self.protocol)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children whose name matches `pattern` (one level, as the store uses it)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def stat(self) -> _Stat:
        return _Stat(int(self.fs.size(self.path)))

    # ---- reading and writing -------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One put: readers see the old object or the new one, never a part."""
        self.fs.pipe_file(self.path, data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.path, mode)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)

    def move_to(self, target: RemotePath) -> None:
        """Copy then delete (object stores have no rename); the copy is whole or absent."""
        self.fs.mv(self.path, target.path)


AnyPath = Path | RemotePath


def file_names(folder: Path | RemotePath) -> set[str]:
    """Names of the files directly in `folder` (one listing; empty when it does not exist)."""
    if isinstance(folder, RemotePath):
        try:
            entries = folder.fs.ls(folder.path, detail=True)
        except FileNotFoundError:
            return set()
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file"}
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.is_file()}


def is_remote(path: object) -> bool:
    return isinstance(path, RemotePath)


def _known_protocol(protocol: str) -> bool:
    from fsspec.registry import known_implementations

    return protocol not in LOCAL and protocol in known_implementations


def as_path(value: str | os.PathLike[str] | RemotePath) -> AnyPath:
    """A local `Path`, or a `RemotePath` for a URI such as `s3://bucket/prefix`."""
    if isinstance(value, RemotePath):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    match = URI_RE.match(text)
    if match is None and not isinstance(value, str):
        match = FOLDED_RE.match(text)  # a URI that went through pathlib
        if match is not None and not _known_protocol(match.group(1).lower()):
            match = None
    if match is None:
        return Path(value)
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol in LOCAL:
        return Path(rest if rest.startswith("/") else "/" + rest)
    return RemotePath.from_uri(f"{protocol}://{rest}")


def download_tree(source: RemotePath, target: Path) -> list[Path]:
    """Copy every object under `source` into the local folder `target`; the files written."""
    written = []
    for entry in source.fs.find(source.path):
        rel = entry[len(source.path) :].lstrip("/")
        if not rel:
            continue
        local = target / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(bytes(source.fs.cat_file(entry)))
        written.append(local)
    return written


def upload_tree(source: Path, target: RemotePath) -> list[RemotePath]:
    """Put every file under the local folder `source` below `target` (one put per file, the
    bookkeeping under `.magpie/` last, so a folder with its record is a complete one)."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    files.sort(key=lambda p: ".magpie" in p.relative_to(source).parts)
    written = []
    for path in files:
        remote = target / path.relative_to(source).as_posix()
        remote.write_bytes(path.read_bytes())
        written.append(remote)
    return written


# ---- Parquet through either kind of path -------------------------------------------------------


def read_table(path: AnyPath) -> pa.Table:
    if isinstance(path, RemotePath):
        return pq.read_table(pa.BufferReader(path.read_bytes()))
    return pq.read_table(path)


FOOTER_GUESS = 64 * 1024


def _footer(path: RemotePath) -> pa.BufferReader | None:
    """The end of a Parquet object in one ranged GET, when it holds the whole footer (pyarrow
    reads a file's metadata from its last bytes only); None when the footer is longer."""
    tail = bytes(path.fs.cat_file(path.path, start=-FOOTER_GUESS))
    if len(tail) < FOOTER_GUESS:
        return pa.BufferReader(tail)  # the whole object
    if tail[-4:] == b"PAR1" and int.from_bytes(tail[-8:-4], "little") + 8 <= len(tail):
        return pa.BufferReader(tail)
    return None


def _read_footer_with(reader: Any, path: AnyPath) -> Any:
    """`reader` (pq.read_metadata / pq.read_schema) of a local file, or of a remote one's footer
    (one ranged read; the whole object where the store cannot read a range)."""
    if isinstance(path, RemotePath):
        footer = _footer(path)
        if footer is not None:
            return reader(footer)
        with path.open("rb") as handle:
            return reader(handle)
    return reader(path)


def read_metadata(path: AnyPath) -> Any:
    return _read_footer_with(pq.read_metadata, path)


def read_schema(path: AnyPath) -> pa.Schema:
    return _read_footer_with(pq.read_schema, path)


def table_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a zstd Parquet file (what the store commits)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
