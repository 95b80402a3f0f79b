// magpie: flash attention of query rows over an F16 KV cache, a block of cells at a time.
// Inserted into ggml-cpu/ops.cpp by scripts/patch_llama_cpp.py, before the row-by-row kernel
// (ggml_compute_forward_flash_attn_ext_f16_one_chunk), which calls it for F16 caches.
//
// The kernel it replaces walks the cells one at a time: a dot product through a function
// pointer, a scalar expf, and a multiply-add into an F16 accumulator (converted to F32 and back
// for every cell). Here a block of up to 64 cells gets its scores first, then one vectorized exp
// (ggml_vec_soft_max_f32), then its values are added into an F32 accumulator held in registers.
// Same online softmax (running maximum M, sum S), so partial results still combine.
//
// The query heads that share a KV head (grouped-query attention) are computed together: each
// key and value row is read and converted once for all of them. A row's arithmetic is the same
// whether it is computed alone or in a group (the same operations on the same values in the same
// order), so a row depends only on its query, the cells and the mask: never on the other rows,
// the chunking or the threads.

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define MAGPIE_FA_LANES 16
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define MAGPIE_FA_LANES 8
#endif

#ifdef MAGPIE_FA_LANES
#include <immintrin.h>
#include <vector>

#define MAGPIE_FA_BLOCK 64
#define MAGPIE_FA_GROUP 4      // at most this many query heads computed together
#define MAGPIE_FA_PREFETCH 8   // how many cells ahead the key rows are fetched into the cache
#define MAGPIE_MAD_WIDTH 4     // vectors of each accumulator held in registers at once

