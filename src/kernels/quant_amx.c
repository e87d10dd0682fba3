/* kernels/quant_amx: AMX-INT8 tiles of qmatmul for Q8_0 weights against Q8_0
 * activations, used for matmuls of QMM_AMX_MIN_ROWS rows or more (prefill).
 *
 * Arithmetic (the reference twin is qmatmul_q8_0_blocked_ref): per 32-element
 * block the int32 dot of weight and activation quants, exact (TDPBSSD); then
 * acc = fma(float(dot), d_w * d_a, acc) over the blocks in order, one fp32
 * accumulator per output. That is not the order of llama.cpp's x86 vec_dot
 * (8 lanes, summed at the end), which the AVX-512 tiles keep for decode.
 *
 * Layout. A tile = 16 weight rows x one block: read straight from the GGUF
 * rows (32 quant bytes each, the row stride apart), so weights need no
 * repacking. B = the block's activation quants for up to 16 tokens in the
 * VNNI layout TDPBSSD wants (row k holds bytes 4k..4k+3 of every token):
 * the activations are quantised straight into that layout, once per matmul
 * (qk_q8_0_blocked_pack), in the bytes the row layout would take:
 *   token group g (rows 16g .. 16g+m-1, m = min(16, N - 16g)) starts at
 *   byte 16g * nb * 34 and holds quants [nb][8][4m], then scales [nb][m]
 *   (fp16, as in the Q8_0 block).
 * C = 16 weight rows x m tokens of int32, stored and scaled in AVX-512.
 *
 * qk_amx_q8_0_r8_tile does the same on the repacked DT_Q8_0_R8 layout
 * (below).
 *
 * Built always (functions carry their own target), called only where the
 * CPU has AMX-INT8 and the kernel granted the tiles (moe_amx_enable). */
#include "kernels/qmatmul.h"
#include "core/core.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>

#define AMX_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

enum { QB = 32, Q8_0_BYTES = 34, TM = 16 };

/* tiles 0, 1: weights (nw rows x 32 bytes) of blocks b, b + 1;
 * 2, 3: activations (8 rows x 4m bytes); 4, 5: int32 results (nw x m) */
static AMX_TARGET void load_config(int nw, int m) {
    moe_amx_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.rows[t] = (uint8_t)nw, c.colsb[t] = QB;
        c.rows[2 + t] = QB / 4, c.colsb[2 + t] = (uint16_t)(4 * m);
        c.rows[4 + t] = (uint8_t)nw, c.colsb[4 + t] = (uint16_t)(4 * m);
    }
    moe_amx_load_config(&c);
}

void qk_q8_0_blocked_pack(void *dst, const float *in, int n, int N, int64_t C) {
    qmm_quant_fn quant = qk_avx512_quantize(DT_Q8_0);
    const int64_t nb = C / QB;
    const int g = n / TM, j = n % TM, m = N - TM * g < TM ? N - TM * g : TM;
    uint8_t *grp = (uint8_t *)dst + (size_t)TM * g * nb * Q8_0_BYTES, blk[Q8_0_BYTES];
    uint8_t *scales = grp + (size_t)nb * QB * m;
    for (int64_t b = 0; b < nb; b++) {
        quant(blk, in + b * QB, QB);
        uint8_t *q = grp + (size_t)b * QB * m + 4 * j;
        for (int k = 0; k < QB / 4; k++) memcpy(q + (size_t)k * 4 * m, blk + 2 + 4 * k, 4);
        memcpy(scales + 2 * ((size_t)b * m + j), blk, 2);
    }
}

/* acc[i] += float(int32 row i of c) * (d[i] * da), 8 rows */
static inline AMX_TARGET void scale8(__m512 *acc, int32_t (*c)[TM], const float *d, __m512 da) {
    _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)c[i])), _mm512_mul_ps(_mm512_set1_ps(d[i]), da), acc[i]);
}

/* the same over a whole 16-row tile */
#define SCALE_ROWS(buf, dwb, da) (scale8(acc, (buf), (dwb), (da)), scale8(acc + 8, (buf) + 8, (dwb) + 8, (da)))

