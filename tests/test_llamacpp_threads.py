"""llama.cpp threads follow the free cores: fewer when other processes are busy, same text."""

from __future__ import annotations

import subprocess
import sys

import llama_cpp
import pytest

from magpie.engines.base import Request, Sampling
from magpie.engines.llamacpp import LlamaCppEngine
from magpie.engines.llamacpp_runtime import default_threads, free_cores, usable_cores

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n"
)
SAMPLING = Sampling(temperature=1.0, max_tokens=12, stop=("<|im_end|>",))
BUSY = "while True: pass"


@pytest.fixture
def busy_process():
    """One other process spinning on a core, the way another job on a shared machine does."""
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    yield child
    child.kill()
    child.wait()


def test_threads_env_wins_and_busy_cores_are_left_alone(busy_process, monkeypatch) -> None:
    monkeypatch.setenv("MAGPIE_N_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("MAGPIE_N_THREADS")
    assert 1 <= free_cores() <= max(1, usable_cores() - 1)


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 cores to have one to give up")
def test_governor_gives_up_a_busy_core_mid_run_and_the_text_does_not_change(
    busy_process, monkeypatch
) -> None:
    monkeypatch.delenv("MAGPIE_N_THREADS", raising=False)
    requests = [Request(PROMPT, SAMPLING, seed=s) for s in range(3)]
    fixed = LlamaCppEngine(
        n_ctx=512, batch_size=2, n_threads=1
    )  # 2 threads beside a busy core crawl
    try:
        expected = [[c.text for c in r] for r in fixed.generate(requests)]
        assert fixed._decoder._governor is None  # threads given: never adapted
    finally:
        fixed.close()
    adaptive = LlamaCppEngine(n_ctx=512, batch_size=2)
    try:
        governor = adaptive._decoder._governor
        assert governor is not None
        governor.threads = usable_cores()  # start from all cores, as on an idle machine
        llama_cpp.llama_set_n_threads(governor._ctx, governor.threads, governor.threads)
        governor._period = 0.0
        for _ in range(20):  # a call can end before two checks agree (fast CPUs: ~0.1 s)
            texts = [[c.text for c in r] for r in adaptive.generate(requests)]
            assert texts == expected
            if governor.changes:
                break
        assert governor.changes >= 1 and governor.threads < usable_cores()
    finally:
        adaptive.close()
    assert texts == expected
