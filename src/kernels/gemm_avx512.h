/* gemm_avx512.h: what the AVX-512 GEMM backends (gemm_avx512.c,
 * gemm_avx512_bf16.c, gemm_amx_bf16.c) share: the register tile (MR rows x NR
 * columns held in 16 zmm accumulators), its masks, prologue and store, the
 * in-register 16x16 transpose, the bf16 pair conversions, the packing of B
 * into bf16 pair panels and the task grid helper. Private to those files. */
#ifndef MOE_GEMM_AVX512_H
#define MOE_GEMM_AVX512_H
#include "kernels/gemm.h"
#include "core/core.h"

#include <immintrin.h>

#define MR 8    /* rows of A per micro-kernel (6, 12, 14 measured no better) */
#define NR 32   /* columns of B per micro-kernel (2 zmm)        */
#define MCB 128 /* rows per task block: A slice MCB*KC floats = 128 KB in L2  */
#define SLAB_FLOATS (4u << 20) /* packed-B scratch bound: 16 MB */

/* the tile's rows, for macros that expand once per accumulator row */
#define UK_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

/* mask of the first n of 16 lanes (n <= 0: none, n >= 16: all); lanes(n - 16)
 * is the mask of the second 16-lane half of n values */
static inline __mmask16 lanes(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Shared by the fp32 and bf16 micro-kernels: the masks of the tile's two
 * 16-column halves, its initial values (the bias row or 0), and the
 * accumulator registers c<r>0, c<r>1 of each row, loaded from C when
 * accumulating and stored back at the end. */
#define TILE_PROLOGUE                                                              \
    __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);                                 \
    __m512 i0 = _mm512_setzero_ps(), i1 = _mm512_setzero_ps();                     \
    if (!load_c && bias) {                                                         \
        i0 = _mm512_maskz_loadu_ps(m0, bias);                                      \
        i1 = _mm512_maskz_loadu_ps(m1, bias + 16);                                 \
    }
#define TILE_DECL(r)                                                               \
    __m512 c##r##0 = i0, c##r##1 = i1;                                             \
    if (load_c && r < mr) {                                                        \
        c##r##0 = _mm512_maskz_loadu_ps(m0, c + (ptrdiff_t)r * ldc);               \
        c##r##1 = _mm512_maskz_loadu_ps(m1, c + (ptrdiff_t)r * ldc + 16);          \
    }
#define TILE_STORE(r)                                                              \
    if (r < mr) {                                                                  \
        _mm512_mask_storeu_ps(c + (ptrdiff_t)r * ldc, m0, c##r##0);                \
        _mm512_mask_storeu_ps(c + (ptrdiff_t)r * ldc + 16, m1, c##r##1);           \
    }

/* In-register 16x16 transpose: o[j][i] = r[i][j]. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int m = 0; m < 8; m++) {
        t[2 * m] = _mm512_unpacklo_ps(r[2 * m], r[2 * m + 1]);
        t[2 * m + 1] = _mm512_unpackhi_ps(r[2 * m], r[2 * m + 1]);
    }
    for (int g = 0; g < 4; g++) { /* u[4g+c] lane L = column 4L+c of rows 4g..4g+3 */
        u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        __m512 xlo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
        __m512 xhi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        __m512 ylo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        __m512 yhi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_f32x4(xlo, ylo, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(xlo, ylo, 0xDD);
        r[8 + c] = _mm512_shuffle_f32x4(xhi, yhi, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(xhi, yhi, 0xDD);
    }
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* 16 floats -> 16 bf16 (round to nearest even) in a ymm */
BF16_TARGET static inline __m256i cvt16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* x[j], y[j] as bf16 pairs (x0, y0, x1, y1, ... x15, y15): words j of the
 * low half are pairs 0..7, of the high half pairs 8..15 */
BF16_TARGET static inline __m512i pairs_interleave(__m512 x, __m512 y) {
    const __m512i ilv = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    return _mm512_permutexvar_epi16(
        ilv, _mm512_inserti64x4(_mm512_castsi256_si512(cvt16(x)), cvt16(y), 1));
}

/* Packs panel p of B (columns p*NR.. p*NR+NR-1, zero past Nc) as bf16 pairs
 * along k: the 32-bit word (kp, j) = (B(2kp, n), B(2kp+1, n)), n = p*NR + j,
 * at dst[(kp*NR + j)*2], for kp < kp_pad (>= (K+1)/2; pairs past K are zero,
 * an odd K's last pair gets a zero second element). This is also the VNNI
 * layout of an AMX B tile: 16 rows kp of 16 words, row stride NR words. */
void gemm_pack_b_bf16(uint16_t *dst, const gemm_desc *g, int p, int kp_pad);

/* Splits nps panels into groups of *ppg so that nrb row blocks x groups make
 * about `want` tasks; returns the number of groups. */
static inline int panel_groups(int want, int nrb, int nps, int *ppg) {
    int groups = MOE_MAX(1, MOE_MIN((want + nrb - 1) / nrb, nps));
    *ppg = (nps + groups - 1) / groups;
    return (nps + *ppg - 1) / *ppg;
}


/* bytes rounded up to whole cache lines, for carving one workspace */
static inline size_t ws_round(size_t bytes) { return (bytes + 63) & ~(size_t)63; }
#endif
