"""The shard store's safety rules, in process: what --overwrite may touch, locks, checks, repair.

Real files, real Parquet, real OS locks; other processes are real subprocesses.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from magpie import locking
from magpie.errors import MagpieError
from magpie.store import (
    DiskFullError,
    ShardStore,
    atomic_write_bytes,
    classify,
    open_run_root,
    prepare_output_dir,
)
from magpie.verify import verify_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _release_locks() -> Iterator[None]:
    yield
    locking.release_all()


def _rows(start: int, n: int) -> pa.Table:
    return pa.table({"instruction": [f"question {i}" for i in range(start, start + n)]})


def make_dataset(root: Path, shards: int = 3, config_hash: str = "h1", rows: int = 2) -> ShardStore:
    """A committed dataset of `shards` shards of `rows` rows each, written through the store."""
    store = ShardStore(root)
    store.open_for_write("test", {"command": "test", "k": config_hash}, config_hash, False)
    for index in range(shards):
        store.commit(index, _rows(index * rows, rows), {"shard": index, "rows": rows})
    store.update_manifest(complete=True, rows=shards * rows)
    store.close()
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (but lock files, which only name holders) and its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


# ---- --overwrite touches only what we wrote --------------------------------------------------


def test_overwrite_refuses_a_folder_magpie_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(MagpieError, match=r"did not write \(sub/, thesis.txt\).*new --out"):
            ShardStore(folder).open_for_write("test", {}, "h", overwrite)
    assert snapshot(folder) == before and not (folder / ".magpie").exists()


def test_overwrite_removes_our_files_and_keeps_foreign_ones(tmp_path: Path, capfd) -> None:
    root = tmp_path / "d"
    store = make_dataset(root)
    (root / "notes.md").write_text("mine")
    (root / "card.html").write_text("made by a magpie writer")
    store.record_written("card.html")
    assert store.read_manifest()["written_files"] == ["card.html"]
    ShardStore(root).open_for_write("test", {"command": "test"}, "h2", True)
    assert (root / "notes.md").read_text() == "mine"
    assert not (root / "card.html").exists() and not list(root.glob("part-*"))
    assert ShardStore(root).read_manifest()["config_hash"] == "h2"
    assert "--overwrite kept 1 file(s) magpie did not write: notes.md" in capfd.readouterr().err
    locking.release_all()


def test_a_dataset_keeps_its_foreign_files_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dataset(root)
    (root / "notes.md").write_text("mine")
    store = ShardStore(root)
    store.open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    assert store.shard_indices() == [0, 1, 2]
    store.close()


def test_run_output_overwrite_clears_stage_dirs_and_keeps_the_rest(tmp_path: Path, capfd) -> None:
    run = tmp_path / "run"
    open_run_root(run, overwrite=False)
    (run / "recipe.yaml").write_text("num: 2\n")
    make_dataset(run / "instructions")
    prepare_output_dir(run / "export" / "trl", overwrite=False)
    (run / "export" / "trl" / "train-00000-of-00001.parquet").write_bytes(b"x")
    (run / "export" / "trl" / ".magpie").mkdir()
    (run / "export" / "trl" / ".magpie" / "export.json").write_text("{}")
    (run / "instructions" / "keep.txt").write_text("user file")
    (run / "README.md").write_text("card")
    ShardStore(run).record_written("README.md")
    (run / "analysis.ipynb").write_text("{}")
    locking.release_all()
    assert classify(run) == "run"
    open_run_root(run, overwrite=True)
    names = sorted(p.name for p in run.iterdir())
    assert names == [".magpie", "analysis.ipynb", "instructions"]
    assert sorted(p.name for p in (run / "instructions").iterdir()) == [".magpie", "keep.txt"]
    assert "analysis.ipynb" in capfd.readouterr().err
    with pytest.raises(MagpieError, match="output of `magpie run`"):
        ShardStore(run).open_for_write("test", {}, "h", True)
    locking.release_all()


def test_export_dirs_follow_the_same_rule(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    (out / "thesis.parquet").write_bytes(b"PAR1")
    with pytest.raises(MagpieError, match="did not write"):
        prepare_output_dir(out, overwrite=True)
    assert (out / "thesis.parquet").read_bytes() == b"PAR1"


# ---- one writer per dataset ------------------------------------------------------------------

HOLD = """
import sys, time
from magpie import locking
locking.acquire(sys.argv[1], "magpie instructions --out held")
print("held", flush=True)
time.sleep(60)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dataset(root)
    proc = _holder(root)
    try:
        before = snapshot(root)
        with pytest.raises(MagpieError, match=rf"being written by pid {proc.pid} on host .*held"):
            ShardStore(root).open_for_write("test", {}, "h1", True)
        assert snapshot(root) == before
        assert locking.holder_of(root)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert locking.holder_of(root) is None  # the OS dropped the dead holder's lock


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, capfd) -> None:
    root = tmp_path / "d"
    make_dataset(root)
    proc = _holder(root)
    proc.kill()
    proc.wait()
    store = ShardStore(root)
    store.open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    assert f"stale lock of {root} left by pid {proc.pid}" in capfd.readouterr().err
    holder = json.loads((root / ".magpie" / "lock").read_text())
    assert holder["pid"] == os.getpid()
    store.close()
    assert (root / ".magpie" / "lock").read_text() == ""


def test_locks_are_reentrant_in_one_process(tmp_path: Path) -> None:
    with locking.locked(tmp_path / "d") as first, locking.locked(tmp_path / "d") as second:
        assert first is second and first.path in locking._HELD
    assert first.path not in locking._HELD
    assert locking.holder_of(tmp_path / "d") is None


