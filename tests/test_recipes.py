"""Step-list recipes: every shipped CPU miniature end to end, resume, `--check`, validation.

The miniatures run at reduced size (`--num 4`) with the fake engine generating and judging tags
(the plumbing is the point here; the tag and judge stages on the bundled model are covered by
their own tests), while the judge rewards, embeddings, language detection, DuckDB filters,
exports, cards and `datasets` are the real ones. Judge tags from the fake engine are null, so the
filters' quality/difficulty parameters are switched off with `--set`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, run_cli
from typer.testing import CliRunner

from magpie import cli
from magpie.errors import MagpieError
from magpie.inputs import resolve_dataset
from magpie.recipe import plan

RECIPES = REPO / "recipes"
GPU_RECIPES = sorted(RECIPES.glob("llama-3.1-70b-*.yaml"))
NO_JUDGED_LEVELS = {  # the fake engine's judge tags are null: conditions on them are switched off
    "cpu-pro-1m": [],
    "cpu-pro-300k-filtered": ["filtered.params={min_quality: none}"],
    "cpu-pro-mt-300k": ["filtered.params={min_quality: none}"],
    "cpu-pro-dpo-100k": [
        "selected.params={min_quality: none, min_difficulty: none}",
        "dpo-responses.n=2",
    ],
}
SHAPE = {  # columns that make each published dataset's shape
    "cpu-pro-1m": {"conversations", "difficulty", "input_quality", "task_category",
                   "llama_guard_2", "language", "instruct_reward", "min_neighbor_distance"},
    "cpu-pro-300k-filtered": {"conversations", "input_quality", "response_length"},
    "cpu-pro-mt-300k": {"conversations", "instruction_2", "response_2"},
    "cpu-pro-dpo-100k": {"chosen", "rejected", "responses", "rewards", "task_category"},
}  # fmt: skip
FINAL = {
    "cpu-pro-1m": "tagged",
    "cpu-pro-300k-filtered": "filtered",
    "cpu-pro-mt-300k": "multi-turn",
    "cpu-pro-dpo-100k": "pairs",
}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (lock files aside) and the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def mini(name: str, out: Path) -> list[str]:
    """`magpie run` of a shipped miniature at test size, generating with the fake engine."""
    sets = [a for s in NO_JUDGED_LEVELS[name] for a in ("--set", s)]
    return [
        "run", str(RECIPES / f"{name}.yaml"), "--out", str(out), "--num", "4",
        "--engine", "fake", *sets, "-q",
    ]  # fmt: skip


def check_result(name: str, out: Path, cache: Path) -> list[dict]:
    """The run's result is the final step's dataset, of the published shape, with its card and
    exports loading through `datasets`; returns the resolved recipe's steps."""
    import datasets

    dataset, note = resolve_dataset(out)  # `--in RUN` means the final step's dataset
    assert dataset == out / FINAL[name] and note
    table = pq.read_table(dataset)
    assert SHAPE[name] <= set(table.column_names)
    assert (out / "README.md").is_file() and (out / "view.html").is_file()
    loaded = datasets.load_dataset(str(out), cache_dir=str(cache / name))  # through the card
    assert loaded["train"].num_rows == table.num_rows > 0
    steps = yaml.safe_load((out / "recipe.yaml").read_text())["steps"]
    assert steps[-1]["stage"] == "card" and steps[0]["num"] == 4
    for fmt in next(s for s in steps if s["stage"] == "export")["formats"]:
        exported = datasets.load_dataset(
            "parquet", data_dir=str(out / "export" / fmt), cache_dir=str(cache / name / fmt)
        )
        assert sum(split.num_rows for split in exported.values()) == table.num_rows
    return steps


