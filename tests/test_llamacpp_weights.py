"""Which weights llama.cpp runs: the bundled Q4_1 file as a Q8_0 copy on a CPU with AMX, else as
an F16 copy (both cached)."""

from __future__ import annotations

import os
import time

import pytest

from magpie.engines import llamacpp_weights
from magpie.engines.base import Request, Sampling
from magpie.engines.llamacpp import LlamaCppEngine, bundled_model_path
from magpie.engines.llamacpp_weights import file_type, resolve_weights
from magpie.errors import MagpieError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGPIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MAGPIE_LLAMACPP_WEIGHTS", raising=False)
    return tmp_path / "cache"


def test_auto_runs_the_bundled_model_as_a_cached_f16_copy_without_amx(cache, monkeypatch) -> None:
    monkeypatch.setattr(llamacpp_weights, "has_amx_int8", lambda: False)
    source = bundled_model_path()
    assert file_type(source) == 3  # Q4_1
    chosen = resolve_weights(source)
    assert chosen.kind == "f16" and chosen.source_type == "Q4_1"
    assert chosen.path.parent == cache / "models" and file_type(chosen.path) == 1  # F16
    made = chosen.path.stat().st_mtime_ns
    again = resolve_weights(source)
    assert again.path == chosen.path and again.path.stat().st_mtime_ns == made  # reused
    assert resolve_weights(chosen.path).kind == "file"  # an F16 file runs as given
    assert not list((cache / "models").glob(".*tmp*"))


def test_a_new_copy_removes_stale_copies_of_the_same_file_and_type(cache, monkeypatch) -> None:
    """A reinstalled package gives the model file a new mtime, so a new key: the copies made under
    older keys go once they are a day old; other types, fresh copies and other files stay."""
    monkeypatch.setattr(llamacpp_weights, "has_amx_int8", lambda: False)
    source = bundled_model_path()
    models = cache / "models"
    models.mkdir(parents=True)
    stale = models / f"{source.stem}.0123456789abcdef.f16.gguf"
    fresh = models / f"{source.stem}.fedcba9876543210.f16.gguf"
    other_type = models / f"{source.stem}.0123456789abcdef.q8_0.gguf"
    other_file = models / "notes.f16.gguf"
    two_days_ago = time.time() - 2 * 86400
    for planted in (stale, fresh, other_type, other_file):
        planted.write_bytes(b"GGUF")
        if planted is not fresh:
            os.utime(planted, (two_days_ago, two_days_ago))
    chosen = resolve_weights(source)
    assert chosen.kind == "f16" and chosen.path.is_file()
    assert not stale.exists()
    assert fresh.exists() and other_type.exists() and other_file.exists()


def test_auto_runs_the_bundled_model_as_a_cached_q8_0_copy_on_amx(cache, monkeypatch) -> None:
    """On AMX, llama.cpp's kernels run a Q8_0 copy of the Q4_1 file faster than the file; other
    types its AMX kernels take run as given."""
    monkeypatch.setattr(llamacpp_weights, "has_amx_int8", lambda: True)
    chosen = resolve_weights(bundled_model_path())
    assert chosen.kind == "q8_0" and chosen.source_type == "Q4_1" and "AMX" in chosen.reason
    assert chosen.path.parent == cache / "models" and file_type(chosen.path) == 7  # Q8_0
    assert resolve_weights(chosen.path).kind == "file"  # a Q8_0 file runs as given on AMX
    assert resolve_weights(bundled_model_path(), "file").kind == "file"  # the option still rules
    monkeypatch.setattr(llamacpp_weights, "AUTO_COPY_MAX_BYTES", 1 << 20)
    too_big = resolve_weights(bundled_model_path())
    assert too_big.kind == "file" and "too big" in too_big.reason


