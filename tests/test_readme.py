"""The README's shell examples run as written, in order, in one folder, on the bundled model.

Every line of every ```bash block is run, except:
- lines marked `# gpu` or `# needs: ...` (a GPU, a model or file we cannot have offline, or more
  CPU time than the fast tier has: multi-turn math replies run to hundreds of tokens, so that
  example is covered by tests/test_instructions.py and tests/test_cli_newcomer.py instead);
- `. .venv/bin/activate` / `source ...` (this test already runs inside the environment).

MAGPIE_README_TINY (default 1) shrinks sizes so the whole walk fits the fast tier: `--num N`
becomes `--num 2`, `--n N` becomes `--n 2`, and commands that sample responses get
`--max-tokens 32`. MAGPIE_README_TINY=0 runs the README at its written sizes (slow: tens of
minutes on a CPU).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP_MARKERS = ("# gpu", "# needs:")
TINY = os.environ.get("MAGPIE_README_TINY", "1") != "0"
TINY_SIZES = {"--num": "2", "--n": "2"}
TINY_RESPONSE_TOKENS = "32"


def readme_commands(text: str) -> list[str]:
    """The runnable lines of the README's ```bash blocks, continuations joined, in order."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or any(m in line for m in SKIP_MARKERS):
                continue
            if line.startswith((". ", "source ")):
                continue
            commands.append(line)
    return commands


def tiny(argv: list[str]) -> list[str]:
    """Shrink one `magpie ...` command line to test sizes (see the module docstring)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in TINY_SIZES:
            out[i + 1] = TINY_SIZES[arg]
    command = out[1] if len(out) > 1 else ""
    if command in {"responses", "run"} and "--max-tokens" not in out:
        out += ["--max-tokens", TINY_RESPONSE_TOKENS]
    if command == "run":
        for flag, value in TINY_SIZES.items():
            if flag not in out:
                out += [flag, value]
    return out


def test_commands_are_parsed_and_shrunk() -> None:
    commands = readme_commands(README.read_text())
    assert commands and all(c.split()[0] == "magpie" for c in commands), commands
    assert not any("make " in c or "PATH/" in c or "bench/" in c for c in commands)
    run = tiny(shlex.split("magpie run --out x", comments=True))
    assert run == ["magpie", "run", "--out", "x", "--max-tokens", "32", "--num", "2", "--n", "2"]
    assert tiny(["magpie", "instructions", "--num", "200"]) == [
        "magpie",
        "instructions",
        "--num",
        "2",
    ]


def _run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(line, comments=True)
    if TINY:
        argv = tiny(argv)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": "200",
        "NO_COLOR": "1",
        # one llama.cpp thread per process: on a shared, oversubscribed CPU two spinning threads
        # are many times slower than one
        "MAGPIE_N_THREADS": os.environ.get("MAGPIE_N_THREADS", "1"),
    }
    return subprocess.run(
        [sys.executable, "-m", "magpie", *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow  # ~2.5 min: every README example in order (CI runs the slow tier)
def test_readme_examples_run_in_order(tmp_path: Path) -> None:
    for line in readme_commands(README.read_text()):
        print(line, flush=True)  # shown with -s: where a slow walk is
        result = _run(line, tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Loading weights" not in result.stderr, line  # no library progress bars
    # `magpie run` flags changed single recipe fields and kept the demo's others
    recipe = yaml.safe_load((tmp_path / "data/mine/recipe.yaml").read_text())
    assert recipe["responses"]["temperature"] == 0.7 and recipe["responses"]["n"] == 2
    assert recipe["seed"] == 1 and recipe["score"]["reward_model"] == "judge"
    # the lossless OpenAI preference export of the DPO data
    preference = pq.read_table(next((tmp_path / "data/dpo-openai").glob("*.parquet")))
    assert preference.column_names == ["input", "preferred_output", "non_preferred_output"]
    # --all-responses: one row per non-empty response
    responses = pq.read_table(tmp_path / "data/res", columns=["responses"]).column(0).to_pylist()
    written = pq.read_table(tmp_path / "data/res-sharegpt").num_rows
    assert written == sum(1 for row in responses for r in row if r.strip()) > len(responses)


@pytest.mark.parametrize("path", ["docs/DESIGN.md"])
def test_readme_links_exist(path: str) -> None:
    assert f"]({path})" in README.read_text()
    assert (REPO / path).is_file()
