// magpie: flash attention of one query row over an F16 KV cache, a block of cells at a time.
// Inserted into ggml-cpu/ops.cpp by scripts/patch_llama_cpp.py, before the row-by-row kernel
// (ggml_compute_forward_flash_attn_ext_f16_one_chunk), which calls it for F16 caches.
//
// The kernel it replaces walks the cells one at a time: a dot product through a function
// pointer, a scalar expf, and a multiply-add into an F16 accumulator (converted to F32 and back
// for every cell). Here a block of up to 64 cells gets its scores first, then one vectorized exp
// (ggml_vec_soft_max_f32), then its values are added into an F32 accumulator held in registers.
// Same online softmax (running maximum M, sum S), so partial results still combine; a row
// depends only on its query, the cells and the mask, never on the other rows or the threads.

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define MAGPIE_FA_LANES 16
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define MAGPIE_FA_LANES 8
#endif

#ifdef MAGPIE_FA_LANES
#include <immintrin.h>

#define MAGPIE_FA_BLOCK 64

// q . k for an F32 query and an F16 key of n values (n a multiple of the lanes)
static inline float magpie_fa_dot(const float * q, const ggml_fp16_t * k, int64_t n) {
#if MAGPIE_FA_LANES == 16
    __m512 a0 = _mm512_setzero_ps();
    __m512 a1 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= n; d += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + d))), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + d + 16))), a1);
    }
    for (; d < n; d += 16) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + d))), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    __m256 a0 = _mm256_setzero_ps();
    __m256 a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + d))), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + d + 8))), a1);
    }
    for (; d < n; d += 8) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + d))), a0);
    }
    const __m256 a = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#endif
}

// y += sum over j of p[j] * v_j for an F32 accumulator and the F16 rows v_j = v + j*nbv1 with
// p[j] != 0 (n values each, a multiple of the lanes). Four vectors of y stay in registers while
// the rows go by, rather than a load and a store of y for every row.
static inline void magpie_fa_mad_rows(float * y, const char * v, size_t nbv1, const float * p,
                                      int rows, int64_t n) {
#if MAGPIE_FA_LANES == 16
#define MAGPIE_VEC __m512
#define MAGPIE_LOAD _mm512_loadu_ps
#define MAGPIE_STORE _mm512_storeu_ps
#define MAGPIE_SET1 _mm512_set1_ps
#define MAGPIE_FMA _mm512_fmadd_ps
#define MAGPIE_F16(ptr) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (ptr)))
#else
#define MAGPIE_VEC __m256
#define MAGPIE_LOAD _mm256_loadu_ps
#define MAGPIE_STORE _mm256_storeu_ps
#define MAGPIE_SET1 _mm256_set1_ps
#define MAGPIE_FMA _mm256_fmadd_ps
#define MAGPIE_F16(ptr) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (ptr)))
#endif
    const int64_t L = MAGPIE_FA_LANES;
    int64_t d = 0;
    for (; d + 4*L <= n; d += 4*L) {
        MAGPIE_VEC a0 = MAGPIE_LOAD(y + d), a1 = MAGPIE_LOAD(y + d + L);
        MAGPIE_VEC a2 = MAGPIE_LOAD(y + d + 2*L), a3 = MAGPIE_LOAD(y + d + 3*L);
        for (int j = 0; j < rows; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            const ggml_fp16_t * vj = (const ggml_fp16_t *) (v + j*nbv1) + d;
            const MAGPIE_VEC pj = MAGPIE_SET1(p[j]);
            a0 = MAGPIE_FMA(MAGPIE_F16(vj), pj, a0);
            a1 = MAGPIE_FMA(MAGPIE_F16(vj + L), pj, a1);
            a2 = MAGPIE_FMA(MAGPIE_F16(vj + 2*L), pj, a2);
            a3 = MAGPIE_FMA(MAGPIE_F16(vj + 3*L), pj, a3);
        }
        MAGPIE_STORE(y + d, a0);
        MAGPIE_STORE(y + d + L, a1);
        MAGPIE_STORE(y + d + 2*L, a2);
        MAGPIE_STORE(y + d + 3*L, a3);
    }
    for (; d < n; d += L) {
        MAGPIE_VEC a0 = MAGPIE_LOAD(y + d);
        for (int j = 0; j < rows; ++j) {
            if (p[j] != 0.0f) {
                const ggml_fp16_t * vj = (const ggml_fp16_t *) (v + j*nbv1) + d;
                a0 = MAGPIE_FMA(MAGPIE_F16(vj), MAGPIE_SET1(p[j]), a0);
            }
        }
        MAGPIE_STORE(y + d, a0);
    }
#undef MAGPIE_VEC
#undef MAGPIE_LOAD
#undef MAGPIE_STORE
#undef MAGPIE_SET1
#undef MAGPIE_FMA
#undef MAGPIE_F16
}

// One query row over cells [ic0, ic1): the running maximum M, the sum S of exp(score - M) and
// VKQ32 = sum of exp(score - M) * value (not yet divided by S). k_row/v_row: the row of cell 0.
static void magpie_fa_row_f16(const float * q, const char * k_row, size_t nbk1, const char * v_row,
                              size_t nbv1, const ggml_fp16_t * mp, float slope, float scale,
                              int64_t ic0, int64_t ic1, int64_t DK, int64_t DV, float * VKQ32,
                              float * M_out, float * S_out) {
    float sc[MAGPIE_FA_BLOCK];
    float M = -INFINITY;
    float S = 0.0f;
    memset(VKQ32, 0, DV*sizeof(float));
    for (int64_t b0 = ic0; b0 < ic1; b0 += MAGPIE_FA_BLOCK) {
        const int n = (int) std::min<int64_t>(MAGPIE_FA_BLOCK, ic1 - b0);
        float bmax = -INFINITY;
        for (int j = 0; j < n; ++j) {
            const float mv = mp ? slope*GGML_CPU_FP16_TO_FP32(mp[b0 + j]) : 0.0f;
            if (mv == -INFINITY) {
                sc[j] = -INFINITY;
                continue;
            }
            const ggml_fp16_t * kj = (const ggml_fp16_t *) (k_row + (b0 + j)*nbk1);
            sc[j] = magpie_fa_dot(q, kj, DK)*scale + mv;
            bmax = std::max(bmax, sc[j]);
        }
        if (bmax == -INFINITY) {
            continue;
        }
        const int padded = (n + MAGPIE_FA_LANES - 1)/MAGPIE_FA_LANES*MAGPIE_FA_LANES;
        for (int j = n; j < padded; ++j) {
            sc[j] = -INFINITY;
        }
        if (bmax > M) {
            const float ms = expf(M - bmax);  // 0 for the first block
            ggml_vec_scale_f32(DV, VKQ32, ms);
            S *= ms;
            M = bmax;
        }
        S += (float) ggml_vec_soft_max_f32(padded, sc, sc, M);  // sc[j] = exp(sc[j] - M)
        magpie_fa_mad_rows(VKQ32, v_row + b0*nbv1, nbv1, sc, n, DV);
    }
    *M_out = M;
    *S_out = S;
}
#endif  // MAGPIE_FA_LANES
