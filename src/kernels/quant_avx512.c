/* kernels/quant_avx512: AVX-512 (BW, VL, VNNI, BF16) tiles of qmatmul for the
 * quantised and half-precision weight types, and the Q8_0 / Q8_K activation
 * converters.
 *
 * Every output is the same float operations, in the same order, as the
 * type's portable vec_dot in core/dtype.c (which emulates llama.cpp's x86
 * lanes), so the two agree bit for bit; the activation converters write the
 * same bytes as the portable ones. Integer sums are exact, so they may be
 * formed any way that keeps each product in its lane; the float steps (one
 * fused multiply-add per block and lane, the horizontal sums) are fixed.
 *
 * A tile is nw weight rows x na activation rows. Each weight block is
 * unpacked once into registers and used for up to 4 activation rows (prefill),
 * and with one activation row (decode) 4 weight rows run side by side so the
 * chains of fused adds overlap. Accumulators belong to one (row, row) pair, so
 * the grouping changes nothing in the result.
 *
 * Built always (functions carry their own target), called only where the CPU
 * has the units (qmatmul checks moe_cpu()). */
#include "kernels/qmatmul.h"
#include "core/core.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define QK_TARGET                                                                                  \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
#define QK_INLINE static inline __attribute__((always_inline)) QK_TARGET

enum { QB = 32, QKB = 256, Q8_0_BYTES = 34, Q4_0_BYTES = 18, Q4_K_BYTES = 144, Q5_K_BYTES = 176,
       Q6_K_BYTES = 210, Q8_K_BYTES = 292 };

QK_INLINE float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* as dtype.c's hsum8: ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)) */
QK_INLINE float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
/* as dtype.c's hsum16: lanes l + (l + 8), then hsum8 */
QK_INLINE float hsum16(__m512 v) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

/* ---- tile driver ------------------------------------------------------------
 * BODY(out, ldo, w, wrow, a, arow, C, RW, RA) computes an RW x RA micro-tile
 * with RW, RA compile-time constants; TILE_FN makes the tile function that
 * covers nw x na with micro-tiles: 4 x 1 for one activation row, else
 * MULTI_RW x (up to 4). */
#define MICRO(BODY, rw, ra) BODY(o_, ldo, w_, wrow, a_, arow, C, rw, ra)
#define TILE_FN(NAME, BODY, MULTI_RW)                                                              \
    static QK_TARGET void NAME(float *out, size_t ldo, const void *w, size_t wrow, int nw,         \
                               const void *a, size_t arow, int na, int64_t C) {                    \
        for (int o = 0; o < nw;) {                                                                 \
            int left = nw - o, rw = na == 1 ? (left < 4 ? left : 4)                                \
                                            : (left < (MULTI_RW) ? left : (MULTI_RW));             \
            for (int n = 0; n < na;) {                                                             \
                int ra = na - n < 4 ? na - n : 4;                                                  \
                float *o_ = out + (size_t)n * ldo + o;                                             \
                const uint8_t *w_ = (const uint8_t *)w + (size_t)o * wrow;                         \
                const uint8_t *a_ = (const uint8_t *)a + (size_t)n * arow;                         \
                switch (rw * 8 + ra) {                                                             \
                case 9: MICRO(BODY, 1, 1); break;                                                  \
                case 17: MICRO(BODY, 2, 1); break;                                                 \
                case 25: MICRO(BODY, 3, 1); break;                                                 \
                case 33: MICRO(BODY, 4, 1); break;                                                 \
                case 10: MICRO(BODY, 1, 2); break;                                                 \
                case 11: MICRO(BODY, 1, 3); break;                                                 \
                case 12: MICRO(BODY, 1, 4); break;                                                 \
                case 18: if ((MULTI_RW) > 1) MICRO(BODY, 2, 2); break;                             \
                case 19: if ((MULTI_RW) > 1) MICRO(BODY, 2, 3); break;                             \
                case 20: if ((MULTI_RW) > 1) MICRO(BODY, 2, 4); break;                             \
                }                                                                                  \
                n += ra;                                                                           \
            }                                                                                      \
            o += rw;                                                                               \
        }                                                                                          \
    }
#define FOR_W for (int i = 0; i < RW; i++)
#define FOR_A for (int j = 0; j < RA; j++)
#define FOR_P for (int p = 0; p < PAIRS; p++)

/* Weights are read once per token from memory, not from cache: ask for the
 * lines PREFETCH_AHEAD bytes further along the row while this block computes
 * (measured on decode of the 1.72B Q8_0 MoE, 2 threads, Zen 4: 36 -> 60
 * tokens/s at 4 KiB; 1 KiB gave 41-44, 2 KiB 48, 8 KiB 54). A prefetch
 * past the row's end is a hint and cannot fault. */
#define PREFETCH_AHEAD 4096
QK_INLINE void prefetch_ahead(const uint8_t *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + PREFETCH_AHEAD + o, _MM_HINT_T0);
}

/* ---- Q8_0 and Q4_0 against Q8_0 ----------------------------------------------
 * Lane l of a block: the exact sum of products 4l .. 4l+3, formed as
 * VPDPBUSD(|w|, a signed like w) (so a = -128 against w < 0 wraps as in
 * llama.cpp); acc = fma(dw * da, lane, acc). */
