"""Outputs and inputs in an object store: an S3 server (moto) started by the test on 127.0.0.1.

Commands run in this process through the real CLI (typer's runner: no interpreter start per
command); a subprocess only where another process matters (a writer killed mid-run, a second
writer). The same rules as local folders: shards whole or absent, resume after a kill with identical
objects, `--overwrite` only of what we wrote, one writer per dataset (a lock object with a
heartbeat), `--in s3://...` for the next stage, and `magpie verify` on a prefix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

moto_server = pytest.importorskip("moto.server", reason="needs moto[server]")
pytest.importorskip("s3fs", reason="needs s3fs")

BUCKET = "magpie-test"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[SimpleNamespace]:
    """A moto S3 server in this process; the CLI subprocesses reach it through FSSPEC_S3."""
    import boto3
    import fsspec.config

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    saved_env = {k: os.environ.get(k) for k in [*ENV, "FSSPEC_S3"]}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update({**ENV, "FSSPEC_S3": json.dumps(options)})
    fsspec.config.conf["s3"] = options  # this process (the env var is read at import)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **options)
    yield SimpleNamespace(endpoint=endpoint, client=client, fs=fs)
    server.stop()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if saved_conf is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved_conf


def uri(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def objects(s3: SimpleNamespace, name: str) -> dict[str, str]:
    """sha256 of every object under a prefix (the lock object aside: it names its holder)."""
    prefix = f"{BUCKET}/{name}/"
    return {
        key[len(prefix) :]: hashlib.sha256(s3.fs.cat_file(key)).hexdigest()
        for key in sorted(s3.fs.find(prefix))
        if not key.endswith("/.magpie/lock")
    }


def remote_rows(s3: SimpleNamespace, name: str) -> list[dict]:
    keys = sorted(k for k in s3.fs.find(f"{BUCKET}/{name}/") if k.rsplit("/", 1)[-1][:5] == "part-")
    keys = [k for k in keys if "/.magpie/" not in k]
    return [row for k in keys for row in pq.read_table(io.BytesIO(s3.fs.cat_file(k))).to_pylist()]


def local_rows(path: Path) -> list[dict]:
    return [
        row for p in sorted(path.glob("part-*.parquet")) for row in pq.read_table(p).to_pylist()
    ]


def ins_args(out: str, num: int = 10) -> list[str]:
    return ["instructions", "--engine", "fake", "--num", str(num), "--shard-size", "3",
            "--max-tokens", "9", "--out", out, "-q"]  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`magpie ARGS` in this process (the CLI's own code path, errors and lock release)."""
    from typer.testing import CliRunner

    from magpie.cli import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, result.stderr
    joined = " ".join(x.strip() for x in result.stderr.splitlines())
    for needle in needles:
        assert needle in joined, result.stderr


# ---- stage commands ---------------------------------------------------------------------------


def test_stages_write_and_read_s3_like_local_folders(s3, tmp_path: Path) -> None:
    """instructions -> s3, responses --in s3 -> s3: the rows of the same commands run locally;
    a rerun commits nothing and changes no object; `magpie verify` checks the prefix."""
    local = tmp_path / "ins"
    assert cli(*ins_args(str(local))).returncode == 0
    made = cli(*ins_args(uri("ins")))
    assert made.returncode == 0, made.stderr
    assert remote_rows(s3, "ins") == local_rows(local)
    keys = objects(s3, "ins")
    assert {k for k in keys if k.startswith("part-")} == {p.name for p in local.glob("part-*")}
    assert ".magpie/manifest.json" in keys and not [k for k in keys if ".tmp-" in k]
    manifest = json.loads(s3.fs.cat_file(f"{BUCKET}/ins/.magpie/manifest.json"))
    assert manifest["complete"] and manifest["rows"] == 10
    assert not s3.fs.exists(f"{BUCKET}/ins/.magpie/lock")  # released: the object is deleted

    again = cli(*ins_args(uri("ins")))
    assert again.returncode == 0 and "0 new" in again.stdout, again.stdout + again.stderr
    assert {k: v for k, v in objects(s3, "ins").items() if k.startswith("part-")} == {
        k: v for k, v in keys.items() if k.startswith("part-")
    }

    res = ["responses", "--engine", "fake", "--n", "2", "--max-tokens", "12", "-q"]
    assert cli(*res, "--in", str(local), "--out", str(tmp_path / "res")).returncode == 0
    remote = cli(*res, "--in", uri("ins"), "--out", uri("res"))
    assert remote.returncode == 0, remote.stderr
    assert remote_rows(s3, "res") == local_rows(tmp_path / "res")
    input_of = json.loads(s3.fs.cat_file(f"{BUCKET}/res/.magpie/manifest.json"))["config"]
    assert input_of["input"] == uri("ins")
    check = cli("verify", uri("res"))
    assert check.returncode == 0 and "ok:" in check.stdout, check.stdout + check.stderr