# ---- temp files, disk full -------------------------------------------------------------------


def test_stale_temp_files_are_removed_when_opened_for_write(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dataset(root)
    stale = [root / ".part-00003.parquet.tmp-999999", root / ".magpie" / ".manifest.json.tmp-7"]
    for path in stale:
        path.write_bytes(b"half a shard")
    store = ShardStore(root)
    store.open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    assert not any(p.exists() for p in stale)
    assert store.shard_indices() == [0, 1, 2]
    store.close()


def test_disk_full_during_a_commit_keeps_earlier_shards(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = make_dataset(root, shards=2)
    store.open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    before = snapshot(root)
    big = pa.table({"instruction": [os.urandom(4096).hex() for _ in range(64)]})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # a real EFBIG from the kernel
    try:
        with pytest.raises(DiskFullError, match=r"shard 2 .*the 2 shard\(s\) committed before"):
            store.commit(2, big, {"shard": 2, "rows": 64})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert snapshot(root) == before and not list(root.glob(".*tmp*"))
    store.close()


def test_an_interrupted_write_leaves_no_temp_file(tmp_path: Path) -> None:
    class Boom(KeyboardInterrupt):
        pass

    def interrupted(_tmp: Path) -> None:
        _tmp.write_bytes(b"partial")
        raise Boom

    from magpie.store import _replace_from_temp

    with pytest.raises(Boom):
        _replace_from_temp(tmp_path / "x.json", interrupted)
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert (tmp_path / "x.json").read_bytes() == b"{}"


# ---- checks and repair -----------------------------------------------------------------------


def test_check_finds_each_kind_of_damage(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = make_dataset(root, shards=5)
    assert store.check(deep=True) == [] and store.committed() == [0, 1, 2, 3, 4]
    data = store.shard_path(0).read_bytes()
    store.shard_path(0).write_bytes(data[: len(data) // 2])  # truncated
    garbled = bytearray(store.shard_path(1).read_bytes())
    garbled[4:40] = b"\xff" * 36  # data pages, footer intact
    store.shard_path(1).write_bytes(bytes(garbled))
    other = tmp_path / "other"
    make_dataset(other, shards=3, config_hash="h9")
    (root / "part-00002.parquet").write_bytes(ShardStore(other).shard_path(2).read_bytes())
    pq.write_table(_rows(0, 3), store.shard_path(4))  # no bookkeeping
    problems = {p.shard: p.what for p in store.check(deep=True)}
    assert problems[0].startswith("is truncated or not Parquet")
    assert problems[1].startswith("has garbled data")
    assert problems[2] == "belongs to another configuration (config h9, this dataset h1)"
    assert problems[4].startswith("carries no magpie bookkeeping")
    assert 1 not in {p.shard for p in store.check(deep=False)}  # the footer is fine
    assert store.committed(deep=True) == [3]


def test_resume_refuses_a_broken_shard_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = make_dataset(root)
    store.shard_path(1).write_bytes(store.shard_path(1).read_bytes()[:100])
    before = snapshot(root)
    with pytest.raises(MagpieError) as failure:
        ShardStore(root).open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    message = str(failure.value)
    assert "part-00001.parquet is truncated" in message
    assert f"magpie verify {root} --repair" in message and "\n" not in message
    assert snapshot(root) == before
    locking.release_all()


def test_repair_moves_broken_shards_aside_and_rebuilds_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = make_dataset(root, shards=3)
    good = store.shard_path(0).read_bytes()
    broken = store.shard_path(2).read_bytes()[:50]
    store.shard_path(2).write_bytes(broken)
    (root / ".magpie" / "manifest.json").write_text("{not json")
    with pytest.raises(MagpieError, match=r"manifest.json does not parse .*verify .* --repair"):
        store.read_manifest()
    report = verify_path(root, repair_it=True)
    assert report.ok, report.problems
    assert (root / ".magpie" / "broken" / "part-00002.parquet").read_bytes() == broken
    assert (root / ".magpie" / "broken" / "manifest.json").read_text() == "{not json"
    manifest = store.read_manifest()
    assert manifest["config_hash"] == "h1" and manifest["complete"] is False
    assert store.shard_path(0).read_bytes() == good and store.shard_indices() == [0, 1]
    again = ShardStore(root)  # the next run resumes and redoes shard 2 only
    again.open_for_write("test", {"command": "test", "k": "h1"}, "h1", False)
    again.close()


def test_verify_reports_a_gap_and_a_count_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = make_dataset(root, shards=3)
    store.shard_path(1).unlink()
    lines = [p.line() for p in verify_path(root).problems[root]]
    assert any("part-00001.parquet: is missing between committed shards" in x for x in lines)
    assert any("counts 6 rows, the shards hold 4" in x for x in lines)


def test_reads_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dataset(root)
    proc = _holder(root)
    try:
        assert ShardStore(root).read_all().num_rows == 6
        assert ShardStore(root).check() == []
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_becomes_an_interrupt_with_exit_status_143() -> None:
    import signal

    from magpie import signals

    previous = signals.install()
    try:
        with pytest.raises(signals.Terminated) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
        assert isinstance(caught.value, KeyboardInterrupt)
        assert signals.exit_code(caught.value) == 143
        assert signals.exit_code(KeyboardInterrupt()) == 130
    finally:
        signals.restore(previous)
    assert signal.getsignal(signal.SIGTERM) == previous[1]
