"""Our F16 product for decode steps of a few sequences (scripts/sgemm_few.cpp), compiled for AVX2
and run by one and by two threads: every element is tinyBLAS's computation (an 8-lane FMA chain
over k in order, then its horizontal sum), bit for bit, and close to the product in double
precision; shapes it does not serve are left to tinyBLAS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.test_fa_rows_kernel import build_harness

HARNESS = r"""
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

// what sgemm.cpp gives the kernel: F16 storage, loads, FMA and tinyBLAS's horizontal sum
typedef uint16_t ggml_fp16_t;
struct ggml_threadpool { std::atomic<int> chunk{0}; std::barrier<> * sync = nullptr; };
struct ggml_compute_params { int ith, nth; ggml_threadpool * threadpool; };
static void ggml_barrier(ggml_threadpool * tp) { if (tp->sync) tp->sync->arrive_and_wait(); }
static void ggml_threadpool_chunk_set(ggml_threadpool * tp, int value) { tp->chunk = value; }
static int ggml_threadpool_chunk_add(ggml_threadpool * tp, int value) {
    return tp->chunk.fetch_add(value);
}
namespace {
template <typename T> T load(const ggml_fp16_t *);
template <> inline __m256 load(const ggml_fp16_t * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
}
inline __m256 madd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(__m128 x) {
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
inline float hsum(__m256 x) {
    return hsum(_mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x)));
}
}  // namespace

#include "sgemm_few.cpp"

static float f16(ggml_fp16_t h) { return _cvtsh_ss(h); }

int main() {
    std::mt19937 gen(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int checked = 0, differing = 0;
    double worst = 0.0;
    for (int64_t m : {2, 6, 64, 98}) {
    for (int64_t k : {8, 64, 576}) {
    for (int64_t n : {2, 3, 4}) {
    for (int64_t pad : {0, 8}) {  // lda > k: rows not contiguous (nothing fetched ahead)
    for (int threads : {1, 2}) {
        const int64_t lda = k + pad, ldb = k + pad, ldc = m + 3;
        std::vector<ggml_fp16_t> A(m * lda), B(n * ldb);
        for (auto & x : A) x = _cvtss_sh(normal(gen), 0);
        for (auto & x : B) x = _cvtss_sh(normal(gen), 0);
        std::vector<float> C(n * ldc, -1.0f);
        ggml_threadpool tp;
        std::barrier<> sync(threads);
        tp.sync = &sync;
        std::vector<std::thread> pool;
        std::atomic<int> served{0};
        for (int t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                ggml_compute_params params{t, threads, &tp};
                served += magpie_sgemm_f16_few(&params, m, n, k, A.data(), lda, B.data(), ldb,
                                               C.data(), ldc);
            });
        }
        for (auto & th : pool) th.join();
        if (served != threads) { std::printf("not served m=%ld n=%ld\n", m, n); return 1; }
        for (int64_t j = 0; j < n; ++j) {
            for (int64_t i = 0; i < m; ++i) {
                float lane[8] = {0};
                double exact = 0;
                for (int64_t l = 0; l < k; ++l) {
                    const float a = f16(A[i * lda + l]), b = f16(B[j * ldb + l]);
                    lane[l % 8] = std::fma(a, b, lane[l % 8]);
                    exact += (double) a * b;
                }
                const float want = ((lane[4] + lane[0]) + (lane[6] + lane[2])) +
                                   ((lane[5] + lane[1]) + (lane[7] + lane[3]));
                const float got = C[j * ldc + i];
                differing += std::memcmp(&want, &got, sizeof(float)) != 0;
                worst = std::max(worst, std::fabs(got - exact) / std::sqrt((double) k));
                ++checked;
            }
            if (C[j * ldc + m] != -1.0f) { std::printf("wrote past m\n"); return 1; }
        }
    }}}}}
    // left to tinyBLAS: one column, more than four, odd rows, k not a multiple of 8
    std::vector<ggml_fp16_t> A(16 * 16), B(16 * 16);
    std::vector<float> C(16 * 16);
    ggml_threadpool tp;
    ggml_compute_params params{0, 1, &tp};
    const bool refused =
        !magpie_sgemm_f16_few(&params, 16, 1, 16, A.data(), 16, B.data(), 16, C.data(), 16) &&
        !magpie_sgemm_f16_few(&params, 16, 5, 16, A.data(), 16, B.data(), 16, C.data(), 16) &&
        !magpie_sgemm_f16_few(&params, 15, 4, 16, A.data(), 16, B.data(), 16, C.data(), 16) &&
        !magpie_sgemm_f16_few(&params, 16, 4, 12, A.data(), 16, B.data(), 16, C.data(), 16);
    std::printf("checked %d differing %d worst %.3g refused %d\n", checked, differing, worst,
                refused);
    return differing == 0 && worst < 1e-4 && refused ? 0 : 1;
}
"""


def test_few_column_kernel_is_tinyblas_bit_for_bit_on_one_and_two_threads(
    tmp_path: Path,
) -> None:
    flags = ["-std=c++20", "-O2", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-pthread"]
    binary = build_harness(tmp_path, HARNESS, {"avx2", "fma", "f16c"}, flags)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert "checked 18360 differing 0" in run.stdout, run.stdout
    assert run.returncode == 0, run.stdout