AMX_TARGET void qk_amx_q8_0_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                 const void *pack, int N, int64_t C) {
    const int64_t nb = C / QB;
    const uint8_t *wb = w;
    float dw[QMM_AMX_MAX_BLOCKS][TM];
    /* row by row, along each row: the first touch of the weights, in the
     * order the prefetcher follows (block-major, 16 rows apart, stalled on
     * every line: measured a quarter of the kernel's time) */
    for (int i = 0; i < TM; i++)
        for (int64_t b = 0; b < nb; b++) {
            uint16_t h = 0;
            if (i < nw) memcpy(&h, wb + (size_t)i * wrow + (size_t)b * Q8_0_BYTES, 2);
            dw[b][i] = _cvtsh_ss(h);
        }
    /* PREFETCH_ROWS: the weights come from memory once per prefill. While
     * this tile runs, its first token group asks for the next 16 rows (the
     * next task's, on this thread for an expert's matmul; past the matrix a
     * prefetch is only a hint and cannot fault) */
    const size_t pf_off = (size_t)TM * wrow, pf_lines = (TM * wrow + 63) / 64;
    int32_t buf[2][TM][TM] __attribute__((aligned(64)));
    memset(buf, 0, sizeof buf); /* rows past nw stay 0: their scale is 0 too */
    float res[TM][TM] __attribute__((aligned(64)));
    int cfg_m = -1;
    for (int g = 0; TM * g < N; g++) {
        const int m = N - TM * g < TM ? N - TM * g : TM;
        if (m != cfg_m) load_config(nw, cfg_m = m);
        const uint8_t *grp = (const uint8_t *)pack + (size_t)TM * g * nb * Q8_0_BYTES;
        const uint16_t *scales = (const uint16_t *)(grp + (size_t)nb * QB * m);
        const size_t bstride = (size_t)QB * m;
        const __mmask16 mm = (__mmask16)((1u << m) - 1);
        __m512 acc[TM];
        for (int i = 0; i < TM; i++) acc[i] = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) { /* two blocks in flight */
            if (g == 0) /* the next 16 rows' lines, spread over this pass: see PREFETCH_ROWS */
                for (size_t l = (size_t)b * pf_lines / (size_t)nb; l < (size_t)(b + 2) * pf_lines / (size_t)nb; l++)
                    _mm_prefetch((const char *)wb + pf_off + 64 * l, _MM_HINT_T1);
            _tile_loadd(0, wb + (size_t)b * Q8_0_BYTES + 2, wrow);
            _tile_loadd(1, wb + (size_t)(b + 1) * Q8_0_BYTES + 2, wrow);
            _tile_loadd(2, grp + (size_t)b * bstride, 4 * m);
            _tile_loadd(3, grp + (size_t)(b + 1) * bstride, 4 * m);
            _tile_zero(4);
            _tile_zero(5);
            _tile_dpbssd(4, 0, 2);
            _tile_dpbssd(5, 1, 3);
            _tile_stored(4, buf[0], 4 * TM);
            _tile_stored(5, buf[1], 4 * TM);
            __m512 da0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mm, scales + (size_t)b * m));
            __m512 da1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mm, scales + (size_t)(b + 1) * m));
            SCALE_ROWS(buf[0], dw[b], da0);
            SCALE_ROWS(buf[1], dw[b + 1], da1);
        }
        if (b < nb) {
            _tile_loadd(0, wb + (size_t)b * Q8_0_BYTES + 2, wrow);
            _tile_loadd(2, grp + (size_t)b * bstride, 4 * m);
            _tile_zero(4);
            _tile_dpbssd(4, 0, 2);
            _tile_stored(4, buf[0], 4 * TM);
            __m512 da0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mm, scales + (size_t)b * m));
            SCALE_ROWS(buf[0], dw[b], da0);
        }
        for (int i = 0; i < TM; i++) _mm512_store_ps(res[i], acc[i]);
        for (int n = 0; n < m; n++)
            for (int i = 0; i < nw; i++) out[(size_t)(TM * g + n) * ldo + i] = res[i][n];
    }
    /* no release: the next call on this thread most often loads the same
     * configuration, which moe_amx_load_config then skips */
}

/* ---- Q8_0_R8 (rows regrouped by 8 at load, core/dtype.h) ----------------------
 * The same sums on the repacked layout, so that AMX CPUs can repack Q8_0 for
 * decode too. A group's block b holds its 8 rows' 32 quants contiguously
 * (256 bytes, 32 apart): one aligned 8-row weight tile. A task's 16 rows are
 * two groups (A0, A1) and each step takes two token groups (B0, B1), so a
 * weight tile serves two products and an activation tile two: four 8 x m
 * products per block (C tiles 4-7). Measured standalone (one 512 x 1024
 * matrix, N = 32, one thread, Sapphire Rapids): 66-70 us against the rows
 * kernel's 85, whose 16-row weight tiles straddle cache lines. The block's
 * products are stored and scaled while the next block's run. */
static AMX_TARGET void r8_config(int m0, int m1) {
    moe_amx_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int mb = m1 ? m1 : m0; /* an unused tile keeps a valid shape */
    c.rows[0] = c.rows[1] = 8, c.colsb[0] = c.colsb[1] = QB;      /* A0, A1: weights */
    c.rows[2] = c.rows[3] = QB / 4;                                /* B0, B1: tokens */
    c.colsb[2] = (uint16_t)(4 * m0), c.colsb[3] = (uint16_t)(4 * mb);
    for (int t = 4; t < 8; t++) /* C(a, g) = tile 4 + 2 g + a */
        c.rows[t] = 8, c.colsb[t] = (uint16_t)(4 * (t < 6 ? m0 : mb));
    moe_amx_load_config(&c);
}

