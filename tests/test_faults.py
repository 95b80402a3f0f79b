"""Fault sweep on the real CLI: each fault is one line or a clean stop; nothing committed lost.

Each case runs `magpie` in a subprocess as a user would (bundled model, tiny runs), hashes the
committed files before and after, and checks the message. Server faults use a scripted HTTP
server on 127.0.0.1; disk full is a real EFBIG from a file-size limit (`ulimit -f`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

WORDS = [
    "river",
    "stone",
    "garden",
    "lamp",
    "violin",
    "orbit",
    "maple",
    "copper",
    "harbor",
    "lantern",
    "meadow",
    "prism",
]


def instructions_jsonl(path: Path, rows: int, big_last: bool = False) -> Path:
    """Instructions to tag; with `big_last` the last one is long, so its shard is the biggest."""
    rng = random.Random(rows)
    texts = [f"Please explain question {i} about {WORDS[i % len(WORDS)]}s." for i in range(rows)]
    if big_last:
        texts[-1] = " ".join(rng.choice(WORDS) + str(rng.randrange(10**6)) for _ in range(3000))
    path.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    return path


def tag_args(source: Path, out: Path) -> list[str]:
    """A model-free stage with one committed shard per row: `tag --tags language`."""
    return ["tag", "--in", str(source), "--out", str(out), "--tags", "language",
            "--shard-size", "1", "-q"]  # fmt: skip


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, lock files aside (they only name the holder)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def parts(root: Path) -> list[Path]:
    return sorted(root.glob("part-*.parquet"))


def rows_of(root: Path) -> list[dict]:
    return pq.read_table(root).to_pylist()


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert exit 2 with one `error:` line (no traceback) holding every needle; return it."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, result.stderr
    joined = " ".join(x.strip() for x in lines)  # rich may wrap a long line at the width
    for needle in needles:
        assert needle in joined, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return instructions_jsonl(tmp_path_factory.mktemp("src") / "in.jsonl", 4, big_last=True)


@pytest.fixture(scope="module")
def made(source: Path) -> Path:
    """A finished 4-shard dataset (copied by each test that damages it)."""
    out = source.parent / "tagged"
    result = run_cli(*tag_args(source, out))
    assert result.returncode == 0, result.stderr
    assert len(parts(out)) == 4
    return out


@pytest.fixture
def copy(made: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tagged"
    shutil.copytree(made, out)
    return out


def foreign_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "thesis.txt").write_text("three years of work")
    (root / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return root


def scored_jsonl(path: Path, rows: int = 4) -> Path:
    lines = [
        {"instruction": f"q{i}", "responses": ["a", "bb", "ccc"], "rewards": [1.0, 3.0, 2.0 + i]}
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# ---- 1. --overwrite never destroys what we did not write ------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["instructions", "--num", "1"],
        ["pairs", "--in", "{scored}"],
        ["export", "--in", "{made}", "--format", "jsonl"],
        ["filter", "--in", "{made}", "--where", "true"],
        ["run", "--num", "1"],
    ],
    ids=lambda c: c[0],
)
def test_overwrite_refuses_a_folder_magpie_did_not_write(
    command: list[str], made: Path, tmp_path: Path
) -> None:
    target = foreign_folder(tmp_path / "project")
    before = digest(target)
    scored = scored_jsonl(tmp_path / "scored.jsonl")
    args = [a.format(scored=scored, made=made) for a in command]
    result = run_cli(*args, "--out", str(target), "--overwrite")
    one_line_error(result, "did not write", "thesis.txt", "new --out")
    assert digest(target) == before and sorted(os.listdir(target)) == ["sub", "thesis.txt"]


def test_overwrite_keeps_foreign_files_inside_a_dataset(tmp_path: Path) -> None:
    scored = scored_jsonl(tmp_path / "scored.jsonl")
    out = tmp_path / "pairs"
    assert run_cli("pairs", "--in", str(scored), "--out", str(out), "-q").returncode == 0
    (out / "notes.md").write_text("my notes")
    result = run_cli("pairs", "--in", str(scored), "--out", str(out), "--min-margin", "1.5",
                     "--overwrite", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "kept 1 file(s) magpie did not write: notes.md" in result.stderr
    assert (out / "notes.md").read_text() == "my notes"
    assert (
        json.loads((out / ".magpie" / "manifest.json").read_text())["config"]["config"][
            "min_margin"
        ]
        == 1.5
    )


# ---- 2. one writer per dataset; 4. interrupts -------------------------------------------------


def _start(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "magpie", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        **kwargs,
    )


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for_shard(proc: subprocess.Popen[str], out: Path, more_than: int = 0) -> None:
    deadline = time.monotonic() + 300
    while len(parts(out)) <= more_than:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)],
)
def test_second_writer_is_refused_and_a_signal_stops_cleanly(
    signum: int, code: int, tmp_path: Path
) -> None:
    out = tmp_path / "tagged"
    args = tag_args(instructions_jsonl(tmp_path / "many.jsonl", 2000), out)
    proc = _start(args)
    try:
        _wait_for_shard(proc, out)
        second = run_cli(*args)
        # `magpie` runs the CLI in a child of its crash supervisor: that child holds the lock.
        holder = int(re.search(r"being written by pid (\d+)", second.stderr).group(1))
        assert holder == proc.pid or _parent_pid(holder) == proc.pid
        one_line_error(second, f"being written by pid {holder}", "(magpie tag --in")
        os.kill(proc.pid, signum)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "interrupted: resume with the same command" in stderr and "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temp file left
    assert (out / ".magpie" / "lock").read_text() == ""  # released
    committed = {k: v for k, v in digest(out).items() if k.startswith("part-")}
    # the same command resumes after them and never rewrites them
    resumed = _start(args)
    try:
        _wait_for_shard(resumed, out, len(committed))
        resumed.send_signal(signal.SIGTERM)
        _stdout, stderr = resumed.communicate(timeout=120)
    finally:
        resumed.kill()
    assert resumed.returncode == 143, stderr
    after = digest(out)
    assert all(after[name] == sha for name, sha in committed.items())
    assert len(parts(out)) > len(committed)


def test_a_killed_run_leaves_a_stale_lock_that_is_taken_over(
    copy: Path, made: Path, source: Path
) -> None:
    parts(copy)[-1].unlink()
    lock = copy / ".magpie" / "lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    result = run_cli(*tag_args(source, copy))
    assert result.returncode == 0, result.stderr
    assert f"taking over the stale lock of {copy} left by pid {dead.pid}" in result.stderr
    assert rows_of(copy) == rows_of(made)


# ---- 3. damaged datasets ----------------------------------------------------------------------


def test_truncated_shard_is_named_then_verify_repair_redoes_only_it(
    copy: Path, source: Path, made: Path
) -> None:
    *kept, shard = parts(copy)
    shard.write_bytes(shard.read_bytes()[:200])
    keep = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}
    before = digest(copy)
    result = run_cli(*tag_args(source, copy))
    one_line_error(result, f"{shard.name} is truncated", f"magpie verify {copy} --repair")
    assert digest(copy) == before
    export = run_cli("export", "--in", str(copy), "--out", str(copy.parent / "x"))
    one_line_error(export, f"{shard.name} is truncated", "--repair")
    check = run_cli("verify", str(copy))
    assert check.returncode == 1 and f"{shard.name}: is truncated" in check.stdout, check.stdout
    fixed = run_cli("verify", str(copy), "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert (copy / ".magpie" / "broken" / shard.name).stat().st_size == 200
    rerun = run_cli(*tag_args(source, copy))
    assert rerun.returncode == 0, rerun.stderr
    assert rows_of(copy) == rows_of(made)
    assert all(digest(copy)[name] == sha for name, sha in keep.items())
    assert run_cli("verify", str(copy)).returncode == 0


def test_shard_of_another_configuration_is_named(copy: Path, source: Path) -> None:
    shard = parts(copy)[1]
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    info = json.loads(meta[b"magpie"])
    meta[b"magpie"] = json.dumps({**info, "config_hash": "0123456789abcdef"}).encode()
    pq.write_table(table.replace_schema_metadata(meta), shard)
    before = digest(copy)
    result = run_cli(*tag_args(source, copy))
    one_line_error(result, f"{shard.name} belongs to another configuration", "verify")
    assert digest(copy) == before


def test_unparseable_manifest_is_named_and_rebuilt_by_repair(
    copy: Path, source: Path, made: Path
) -> None:
    manifest = copy / ".magpie" / "manifest.json"
    manifest.write_text('{"stage": "tag", "config_ha')
    before = digest(copy)
    result = run_cli(*tag_args(source, copy))
    one_line_error(result, "manifest.json does not parse", "--repair")
    assert digest(copy) == before
    export = run_cli("export", "--in", str(copy), "--out", str(copy.parent / "x"))
    one_line_error(export, "manifest.json does not parse")
    fixed = run_cli("verify", str(copy), "--repair")
    assert fixed.returncode == 0 and "rebuilt" in fixed.stdout, fixed.stdout + fixed.stderr
    rerun = run_cli(*tag_args(source, copy))
    assert rerun.returncode == 0, rerun.stderr
    assert rows_of(copy) == rows_of(made)
    assert json.loads(manifest.read_text())["complete"] is True


def test_missing_middle_shard_of_a_transform_is_redone_alone(
    copy: Path, source: Path, made: Path
) -> None:
    middle = parts(copy)[1]
    middle.unlink()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts(copy)}
    check = run_cli("verify", str(copy))
    assert check.returncode == 1 and f"{middle.name}: is missing" in check.stdout, check.stdout
    result = run_cli(*tag_args(source, copy))
    assert result.returncode == 0, result.stderr
    assert rows_of(copy) == rows_of(made)
    assert middle.read_bytes() == (made / middle.name).read_bytes()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts(copy) if p != middle} == (
        kept
    )  # the others were neither rewritten nor touched


def ins_args(out: Path) -> list[str]:
    """Instruction synthesis on the deterministic fake engine: fixed blocks of 3 attempts."""
    return ["instructions", "--engine", "fake", "--num", "10", "--shard-size", "3",
            "--max-tokens", "9", "--out", str(out), "-q"]  # fmt: skip


def test_missing_middle_instruction_block_is_redone_alone(tmp_path: Path) -> None:
    """Block 1 lost between committed blocks (today: refused, 'pass --overwrite'): the rerun
    makes exactly that block again; the later blocks are read again, never rewritten."""
    ref = tmp_path / "ref"
    assert run_cli(*ins_args(ref)).returncode == 0
    assert len(parts(ref)) >= 3
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    middle = copy / parts(ref)[1].name
    middle.unlink()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts(copy)}
    result = run_cli(*ins_args(copy))
    assert result.returncode == 0, result.stderr
    assert rows_of(copy) == rows_of(ref)
    reference, after = digest(ref), digest(copy)
    assert {k: v for k, v in after.items() if k != ".magpie/manifest.json"} == {
        k: v for k, v in reference.items() if k != ".magpie/manifest.json"
    }
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts(copy) if p != middle} == (
        kept
    )
    manifest = json.loads((copy / ".magpie" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 10


def test_filter_releases_its_lock_when_it_returns(made: Path, tmp_path: Path) -> None:
    """Twice in one Python process, then another process writes the same output at once."""
    from magpie import locking
    from magpie.filters import filter_dataset

    out = tmp_path / "filtered"
    for overwrite in (False, True):
        report = filter_dataset(made, out, "true", overwrite=overwrite)
        assert report.kept_rows == len(rows_of(made))
        assert locking.holder_of(out) is None
        assert (out / ".magpie" / "lock").read_text() == ""
    again = run_cli("filter", "--in", str(made), "--out", str(out), "--where", "true",
                    "--overwrite", "-q")  # fmt: skip
    assert again.returncode == 0, again.stderr


# ---- 4. disk full ----------------------------------------------------------------------------


def test_disk_full_during_a_commit_keeps_the_earlier_shards(copy: Path, source: Path) -> None:
    last = parts(copy)[-1]
    limit = last.stat().st_size - 1
    assert (copy / ".magpie" / "config.yaml").stat().st_size < limit, "limit too small"
    last.unlink()
    earlier = len(parts(copy)) + len(list((copy / ".magpie" / "empty").glob("*.json")))
    before = digest(copy)

    def small_files() -> None:  # `ulimit -f`: writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "magpie", *tag_args(source, copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    one_line_error(result, f"disk full while committing shard {earlier}",
                   f"the {earlier} shard(s) committed before it are valid")  # fmt: skip
    assert digest(copy) == before
    assert not [p for p in copy.rglob("*") if ".tmp-" in p.name]


# ---- 5. bad input, every command ------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "no-instruction": (b'{"prompt": "hi"}\n', "responses", "no 'instruction' column",
                       "run `magpie instructions` first"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "responses", "is not UTF-8", "line 1"),
    "not-object": (b'{"instruction": "a"}\n["b"]\n', "responses", "line 2 is a JSON list",
                   "one object per line"),
    "bad-json": (b'{"instruction": "a"}\n{"instruction": \n', "responses", "line 2 is not JSON",
                 "JSON Lines"),
    "empty": (b"", "responses", "holds no rows", "non-empty"),
    "no-responses": (b'{"instruction": "a"}\n', "score", "no 'responses' column",
                     "run `magpie responses` first"),
    "no-rewards": (b'{"instruction": "a", "responses": ["x", "y"]}\n', "pairs",
                   "no 'rewards' column", "run `magpie score` first"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_data_is_one_line(case: str, tmp_path: Path) -> None:
    data, command, *needles = BAD_INPUTS[case]
    source = _write(tmp_path / "in.jsonl", data)
    result = run_cli(command, "--in", str(source), "--out", str(tmp_path / "out"), "-q")
    one_line_error(result, *needles)


def test_garbage_parquet_input_is_one_line(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.parquet", b"PAR1 this is not parquet")
    result = run_cli("responses", "--in", str(source), "--out", str(tmp_path / "out"), "-q")
    one_line_error(result, "is not readable Parquet")


def test_out_that_is_the_input_is_refused(tmp_path: Path) -> None:
    scored = scored_jsonl(tmp_path / "scored.jsonl")
    out = tmp_path / "pairs"
    assert run_cli("pairs", "--in", str(scored), "--out", str(out), "-q").returncode == 0
    before = digest(out)
    for extra in ([], ["--overwrite"]):
        result = run_cli("pairs", "--in", str(out), "--out", str(out), *extra, "-q")
        one_line_error(result, "overlaps --in")
        inner = run_cli("pairs", "--in", str(out), "--out", str(out / "sub"), *extra, "-q")
        one_line_error(inner, "overlaps --in")
    assert digest(out) == before


@pytest.mark.parametrize(
    ("recipe", "needles"),
    [
        ("num: 2\nnmu: 3\n", ["nmu", "Extra inputs are not permitted"]),
        ("num: many\n", ["num", "valid integer"]),
        ("responses:\n  n: [1]\n", ["responses", "n"]),
        ("- just\n- a list\n", ["mapping"]),
        ("num: [\n", ["not valid YAML"]),
    ],
)
def test_bad_recipe_is_one_line(recipe: str, needles: list[str], tmp_path: Path) -> None:
    path = _write(tmp_path / "recipe.yaml", recipe.encode())
    result = run_cli("run", str(path), "--out", str(tmp_path / "run"), "-q")
    one_line_error(result, *needles)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.parquet"))


def test_reward_model_directory_without_weights(tmp_path: Path) -> None:
    model = tmp_path / "rm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": [
        "LlamaForSequenceClassification"]}))  # fmt: skip
    source = _write(tmp_path / "in.jsonl", b'{"instruction": "a", "responses": ["x"]}\n')
    result = run_cli("score", "--in", str(source), "--out", str(tmp_path / "out"),
                     "--reward-model", str(model), "-q")  # fmt: skip
    one_line_error(result, str(model), "holds no weights")


def test_a_gguf_that_is_not_a_gguf(tmp_path: Path) -> None:
    fake = _write(tmp_path / "model.gguf", b"<html>404 Not Found</html>" * 40)
    result = run_cli("instructions", "--model", str(fake), "--out", str(tmp_path / "o"), "-q")
    one_line_error(result, str(fake))


# ---- server faults --------------------------------------------------------------------------


class Garbage(BaseHTTPRequestHandler):
    """An 'OpenAI server' that lists a model, then answers completions with broken JSON."""

    def log_message(self, *_: Any) -> None:
        pass

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(
            json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(b'{"choices": [{"text": "half')


@pytest.fixture
def garbage_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = ["--engine", "openai", "--pre-query-template", "chatml", "--num", "2", "-q"]


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    recipe = {  # a recipe reaches engine options the flags do not: no retries, so it is quick
        "num": 2,
        "engine": {"name": "openai", "model": "m", "options": {"base_url": url, "max_retries": 0}},
        "template": {"pre_query_template": "chatml"},
    }
    path = _write(tmp_path / "recipe.yaml", json.dumps(recipe).encode())
    result = run_cli("run", str(path), "--out", str(tmp_path / "run"), "-q")
    one_line_error(result, f"{url}/models")


def test_malformed_json_from_the_server_is_one_line(garbage_server: str, tmp_path: Path) -> None:
    out = tmp_path / "srv"
    result = run_cli("instructions", "--base-url", garbage_server, *SERVER, "--out", str(out))
    one_line_error(result, f"{garbage_server}/completions")
