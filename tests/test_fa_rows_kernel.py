"""Our flash-attention row kernel (scripts/fa_rows.cpp), compiled for AVX2 and AVX-512 and checked
against attention computed in double precision; its rows are the same bit for bit whether computed
alone or with the other query heads of their KV head; and the installed llama.cpp carries it."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[1] / "scripts" / "fa_rows.cpp"

HARNESS = r"""
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

typedef uint16_t ggml_fp16_t;
typedef double ggml_float;
static inline float GGML_CPU_FP16_TO_FP32(ggml_fp16_t h) { return _cvtsh_ss(h); }
static inline ggml_fp16_t to_f16(float f) { return _cvtss_sh(f, 0); }
static void ggml_vec_scale_f32(int n, float * y, float v) { for (int i = 0; i < n; ++i) y[i] *= v; }
static ggml_float ggml_vec_soft_max_f32(int n, float * y, const float * x, float max) {
    ggml_float sum = 0;
    for (int i = 0; i < n; ++i) { y[i] = expf(x[i] - max); sum += y[i]; }
    return sum;
}

#include "fa_rows.cpp"

int main() {
    std::printf("lanes %d\n", MAGPIE_FA_LANES);
    const int DK = 64, DV = 64, kv_heads = 2;  // SmolLM2-like heads, cells interleaved
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    double worst = 0.0;
    int differing = 0, rows_checked = 0;
    for (int rk2 : {1, 3, 6}) {  // query heads per KV head (6: groups of 4 and 2)
    for (int neq1 : {1, 3}) {   // query positions per sequence
    for (int cells : {1, 5, 63, 64, 65, 200, 449}) {
    for (int masked : {0, 1, 2}) {  // none; a causal-like tail; every other cell
    for (int start : {0, 3}) {
        if (start >= cells) continue;
        const int heads = kv_heads * rk2, nr = neq1 * heads;
        const size_t row = kv_heads * DK * sizeof(ggml_fp16_t);
        std::vector<ggml_fp16_t> k(cells * kv_heads * DK), v(cells * kv_heads * DV);
        std::vector<ggml_fp16_t> mask(neq1 * cells);
        for (auto & x : k) x = to_f16(2.0f * normal(gen));
        for (auto & x : v) x = to_f16(normal(gen));
        std::vector<float> q(nr * DK);  // row (iq1, head) at (head*neq1 + iq1)*DK
        for (auto & x : q) x = normal(gen);
        for (int i = 0; i < neq1; ++i) {
            for (int c = 0; c < cells; ++c) {
                bool off = (masked == 1 && c > cells / 2 + i) || (masked == 2 && (c + i) % 2 == 1);
                mask[i * cells + c] = to_f16(off ? -INFINITY : 0.0f);
            }
        }
        // every row alone (chunks of one row), then in llama.cpp-like chunks where the heads
        // of a KV head are computed together: the rows must be the same, bit for bit
        std::vector<float> alone, result(nr * (DV + 2));
        for (int chunk : {1, 5, nr}) {
            for (int ir0 = 0; ir0 < nr; ir0 += chunk) {
                const int ir1 = std::min(ir0 + chunk, nr);
                magpie_fa_groups groups;
                for (int ir = ir0; ir < ir1; ++ir) {
                    const int iq2 = ir / neq1, iq1 = ir % neq1, kv = iq2 / rk2;
                    float * out = result.data() + ir * (DV + 2);
                    magpie_fa_row_f16(groups, ir, ir1, neq1, iq1, iq2, rk2, rk2 > 1,
                                      q.data() + ir * DK, neq1 * DK * sizeof(float),
                                      (const char *) (k.data() + kv * DK), row,
                                      (const char *) (v.data() + kv * DV), row,
                                      mask.data() + iq1 * cells, 1.0f, 0.125f, start, cells, DK, DV,
                                      out + 2, out, out + 1);
                }
            }
            if (chunk == 1) {
                alone = result;
            } else if (std::memcmp(alone.data(), result.data(), result.size() * sizeof(float))) {
                ++differing;
            }
        }
        for (int ir = 0; ir < nr; ++ir) {  // reference: softmax over the unmasked cells, in double
            const int iq2 = ir / neq1, iq1 = ir % neq1, kv = iq2 / rk2;
            const float * out = alone.data() + ir * (DV + 2);
            const float M = out[0], S = out[1];
            std::vector<double> s;
            std::vector<int> kept;
            double top = -INFINITY;
            for (int c = start; c < cells; ++c) {
                if (std::isinf(GGML_CPU_FP16_TO_FP32(mask[iq1 * cells + c]))) continue;
                double d = 0;
                for (int i = 0; i < DK; ++i)
                    d += q[ir * DK + i] * GGML_CPU_FP16_TO_FP32(k[(c * kv_heads + kv) * DK + i]);
                s.push_back(d * 0.125);
                kept.push_back(c);
                top = std::max(top, d * 0.125);
            }
            ++rows_checked;
            if (kept.empty()) {
                if (S != 0.0f || M != -INFINITY) {
                    std::printf("masked row: S %g M %g\n", S, M);
                    return 1;
                }
                continue;
            }
            double total = 0;
            for (double x : s) total += std::exp(x - top);
            if (std::fabs(M - top) > 1e-4 * std::max(1.0, std::fabs(top))) {
                std::printf("max %g vs %g\n", M, top);
                return 1;
            }
            for (int i = 0; i < DV; ++i) {
                double ref = 0;
                for (size_t j = 0; j < kept.size(); ++j) {
                    const size_t at = (kept[j] * kv_heads + kv) * DV + i;
                    ref += std::exp(s[j] - top) / total * GGML_CPU_FP16_TO_FP32(v[at]);
                }
                worst = std::max(worst, std::fabs(out[2 + i] / S - ref));
            }
        }
    }}}}}
    std::printf("rows %d worst %.3g differing %d\n", rows_checked, worst, differing);
    return worst < 1e-5 && differing == 0 ? 0 : 1;
}
"""

VARIANTS = {
    8: ["-mavx2", "-mfma", "-mf16c"],
    16: ["-mavx512f", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def build_harness(tmp_path: Path, source: str, needed: set[str], flags: list[str]) -> Path:
    """Compile a C++ harness that includes a kernel of `scripts/` with `flags`; skip the test
    without an x86 C++ compiler or on a CPU lacking the `needed` flags."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86 C++ compiler")
    if not needed <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needed - cpu_flags())}")
    (tmp_path / "harness.cpp").write_text(source)
    binary = tmp_path / "harness"
    cmd = [compiler, *flags, f"-I{KERNEL.parent}", "-o", str(binary), str(tmp_path / "harness.cpp")]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    return binary


@pytest.mark.parametrize("lanes", sorted(VARIANTS))
def test_fa_rows_kernel_matches_double_precision_and_grouping_changes_no_bit(
    tmp_path: Path, lanes: int
) -> None:
    needed = {"avx2", "fma", "f16c"} | ({"avx512f", "avx512dq"} if lanes == 16 else set())
    binary = build_harness(tmp_path, HARNESS, needed, ["-O2", *VARIANTS[lanes]])
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert f"lanes {lanes}" in run.stdout
    assert run.returncode == 0, run.stdout


def test_installed_llama_cpp_carries_our_patches() -> None:
    """`scripts/llama-cpp-wheel.sh` labels the version with the patches it applied; a silent
    miss (llama.cpp's code moved) would leave the slow attention kernel (`fa`) or the slow F16
    products of a few sequences (`mm`) in place."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "f16c"} <= cpu_flags():
        pytest.skip("the attention patch is for x86 CPUs with AVX2")
    local = llama_cpp.__version__.partition("+")[2]
    labels = local.split(".")
    assert local.startswith("magpie.") and {"fa", "mm"} <= set(labels), llama_cpp.__version__
