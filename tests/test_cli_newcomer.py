"""Issue 14: a newcomer's path through the CLI (one test or more per numbered item)."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from magpie import cli
from magpie.config import InstructionsConfig, Recipe, config_hash, deep_merge
from magpie.errors import MagpieError
from magpie.export import export_dataset, to_format
from magpie.inputs import resolve_dataset
from magpie.pipeline import binding_setting
from magpie.runner import RunSummary
from magpie.stats import dataset_stats
from magpie.store import ShardStore
from tests.conftest import REPO, run_cli

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    """Run the CLI in this process; exit code and everything it printed (line wraps undone)."""
    result = runner.invoke(cli.app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


def _dataset(root: Path, table: pa.Table, stage: str = "responses", **manifest: object) -> Path:
    store = ShardStore(root)
    store.open_for_write(stage, {"command": stage}, f"hash-{stage}", overwrite=False)
    store.commit(0, table, {"shard": 0, "rows": table.num_rows})
    store.update_manifest(complete=True, rows=table.num_rows, **manifest)
    return root


def _sft(n: int = 3) -> pa.Table:
    return pa.table(
        {
            "uuid": ["a", "b"],
            "instruction": ["What is 2+2?", "Name a colour."],
            "responses": [[f"answer {i}" for i in range(n)], [f"red {i}" for i in range(n)]],
        }
    )


def _pairs() -> pa.Table:
    msgs = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    chosen = [[{"content": "hi", "role": "user"}, {"content": "good", "role": "assistant"}]]
    rejected = [[{"content": "hi", "role": "user"}, {"content": "bad", "role": "assistant"}]]
    return pa.table(
        {
            "uuid": ["u0"],
            "instruction": ["hi"],
            "responses": [["good", "meh", "ok", "bad"]],
            "rewards": [[9.0, 5.0, 6.0, 1.0]],
            "rewards_judge": pa.array(
                [[{"score": s} for s in (9.0, 5.0, 6.0, 1.0)]],
                pa.list_(pa.struct([("score", pa.float64())])),
            ),
            "reward_model": ["judge:smollm2"],
            "chosen": pa.array(chosen, msgs),
            "rejected": pa.array(rejected, msgs),
            "reward_margin": [8.0],
            "repeat_count": pa.nulls(1, pa.int64()),
        }
    )


# ---- 1. flags override single recipe fields ----


def test_run_flags_override_single_fields_of_the_recipe() -> None:
    demo = Recipe.model_validate(yaml.safe_load((REPO / "recipes/cpu-demo.yaml").read_text()))
    merged = deep_merge(demo.model_dump(mode="json"), {"responses": {"n": 2, "top_p": None}})
    resolved = Recipe.model_validate(merged)
    assert resolved.responses["n"] == 2
    assert resolved.responses["max_tokens"] == 256 and resolved.responses["temperature"] == 0.8
    # no recipe: the built-in defaults (the CPU demo) keep their response token cap too
    default = Recipe.model_validate(
        deep_merge(Recipe().model_dump(mode="json"), {"responses": {"n": 2}})
    )
    assert default.responses_config().max_tokens == 256 and default.responses_config().n == 2
    assert deep_merge({"engine": {"name": "x"}}, {"engine": {"model": None}}) == {
        "engine": {"name": "x"}
    }


# ---- 2. budgets are resumable and the warning names what binds ----


def test_budgets_stay_out_of_the_config_hash() -> None:
    a = InstructionsConfig(num=4, max_attempts=8, response_max_tokens=64)
    b = InstructionsConfig(num=4, max_attempts=40, response_max_tokens=1024, max_tokens=512)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(InstructionsConfig(num=5, max_attempts=8))


def test_binding_setting_names_the_cap_that_rejected_most() -> None:
    config = InstructionsConfig(num=4, turns=3, response_max_tokens=1024)
    summary = RunSummary("instructions", "x", rejections=Counter(reply_truncated=22, too_short=7))
    message = binding_setting(summary, config)
    assert "22 of 29 rejections were reply_truncated" in message
    assert "--response-max-tokens (now 1024)" in message
    summary = RunSummary("instructions", "x", rejections=Counter(duplicate=3, empty=2))
    assert "raise --max-attempts (now 32)" in binding_setting(summary, config)


def test_short_run_is_usable_and_continues_with_a_larger_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAGPIE_N_THREADS", "1")  # fast on a shared CPU; rows do not depend on it
    out = tmp_path / "ins"
    base = ["instructions", "--out", str(out), "--num", "3", "-q"]
    first = run_cli(
        *base, "--max-tokens", "6", "--max-attempts", "1"
    )  # one short generation: certainly short
    assert first.returncode == 1, first.stderr
    assert "budget spent" in first.stderr and "rerun to continue" in first.stderr
    manifest = ShardStore(out).read_manifest()
    assert manifest["complete"] and manifest["short"]["wanted"] == 3
    # downstream commands accept the short dataset, with a warning
    stats = run_cli("stats", "--in", str(out), "--json")
    assert stats.returncode == 0 and "is short" in stats.stderr, stats.stderr
    # a larger budget (attempts and token cap) continues the same dataset instead of a refusal
    second = run_cli(*base, "--max-tokens", "8", "--max-attempts", "2")
    # (the block the smaller budget cut short is redone whole: attempt blocks are fixed)
    assert second.returncode in (0, 1) and "different configuration" not in second.stderr
    assert ShardStore(out).read_manifest()["attempts"] == 2
    # lowering a token cap would change committed rows: refused in one line, before any work
    third = run_cli(*base, "--max-tokens", "6", "--max-attempts", "3")
    assert third.returncode == 2 and "lower cap" in third.stderr
    assert len(third.stderr.strip().splitlines()) == 1


# ---- 3. stats on exports and parent folders ----


def test_stats_on_a_magpie_export(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "dpo", _pairs(), stage="pairs")
    export_dataset(src, tmp_path / "export" / "magpie", "magpie", extra_columns=True)
    stats = dataset_stats(tmp_path / "export" / "magpie")
    assert stats.rows == 1 and stats.repeats is not None and stats.repeats.repeated == 0
    code, output = invoke("stats", str(tmp_path / "export" / "magpie"))
    assert code == 0, output


def test_stats_refuses_a_folder_of_several_datasets(tmp_path: Path) -> None:
    _dataset(tmp_path / "run" / "a", _sft())
    _dataset(tmp_path / "run" / "b", _sft())
    code, output = invoke("stats", "--in", str(tmp_path / "run"))
    assert code == 2 and "holds several datasets (a, b)" in output
    assert "Traceback" not in output


# ---- 4. --in resolves to one dataset ----


def test_resolve_dataset(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", _sft())
    assert resolve_dataset(ds) == (ds, None)
    run = tmp_path / "run"
    for stage in ("instructions", "responses", "scored", "pairs"):
        _dataset(run / stage, _sft())
    (run / "recipe.yaml").write_text("num: 2\n")
    export_dataset(run / "pairs", run / "export" / "jsonl", "jsonl")
    final, note = resolve_dataset(run)
    assert final == run / "pairs" and "final dataset" in note
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(_sft(), plain / "x.parquet")
    assert resolve_dataset(plain) == (plain, None)
    (run / "recipe.yaml").unlink()
    with pytest.raises(MagpieError, match="several datasets"):
        resolve_dataset(run)


def test_filter_on_a_folder_of_several_datasets_is_refused(tmp_path: Path) -> None:
    _dataset(tmp_path / "run" / "a", _sft())
    _dataset(tmp_path / "run" / "b", _sft())
    code, output = invoke(
        "filter", "--in", str(tmp_path / "run"), "--where", "true", "--out", str(tmp_path / "f")
    )
    assert code == 2 and "pass one of them as --in" in output
    assert not (tmp_path / "f").exists()


def test_filter_on_a_run_folder_reads_its_final_dataset(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _dataset(run / "instructions", _sft())
    _dataset(run / "pairs", _pairs(), stage="pairs")
    (run / "recipe.yaml").write_text("num: 1\n")
    code, output = invoke("filter", "--in", str(run), "--where", "reward_margin > 0", "-q")
    assert code == 0, output
    assert "final dataset" in output
    kept = pq.read_table(tmp_path / "run-filtered")
    assert kept.column("uuid").to_pylist() == ["u0"]


# ---- 6. rich markup is escaped ----


def test_errors_and_summaries_keep_brackets(tmp_path: Path) -> None:
    missing = tmp_path / "no[such]dir"
    code, output = invoke("stats", "--in", str(missing))
    assert code == 2 and "no[such]dir" in output
    console = Console(record=True, width=200)
    original = cli.err_console, cli.out_console
    cli.err_console = cli.out_console = console
    try:
        cli.error("vLLM is not installed: pip install 'magpie-synth[vllm]' on a GPU machine")
        cli.print_summary(RunSummary("pairs", "data/[bold]x[/bold]", rows=1, input_rows=1))
    finally:
        cli.err_console, cli.out_console = original
    text = console.export_text()
    assert "magpie-synth[vllm]" in text and "data/[bold]x[/bold]" in text


# ---- 7. an unknown reward model fails at once offline ----


def test_reward_model_typo_fails_fast_offline(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "res", _sft(2))
    started = time.monotonic()
    result = run_cli(
        "score", "--in", str(src), "--out", str(tmp_path / "s"), "--reward-model", "judg"
    )
    assert result.returncode == 2
    assert "did you mean 'judge'?" in result.stderr and "not reachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Name or service" not in result.stderr
    assert time.monotonic() - started < 20  # generous: no 5 x retries with backoff


def test_hub_reachability_is_checked_once_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from magpie.rewards.classifier import hub_reachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable()
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    assert not hub_reachable()


# ---- 8 + 11. exports say what they keep; judge scores keep their name ----


def test_openai_dpo_counts_the_rejected_reply_and_preference_keeps_it() -> None:
    left = Counter()
    out = to_format(_pairs(), "openai", left_out=left)
    assert (
        out.num_rows == 1
        and left["rejected replies (--format openai-preference keeps each pair)"] == 1
    )
    assert sum(left.values()) == 3  # plus the 2 responses that were neither chosen nor rejected
    pref = to_format(_pairs(), "openai-preference").to_pylist()[0]
    assert pref["input"] == {"messages": [{"role": "user", "content": "hi"}]}
    assert pref["preferred_output"] == [{"role": "assistant", "content": "good"}]
    assert pref["non_preferred_output"] == [{"role": "assistant", "content": "bad"}]


@pytest.mark.parametrize("fmt", ["openai", "sharegpt"])
def test_multi_response_exports_count_or_keep_every_response(fmt: str) -> None:
    left = Counter()
    first = to_format(_sft(3), fmt, left_out=left)
    assert first.num_rows == 2 and sum(left.values()) == 4
    every = to_format(_sft(3), fmt, all_responses=True)
    assert every.num_rows == 6


def test_export_command_reports_what_it_left_out(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "res", _sft(3))
    code, output = invoke("export", "--in", str(src), "--format", "openai")
    assert code == 0, output
    assert "left out: 4 responses beyond the first" in output
    assert (tmp_path / "res-openai").is_dir()  # the default --out
    code, output = invoke(
        "export", "--in", str(src), "-f", "openai", "--all-responses", "-q", "--overwrite"
    )
    assert (
        code == 0 and "exported 6 rows (from 2 input rows)" in output and "left out" not in output
    )


def test_magpie_export_names_judge_scores_after_the_judge(tmp_path: Path) -> None:
    out = to_format(_pairs(), "magpie", extra_columns=True)
    assert out.column("rewards_armorm").null_count == 1
    assert out.column("rewards_judge").to_pylist()[0][0] == {"score": 9.0}
    report = export_dataset(_dataset(tmp_path / "p", _pairs(), "pairs"), tmp_path / "m", "magpie")
    assert "reward_margin" in report.dropped_columns  # not a published column: named
    assert "rewards_judge" in report.dropped_columns  # kept only with --extra-columns
    assert any("reward_margin" in line for line in report.notes())


# ---- 9. near-miss presets ----


def test_system_prompt_near_a_preset_is_refused() -> None:
    code, output = invoke("template", "--system-prompt", "maths")
    assert code == 2 and "did you mean 'math'?" in output
    assert (
        InstructionsConfig.model_validate(
            {"template": {"system_prompt": "You are a maths tutor."}}
        ).template.system_prompt
        == "You are a maths tutor."
    )
    for value in ("math", "none", "Creative", "poetry"):
        InstructionsConfig.model_validate({"template": {"system_prompt": value}})


# ---- 10. one vocabulary ----


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("run", ["--seed", "--temperature", "--system-prompt", "--trust-remote-code", "--quiet"]),
        ("export", ["--in", "--out", "-q", "--all-responses"]),
        ("filter", ["--in", "--out", "-q"]),
        ("stats", ["--in"]),
        ("score", ["--in", "--out", "-q", "--judge-engine", "--trust-remote-code"]),
        ("tag", ["--in", "--out", "-q", "--seed", "--trust-remote-code"]),
        ("responses", ["--in", "--out", "-q", "--seed", "--system-prompt"]),
    ],
)
def test_shared_flags_exist_everywhere(command: str, flags: list[str]) -> None:
    code, output = invoke(command, "--help")
    assert code == 0
    for flag in flags:
        assert flag in output, (command, flag)
    assert "(--engine openai)" not in output


def test_stats_takes_the_path_as_argument_or_in(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", _sft())
    assert invoke("stats", str(ds), "--json")[0] == 0
    assert invoke("stats", "--in", str(ds), "--json")[0] == 0
    code, output = invoke("stats")
    assert code == 2 and "pass --in" in output


# ---- 11. small things ----


def test_summary_leaves_out_zero_rows() -> None:
    console = Console(record=True, width=200)
    original = cli.out_console
    cli.out_console = console
    try:
        summary = RunSummary(
            "score", "x", rows=2, input_rows=2, rejections=Counter(truncated_kept=0)
        )
        cli.print_summary(summary)
    finally:
        cli.out_console = original
    text = console.export_text()
    assert "tokens generated" not in text and "truncated_kept" not in text and "rows" in text


def test_errors_name_the_flag(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ins", _sft())
    code, output = invoke("responses", "--in", str(src), "--n", "0")
    assert code == 2 and "invalid --n:" in output
