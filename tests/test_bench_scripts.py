"""Every `bench/` script still runs: each at its smallest size, on the bundled model.

The benches reach into engine internals (the batch decoder, the sampler) that change often; one
had stopped running unnoticed. These runs check that each script finishes and prints its figure,
never how fast (speed is for the bench itself, on a quiet machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"

RUNS = {
    "kv_cache.py": (["--batch", "4", "--steps", "1", "--tokens", "32"], "vs f16 over 32 tokens"),
    "weights.py": (
        ["--kinds", "file", "--batches", "1,2", "--steps", "2", "--prompts", "2x16"],
        "2x16 prompt tok/s",
    ),
    "instructions.py": (
        ["--rows", "4", "--max-tokens", "32", "--batch", "4", "--shard-size", "4"],
        "pipeline / raw single",
    ),
    "pipeline.py": (["--num", "2", "--n", "2", "--max-tokens", "16"], "pairs/hour"),
    "runtimes.py": (["--prompt-tokens", "16", "--decode-tokens", "8"], "decode tok/s"),
    "tags.py": (["--rows", "50", "--judge-rows", "2", "--indexes", "flat"], "judge tag safety"),
    "executors.py": (
        ["--rows", "2", "--fake-rows", "4", "--max-tokens", "8", "--n", "1"],
        "ray x2 warm",
    ),
    "engines.py": (
        ["--engine", "llamacpp", "--prompts", "4", "--instructions", "2", "--max-tokens", "8"]
        + ["--repeats", "1"],
        "x 5 responses, max_tokens 8: engine",
    ),
    "transformers_cpu.py": (
        ["--dtypes", "float32", "--batches", "1,2", "--steps", "2", "--repeats", "1"],
        "vs llama.cpp's best",
    ),
}


def test_every_bench_script_is_covered() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts - {"vs_distilabel.py"} == set(RUNS)  # vs_distilabel: its own test below


@pytest.mark.parametrize("script", sorted(RUNS))
def test_bench_script_runs_at_its_smallest_size(script: str) -> None:
    args, expected = RUNS[script]
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]
    if script == "weights.py":  # a cell whose subprocess failed reads "exit N"
        assert "exit" not in done.stdout, done.stdout[-3000:]


def test_weights_compares_builds_by_their_library_folders() -> None:
    """`--libs` runs each cell again with another build's libraries first on the path (here the
    installed build's own folder, so both rows must succeed), a row per build."""
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = Path(llama_cpp.__file__).parent / "lib"
    args = ["--kinds", "file", "--batches", "2", "--steps", "2", "--prompts", ""]
    done = subprocess.run(
        [sys.executable, str(BENCH / "weights.py"), *args, "--libs", str(libs), "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    builds = {row[0] for row in rows if len(row) == 4 and row[2] == "native"}
    assert builds == {"installed", "libs1"}, done.stdout
    assert f"libs1: {libs}" in done.stdout and "exit" not in done.stdout, done.stdout


def test_vs_distilabel_runs_or_says_why_not() -> None:
    """Without distilabel installed it skips with a one-line reason (it installs nothing)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "vs_distilabel.py"), "--num", "2", "--max-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        import distilabel  # noqa: F401
    except ImportError:
        assert "distilabel is not importable here: skipped" in done.stdout
    else:
        assert "x instructions/s" in done.stdout and "median" in done.stdout
