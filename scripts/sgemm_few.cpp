// F16 weights times two to four columns on x86 CPUs with AVX2 (not AVX-512): the decode steps of
// a few sequences, as at the end of a block when most of its attempts have finished.
//
// scripts/patch_llama_cpp.py inserts this file into llama.cpp's llamafile/sgemm.cpp, before
// `llamafile_sgemm`, which calls `magpie_sgemm_f16_few` first for F16 A and F16 B. At these
// widths a decode step reads all the weights from memory for little arithmetic, and tinyBLAS
// (4 rows by 2-3 columns a tile, 4 streams of one 1152-byte row each) waits on memory. Here a
// thread walks pairs of contiguous rows once for all columns, with B converted to F32 once per
// call (exact) and the next pair of rows fetched ahead.
//
// Each element of C is tinyBLAS's computation: one 8-lane FMA chain over k in order, then the
// same `hsum`, so the results are the same bit for bit (tests/test_sgemm_few_kernel.py).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <vector>

#define MAGPIE_FEW_COLUMNS 4

namespace {

// Rows `a` and `a + lda` times the N columns of `b` (F32, k apart) into C[j * ldc + 0..1];
// `ahead`, when set, is fetched a cache line every other step (the next 2 * k halves).
template <int N>
inline void magpie_f16_rows2(int64_t k, const ggml_fp16_t * a, int64_t lda, const float * b,
                             float * c, int64_t ldc, const char * ahead) {
    __m256 s0[N], s1[N];
    for (int j = 0; j < N; ++j) {
        s0[j] = _mm256_setzero_ps();
        s1[j] = _mm256_setzero_ps();
    }
    for (int64_t l = 0; l < k; l += 8) {
        if (ahead)
            _mm_prefetch(ahead + l * 4, _MM_HINT_T0);
        const __m256 x0 = load<__m256>(a + l);
        const __m256 x1 = load<__m256>(a + lda + l);
        for (int j = 0; j < N; ++j) {
            const __m256 y = _mm256_loadu_ps(b + j * k + l);
            s0[j] = madd(x0, y, s0[j]);
            s1[j] = madd(x1, y, s1[j]);
        }
    }
    for (int j = 0; j < N; ++j) {
        c[ldc * j] = hsum(s0[j]);
        c[ldc * j + 1] = hsum(s1[j]);
    }
}

}  // namespace

// C (m x n, column j at C + ldc * j) = A (m x k F16 rows) times B (n columns of k F16); false
// (nothing done) outside the shapes it serves. Every thread of the op calls it, as tinyBLAS.
static bool magpie_sgemm_f16_few(const ggml_compute_params * params, int64_t m, int64_t n,
                                 int64_t k, const ggml_fp16_t * A, int64_t lda,
                                 const ggml_fp16_t * B, int64_t ldb, float * C, int64_t ldc) {
    if (n < 2 || n > MAGPIE_FEW_COLUMNS || k % 8 != 0 || m % 2 != 0)
        return false;
    static thread_local std::vector<float> columns;
    columns.resize((size_t)(n * k));
    float * b = columns.data();
    for (int64_t j = 0; j < n; ++j)
        for (int64_t l = 0; l < k; l += 8)
            _mm256_storeu_ps(b + j * k + l, load<__m256>(B + ldb * j + l));
    const int64_t rows = 32;  // a job: 16 pairs of rows
    const int64_t jobs = (m + rows - 1) / rows;
    if (params->ith == 0)
        ggml_threadpool_chunk_set(params->threadpool, params->nth);
    ggml_barrier(params->threadpool);
    for (int64_t job = params->ith; job < jobs;
         job = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t end = std::min(m, (job + 1) * rows);
        for (int64_t i = job * rows; i < end; i += 2) {
            const ggml_fp16_t * a = A + lda * i;
            const char * ahead =
                lda == k && i + 4 <= m ? (const char *)(A + lda * (i + 2)) : nullptr;
            switch (n) {
            case 2: magpie_f16_rows2<2>(k, a, lda, b, C + i, ldc, ahead); break;
            case 3: magpie_f16_rows2<3>(k, a, lda, b, C + i, ldc, ahead); break;
            default: magpie_f16_rows2<4>(k, a, lda, b, C + i, ldc, ahead); break;
            }
        }
    }
    ggml_barrier(params->threadpool);
    return true;
}
#endif
