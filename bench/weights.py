"""llama.cpp decode speed per weight type on this CPU: why `weights=auto` runs the bundled model
as a Q8_0 copy on a CPU with AMX and as F16 elsewhere.

For each type (the file as shipped, and copies made by `magpie.engines.llamacpp_weights`), a
subprocess loads the model and times decode steps of 1, 32 and 64 sequences (one token each per
step, every sequence in its own KV stream as our engine runs them), then prints tokens/s; and
prompt evaluation (`--prompts SxT`: S sequences of T tokens in decodes of up to 512 tokens, as
the judge reads its prompts; `--prompts ""` skips it).

    python bench/weights.py [--model M.gguf] [--kinds file,f16,q8_0] [--runtimes native,no-repack]

`--runtimes` loads each model as those llama.cpp runtimes do (`no-repack`: no AMX, no repacked
kernels), a row per (weights, runtime). `--libs DIR,...` compares llama.cpp builds: each cell
also runs with `LD_LIBRARY_PATH=DIR` (e.g. the `llama_cpp/lib` of another wheel, unzipped), a
row per build (`installed`: the venv's own; `libs1`, `libs2`...: the folders in order); with
`--rounds R` every cell is the median of R runs, the builds alternating, so a machine's drift
falls on all of them alike.

    python bench/weights.py --kinds f16 --batches 2,4,8,16,32 --prompts "" \
        --libs /tmp/old/llama_cpp/lib --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def open_context(path: str, seqs: int, cells: int, threads: int, runtime: str) -> tuple:
    """(model, context) as our engine opens them: `seqs` KV streams of `cells` cells each, flash
    attention, the model loaded as llama.cpp runtime `runtime` loads it (`native`: repacked for
    AMX/AVX-512)."""
    import llama_cpp as lib

    from magpie.engines.llamacpp_runtime import RUNTIMES, apply_model_params

    apply_model_params(RUNTIMES[runtime])
    lib.llama_backend_init()
    loading = lib.llama_cpp.llama_model_default_params()  # with the runtime's overrides
    model = lib.llama_model_load_from_file(path.encode(), loading)
    params = lib.llama_context_default_params()
    params.n_seq_max = seqs
    params.n_ctx = seqs * cells
    params.n_batch = params.n_ubatch = max(512, seqs)
    params.kv_unified = False
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.n_threads = params.n_threads_batch = threads
    return model, lib.llama_init_from_model(model, params)


def measure_prompts(path: str, seqs: int, tokens: int, threads: int, runtime: str) -> float:
    """Prompt tokens/s: `seqs` sequences of `tokens` tokens each, decoded in batches of up to 512
    tokens (a sequence's tokens in order), the best of three rounds on an emptied cache."""
    import llama_cpp as lib

    model, ctx = open_context(path, seqs, (tokens + 255) // 256 * 256, threads, runtime)
    decode_batch = lib.llama_batch_init(512, 0, 1)
    order = [(seq, pos) for seq in range(seqs) for pos in range(tokens)]
    best = float("inf")
    for _ in range(3):
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        started = time.perf_counter()
        for at in range(0, len(order), 512):
            chunk = order[at : at + 512]
            decode_batch.n_tokens = len(chunk)
            for i, (seq, pos) in enumerate(chunk):
                decode_batch.token[i] = 1000 + 7 * pos + seq
                decode_batch.pos[i], decode_batch.n_seq_id[i] = pos, 1
                decode_batch.seq_id[i][0], decode_batch.logits[i] = seq, pos == tokens - 1
            if lib.llama_decode(ctx, decode_batch) != 0:
                raise SystemExit("llama_decode failed")
        best = min(best, time.perf_counter() - started)
    lib.llama_batch_free(decode_batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return seqs * tokens / best


def measure(path: str, batch: int, steps: int, threads: int, runtime: str) -> float:
    """Decode tokens/s of `batch` sequences for `steps` steps (after 3 warm-up steps)."""
    import llama_cpp as lib

    model, ctx = open_context(path, batch, 256, threads, runtime)
    decode_batch = lib.llama_batch_init(batch, 0, 1)

    def step(pos: int) -> None:
        decode_batch.n_tokens = batch
        for i in range(batch):
            decode_batch.token[i] = 1000 + 37 * i + pos
            decode_batch.pos[i], decode_batch.n_seq_id[i] = pos, 1
            decode_batch.seq_id[i][0], decode_batch.logits[i] = i, True
        if lib.llama_decode(ctx, decode_batch) != 0:
            raise SystemExit("llama_decode failed")

    for pos in range(3):
        step(pos)
    started = time.perf_counter()
    for pos in range(3, 3 + steps):
        step(pos)
    seconds = time.perf_counter() - started
    lib.llama_batch_free(decode_batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--kinds", default="file,f16,q8_0")
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--runtimes",
        default="native",
        help="comma-separated: native (weights repacked for AMX/AVX-512 kernels), no-repack",
    )
    parser.add_argument(
        "--prompts", default="8x240", help='prompt evaluation: SEQUENCESxTOKENS ("" skips it)'
    )
    parser.add_argument("--libs", default="", help="other builds' library folders to compare")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (the median)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, batch, runtime = args.child
        if "x" in batch:  # a prompt column: SEQUENCESxTOKENS
            seqs, tokens = (int(n) for n in batch.split("x"))
            print(json.dumps(measure_prompts(path, seqs, tokens, args.threads, runtime)))
        else:
            print(json.dumps(measure(path, int(batch), args.steps, args.threads, runtime)))
        return
    prompts = args.prompts.strip().lower()
    if prompts and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", prompts):
        raise SystemExit(f"--prompts {args.prompts!r}: write SEQUENCESxTOKENS, e.g. 8x240")
    from magpie.cpu import cpu_facts
    from magpie.engines.llamacpp import bundled_model_path
    from magpie.engines.llamacpp_weights import converted, resolve_weights

    source = Path(args.model) if args.model else bundled_model_path()
    cpu = cpu_facts()
    print(f"cpu: {cpu['model']} ({', '.join(cpu['flags'])}); threads {args.threads}")
    print(f"model: {source.name}; weights=auto chooses: {resolve_weights(source).reason}")
    columns = args.batches.split(",") + ([prompts] if prompts else [])
    heads = [f"{c} prompt tok/s" if "x" in c else f"{c} seq tok/s" for c in columns]
    libs = [""] + [lib for lib in args.libs.split(",") if lib]
    label = f"{'build':<10}" if len(libs) > 1 else ""
    print(f"{label}{'weights':<10}{'runtime':<11}" + "".join(f"{h:>22}" for h in heads))
    for kind in args.kinds.split(","):
        path = source if kind == "file" else converted(source, kind)
        for runtime in args.runtimes.split(","):
            cells: dict[str, list[str]] = {lib: [] for lib in libs}
            for batch in columns:
                runs: dict[str, list[float]] = {lib: [] for lib in libs}
                failed: dict[str, int] = {}
                for _ in range(max(1, args.rounds)):
                    for lib in libs:
                        code, speed = run_child(path, batch, runtime, args, lib)
                        if speed is None:
                            failed[lib] = code
                        else:
                            runs[lib].append(speed)
                for lib in libs:
                    median = f"{statistics.median(runs[lib]):.1f}" if runs[lib] else ""
                    cells[lib].append(f"exit {failed[lib]}" if lib in failed else median)
            for number, lib in enumerate(libs):
                name = f"{'installed' if not lib else f'libs{number}':<10}" if label else ""
                print(f"{name}{kind:<10}{runtime:<11}" + "".join(f"{c:>22}" for c in cells[lib]))
    for number, lib in enumerate(libs[1:], start=1):
        print(f"libs{number}: {lib}")


def run_child(
    path: Path, column: str, runtime: str, args: argparse.Namespace, lib: str
) -> tuple[int, float | None]:
    """One cell in a subprocess (with `lib` first on the library path when set): its exit code
    and tokens/s (None when it failed)."""
    cmd = [sys.executable, __file__, "--child", str(path), column, runtime]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    env = dict(os.environ, LD_LIBRARY_PATH=lib) if lib else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ok = done.returncode == 0 and done.stdout.strip()
    return done.returncode, float(json.loads(done.stdout)) if ok else None


if __name__ == "__main__":
    main()