#if MAGPIE_FA_LANES == 16
#define MAGPIE_VEC __m512
#define MAGPIE_ZERO _mm512_setzero_ps
#define MAGPIE_LOAD _mm512_loadu_ps
#define MAGPIE_STORE _mm512_storeu_ps
#define MAGPIE_SET1 _mm512_set1_ps
#define MAGPIE_ADD _mm512_add_ps
#define MAGPIE_FMA _mm512_fmadd_ps
#define MAGPIE_F16(ptr) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (ptr)))
static inline float magpie_fa_sum(__m512 a) { return _mm512_reduce_add_ps(a); }
#else
#define MAGPIE_VEC __m256
#define MAGPIE_ZERO _mm256_setzero_ps
#define MAGPIE_LOAD _mm256_loadu_ps
#define MAGPIE_STORE _mm256_storeu_ps
#define MAGPIE_SET1 _mm256_set1_ps
#define MAGPIE_ADD _mm256_add_ps
#define MAGPIE_FMA _mm256_fmadd_ps
#define MAGPIE_F16(ptr) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (ptr)))
static inline float magpie_fa_sum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// out[g] = q[g] . k for G F32 queries and one F16 key of n values (n a multiple of the lanes);
// the key is converted once for all G queries.
template <int G>
static inline void magpie_fa_dots(const float * const * q, const ggml_fp16_t * k, int64_t n,
                                  float * out) {
    const int64_t L = MAGPIE_FA_LANES;
    MAGPIE_VEC a0[G], a1[G];
    for (int g = 0; g < G; ++g) {
        a0[g] = MAGPIE_ZERO();
        a1[g] = MAGPIE_ZERO();
    }
    int64_t d = 0;
    for (; d + 2*L <= n; d += 2*L) {
        const MAGPIE_VEC k0 = MAGPIE_F16(k + d), k1 = MAGPIE_F16(k + d + L);
        for (int g = 0; g < G; ++g) {
            a0[g] = MAGPIE_FMA(MAGPIE_LOAD(q[g] + d), k0, a0[g]);
            a1[g] = MAGPIE_FMA(MAGPIE_LOAD(q[g] + d + L), k1, a1[g]);
        }
    }
    for (; d < n; d += L) {
        const MAGPIE_VEC k0 = MAGPIE_F16(k + d);
        for (int g = 0; g < G; ++g) {
            a0[g] = MAGPIE_FMA(MAGPIE_LOAD(q[g] + d), k0, a0[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        out[g] = magpie_fa_sum(MAGPIE_ADD(a0[g], a1[g]));
    }
}

// y[g] += sum over j of p[g][j] * v_j for G F32 accumulators and the F16 rows v_j = v + j*nbv1
// (n values each, a multiple of the lanes); a zero weight adds nothing. W vectors of every
// accumulator stay in registers while the rows go by, and each row is converted once.
template <int G, int W>
static inline void magpie_fa_mad_pass(float * const * y, const char * v, size_t nbv1,
                                      const float (*p)[MAGPIE_FA_BLOCK], int rows, int64_t d) {
    const int64_t L = MAGPIE_FA_LANES;
    MAGPIE_VEC acc[G][W];
    for (int g = 0; g < G; ++g) {
        for (int w = 0; w < W; ++w) {
            acc[g][w] = MAGPIE_LOAD(y[g] + d + w*L);
        }
    }
    for (int j = 0; j < rows; ++j) {
        bool any = false;
        for (int g = 0; g < G; ++g) {
            any |= p[g][j] != 0.0f;
        }
        if (!any) {
            continue;
        }
        const ggml_fp16_t * vj = (const ggml_fp16_t *) (v + j*nbv1) + d;
        MAGPIE_VEC vx[W];
        for (int w = 0; w < W; ++w) {
            vx[w] = MAGPIE_F16(vj + w*L);
        }
        for (int g = 0; g < G; ++g) {
            if (p[g][j] == 0.0f) {
                continue;
            }
            const MAGPIE_VEC pj = MAGPIE_SET1(p[g][j]);
            for (int w = 0; w < W; ++w) {
                acc[g][w] = MAGPIE_FMA(vx[w], pj, acc[g][w]);
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        for (int w = 0; w < W; ++w) {
            MAGPIE_STORE(y[g] + d + w*L, acc[g][w]);
        }
    }
}

template <int G>
static inline void magpie_fa_mad_rows(float * const * y, const char * v, size_t nbv1,
                                      const float (*p)[MAGPIE_FA_BLOCK], int rows, int64_t n) {
    const int64_t L = MAGPIE_FA_LANES;
    const int64_t step = MAGPIE_MAD_WIDTH*L;
    int64_t d = 0;
    for (; d + step <= n; d += step) {
        magpie_fa_mad_pass<G, MAGPIE_MAD_WIDTH>(y, v, nbv1, p, rows, d);
    }
    for (; d < n; d += L) {
        magpie_fa_mad_pass<G, 1>(y, v, nbv1, p, rows, d);
    }
}

// G query rows over cells [ic0, ic1) of one KV head: for each, the running maximum M, the sum S
// of exp(score - M) and VKQ32 = sum of exp(score - M) * value (not yet divided by S).
// k_row/v_row: the rows of cell 0.
template <int G>
static void magpie_fa_rows_f16(const float * const * q, const char * k_row, size_t nbk1,
                               const char * v_row, size_t nbv1, const ggml_fp16_t * mp,
                               float slope, float scale, int64_t ic0, int64_t ic1, int64_t DK,
                               int64_t DV, float * const * VKQ32, float * M, float * S) {
    float sc[G][MAGPIE_FA_BLOCK];
    float dots[G];
    for (int g = 0; g < G; ++g) {
        M[g] = -INFINITY;
        S[g] = 0.0f;
        memset(VKQ32[g], 0, DV*sizeof(float));
    }
    for (int64_t b0 = ic0; b0 < ic1; b0 += MAGPIE_FA_BLOCK) {
        const int n = (int) std::min<int64_t>(MAGPIE_FA_BLOCK, ic1 - b0);
        float bmax[G];
        for (int g = 0; g < G; ++g) {
            bmax[g] = -INFINITY;
        }
        for (int j = 0; j < n; ++j) {
            // the key row a few cells ahead (unless masked), the value row for the pass below
            const int64_t ahead = b0 + j + MAGPIE_FA_PREFETCH;
            if (ahead < ic1 && !(mp && slope*GGML_CPU_FP16_TO_FP32(mp[ahead]) == -INFINITY)) {
                for (int64_t at = 0; at < DK*(int64_t) sizeof(ggml_fp16_t); at += 64) {
                    _mm_prefetch(k_row + ahead*nbk1 + at, _MM_HINT_T0);
                }
            }
            const float mv = mp ? slope*GGML_CPU_FP16_TO_FP32(mp[b0 + j]) : 0.0f;
            if (mv == -INFINITY) {
                for (int g = 0; g < G; ++g) {
                    sc[g][j] = -INFINITY;
                }
                continue;
            }
            for (int64_t at = 0; at < DV*(int64_t) sizeof(ggml_fp16_t); at += 64) {
                _mm_prefetch(v_row + (b0 + j)*nbv1 + at, _MM_HINT_T0);
            }
            magpie_fa_dots<G>(q, (const ggml_fp16_t *) (k_row + (b0 + j)*nbk1), DK, dots);
            for (int g = 0; g < G; ++g) {
                sc[g][j] = dots[g]*scale + mv;
                bmax[g] = std::max(bmax[g], sc[g][j]);
            }
        }
        bool any = false;
        for (int g = 0; g < G; ++g) {
            any |= bmax[g] != -INFINITY;
        }
        if (!any) {  // every cell of the block masked
            continue;
        }
        const int padded = (n + MAGPIE_FA_LANES - 1)/MAGPIE_FA_LANES*MAGPIE_FA_LANES;
        for (int g = 0; g < G; ++g) {
            if (bmax[g] == -INFINITY) {  // nothing to add: zero weights
                std::fill(sc[g], sc[g] + n, 0.0f);
                continue;
            }
            std::fill(sc[g] + n, sc[g] + padded, -INFINITY);
            if (bmax[g] > M[g]) {
                const float ms = expf(M[g] - bmax[g]);  // 0 for the first block
                ggml_vec_scale_f32(DV, VKQ32[g], ms);
                S[g] *= ms;
                M[g] = bmax[g];
            }
            S[g] += (float) ggml_vec_soft_max_f32(padded, sc[g], sc[g], M[g]);  // exp(sc - M)
        }
        magpie_fa_mad_rows<G>(VKQ32, v_row + b0*nbv1, nbv1, sc, n, DV);
    }
}

static void magpie_fa_rows_any(int G, const float * const * q, const char * k_row, size_t nbk1,
                               const char * v_row, size_t nbv1, const ggml_fp16_t * mp,
                               float slope, float scale, int64_t ic0, int64_t ic1, int64_t DK,
                               int64_t DV, float * const * VKQ32, float * M, float * S) {
    switch (G) {
        case 1: magpie_fa_rows_f16<1>(q, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV, VKQ32, M, S); break;
        case 2: magpie_fa_rows_f16<2>(q, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV, VKQ32, M, S); break;
        case 3: magpie_fa_rows_f16<3>(q, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV, VKQ32, M, S); break;
        default: magpie_fa_rows_f16<4>(q, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV, VKQ32, M, S); break;
    }
}

// The results of the groups computed in one call of llama.cpp's row loop, a slot per query
// position: a group's first row computes its members' rows too, and they are taken from here.
struct magpie_fa_groups {
    std::vector<float> data;       // per slot: M[GROUP], S[GROUP], out[GROUP][DV]
    std::vector<int64_t> first;    // per slot: the group's first row, -1 for none
    std::vector<int> count;        // per slot: its rows
};

// One row (ir) of llama.cpp's loop: its M, S and VKQ32, computed with the following query heads
// of the same KV head (rows ir + g*neq1 below ir1) when `groupable`, or taken from that group.
// q_row: the row's query; the next head's is nbq2 bytes on.
static void magpie_fa_row_f16(magpie_fa_groups & groups, int64_t ir, int64_t ir1, int64_t neq1,
                              int64_t iq1, int64_t iq2, int64_t rk2, bool groupable,
                              const float * q_row, size_t nbq2, const char * k_row, size_t nbk1,
                              const char * v_row, size_t nbv1, const ggml_fp16_t * mp, float slope,
                              float scale, int64_t ic0, int64_t ic1, int64_t DK, int64_t DV,
                              float * VKQ32, float * M_out, float * S_out) {
    int G = 1;
    if (groupable) {
        const int64_t last_head = (iq2/rk2 + 1)*rk2;  // the first head of the next KV head
        while (G < MAGPIE_FA_GROUP && iq2 + G < last_head && ir + G*neq1 < ir1) {
            ++G;
        }
    }
    if (G == 1 && groups.first.empty()) {  // no group to take it from, none to keep
        magpie_fa_rows_any(1, &q_row, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV,
                           &VKQ32, M_out, S_out);
        return;
    }
    const int64_t slots = std::min<int64_t>(neq1, 64);
    const int64_t slot_size = 2*MAGPIE_FA_GROUP + MAGPIE_FA_GROUP*DV;
    if (groups.first.empty()) {
        groups.data.resize(slots*slot_size);
        groups.first.assign(slots, -1);
        groups.count.assign(slots, 0);
    }
    const int64_t slot = iq1 % slots;
    float * base = groups.data.data() + slot*slot_size;
    const int64_t first = groups.first[slot];
    const int64_t member = first < 0 ? -1 : (ir - first)/neq1;
    if (first < 0 || (ir - first) % neq1 != 0 || member < 0 || member >= groups.count[slot]) {
        const float * q[MAGPIE_FA_GROUP];
        float * out[MAGPIE_FA_GROUP];
        for (int g = 0; g < G; ++g) {
            q[g] = (const float *) ((const char *) q_row + g*nbq2);
            out[g] = base + 2*MAGPIE_FA_GROUP + g*DV;
        }
        magpie_fa_rows_any(G, q, k_row, nbk1, v_row, nbv1, mp, slope, scale, ic0, ic1, DK, DV, out,
                           base, base + MAGPIE_FA_GROUP);
        groups.first[slot] = ir;
        groups.count[slot] = G;
        memcpy(VKQ32, out[0], DV*sizeof(float));
        *M_out = base[0];
        *S_out = base[MAGPIE_FA_GROUP];
        return;
    }
    memcpy(VKQ32, base + 2*MAGPIE_FA_GROUP + member*DV, DV*sizeof(float));
    *M_out = base[member];
    *S_out = base[MAGPIE_FA_GROUP + member];
}
#endif  // MAGPIE_FA_LANES