QK_INLINE __m256i q4_0_quants(const uint8_t *qs) {
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
}
QK_INLINE void q8_0_like_body(float *out, size_t ldo, const uint8_t *w, size_t wrow,
                              const uint8_t *a, size_t arow, int64_t C, const int RW, const int RA,
                              const int four_bit) {
    __m256 acc[4][4];
    FOR_W FOR_A acc[i][j] = _mm256_setzero_ps();
    const size_t wb = four_bit ? Q4_0_BYTES : Q8_0_BYTES;
    for (int64_t b = 0; b < C / QB; b++) {
        __m256i wq[4], wabs[4];
        float wd[4];
        FOR_W {
            const uint8_t *p = w + (size_t)i * wrow + (size_t)b * wb;
            prefetch_ahead(p, 1); /* one line per block: a block is 18 or 34 bytes */
            wd[i] = h2f(p);
            wq[i] = four_bit ? q4_0_quants(p + 2) : _mm256_loadu_si256((const __m256i *)(p + 2));
            wabs[i] = _mm256_abs_epi8(wq[i]);
        }
        FOR_A {
            const uint8_t *p = a + (size_t)j * arow + (size_t)b * Q8_0_BYTES;
            float ad = h2f(p);
            __m256i aq = _mm256_loadu_si256((const __m256i *)(p + 2));
            FOR_W {
                __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs[i],
                                                _mm256_sign_epi8(aq, wq[i]));
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[i] * ad), _mm256_cvtepi32_ps(s), acc[i][j]);
            }
        }
    }
    FOR_W FOR_A out[(size_t)j * ldo + i] = hsum8(acc[i][j]);
}
#define Q8_0_BODY(o, ldo, w, wr, a, ar, C, RW, RA) q8_0_like_body(o, ldo, w, wr, a, ar, C, RW, RA, 0)
#define Q4_0_BODY(o, ldo, w, wr, a, ar, C, RW, RA) q8_0_like_body(o, ldo, w, wr, a, ar, C, RW, RA, 1)
TILE_FN(q8_0_tile, Q8_0_BODY, 2)
TILE_FN(q4_0_tile, Q4_0_BODY, 2)

/* Two weight rows per 512-bit register, row 2p in the low 256 bits and
 * 2p + 1 in the high ones, against up to 4 activation rows: each lane does
 * what q8_0_like_body's lane does (one fused add per block of the scale
 * wd * ad, hsum8 at the end) at a third of the instructions. The integer
 * lane is formed without the sign trick, which AVX-512 lacks for bytes:
 * with u = w + 128 (Q8_0: w xor 0x80; Q4_0: the nibble itself, w + 8),
 * sum(u a) - 128 sum(a) (or 8 sum(a)) is the same exact sum whenever
 * a != -128. The converter gives a in [-127, 127] for every finite input;
 * only a NaN or infinite input gives -128, and the row's output is then
 * garbage either way. sum(a) per lane comes once per activation block. */
/* Where block b of weight row r lies: scale at s + r * srow + b * sblk,
 * quants at q + r * qrow + b * qblk. Q8_0 rows have one stride; in a
 * Q8_0_R8 group (core/dtype.h) row r0 + r of nb blocks is read in place. */
typedef struct { const uint8_t *s, *q; size_t srow, sblk, qrow, qblk; } wlay;
QK_INLINE wlay lay_rows(const uint8_t *w, size_t wrow, size_t blk) { return (wlay){w, w + 2, wrow, blk, wrow, blk}; }
QK_INLINE wlay lay_r8(const uint8_t *group, int64_t nb, int r0) {
    return (wlay){group + 2 * r0, group + (size_t)nb * 16 + (size_t)QB * r0, 2, 16, QB, 8 * QB};
}
/* Q8_0_R8 reads one stream, so it asks for lines closer ahead than the rows'
 * PREFETCH_AHEAD (a prototype of this tile on 2 threads, Zen 4, streaming
 * 570 MB of expert-sized matrices: 2 KiB ahead 24-26 GB/s, 1 and 4 KiB 20-24) */
#define PREFETCH_AHEAD_R8 2048