KILLER = textwrap.dedent(
    """
    import os, sys
    from magpie.store import ShardStore
    from magpie.cli import app

    kill_after, args = int(sys.argv[1]), sys.argv[2:]
    commit, done = ShardStore.commit, []

    def dying_commit(self, *a, **k):
        commit(self, *a, **k)
        done.append(1)
        if len(done) == kill_after:
            os._exit(9)

    ShardStore.commit = dying_commit
    app(args, prog_name="magpie")
    """
)


def test_killed_after_commits_then_resumed_gives_identical_objects(s3, tmp_path: Path) -> None:
    """The writer dies (os._exit) after 2 commits, leaving its lock object behind; the same
    command takes the stale lock over and writes what an uninterrupted run writes."""
    assert cli(*ins_args(uri("ref"))).returncode == 0
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    killed = subprocess.run([sys.executable, str(script), "2", *ins_args(uri("kill"))],
                            env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    assert len([k for k in objects(s3, "kill") if k.startswith("part-")]) == 2
    assert s3.fs.exists(f"{BUCKET}/kill/.magpie/lock")  # the dead writer's lock object
    resumed = cli(*ins_args(uri("kill")))
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the stale lock of {uri('kill')} left by pid" in resumed.stderr
    ref, got = objects(s3, "ref"), objects(s3, "kill")
    manifest = ".magpie/manifest.json"  # holds times and the invocation's own counts
    assert {k: v for k, v in got.items() if k != manifest} == {
        k: v for k, v in ref.items() if k != manifest
    }
    assert remote_rows(s3, "kill") == remote_rows(s3, "ref")
    done = json.loads(s3.fs.cat_file(f"{BUCKET}/kill/{manifest}"))
    assert done["complete"] and done["rows"] == 10


def test_plain_jsonl_and_parquet_objects_are_inputs(s3) -> None:
    import pyarrow as pa

    from magpie.fs import table_bytes

    rows = [{"instruction": f"Name a colour number {i}."} for i in range(3)]
    s3.fs.pipe_file(
        f"{BUCKET}/plain/in.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    s3.fs.pipe_file(f"{BUCKET}/plain/more.parquet", table_bytes(pa.Table.from_pylist(rows[:1])))
    res = ["responses", "--engine", "fake", "--n", "1", "--max-tokens", "8", "-q"]
    one = cli(*res, "--in", uri("plain/in.jsonl"), "--out", uri("from-jsonl"))
    assert one.returncode == 0, one.stderr
    assert [r["instruction"] for r in remote_rows(s3, "from-jsonl")] == [
        r["instruction"] for r in rows
    ]
    both = cli(*res, "--in", uri("plain"), "--out", uri("from-folder"))  # .jsonl + .parquet
    assert both.returncode == 0, both.stderr
    assert len(remote_rows(s3, "from-folder")) == 4


# ---- what we did not write; one writer ---------------------------------------------------------


def test_overwrite_refuses_a_prefix_holding_foreign_objects(s3) -> None:
    s3.fs.pipe_file(f"{BUCKET}/project/thesis.txt", b"three years of work")
    s3.fs.pipe_file(f"{BUCKET}/project/sub/data.csv", b"a,b\n1,2\n")
    before = objects(s3, "project")
    result = cli(*ins_args(uri("project"), num=2), "--overwrite")
    one_line_error(result, "did not write", "thesis.txt", "new --out")
    assert objects(s3, "project") == before


def test_overwrite_of_our_dataset_keeps_a_foreign_object_inside(s3) -> None:
    assert cli(*ins_args(uri("mine"), num=4)).returncode == 0
    s3.fs.pipe_file(f"{BUCKET}/mine/notes.md", b"my notes")
    redo = cli(*ins_args(uri("mine"), num=3), "--max-attempts", "40", "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert "kept 1 file(s) magpie did not write: notes.md" in redo.stderr
    assert s3.fs.cat_file(f"{BUCKET}/mine/notes.md") == b"my notes"
    assert len(remote_rows(s3, "mine")) == 3


def _lock_object(s3, name: str, **holder) -> None:
    base = {"pid": 4242, "host": "elsewhere", "command": "magpie instructions", "started": 1e9}
    s3.fs.pipe_file(f"{BUCKET}/{name}/.magpie/lock", json.dumps({**base, **holder}).encode())


def test_a_live_lock_object_is_refused_and_a_stale_one_taken_over(s3) -> None:
    assert cli(*ins_args(uri("locked"), num=2)).returncode == 0
    before = objects(s3, "locked")
    _lock_object(s3, "locked", heartbeat=time.time(), stale_after=120)
    refused = cli(*ins_args(uri("locked"), num=4))
    one_line_error(refused, "being written by pid 4242 on host elsewhere", "another --out")
    assert objects(s3, "locked") == before
    _lock_object(s3, "locked", heartbeat=time.time() - 600, stale_after=120)
    taken = cli(*ins_args(uri("locked"), num=2))
    assert taken.returncode == 0, taken.stderr
    assert "taking over the stale lock" in taken.stderr and "pid 4242" in taken.stderr
    shards = lambda found: {k: v for k, v in found.items() if k.startswith("part-")}  # noqa: E731
    assert shards(objects(s3, "locked")) == shards(before)


def test_a_second_writer_on_the_same_prefix_is_refused(s3) -> None:
    """A held lock in this process (heartbeat running) against the real CLI in another."""
    from magpie import locking
    from magpie.fs import as_path

    lock = locking.acquire(as_path(uri("busy")), "test holder")
    try:
        result = run_cli(*ins_args(uri("busy"), num=2))
        one_line_error(result, f"being written by pid {os.getpid()} on host {socket.gethostname()}")
        assert not [k for k in objects(s3, "busy") if k.startswith("part-")]
    finally:
        locking.release(lock)
    assert not s3.fs.exists(f"{BUCKET}/busy/.magpie/lock")


@pytest.mark.slow  # ~15 s: a subprocess with language detection, stopped mid-run
def test_sigterm_stops_cleanly_and_releases_the_lock_object(s3, tmp_path: Path) -> None:
    """A model-free stage with one shard per row, stopped by SIGTERM after its first commits."""
    source = tmp_path / "many.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Say {i}."}) + "\n" for i in range(500)))
    args = ["tag", "--in", str(source), "--out", uri("term"), "--tags", "language",
            "--shard-size", "1", "-q"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "magpie", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # list names only while the writer runs: its temporary objects may vanish between a
        # listing and a read
        part = f"{BUCKET}/term/part-"
        while not [k for k in s3.fs.find(f"{BUCKET}/term/") if k.startswith(part)]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "interrupted: resume with the same command" in stderr and "Traceback" not in stderr
    assert not s3.fs.exists(f"{BUCKET}/term/.magpie/lock")
    committed = {k: v for k, v in objects(s3, "term").items() if k.startswith("part-")}
    check = cli("verify", uri("term"))  # every committed shard whole, none missing before another
    assert check.returncode == 0 and f"ok: {len(committed)} shard(s)" in check.stdout, check.stdout
    resumed = cli(*args[:-1], "--shard-size", "100", "-q")  # another config: refused, kept
    one_line_error(resumed, "different configuration")
    assert {k: v for k, v in objects(s3, "term").items() if k.startswith("part-")} == committed


def test_a_holder_that_lost_its_lock_stops_before_the_next_commit(s3, monkeypatch) -> None:
    """A stalled holder whose lock another writer took over notices it at its next heartbeat."""
    import pyarrow as pa

    from magpie import locking
    from magpie.errors import MagpieError
    from magpie.fs import as_path
    from magpie.store import ShardStore

    monkeypatch.setenv("MAGPIE_LOCK_STALE_S", "0.4")  # heartbeat every 0.1 s
    store = ShardStore(as_path(uri("lost")))
    store._lock = lock = locking.acquire(store.root, "stalled holder")
    try:
        store.commit(0, pa.table({"x": [1]}), {"shard": 0, "rows": 1})
        _lock_object(s3, "lost", heartbeat=time.time(), token="someone else")
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(MagpieError, match="was taken over by pid 4242 on host elsewhere"):
            store.commit(1, pa.table({"x": [2]}), {"shard": 1, "rows": 1})
    finally:
        locking.release(lock)
    assert store.shard_indices() == [0]
    assert json.loads(s3.fs.cat_file(f"{BUCKET}/lost/.magpie/lock"))["token"] == "someone else"


def test_memory_store_commits_reads_and_clears_only_ours() -> None:
    """The same store code on fsspec's in-memory filesystem (no server at all)."""
    import pyarrow as pa

    from magpie.fs import RemotePath, as_path
    from magpie.store import ShardStore, classify, remove_ours

    root = as_path("memory://magpie-test/d")
    assert isinstance(root, RemotePath) and classify(root) == "missing"
    store = ShardStore(root)
    store.open_for_write("tag", {"command": "tag"}, "abc", overwrite=False)
    store.commit(0, pa.table({"x": [1, 2]}), {"shard": 0, "rows": 2})
    store.commit(1, pa.table({"x": pa.array([], pa.int64())}), {"shard": 1, "rows": 0})
    store.close()
    assert store.shard_indices() == [0, 1] and store.read_all().column("x").to_pylist() == [1, 2]
    assert classify(root) == "dataset" and store.check(deep=True) == []
    (root / "notes.md").write_text("mine")
    assert [p.name for p in remove_ours(root)] == ["notes.md"]
    assert [p.name for p in root.iterdir()] == ["notes.md"]


def test_truncated_shard_object_is_named_and_repaired(s3) -> None:
    assert cli(*ins_args(uri("broken"), num=6)).returncode == 0
    rows = remote_rows(s3, "broken")
    key = f"{BUCKET}/broken/part-00001.parquet"
    s3.fs.pipe_file(key, s3.fs.cat_file(key)[:100])
    result = cli(*ins_args(uri("broken"), num=6))
    one_line_error(result, "part-00001.parquet is truncated", f"magpie verify {uri('broken')}")
    fixed = cli("verify", uri("broken"), "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert s3.fs.exists(f"{BUCKET}/broken/.magpie/broken/part-00001.parquet")
    redo = cli(*ins_args(uri("broken"), num=6))
    assert redo.returncode == 0, redo.stderr
    assert remote_rows(s3, "broken") == rows


def test_missing_bucket_and_local_only_commands_are_one_line(s3, tmp_path: Path) -> None:
    missing = cli(*ins_args("s3://no-such-bucket/x", num=2))
    one_line_error(missing, "cannot write to s3://no-such-bucket/x", "bucket")
    unknown = cli(*ins_args("nosuchstore://b/x", num=2))
    one_line_error(unknown, "nosuchstore://b/x is not a storage address fsspec knows")
    assert cli(*ins_args(uri("for-filter"), num=2)).returncode == 0
    local_only = cli("filter", "--in", uri("for-filter"), "--out", str(tmp_path / "f"),
                         "--where", "true", "-q")  # fmt: skip
    one_line_error(local_only, uri("for-filter"), "local folders only")


# ---- the bundled model, magpie run and Ray ----------------------------------------------------


def test_bundled_model_instructions_to_s3(s3, tmp_path: Path) -> None:
    """llama.cpp with the bundled SmolLM2 at tiny size: the same rows as a local folder."""
    args = ["instructions", "--num", "2", "--max-tokens", "24", "--shard-size", "2",
            "--n-threads", "1", "-q"]  # fmt: skip
    assert cli(*args, "--out", str(tmp_path / "ins")).returncode == 0
    made = cli(*args, "--out", uri("model"))
    assert made.returncode == 0, made.stderr
    assert remote_rows(s3, "model") == local_rows(tmp_path / "ins")
    assert len(remote_rows(s3, "model")) == 2


@pytest.mark.slow  # ~20 s on 2 shared cores: Ray start and two actors
def test_ray_executor_commits_into_s3_the_rows_of_a_local_run(s3, tmp_path, monkeypatch) -> None:
    """Actors (half a CPU each) run the shards; the driver commits them into the store."""
    ray = pytest.importorskip("ray")
    from rich.console import Console

    from magpie import pipeline
    from magpie.config import InstructionsConfig, ResponsesConfig
    from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
    from magpie.fs import as_path

    monkeypatch.setenv("MAGPIE_CACHE_DIR", str(tmp_path / "cache"))  # actors' logs go there
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    view = ProgressView(Console(file=io.StringIO()), enabled=False)
    fake = {"name": "fake"}
    ins = InstructionsConfig.model_validate({"engine": fake, "num": 8, "max_tokens": 9})
    res = ResponsesConfig.model_validate({"engine": fake, "n": 2, "shard_size": 2})
    pipeline.instructions(ins, tmp_path / "ins", view)
    pipeline.responses(res, tmp_path / "ins", tmp_path / "res", view)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        executor = create_executor(ExecutorSpec(name="ray", actors=2, num_cpus=0.5))
        try:
            summary = pipeline.responses(
                res, tmp_path / "ins", as_path(uri("ray-res")), view, executor=executor
            )
        finally:
            executor.close()
    finally:
        ray.shutdown()
    assert summary.complete and summary.shards == 4
    assert remote_rows(s3, "ray-res") == local_rows(tmp_path / "res")
    logs = list((tmp_path / "cache" / "logs" / "s3").rglob("responses-actor-*.log"))
    assert logs and any("shard" in p.read_text() for p in logs)


RUN_RECIPE = """\
num: 2
engine: {name: fake}
instructions: {max_tokens: 9, shard_size: 3}
responses: {n: 2, max_tokens: 12, shard_size: 2}
score: {shard_size: 4, judge_engine: {options: {n_threads: 1}}}
export: [trl]
"""


def run_here_and_in_s3(tmp_path: Path, text: str, name: str) -> Path:
    """`magpie run` of the recipe `text` into tmp_path/NAME and into s3://BUCKET/NAME."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    for out in (str(tmp_path / name), uri(name)):
        result = cli("run", str(recipe), "--out", out, "-q")
        assert result.returncode == 0, result.stderr
    return recipe


def test_magpie_run_into_s3_gives_the_local_run(s3, tmp_path: Path) -> None:
    """Generation on the fake engine, scores from the bundled model as judge; the same pairs
    and export as a local run, plus the card and viewer recorded as ours in the run record."""
    run_here_and_in_s3(tmp_path, RUN_RECIPE, "run")
    pairs = local_rows(tmp_path / "run" / "pairs")
    assert pairs and remote_rows(s3, "run/pairs") == pairs
    keys = objects(s3, "run")
    export = sorted(k for k in keys if k.startswith("export/trl/") and "/.magpie/" not in k)
    assert export == sorted(
        str(p.relative_to(tmp_path / "run"))
        for p in (tmp_path / "run" / "export" / "trl").iterdir()
        if p.is_file()
    )
    for name in export:
        assert keys[name] == hashlib.sha256((tmp_path / "run" / name).read_bytes()).hexdigest()
    record = json.loads(s3.fs.cat_file(f"{BUCKET}/run/.magpie/run.json"))
    assert {"README.md", "view.html"} <= set(record["written_files"]) and "README.md" in keys
    check = cli("verify", uri("run"))
    assert check.returncode == 0, check.stdout + check.stderr


STEP_RECIPE = """\
num: 6
engine: {name: fake}
steps:
  - stage: instructions
    max_tokens: 9
    shard_size: 4
  - stage: responses
    n: 2
  - name: picked
    stage: filter
    where: "length(instruction) > 10"
  - stage: export
    formats: [sharegpt]
    test_size: 0.3
  - stage: card
    plots: false
"""


def test_step_recipe_into_s3_gives_the_local_run(s3, tmp_path: Path) -> None:
    """A step recipe's in-process steps (filter, export, card) run on a local copy of their
    input and are put beside the stages' datasets: the same rows and export files as locally."""
    recipe = run_here_and_in_s3(tmp_path, STEP_RECIPE, "steps")
    picked = local_rows(tmp_path / "steps" / "picked")
    assert picked and remote_rows(s3, "steps/picked") == picked
    keys = objects(s3, "steps")
    exported = tmp_path / "steps" / "export" / "sharegpt"
    files = sorted(p.name for p in exported.iterdir() if p.is_file())
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if k.startswith("export/sharegpt/")
                  and "/.magpie/" not in k) == files  # fmt: skip
    for name in files:
        digest = hashlib.sha256((exported / name).read_bytes()).hexdigest()
        assert keys[f"export/sharegpt/{name}"] == digest
    record = json.loads(s3.fs.cat_file(f"{BUCKET}/steps/.magpie/run.json"))
    assert record["final"] == "picked" and "README.md" in keys
    again = cli("run", str(recipe), "--out", uri("steps"), "-q")  # complete: every step skipped
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 5, again.stdout
    assert objects(s3, "steps") == keys
