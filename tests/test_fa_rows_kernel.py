"""Our flash-attention row kernel (scripts/fa_rows.cpp), compiled for AVX2 and AVX-512 and checked
against attention computed in double precision; and the installed llama.cpp carries it."""

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
    const int DK = 64, DV = 64, heads = 3;  // SmolLM2: 3 KV heads of 64 values, cells interleaved
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    double worst = 0.0;
    for (int cells : {1, 5, 63, 64, 65, 200, 449}) {
        for (int masked : {0, 1, 2}) {  // none; a causal-like tail; every other cell
            for (int start : {0, 3}) {
                if (start >= cells) continue;
                std::vector<ggml_fp16_t> k(cells * heads * DK), v(cells * heads * DV), mask(cells);
                for (auto & x : k) x = to_f16(2.0f * normal(gen));
                for (auto & x : v) x = to_f16(normal(gen));
                std::vector<float> q(DK);
                for (auto & x : q) x = normal(gen);
                for (int c = 0; c < cells; ++c) {
                    bool off = (masked == 1 && c > cells / 2) || (masked == 2 && c % 2 == 1);
                    mask[c] = to_f16(off ? -INFINITY : 0.0f);
                }
                const int head = 1;
                const size_t row = heads * DK * sizeof(ggml_fp16_t);
                std::vector<float> out(DV);
                float M, S;
                magpie_fa_row_f16(q.data(), (const char *) (k.data() + head * DK), row,
                                  (const char *) (v.data() + head * DV), row, mask.data(), 1.0f,
                                  0.125f, start, cells, DK, DV, out.data(), &M, &S);
                // reference: softmax over the unmasked cells in [start, cells), in double
                std::vector<double> s;
                std::vector<int> kept;
                double top = -INFINITY;
                for (int c = start; c < cells; ++c) {
                    if (std::isinf(GGML_CPU_FP16_TO_FP32(mask[c]))) continue;
                    double d = 0;
                    for (int i = 0; i < DK; ++i)
                        d += q[i] * GGML_CPU_FP16_TO_FP32(k[(c * heads + head) * DK + i]);
                    s.push_back(d * 0.125);
                    kept.push_back(c);
                    top = std::max(top, d * 0.125);
                }
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
                    std::printf("max %g vs %g\n", M, top); return 1;
                }
                for (int i = 0; i < DV; ++i) {
                    double ref = 0;
                    for (size_t j = 0; j < kept.size(); ++j) {
                        const size_t at = (kept[j] * heads + head) * DV + i;
                        const float value = GGML_CPU_FP16_TO_FP32(v[at]);
                        ref += std::exp(s[j] - top) / total * value;
                    }
                    worst = std::max(worst, std::fabs(out[i] / S - ref));
                }
            }
        }
    }
    std::printf("worst %.3g\n", worst);
    return worst < 1e-5 ? 0 : 1;
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


@pytest.mark.parametrize("lanes", sorted(VARIANTS))
def test_fa_rows_kernel_matches_double_precision_attention(tmp_path: Path, lanes: int) -> None:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86 C++ compiler")
    needed = {"avx2", "fma", "f16c"} | ({"avx512f", "avx512dq"} if lanes == 16 else set())
    if not needed <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needed - cpu_flags())}")
    (tmp_path / "harness.cpp").write_text(HARNESS)
    binary = tmp_path / "harness"
    subprocess.run(
        [
            compiler,
            "-O2",
            *VARIANTS[lanes],
            f"-I{KERNEL.parent}",
            "-o",
            str(binary),
            str(tmp_path / "harness.cpp"),
        ],
        check=True,
        capture_output=True,
    )
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert f"lanes {lanes}" in run.stdout
    assert run.returncode == 0, run.stdout


def test_installed_llama_cpp_carries_our_patches() -> None:
    """`scripts/llama-cpp-wheel.sh` labels the version with the patches it applied; a silent
    miss (llama.cpp's code moved) would leave the slow attention kernel in place."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "f16c"} <= cpu_flags():
        pytest.skip("the attention patch is for x86 CPUs with AVX2")
    local = llama_cpp.__version__.partition("+")[2]
    assert local.startswith("magpie.") and "fa" in local.split("."), llama_cpp.__version__