QK_INLINE void q8_0_like_pairs(float *out, size_t ldo, const wlay L, const uint8_t *a, size_t arow,
                               int64_t C, const int PAIRS, const int RA, const int four_bit, const int r8) {
    __m512 acc[4][4];
    FOR_P FOR_A acc[p][j] = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < C / QB; b++) {
        __m512i a2[4], init[4];
        __m512 ad[4];
        FOR_A {
            const uint8_t *pa = a + (size_t)j * arow + (size_t)b * Q8_0_BYTES;
            ad[j] = _mm512_set1_ps(h2f(pa));
            a2[j] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(pa + 2)));
            const __m512i asum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, a2[j]);
            init[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(asum, four_bit ? 3 : 7));
        }
        if (r8) _mm_prefetch((const char *)L.s + b * L.sblk + PREFETCH_AHEAD_R8 / 16, _MM_HINT_T0);
        FOR_P {
            const uint8_t *s0 = L.s + (size_t)(2 * p) * L.srow + (size_t)b * L.sblk, *s1 = s0 + L.srow;
            const uint8_t *q0 = L.q + (size_t)(2 * p) * L.qrow + (size_t)b * L.qblk, *q1 = q0 + L.qrow;
            if (r8) {
                _mm_prefetch((const char *)q0 + PREFETCH_AHEAD_R8, _MM_HINT_T0);
            } else {
                prefetch_ahead(s0, 1);
                prefetch_ahead(s1, 1);
            }
            __m512i u;
            if (four_bit) {
                const __m256i m15 = _mm256_set1_epi8(15);
                __m128i t0 = _mm_loadu_si128((const __m128i *)q0), t1 = _mm_loadu_si128((const __m128i *)q1);
                __m256i n0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t0, 4), t0), m15);
                __m256i n1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t1, 4), t1), m15);
                u = _mm512_inserti64x4(_mm512_castsi256_si512(n0), n1, 1);
            } else if (r8) { /* the pair's 64 bytes are contiguous */
                u = _mm512_xor_si512(_mm512_loadu_si512((const void *)q0), flip);
            } else {
                u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q0)),
                                       _mm256_loadu_si256((const __m256i *)q1), 1);
                u = _mm512_xor_si512(u, flip);
            }
            const __m512 wd = _mm512_insertf32x8(_mm512_set1_ps(h2f(s0)), _mm256_set1_ps(h2f(s1)), 1);
            FOR_A {
                const __m512i lanes = _mm512_dpbusd_epi32(init[j], u, a2[j]);
                acc[p][j] = _mm512_fmadd_ps(_mm512_mul_ps(wd, ad[j]), _mm512_cvtepi32_ps(lanes), acc[p][j]);
            }
        }
    }
    FOR_P FOR_A {
        out[(size_t)j * ldo + 2 * p] = hsum8(_mm512_castps512_ps256(acc[p][j]));
        out[(size_t)j * ldo + 2 * p + 1] = hsum8(_mm512_extractf32x8_ps(acc[p][j], 1));
    }
}
/* the tile: weight rows 2 pairs at a time (then a single pair) x up to 4
 * activation rows; an odd last weight row by the general tile. 4 pairs for
 * decode ran the kernel faster from cache but decode itself slower (8 weight
 * streams at once; Zen 4, eleventh session: 40.6 / 44.1 against 46.3 / 44.4
 * tokens/s on the 1.72B Q8_0 MoE, interleaved) */
#define PAIRS_CALL(P, R, FOUR_BIT) \
    q8_0_like_pairs(o_, ldo, lay_rows(w_, wrow, (FOUR_BIT) ? Q4_0_BYTES : Q8_0_BYTES), a_, arow, C, P, R, FOUR_BIT, 0)
#define PAIRS_TILE_FN(NAME, GENERAL, FOUR_BIT)                                                     \
    static QK_TARGET void NAME(float *out, size_t ldo, const void *w, size_t wrow, int nw,         \
                               const void *a, size_t arow, int na, int64_t C) {                    \
        int o = 0;                                                                                 \
        while (nw - o >= 2) {                                                                      \
            const int pairs = nw - o >= 4 ? 2 : 1;                                                 \
            const uint8_t *w_ = (const uint8_t *)w + (size_t)o * wrow;                             \
            for (int n = 0; n < na;) {                                                             \
                const int ra = na - n < 4 ? na - n : 4;                                            \
                float *o_ = out + (size_t)n * ldo + o;                                             \
                const uint8_t *a_ = (const uint8_t *)a + (size_t)n * arow;                         \
                switch (pairs * 8 + ra) {                                                          \
                        case 17: PAIRS_CALL(2, 1, FOUR_BIT); break;                                        \
                case 18: PAIRS_CALL(2, 2, FOUR_BIT); break;                                        \
                case 19: PAIRS_CALL(2, 3, FOUR_BIT); break;                                        \
                case 20: PAIRS_CALL(2, 4, FOUR_BIT); break;                                        \
                case 9: PAIRS_CALL(1, 1, FOUR_BIT); break;                                         \
                case 10: PAIRS_CALL(1, 2, FOUR_BIT); break;                                        \
                case 11: PAIRS_CALL(1, 3, FOUR_BIT); break;                                        \
                case 12: PAIRS_CALL(1, 4, FOUR_BIT); break;                                        \
                }                                                                                  \
                n += ra;                                                                           \
            }                                                                                      \
            o += 2 * pairs;                                                                        \
        }                                                                                          \
        if (o < nw) GENERAL(out + o, ldo, (const uint8_t *)w + (size_t)o * wrow, wrow, nw - o, a, arow, na, C); \
    }
PAIRS_TILE_FN(q8_0_pairs_tile, q8_0_tile, 0)
PAIRS_TILE_FN(q4_0_pairs_tile, q4_0_tile, 1)

/* Q8_0_R8 (nw a multiple of 8; w the first row's group): each group's 4
 * pairs in one pass for up to 2 activation rows (one stream), 2 pairs at a
 * time for 3 or 4 (the accumulators would not fit the registers). The same
 * lanes as the rows' tile, so the same bits. */
#define R8_CALL(P, R, R0) q8_0_like_pairs(o_ + (R0), ldo, lay_r8(g_, nb, R0), a_, arow, C, P, R, 0, 1)
static QK_TARGET void q8_0_r8_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                   const void *a, size_t arow, int na, int64_t C) {
    const int64_t nb = C / QB;
    for (int o = 0; o + 8 <= nw; o += 8) {
        const uint8_t *g_ = (const uint8_t *)w + (size_t)o * wrow;
        for (int n = 0; n < na;) {
            const int ra = na - n < 4 ? na - n : 4;
            float *o_ = out + (size_t)n * ldo + o;
            const uint8_t *a_ = (const uint8_t *)a + (size_t)n * arow;
            switch (ra) {
            case 1: R8_CALL(4, 1, 0); break;
            case 2: R8_CALL(4, 2, 0); break;
            case 3: R8_CALL(2, 3, 0); R8_CALL(2, 3, 4); break;
            default: R8_CALL(2, 4, 0); R8_CALL(2, 4, 4); break;
            }
            n += ra;
        }
    }
}

