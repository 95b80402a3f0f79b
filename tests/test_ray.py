"""The Ray executor on a local Ray started by the test: same rows as the local executor whatever
the shards x actors, out-of-order completion, dead actors, a killed driver, worker errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
from conftest import REPO, run_cli
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig, ResponsesConfig
from magpie.errors import MagpieError
from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
from magpie.store import ShardStore


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray for this module; its address lets subprocess drivers join it."""
    os.environ.setdefault("PYTHONPATH", str(REPO))
    context = ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def on_ray(actors: int, **kw):
    return create_executor(ExecutorSpec(name="ray", actors=actors, num_cpus=0.5, **kw))


def fake(**options) -> dict:
    return {"name": "fake", "options": options}


def ins_config(**kw) -> InstructionsConfig:
    base = {"engine": fake(), "num": 10, "max_tokens": 9, "shard_size": 4}
    return InstructionsConfig.model_validate({**base, **kw})


def res_config(engine: dict | None = None, **kw) -> ResponsesConfig:
    return ResponsesConfig.model_validate({"engine": engine or fake(), "n": 3, **kw})


def table_rows(path: Path) -> list[dict]:
    return ShardStore(path).read_all().to_pylist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Instructions and responses made by the local executor."""
    root = tmp_path_factory.mktemp("local")
    pipeline.instructions(ins_config(), root / "ins", view())
    pipeline.responses(res_config(shard_size=3), root / "ins", root / "res", view())
    return root


@pytest.mark.parametrize(("actors", "shard_size"), [(1, 4), (3, 2)])
def test_same_rows_as_local_for_any_shards_and_actors(
    cluster, reference, tmp_path, actors, shard_size
):
    executor = on_ray(actors, max_in_flight=2)
    summary, _ = pipeline.instructions(ins_config(), tmp_path / "ins", view(), executor=executor)
    assert summary.complete and table_rows(tmp_path / "ins") == table_rows(reference / "ins")
    res = pipeline.responses(
        res_config(shard_size=shard_size),
        tmp_path / "ins",
        tmp_path / "res",
        view(),
        executor=executor,
    )
    assert res.complete and table_rows(tmp_path / "res") == table_rows(reference / "res")
    logs = sorted(p.name for p in (tmp_path / "res" / ".magpie" / "logs").iterdir())
    assert logs and all(name.startswith("responses-actor-") for name in logs)


def test_out_of_order_completion_and_a_killed_actor_give_the_same_rows(
    cluster, reference, tmp_path
):
    """Shard 0 holds a slow prompt, so later shards finish and are committed first; and an actor
    dies (os._exit) in the middle of shard 1: it is restarted and the shard retried."""
    ins = table_rows(reference / "ins")
    marker = tmp_path / "crashed"
    engine = fake(
        delay=0.05,
        slow_prompts=ins[0]["instruction"],
        crash_once=str(marker),
        crash_on=ins[4]["instruction"],
    )
    summary = pipeline.responses(
        res_config(engine, shard_size=3),
        reference / "ins",
        tmp_path / "res",
        view(),
        executor=on_ray(2, max_in_flight=2),
    )
    assert marker.exists()  # an actor really died in the middle of shard 1
    assert summary.complete and summary.commit_order != sorted(summary.commit_order)
    assert [r["responses"] for r in table_rows(tmp_path / "res")] == [
        r["responses"] for r in table_rows(reference / "res")
    ]


def test_worker_error_stops_the_run_with_one_line(cluster, reference, tmp_path):
    bad = table_rows(reference / "ins")[7]["instruction"]  # shard 7 of shards of 1 row
    engine = fake(fail_on=bad)
    with pytest.raises(MagpieError) as info:
        pipeline.responses(
            res_config(engine, shard_size=1),
            reference / "ins",
            tmp_path / "res",
            view(),
            executor=on_ray(1, max_in_flight=1),
        )
    message = str(info.value)
    assert message.startswith("shard 7: fake engine refused") and "\n" not in message
    store = ShardStore(tmp_path / "res")
    assert store.shard_indices() == list(range(7))  # committed shards kept, nothing torn
    assert not store.read_manifest()["complete"]


DRIVER = textwrap.dedent(
    """
    import io, os, sys
    from pathlib import Path
    from rich.console import Console
    from magpie import pipeline
    from magpie.config import ResponsesConfig
    from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
    from magpie.store import ShardStore

    kill_after = int(sys.argv[3])
    commit = ShardStore.commit
    done = []

    def dying_commit(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        done.append(1)
        if len(done) == kill_after:
            os._exit(9)

    ShardStore.commit = dying_commit
    spec = ExecutorSpec(name="ray", address=sys.argv[4], actors=1, num_cpus=0.5)
    executor = create_executor(spec)
    config = ResponsesConfig.model_validate(
        {"engine": {"name": "fake", "options": {"delay": 0.02}}, "n": 3, "shard_size": 3}
    )
    view = ProgressView(Console(file=io.StringIO()), enabled=False)
    pipeline.responses(config, Path(sys.argv[1]), Path(sys.argv[2]), view, executor=executor)
    """
)


def test_driver_killed_after_commits_then_rerun_gives_identical_files(cluster, reference, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(reference / "ins"), str(out)]
    killed = subprocess.run([*cmd, "2", cluster], env=env, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert len(ShardStore(out).shard_indices()) == 2
    finished = subprocess.run([*cmd, "0", cluster], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    ref, got = ShardStore(reference / "res"), ShardStore(out)
    for index in ref.shard_indices():
        # Same rows and bookkeeping; the shards' config hash differs only by the fake engine's
        # `delay` option, which this driver adds so that it can be killed mid-run.
        assert got.read_shard(index).equals(ref.read_shard(index))
        strip = lambda info: {k: v for k, v in info.items() if k != "config_hash"}  # noqa: E731
        assert strip(got.shard_info(index)) == strip(ref.shard_info(index))
    assert got.read_manifest()["complete"]


RECIPE = """\
out: {out}
num: 3
engine: {{options: {{n_threads: 1}}}}
instructions: {{max_tokens: 48, shard_size: 3}}
responses: {{n: 2, max_tokens: 24, shard_size: 2}}
score: {{shard_size: 2, judge_engine: {{options: {{n_threads: 1}}}}}}
export: [trl]
executor: {{name: local, num_cpus: 0.5}}
"""


@pytest.mark.slow  # ~45 s: the whole DPO recipe twice (Ray, then local)
def test_magpie_run_on_ray_gives_the_pairs_of_a_local_run(cluster, tmp_path):
    """The bundled model in llama.cpp actors (half a CPU each) against the local executor."""
    results = {}
    for where in ("local", "ray"):
        recipe = tmp_path / f"{where}.yaml"
        recipe.write_text(RECIPE.format(out=tmp_path / where))
        extra = ["--address", cluster, "--actors", "2"] if where == "ray" else []
        done = run_cli("run", str(recipe), "--executor", where, *extra, "-q")
        assert done.returncode == 0, done.stderr
        results[where] = table_rows(tmp_path / where / "pairs")
    assert results["ray"] == results["local"] and len(results["local"]) > 0
    logs = tmp_path / "ray" / "responses" / ".magpie" / "logs"
    assert any("shard 0" in p.read_text() for p in logs.iterdir())