def test_weights_option_file_keeps_the_model_id_and_changes_the_text(cache) -> None:
    request = Request(
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
        Sampling(temperature=0.0, max_tokens=12),
        seed=0,
    )
    as_file = LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=1, weights="file")
    f16 = LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=1, weights="f16", kv_type="f16")
    try:
        assert "run as" not in as_file.info.model_id
        assert f16.info.model_id.endswith("(run as F16)")  # part of every dataset's identity
        assert f16.weights.kind == "f16" and as_file.weights.kind == "file"
        for engine in (as_file, f16):
            text = engine.generate([request])[0][0].text
            assert text.strip() and text == engine.generate([request])[0][0].text
    finally:
        as_file.close()
        f16.close()


def test_unknown_weights_value_is_one_line(cache) -> None:
    with pytest.raises(MagpieError, match="weights='int3'.*auto, file, f16, q8_0"):
        resolve_weights(bundled_model_path(), "int3")


def test_a_moved_sequence_keeps_its_kv(cache) -> None:
    """Short sequences finish first; the long one in the last slot is moved to slot 0 (its KV
    stream copied) and must go on as if it had run alone."""
    engine = LlamaCppEngine(n_ctx=512, batch_size=4, n_threads=1)
    try:
        long = Request(
            "<|im_start|>user\nCount from one to twenty in words.<|im_end|>\n"
            "<|im_start|>assistant\n",
            Sampling(temperature=0.0, max_tokens=40),
            seed=0,
        )
        short = [
            Request(
                f"<|im_start|>user\nSay {w}.<|im_end|>\n<|im_start|>assistant\n",
                Sampling(temperature=0.0, max_tokens=2),
                seed=0,
            )
            for w in ("yes", "no", "maybe")
        ]
        together = engine.generate([*short, long])[3][0].text
        alone = engine.generate([long])[0][0].text
        assert len(alone) > 40
        assert together[:40] == alone[:40]
    finally:
        engine.close()


def test_kv_type_option_enters_the_model_id_and_keeps_greedy_text_close(cache) -> None:
    """The KV cache is F16 by default and Q8_0 on request; both run, and a Q8_0 cache is part of
    the model id (so a dataset made with one is never resumed with the other)."""
    request = Request(
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
        Sampling(temperature=0.0, max_tokens=16, logprobs=5),
        seed=0,
    )
    f16 = LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=1, weights="f16", kv_type="f16")
    q8 = LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=1, weights="f16", kv_type="q8_0")
    try:
        assert f16.kv_type == "f16" and "KV" not in f16.info.model_id
        assert q8.info.model_id.endswith("(run as F16, KV Q8_0)")
        first_q8 = q8.generate([request])[0][0]
        first_f16 = f16.generate([request])[0][0]
        assert first_q8.text.strip() and first_f16.text.strip()
        assert first_q8.text == q8.generate([request])[0][0].text
        # the first token comes from the prompt alone: its distribution barely moves
        assert first_q8.top_logprobs is not None and first_f16.top_logprobs is not None
        top_q8, top_f16 = first_q8.top_logprobs[0], first_f16.top_logprobs[0]
        best = max(top_f16, key=top_f16.get)
        assert max(top_q8, key=top_q8.get) == best
        assert abs(top_q8[best] - top_f16[best]) < 0.05
    finally:
        q8.close()
        f16.close()


def test_kv_type_auto_is_f16() -> None:
    """F16 on every CPU (Q8_0 is no faster, and moves the logits more); what the user names is
    kept."""
    from magpie.engines import llamacpp

    assert llamacpp.resolve_kv_type(None) == llamacpp.resolve_kv_type("auto") == "f16"
    assert llamacpp.resolve_kv_type("Q8_0") == "q8_0"
    assert llamacpp.resolve_kv_type("F16") == "f16"


def test_unknown_kv_type_is_one_line(cache) -> None:
    with pytest.raises(MagpieError, match="kv_type='q4'.*f16, q8_0"):
        LlamaCppEngine(n_ctx=512, batch_size=2, n_threads=1, kv_type="q4")