/* ---- Q8_0 prefill without AMX ---------------------------------------------------
 * qmatmul_q8_0_blocked_ref's arithmetic, as the AMX tile computes it (exact
 * int32 dot per block, then acc = fma(float(dot), d_w * d_a, acc)), on the
 * AMX path's packed activations (qk_q8_0_blocked_pack: per token group and
 * block, row k holds bytes 4k .. 4k+3 of every token), so both paths give
 * the same bits. One 512-bit register holds 4 bytes of 16 tokens; VPDPBUSD
 * multiplies them, made unsigned (a + 128 = a xor 0x80, exact for every a),
 * by 4 weight bytes broadcast from the row, and the 128 sum(w) this adds is
 * taken out first. An accumulator holds one weight row's 16 tokens, so a
 * block's float work is one conversion and one fused add per 16 outputs
 * instead of per 8-lane output as in the vec_dot order. */
QK_INLINE void blocked_rows(float *out, size_t ldo, const wlay L, const uint8_t *grp,
                            const uint8_t *scales, int64_t nb, int m, const int R, const int r8) {
    const __mmask64 qmask = m == 16 ? ~0ull : (1ull << (4 * m)) - 1;
    const __mmask16 tmask = (__mmask16)((1u << m) - 1);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m256i ones = _mm256_set1_epi8(1);
    __m512 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = grp + (size_t)b * QB * m;
        __m512i au[8];
        for (int k = 0; k < 8; k++) au[k] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(qmask, q + (size_t)k * 4 * m), flip);
        const __m512 da = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tmask, scales + 2 * (size_t)b * m));
        if (r8) _mm_prefetch((const char *)L.s + b * L.sblk + PREFETCH_AHEAD / 16, _MM_HINT_T0);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint8_t *ps = L.s + (size_t)r * L.srow + (size_t)b * L.sblk;
            const uint8_t *pq = L.q + (size_t)r * L.qrow + (size_t)b * L.qblk;
            if (!r8) prefetch_ahead(ps, 1);
            else if (r % 2 == 0) prefetch_ahead(pq, 1); /* a line holds two rows' quants */
            /* sum(w) of the block in every lane, times -128 */
            const __m256i s8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, _mm256_loadu_si256((const __m256i *)pq));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            __m512i dot = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_broadcastd_epi32(s4), 7));
            for (int k = 0; k < 8; k++) {
                int32_t wk;
                memcpy(&wk, pq + 4 * k, 4);
                dot = _mm512_dpbusd_epi32(dot, au[k], _mm512_set1_epi32(wk));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(h2f(ps)), da), acc[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float v[16];
        _mm512_storeu_ps(v, acc[r]);
        for (int t = 0; t < m; t++) out[(size_t)t * ldo + r] = v[t];
    }
}

/* rows of w (Q8_0, or a whole number of Q8_0_R8 groups when r8) against the
 * pack's token groups, 8 weight rows at a time */
QK_INLINE void blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                            const void *pack, int N, int64_t C, const int r8) {
    const int64_t nb = C / QB;
    const uint8_t *wb = w;
    for (int g = 0; 16 * g < N; g++) {
        const int m = N - 16 * g < 16 ? N - 16 * g : 16;
        const uint8_t *grp = (const uint8_t *)pack + (size_t)16 * g * nb * Q8_0_BYTES;
        const uint8_t *scales = grp + (size_t)nb * QB * m;
        float *o_ = out + (size_t)16 * g * ldo;
        for (int o = 0; o < nw;) {
            const int R = nw - o < 8 ? nw - o : 8;
            const uint8_t *w_ = wb + (size_t)o * wrow;
            const wlay L = r8 ? lay_r8(w_, nb, 0) : lay_rows(w_, wrow, Q8_0_BYTES);
#define BLOCKED_CASE(n) case n: blocked_rows(o_ + o, ldo, L, grp, scales, nb, m, n, r8); break
            switch (r8 ? 8 : R) {
            BLOCKED_CASE(8); BLOCKED_CASE(7); BLOCKED_CASE(6); BLOCKED_CASE(5);
            BLOCKED_CASE(4); BLOCKED_CASE(3); BLOCKED_CASE(2); default: blocked_rows(o_ + o, ldo, L, grp, scales, nb, m, 1, r8); break;
            }
#undef BLOCKED_CASE
            o += R;
        }
    }
}
QK_TARGET void qk_avx512_q8_0_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                           const void *pack, int N, int64_t C) {
    blocked_tile(out, ldo, w, wrow, nw, pack, N, C, 0);
}
QK_TARGET void qk_avx512_q8_0_r8_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                              const void *pack, int N, int64_t C) {
    blocked_tile(out, ldo, w, wrow, nw, pack, N, C, 1);
}