@pytest.mark.slow  # ~45 s: three recipe miniatures end to end (CI runs the slow tier)
def test_cpu_miniatures_end_to_end_sharing_the_pro_pool(tmp_path: Path) -> None:
    """Pro-1M runs whole; the 300K filter, the multi-turn set and the DPO set are run into the
    same folder, as their recipes suggest, so the steps they share with it are skipped."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = run_cli(*mini("cpu-pro-1m", out))
    assert first.returncode == 0, first.stderr[-3000:]
    check_result("cpu-pro-1m", out, cache)

    name = "cpu-pro-300k-filtered"
    second = run_cli(*mini(name, out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("complete, skipped") == 3  # instructions, responses, tagged
    steps = check_result(name, out, cache)
    manifest = json.loads((out / "filtered" / ".magpie" / "manifest.json").read_text())
    assert manifest["rows"] <= 8 and manifest["config"]["selection"]["shuffle_seed"] == 42
    before = tree_digest(out)  # resume: a complete run does no work and changes no byte
    again = run_cli(*mini(name, out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("complete, skipped") == len(steps)
    assert tree_digest(out) == before

    for name in ("cpu-pro-mt-300k", "cpu-pro-dpo-100k"):
        result = run_cli(*mini(name, out))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("complete, skipped") >= 3
        check_result(name, out, cache)


FAKE = """\
out: {out}
num: 4
engine: {{name: fake}}
steps:
  - stage: instructions
    shard_size: 4
  - stage: responses
    n: 2
    shard_size: 2
  - name: picked
    stage: filter
    where: {where}
  - name: formats
    stage: export
    formats: [jsonl]
  - stage: card
    plots: false