AMX_TARGET void qk_amx_q8_0_r8_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                    const void *pack, int N, int64_t C) {
    const int64_t nb = C / QB;
    const int two = nw > 8; /* nw is 8 or 16 */
    const uint8_t *g0 = w, *g1 = (const uint8_t *)w + 8 * wrow;
    float dw[QMM_AMX_MAX_BLOCKS][TM] __attribute__((aligned(64)));
    for (int64_t b = 0; b < nb; b++) {
        _mm256_store_ps(dw[b], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g0 + 16 * b))));
        _mm256_store_ps(dw[b] + 8, two ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g1 + 16 * b)))
                                       : _mm256_setzero_ps());
    }
    const uint8_t *q0 = g0 + 16 * nb, *q1 = g1 + 16 * nb; /* the quants follow the scales */
    int32_t buf[2][4][8][TM] __attribute__((aligned(64)));
    const size_t pf_off = (size_t)TM * wrow, pf_lines = (TM * wrow + 63) / 64;
    for (int g = 0; TM * g < N; g += 2) {
        const int m0 = N - TM * g < TM ? N - TM * g : TM, rest = N - TM * (g + 1);
        const int m1 = rest <= 0 ? 0 : rest < TM ? rest : TM;
        r8_config(m0, m1);
        const uint8_t *p0 = (const uint8_t *)pack + (size_t)TM * g * nb * Q8_0_BYTES;
        const uint8_t *p1 = m1 ? p0 + (size_t)TM * nb * Q8_0_BYTES : p0; /* p0: never read */
        const uint16_t *s0 = (const uint16_t *)(p0 + (size_t)nb * QB * m0);
        const uint16_t *s1 = (const uint16_t *)(p1 + (size_t)nb * QB * m1);
        const __mmask16 k0 = (__mmask16)((1u << m0) - 1), k1 = (__mmask16)((1u << m1) - 1);
        /* acc[a + 2 h][i]: weight row 8 a + i against token group g + h */
        __m512 acc[4][8];
        for (int t = 0; t < 4; t++)
            for (int i = 0; i < 8; i++) acc[t][i] = _mm512_setzero_ps();
        for (int64_t b = 0; b <= nb; b++) {
            if (g == 0 && b < nb) /* the next 16 rows, as PREFETCH_ROWS above: here they follow these */
                for (size_t l = (size_t)b * pf_lines / (size_t)nb; l < (size_t)(b + 1) * pf_lines / (size_t)nb; l++)
                    _mm_prefetch((const char *)w + pf_off + 64 * l, _MM_HINT_T1);
            if (b < nb) {
                _tile_loadd(0, q0 + 256 * b, QB);
                if (two) _tile_loadd(1, q1 + 256 * b, QB);
                _tile_loadd(2, p0 + (size_t)b * QB * m0, 4 * m0);
                if (m1) _tile_loadd(3, p1 + (size_t)b * QB * m1, 4 * m1);
                _tile_zero(4);
                _tile_dpbssd(4, 0, 2);
                if (two) { _tile_zero(5); _tile_dpbssd(5, 1, 2); }
                if (m1) { _tile_zero(6); _tile_dpbssd(6, 0, 3); }
                if (m1 && two) { _tile_zero(7); _tile_dpbssd(7, 1, 3); }
            }
            if (b > 0) { /* block b - 1, stored last step: acc += float(dot) * (d_w * d_a) */
                const int64_t p = b - 1;
                int32_t(*c)[8][TM] = buf[p & 1];
                const __m512 da0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k0, s0 + (size_t)p * m0));
                const __m512 da1 = m1 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k1, s1 + (size_t)p * m1)) : da0;
                scale8(acc[0], c[0], dw[p], da0);
                if (two) scale8(acc[1], c[1], dw[p] + 8, da0);
                if (m1) scale8(acc[2], c[2], dw[p], da1);
                if (m1 && two) scale8(acc[3], c[3], dw[p] + 8, da1);
            }
            if (b < nb) {
                int32_t(*c)[8][TM] = buf[b & 1];
                _tile_stored(4, c[0], 4 * TM);
                if (two) _tile_stored(5, c[1], 4 * TM);
                if (m1) _tile_stored(6, c[2], 4 * TM);
                if (m1 && two) _tile_stored(7, c[3], 4 * TM);
            }
        }
        /* out by token rows: each token's nw outputs are adjacent there */
        float res[TM][TM] __attribute__((aligned(64)));
        for (int h = 0; h < 2; h++) {
            const int m = h ? m1 : m0;
            if (!m) continue;
            for (int i = 0; i < 8; i++) {
                _mm512_store_ps(res[i], acc[2 * h][i]);
                _mm512_store_ps(res[8 + i], acc[2 * h + 1][i]); /* zeros when !two: not written */
            }
            for (int n = 0; n < m; n++)
                for (int i = 0; i < nw; i++) out[(size_t)(TM * (g + h) + n) * ldo + i] = res[i][n];
        }
    }
}

int qk_amx_q8_0_supported(void) {
    const moe_cpu_features *c = moe_cpu();
    return c->amx_int8 && qk_avx512_supported() && moe_amx_enable();
}

#else /* no AMX intrinsics here */
void qk_q8_0_blocked_pack(void *dst, const float *in, int n, int N, int64_t C) {}
void qk_amx_q8_0_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                      const void *pack, int N, int64_t C) {}
void qk_amx_q8_0_r8_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                         const void *pack, int N, int64_t C) {}
int qk_amx_q8_0_supported(void) { return 0; }
#endif