/* ---- Q4_K, Q5_K, Q6_K against Q8_K --------------------------------------------
 * 64 elements per 512-bit step: unsigned weight quants times activation
 * bytes (VPMADDUBSW: no saturation here, |pair| <= 2 * 63 * 128), times the
 * sub-block scale as int16 (VPMADDWD), into 16 int32 lanes; lane m of each
 * 256-bit half covers elements 4m .. 4m+3 of a 32-element sub-block, so
 * lanes m and m + 8 both belong to the portable lane m: folding the halves
 * gives exactly its 8 integer lanes, whichever sub-blocks a step pairs. */

QK_INLINE __m256i fold16(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}
/* per activation block: pairs of block sums (8 int16, bs[2k] + bs[2k+1]) */
QK_INLINE __m128i bsum_pairs(const dtype_q8_K_block *y) {
    __m256i bs = _mm256_loadu_si256((const __m256i *)y->bsums);
    return _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
}

/* The unpacked weight super-block: 4 steps of 64 quants (unsigned), their
 * scales, and for Q4_K / Q5_K the 8 mins as int16. */
typedef struct {
    __m512i q[4], sc[4];
    __m128i mins;
    float d, dmin;
} kblock;

/* dtype_k_scales on 32-bit words: the 12 scale bytes as u0 u1 u2, scales 0-3
 * = u0 & 63 per byte, mins 0-3 = u1 & 63, scales 4-7 = low nibbles of u2 with
 * u0's top two bits above, mins 4-7 = high nibbles of u2 with u1's */
QK_INLINE void k_scales_words(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, top = 0x30303030u;
    *sc = (uint64_t)(u0 & m6) | (uint64_t)((u2 & m4) | ((u0 >> 2) & top)) << 32;
    *mn = (uint64_t)(u1 & m6) | (uint64_t)(((u2 >> 4) & m4) | ((u1 >> 2) & top)) << 32;
}

/* Register r of the super-block holds two 32-element sub-blocks, one per
 * 256-bit half: (0, 2), (1, 3), (4, 6), (5, 7), so that one 512-bit load of
 * the quants gives two registers (low nibbles, high nibbles). Lane m of
 * each half still covers elements 4m .. 4m+3 of its sub-block, which is
 * all fold16 needs. The activations are loaded in the same pairs (k_acts). */
static const uint8_t k_pair[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};

QK_INLINE void unpack_k_affine(kblock *k, const uint8_t *p, int five_bits) {
    uint64_t scw, mnw;
    k_scales_words(p + 4, &scw, &mnw);
    k->d = h2f(p);
    k->dmin = h2f(p + 2);
    k->mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mnw));
    const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)scw)));
    const __mmask32 high = 0xffff0000u;
    const uint8_t *qs = p + (five_bits ? 48 : 16);
    const __m512i m15 = _mm512_set1_epi8(15), one = _mm512_set1_epi8(1);
    const __m512i hb = five_bits ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(p + 16)))
                                 : _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
        const __m512i raw = _mm512_loadu_si512((const void *)(qs + 64 * h));
        __m512i q[2] = {_mm512_and_si512(raw, m15), _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15)};
        for (int r = 0; r < 2; r++) {
            /* each int16 lane: the number of its half's sub-block */
            const __m512i sub = _mm512_mask_blend_epi16(high, _mm512_set1_epi16((short)k_pair[2 * h + r][0]),
                                                        _mm512_set1_epi16((short)k_pair[2 * h + r][1]));
            if (five_bits) /* bit s of qh[l] tops element l of sub-block s */
                q[r] = _mm512_or_si512(q[r], _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sub), one), 4));
            k->q[2 * h + r] = q[r];
            k->sc[2 * h + r] = _mm512_permutexvar_epi16(sub, sc16);
        }
    }
}

/* one activation row's super-block in k_pair's sub-block order */
QK_INLINE void k_acts(__m512i av[4], const int8_t *qa) {
    for (int r = 0; r < 4; r++)
        av[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(qa + 32 * k_pair[r][0]))),
                                   _mm256_loadu_si256((const __m256i *)(qa + 32 * k_pair[r][1])), 1);
}

QK_INLINE __m256i k_lanes(const kblock *k, const __m512i av[4]) {
    __m512i s = _mm512_setzero_si512();
    for (int r = 0; r < 4; r++) s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(k->q[r], av[r]), k->sc[r]));
    return fold16(s);
}

/* Q4_K: 4 min lanes (fma per lane, (0+2) + (1+3) at the end); Q5_K: one
 * scalar fma with the whole integer min sum */
/* weight row i's block b at w + i * wrow + b * wblk (rows: wblk the block's
 * bytes; a Q4_K_R4 group: wrow one block, wblk four) */