"""


def test_rerun_resumes_at_the_first_incomplete_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAKE.format(out=out, where="no_such_column > 1"))
    failed = run_cli("run", str(recipe), "-q")
    assert failed.returncode == 2 and "no_such_column" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    done = {d: tree_digest(out / d) for d in ("instructions", "responses")}
    planned = run_cli("run", str(recipe), "--check")  # the plan says which steps are complete
    assert planned.returncode == 0 and planned.stdout.count("[complete") == 2, planned.stdout
    recipe.write_text(FAKE.format(out=out, where="length(instruction) > 0"))
    fixed = run_cli("run", str(recipe), "-q")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.count("complete, skipped") == 2  # instructions and responses not redone
    assert {d: tree_digest(out / d) for d in done} == done
    assert (out / "formats" / "jsonl" / "data.jsonl").is_file()
    assert resolve_dataset(out)[0] == out / "picked"
    assert run_cli("verify", str(out)).returncode == 0  # every step's dataset is checked
    # a changed step is refused as the stage commands refuse it, naming the fix
    other_filter = ["--set", "picked.where=length(instruction) > 1"]
    for changed in (["--set", "responses.temperature=0.5"], other_filter):
        refused = run_cli("run", str(recipe), *changed, "-q")
        assert refused.returncode == 2, refused.stderr
        assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    # --overwrite clears every step folder (custom names too) and runs them again
    redone = run_cli("run", str(recipe), *other_filter, "--overwrite", "-q")
    assert redone.returncode == 0, redone.stderr
    assert "skipped" not in redone.stdout and "did not write" not in redone.stderr


runner = CliRunner()


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_check_resolves_gpu_recipes_without_a_gpu(path: Path) -> None:
    result = runner.invoke(cli.app, ["run", str(path), "--check"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "meta-llama/Llama-3.1-70B-Instruct" in text and "vllm" in text and "GPU" in text
    if "dpo" in path.name:
        assert "RLHFlow/ArmoRM-Llama3-8B-v0.1" in text
    if "pro-1m" in path.name:
        assert "Meta-Llama-Guard-2-8B" in text and "all-mpnet-base-v2" in text
    assert not (REPO / yaml.safe_load(path.read_text())["out"]).exists()  # no work done


def test_check_names_the_final_step_and_the_bundled_model() -> None:
    result = runner.invoke(
        cli.app, ["run", str(RECIPES / "cpu-pro-mt-300k.yaml"), "--check", "--num", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "result: multi-turn/" in result.output
    assert "bundled SmolLM2" in result.output and "packaged all-MiniLM-L6-v2" in result.output
    default = runner.invoke(cli.app, ["run", "--check"])  # no recipe: the DPO demo, old layout
    assert default.exit_code == 0 and "(scored) score <- responses" in default.output


STEPS = [{"stage": "instructions"}, {"stage": "responses"}, {"stage": "filter", "where": "true"}]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({2: {"stage": "filter", "wher": "x"}}, ["steps[2] (filter).wher", "Extra inputs"]),
        ({2: {"stage": "filter", "presets": ["magpie-filterd"]}},
         ["steps[2] (filter).presets", "did you mean 'magpie-filtered'"]),
        ({2: {"stage": "filter", "balance": "task_category"}}, ["steps[2] (filter)", "limit"]),
        ({2: {"stage": "filter"}}, ["steps[2] (filter)", "nothing to filter by"]),
        ({2: {"stage": "filtr"}}, ["steps[2].stage", "did you mean 'filter'"]),
        ({1: {"stage": "responses", "n": 0}}, ["steps[1] (responses).n", "greater than"]),
        ({1: {"stage": "responses", "input": "instructons"}},
         ["steps[1] (responses).input", "did you mean 'instructions'"]),
        ({2: {"stage": "responses"}}, ["steps[2] (responses).name", "already named"]),
        ({0: {"stage": "responses"}}, ["steps[0] (responses)", "no earlier step"]),
        ({2: {"stage": "export", "formats": ["tlr"]}}, ["steps[2] (export).formats", "'trl'"]),
        ({2: {"stage": "tag", "tags": ["reward"]}}, ["steps[2] (tag)", "reward tag needs"]),
        ({2: {"stage": "card", "name": "plots"}}, ["steps[2] (plots).name", "folder name"]),
        ({2: {"stage": "filter", "name": "export", "limit": 1}}, ["(export).name", "export step"]),
        ({2: {"stage": "pairs"}}, ["steps[2] (pairs).input", "no 'rewards' column", "score step"]),
        ({2: {"stage": "filter", "presets": ["magpie-filtered"]}},
         ["steps[2] (filter).presets", "input_quality", "--tags quality"]),
        ({1: {"stage": "extend"}}, ["steps[1] (extend).input", "responses step with n: 1"]),
    ],
)  # fmt: skip
def test_validation_names_step_and_field(change: dict, needles: list[str]) -> None:
    steps = [change.get(i, s) for i, s in enumerate(STEPS)]
    with pytest.raises(MagpieError) as error:
        plan({"out": "x", "steps": steps})
    for needle in needles:
        assert needle in str(error.value)


def test_recipe_level_settings_reach_steps_unless_a_step_sets_its_own() -> None:
    made = plan(
        {
            "num": 7,
            "seed": 3,
            "engine": {"name": "fake"},
            "steps": [
                {"stage": "instructions"},
                {"stage": "responses", "seed": 9, "engine": {"name": "llamacpp"}},
                {"stage": "filter", "limit": 2},
                {"stage": "card"},
            ],
        }
    )
    ins, res, fil, card = made.steps
    assert (ins.settings.num, ins.settings.seed, ins.settings.engine.name) == (7, 3, "fake")
    assert (res.settings.seed, res.settings.engine.name) == (9, "llamacpp")
    assert fil.input == "responses" and fil.settings.seed == 3
    assert made.final is fil and made.folder(card) == made.out


def test_fixed_format_runs_as_the_same_steps_and_folders() -> None:
    from magpie.config import Recipe
    from magpie.recipe import plan_legacy

    made = plan_legacy(Recipe(out="r", export=["trl"]))
    assert [(s.name, s.stage, s.input) for s in made.steps] == [
        ("instructions", "instructions", None),
        ("responses", "responses", "instructions"),
        ("scored", "score", "responses"),
        ("pairs", "pairs", "scored"),
        ("export", "export", "pairs"),
        ("card", "card", "pairs"),
    ]
    assert made.final.name == "pairs" and made.folder(made.steps[-1]) == made.out


def test_bad_set_and_mixed_formats_are_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAKE.format(out=tmp_path / "run", where="true"))
    code = runner.invoke(cli.app, ["run", str(recipe), "--set", "pikced.where=1", "--check"])
    assert code.exit_code == 2 and "did you mean 'picked'" in code.output
    recipe.write_text("steps: [{stage: instructions}]\nresponses: {n: 2}\n")
    mixed = runner.invoke(cli.app, ["run", str(recipe), "--check"])
    assert mixed.exit_code == 2 and "both steps:" in mixed.output


@pytest.mark.slow
def test_cpu_miniature_on_the_bundled_model(tmp_path: Path) -> None:
    """The 300K-filtered miniature as shipped, at 8 rows: the bundled model generates and judges."""
    out = tmp_path / "run"
    recipe = str(RECIPES / "cpu-pro-300k-filtered.yaml")
    result = run_cli("run", recipe, "--out", str(out), "--num", "8", "-q", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "README.md").is_file() and resolve_dataset(out)[0] == out / "filtered"
    tagged = pq.read_table(out / "tagged").to_pylist()
    assert any(r["input_quality"] is not None for r in tagged)