QK_INLINE void k_affine_body(float *out, size_t ldo, const uint8_t *w, size_t wrow, size_t wblk,
                             const uint8_t *a, size_t arow, int64_t C, const int RW, const int RA,
                             const int five_bits) {
    __m256 acc[4][4];
    __m128 accm[4][4];
    float summs[4][4];
    FOR_W FOR_A acc[i][j] = _mm256_setzero_ps(), accm[i][j] = _mm_setzero_ps(), summs[i][j] = 0.0f;
    const size_t wb = five_bits ? Q5_K_BYTES : Q4_K_BYTES;
    for (int64_t b = 0; b < C / QKB; b++) {
        kblock k[4];
        FOR_W {
            prefetch_ahead(w + (size_t)i * wrow + (size_t)b * wblk, wb);
            unpack_k_affine(&k[i], w + (size_t)i * wrow + (size_t)b * wblk, five_bits);
        }
        FOR_A {
            const dtype_q8_K_block *y =
                (const dtype_q8_K_block *)(a + (size_t)j * arow) + b;
            __m128i pairs = bsum_pairs(y);
            __m512i av[4];
            k_acts(av, y->qs);
            FOR_W {
                __m256i lanes = k_lanes(&k[i], av);
                __m128i mp = _mm_madd_epi16(k[i].mins, pairs);
                float d = y->d * k[i].d, dmin = -y->d * k[i].dmin;
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc[i][j]);
                if (five_bits) {
                    __m128i t = _mm_add_epi32(mp, _mm_unpackhi_epi64(mp, mp));
                    int tot = _mm_cvtsi128_si32(t) + _mm_extract_epi32(t, 1);
                    summs[i][j] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(dmin), _mm_set_ss((float)tot),
                                                             _mm_set_ss(summs[i][j])));
                } else {
                    accm[i][j] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mp), accm[i][j]);
                }
            }
        }
    }
    FOR_W FOR_A {
        float mins = summs[i][j];
        if (!five_bits) {
            __m128 m = _mm_add_ps(accm[i][j], _mm_movehl_ps(accm[i][j], accm[i][j]));
            mins = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
        }
        out[(size_t)j * ldo + i] = hsum8(acc[i][j]) + mins;
    }
}
#define Q4_K_BODY(o, ldo, w, wr, a, ar, C, RW, RA) k_affine_body(o, ldo, w, wr, Q4_K_BYTES, a, ar, C, RW, RA, 0)
#define Q5_K_BODY(o, ldo, w, wr, a, ar, C, RW, RA) k_affine_body(o, ldo, w, wr, Q5_K_BYTES, a, ar, C, RW, RA, 1)
TILE_FN(q4_K_tile, Q4_K_BODY, 2)
TILE_FN(q5_K_tile, Q5_K_BODY, 2)

/* The _R4 layouts (nw a multiple of 4; w the first row's group): a group's
 * 4 rows in one pass for one activation row (one stream), 2 at a time for
 * more, as the rows' tiles take them; the same lanes, so the same bits.
 * BODY4(RW, RA, R0) runs rows R0 .. R0 + RW - 1 of the group. */
#define R4_TILE_FN(NAME, BODY4)                                                                    \
    static QK_TARGET void NAME(float *out, size_t ldo, const void *w, size_t wrow, int nw,         \
                               const void *a, size_t arow, int na, int64_t C) {                    \
        for (int o = 0; o + 4 <= nw; o += 4) {                                                     \
            const uint8_t *g_ = (const uint8_t *)w + (size_t)o * wrow;                             \
            for (int n = 0; n < na;) {                                                             \
                const int ra = na - n < 4 ? na - n : 4;                                            \
                float *o_ = out + (size_t)n * ldo + o;                                             \
                const uint8_t *a_ = (const uint8_t *)a + (size_t)n * arow;                         \
                switch (na == 1 ? 0 : ra) {                                                        \
                case 0: BODY4(4, 1, 0); break;                                                     \
                case 1: BODY4(2, 1, 0); BODY4(2, 1, 2); break;                                     \
                case 2: BODY4(2, 2, 0); BODY4(2, 2, 2); break;                                     \
                case 3: BODY4(2, 3, 0); BODY4(2, 3, 2); break;                                     \
                default: BODY4(2, 4, 0); BODY4(2, 4, 2); break;                                    \
                }                                                                                  \
                n += ra;                                                                           \
            }                                                                                      \
        }                                                                                          \
    }
#define K4_BODY4(RW, RA, R0) k_affine_body(o_ + (R0), ldo, g_ + (size_t)(R0) * Q4_K_BYTES, Q4_K_BYTES, \
                                           4 * Q4_K_BYTES, a_, arow, C, RW, RA, 0)
#define K5_BODY4(RW, RA, R0) k_affine_body(o_ + (R0), ldo, g_ + (size_t)(R0) * Q5_K_BYTES, Q5_K_BYTES, \
                                           4 * Q5_K_BYTES, a_, arow, C, RW, RA, 1)
R4_TILE_FN(q4_K_r4_tile, K4_BODY4)
R4_TILE_FN(q5_K_r4_tile, K5_BODY4)

/* Q6_K: quants q + 32 (0..63); step p covers elements 64p .. 64p+63, int16
 * lane t there has scale sc[4p + t / 8]; the offset 32 comes out per lane l
 * as 32 (sc[2l] bs[2l] + sc[2l+1] bs[2l+1]). */
typedef struct {
    __m512i q[4], sc[4];
    __m256i sc16;
    float d;
} q6block;

QK_INLINE void unpack_q6_K(q6block *k, const uint8_t *p) {
    const uint8_t *ql = p, *qh = p + 128;
    k->d = h2f(p + 208);
    k->sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
    __m512i s512 = _mm512_castsi256_si512(k->sc16);
    const __m512i m15 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        __m512i l = _mm512_loadu_si512((const void *)(ql + 64 * h));
        __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
        /* top bits: bits 0-1 / 2-3 for the low-nibble pair, 4-5 / 6-7 for the high one */
        __m512i h01 = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
        __m512i h23 = _mm512_srli_epi16(h01, 4);
        h01 = _mm512_slli_epi16(_mm512_and_si512(h01, m3), 4);
        h23 = _mm512_slli_epi16(_mm512_and_si512(h23, m3), 4);
        k->q[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m15), h01);
        k->q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m15), h23);
    }
    /* int16 lane t of step s takes scale 4s + t / 8 */
    static const int16_t base[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                     2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
    const __m512i idx = _mm512_loadu_si512((const void *)base);
    for (int s = 0; s < 4; s++)
        k->sc[s] = _mm512_permutexvar_epi16(_mm512_add_epi16(idx, _mm512_set1_epi16((short)(4 * s))), s512);
}

QK_INLINE void q6_K_body(float *out, size_t ldo, const uint8_t *w, size_t wrow, size_t wblk, const uint8_t *a,
                         size_t arow, int64_t C, const int RW, const int RA) {
    __m256 acc[4][4];
    FOR_W FOR_A acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < C / QKB; b++) {
        q6block k[4];
        FOR_W {
            prefetch_ahead(w + (size_t)i * wrow + (size_t)b * wblk, Q6_K_BYTES);
            unpack_q6_K(&k[i], w + (size_t)i * wrow + (size_t)b * wblk);
        }
        FOR_A {
            const dtype_q8_K_block *y = (const dtype_q8_K_block *)(a + (size_t)j * arow) + b;
            __m256i bs = _mm256_loadu_si256((const __m256i *)y->bsums);
            FOR_W {
                __m512i s = _mm512_setzero_si512();
                for (int c = 0; c < 4; c++) {
                    __m512i av = _mm512_loadu_si512((const void *)(y->qs + 64 * c));
                    s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(k[i].q[c], av), k[i].sc[c]));
                }
                __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(bs, k[i].sc16), 5);
                __m256i lanes = _mm256_sub_epi32(fold16(s), off);
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(y->d * k[i].d), _mm256_cvtepi32_ps(lanes), acc[i][j]);
            }
        }
    }
    FOR_W FOR_A out[(size_t)j * ldo + i] = hsum8(acc[i][j]);
}
#define Q6_K_BODY(o, ldo, w, wr, a, ar, C, RW, RA) q6_K_body(o, ldo, w, wr, Q6_K_BYTES, a, ar, C, RW, RA)
TILE_FN(q6_K_tile, Q6_K_BODY, 2)
#define K6_BODY4(RW, RA, R0) q6_K_body(o_ + (R0), ldo, g_ + (size_t)(R0) * Q6_K_BYTES, Q6_K_BYTES, 4 * Q6_K_BYTES, \
                                       a_, arow, C, RW, RA)
R4_TILE_FN(q6_K_r4_tile, K6_BODY4)

/* ---- F16 and BF16 ---------------------------------------------------------------
 * f16: per 64 elements 4 vectors of 16 fused products, then (v0+v2) + (v1+v3)
 * reduced; bf16: per 64 elements two VDPBF16PS vectors, each reduced and
 * added in double. The n % 64 tail: float products summed in double. */
QK_INLINE void f16_body(float *out, size_t ldo, const uint8_t *w, size_t wrow, const uint8_t *a,
                        size_t arow, int64_t C, const int RW, const int RA) {
    __m512 v[4][4][4];
    FOR_W FOR_A for (int s = 0; s < 4; s++) v[i][j][s] = _mm512_setzero_ps();
    int64_t np = C & ~(int64_t)63;
    for (int64_t e = 0; e < np; e += 64)
        for (int s = 0; s < 4; s++) {
            __m512 wv[4];
            FOR_W wv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + (size_t)i * wrow + 2 * (e + 16 * s))));
            FOR_A {
                __m512 av = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a + (size_t)j * arow + 2 * (e + 16 * s))));
                FOR_W v[i][j][s] = _mm512_fmadd_ps(wv[i], av, v[i][j][s]);
            }
        }
    FOR_W FOR_A {
        __m512 t = _mm512_add_ps(_mm512_add_ps(v[i][j][0], v[i][j][2]), _mm512_add_ps(v[i][j][1], v[i][j][3]));
        double sum = (double)hsum16(t);
        const uint8_t *wr = w + (size_t)i * wrow, *ar = a + (size_t)j * arow;
        for (int64_t e = np; e < C; e++) sum += (double)(h2f(wr + 2 * e) * h2f(ar + 2 * e));
        out[(size_t)j * ldo + i] = (float)sum;
    }
}
#define F16_BODY(o, ldo, w, wr, a, ar, C, RW, RA) f16_body(o, ldo, w, wr, a, ar, C, RW, RA)
TILE_FN(f16_tile, F16_BODY, 1)

QK_INLINE float bf2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
QK_INLINE void bf16_body(float *out, size_t ldo, const uint8_t *w, size_t wrow, const uint8_t *a,
                         size_t arow, int64_t C, const int RW, const int RA) {
    __m512 c[4][4][2];
    FOR_W FOR_A c[i][j][0] = c[i][j][1] = _mm512_setzero_ps();
    int64_t np = C & ~(int64_t)63;
    for (int64_t e = 0; e < np; e += 64)
        for (int s = 0; s < 2; s++) {
            __m512bh wv[4];
            FOR_W wv[i] = (__m512bh)_mm512_loadu_si512((const void *)(w + (size_t)i * wrow + 2 * (e + 32 * s)));
            FOR_A {
                __m512bh av = (__m512bh)_mm512_loadu_si512((const void *)(a + (size_t)j * arow + 2 * (e + 32 * s)));
                FOR_W c[i][j][s] = _mm512_dpbf16_ps(c[i][j][s], wv[i], av);
            }
        }
    FOR_W FOR_A {
        double sum = 0.0;
        sum += (double)hsum16(c[i][j][0]);
        sum += (double)hsum16(c[i][j][1]);
        const uint8_t *wr = w + (size_t)i * wrow, *ar = a + (size_t)j * arow;
        for (int64_t e = np; e < C; e++) sum += (double)(bf2f(wr + 2 * e) * bf2f(ar + 2 * e));
        out[(size_t)j * ldo + i] = (float)sum;
    }
}
#define BF16_BODY(o, ldo, w, wr, a, ar, C, RW, RA) bf16_body(o, ldo, w, wr, a, ar, C, RW, RA)
TILE_FN(bf16_tile, BF16_BODY, 1)

/* ---- activation converters --------------------------------------------------- */

/* Q8_0 as dtype.c's q8_0_quantize_act: the 8-lane MAXPS tree for amax (which
 * fixes where a NaN wins), fp16 d = amax / 127, q = saturate(nearest(x * 127 / amax)). */
static QK_TARGET void q8_0_quantize(void *dst, const float *x, int64_t n) {
    uint8_t *y = dst;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QB; i++, x += QB, y += Q8_0_BYTES) {
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
        for (int r = 1; r < 4; r++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * r)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        uint16_t h = _cvtss_sh(amax / 127.0f, 0);
        memcpy(y, &h, 2);
        __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < 2; k++) {
            __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * k), id),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(y + 2 + 16 * k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
        }
    }
}

/* Q8_K as dtype.c's q8_K_quantize_act: max = the first element of largest
 * magnitude (NaN never wins), iscale = -127 / max, q = min(127, nearest even
 * of iscale * x by the 1.5 * 2^23 trick), bsums, d = 1 / iscale. */
static QK_TARGET void q8_K_quantize(void *dst, const float *x, int64_t n) {
    dtype_q8_K_block *y = dst;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QKB; i++, x += QKB) {
        __m512 m = _mm512_setzero_ps();
        for (int k = 0; k < QKB / 16; k++) /* MAXPS returns its second operand for a NaN */
            m = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + 16 * k)), m);
        float amax = _mm512_reduce_max_ps(m);
        memset(&y[i], 0, sizeof y[i]);
        if (amax == 0.0f) continue;
        int first = 0;
        for (int k = 0; k < QKB / 16; k++) {
            __mmask16 eq = _mm512_cmpeq_ps_mask(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + 16 * k)),
                                                _mm512_set1_ps(amax));
            if (eq) { first = 16 * k + __builtin_ctz(eq); break; }
        }
        float iscale = -127.0f / x[first];
        const __m512 vs = _mm512_set1_ps(iscale), magic = _mm512_set1_ps(12582912.0f);
        for (int k = 0; k < QKB / 16; k++) {
            __m512 s = _mm512_add_ps(_mm512_mul_ps(vs, _mm512_loadu_ps(x + 16 * k)), magic);
            __m512i v = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(0x007fffff)),
                                         _mm512_set1_epi32(0x00400000));
            v = _mm512_min_epi32(v, _mm512_set1_epi32(127));
            __m128i q = _mm512_cvtepi32_epi8(v);
            _mm_storeu_si128((__m128i *)(y[i].qs + 16 * k), q);
            y[i].bsums[k] = (int16_t)_mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q));
        }
        y[i].d = 1.0f / iscale;
    }
}

int qk_avx512_supported(void) {
    const moe_cpu_features *c = moe_cpu();
    return c->avx512f && c->avx512bw && c->avx512vl && c->avx512_vnni && c->avx512_bf16 && c->fma;
}

qmm_tile_fn qk_avx512_tile(int wtype) {
    switch (wtype) {
    case DT_Q8_0: return q8_0_pairs_tile;
    case DT_Q8_0_R8: return q8_0_r8_tile;
    case DT_Q4_K_R4: return q4_K_r4_tile;
    case DT_Q5_K_R4: return q5_K_r4_tile;
    case DT_Q6_K_R4: return q6_K_r4_tile;
    case DT_Q4_0: return q4_0_pairs_tile;
    case DT_Q4_K: return q4_K_tile;
    case DT_Q5_K: return q5_K_tile;
    case DT_Q6_K: return q6_K_tile;
    case DT_F16: return f16_tile;
    case DT_BF16: return bf16_tile;
    default: return NULL;
    }
}

qmm_quant_fn qk_avx512_quantize(int dot_type) {
    return dot_type == DT_Q8_0 ? q8_0_quantize : dot_type == DT_Q8_K ? q8_K_quantize : NULL;
}

#else /* not x86-64 with GCC-style intrinsics: no fast tiles */
int qk_avx512_supported(void) { return 0; }
qmm_tile_fn qk_avx512_tile(int wtype) { return NULL; }
qmm_quant_fn qk_avx512_quantize(int dot_type) { return NULL; }
void qk_avx512_q8_0_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                 const void *pack, int N, int64_t C) {}
void qk_avx512_q8_0_r8_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                    const void *pack, int N, int64_t C) {}
#endif
