/* core/dtype: the element-type table, fp16/bf16 conversions, and the
 * reference (portable C) dequantisation, quantisation and dot products.
 *
 * Block layouts are ggml's (ggml-common.h). The activation converters and the
 * dot products follow what llama.cpp's CPU backend computes, so that a row
 * quantised here holds the same integers as llama.cpp's, and each dot product
 * is llama.cpp's x86 arithmetic, its SIMD lanes emulated in scalar code:
 * exact integer sums per block, block scales applied in float, the float
 * terms added in the same lanes and the same order.
 * The quantisers use no fused multiply-add; the dot products use one exactly
 * where llama.cpp's x86 kernels do. */
#include "core/dtype.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define QK 32     /* elements in a Q4_0 / Q8_0 block */
#define QKK 256   /* elements in a K-quant super-block */

/* ------------------------------------------------------------------------ */
/* fp16 and bf16                                                              */
/* ------------------------------------------------------------------------ */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Branch-free so that row loops vectorise: the half's exponent and mantissa
 * shifted into a float's place and scaled by 2^112 give every finite value
 * (subnormals included) exactly; an all-ones exponent becomes inf/NaN. */
float dtype_f16_to_f32(uint16_t h) {
    uint32_t em = (uint32_t)(h & 0x7fffu) << 13;
    float v = bits_f32(em) * 0x1p112f;
    uint32_t u = f32_bits(v);
    uint32_t special = (h & 0x7c00u) == 0x7c00u;
    uint32_t nan = special & ((h & 0x3ffu) != 0);
    u = special ? 0x7f800000u | em | (nan << 22) : u; /* NaN made quiet, as VCVTPH2PS does */
    return bits_f32(u | ((uint32_t)(h & 0x8000u) << 16));
}

/* Round to nearest even, as F16C's VCVTPS2PH with rounding control 0 (what
 * llama.cpp's GGML_CPU_FP32_TO_FP16 is on x86): overflow to inf, subnormal
 * results kept, NaN made quiet with the top payload bits kept. */
uint16_t dtype_f32_to_f16(float f) {
    uint32_t x = f32_bits(f), ax = x & 0x7fffffffu;
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds past 65504 */
    if (ax >= 0x38800000u) {                                    /* normal result */
        uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);           /* a carry may bump the exponent */
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    if (ax <= 0x33000000u) return sign;                         /* <= 2^-25: ties to even zero */
    /* subnormal result: value = m * 2^(e-150), in units of 2^-24 = m >> (126 - e) */
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - e;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

float dtype_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

/* llama.cpp's scalar GGML_FP32_TO_BF16 (its CPU backend converts activations
 * with it even where AVX512_BF16 exists): round to nearest even, subnormals
 * kept (unlike VCVTNEPS2BF16, which flushes them), NaN forced quiet. */
uint16_t dtype_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float ld_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return dtype_f16_to_f32(h);
}
static inline void st_f16(uint8_t *p, float f) {
    uint16_t h = dtype_f32_to_f16(f);
    memcpy(p, &h, 2);
}

/* fp16 of a non-negative scale, rounded up when nearest rounding fell below
 * it, and kept finite: the quantisers need d * qmax to cover the data. */
static uint16_t f16_scale_up(float s) {
    uint16_t h = dtype_f32_to_f16(s);
    if (h >= 0x7c00u) return 0x7bffu;
    if (dtype_f16_to_f32(h) < s && h < 0x7bffu) h++;
    return h;
}

/* ------------------------------------------------------------------------ */
/* block layouts (ggml's; all fields byte arrays, so any 1-byte alignment)    */
/* ------------------------------------------------------------------------ */

typedef struct { uint8_t d[2]; uint8_t qs[QK / 2]; } blk_q4_0;            /* x = d (q - 8) */
typedef struct { uint8_t d[2]; int8_t qs[QK]; } blk_q8_0;                 /* x = d q       */
typedef struct {                                     /* x = d sc_j q - dmin m_j, 8 x 32    */
    uint8_t d[2], dmin[2], scales[12], qs[QKK / 2];
} blk_q4_K;
typedef struct {                                     /* as q4_K with a 5th bit in qh       */
    uint8_t d[2], dmin[2], scales[12], qh[QKK / 8], qs[QKK / 2];
} blk_q5_K;
typedef struct {                                     /* x = d sc_j (q - 32), 16 x 16       */
    uint8_t ql[QKK / 2], qh[QKK / 4];
    int8_t scales[QKK / 16];
    uint8_t d[2];
} blk_q6_K;
_Static_assert(sizeof(blk_q4_0) == 18 && sizeof(blk_q8_0) == 34, "block size");
_Static_assert(sizeof(blk_q4_K) == 144 && sizeof(blk_q5_K) == 176, "block size");
_Static_assert(sizeof(blk_q6_K) == 210, "block size");
_Static_assert(offsetof(blk_q5_K, scales) == offsetof(blk_q4_K, scales), "shared K header");
_Static_assert(sizeof(dtype_q8_K_block) == 292, "block size");

/* ------------------------------------------------------------------------ */
/* K-quant unpacking, shared by to_float and vec_dot                          */
/* ------------------------------------------------------------------------ */

static void k_pack_scale_min(uint8_t *s, const uint8_t *sc, const uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xf) | ((mn[j + 4] & 0xf) << 4));
    }
}

/* q[e] for element e of the super-block: element e lies in 64-element chunk
 * e/64; its first 32 are the low nibbles of qs[32c..32c+31], the next 32 the
 * high nibbles. Q5_K adds bit (2c) resp. (2c+1) of qh[e % 32] as 16. */
static void q4k_unpack(const blk_q4_K *b, int8_t *q) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(b->qs[32 * c + l] & 0xf);
            q[64 * c + 32 + l] = (int8_t)(b->qs[32 * c + l] >> 4);
        }
}
static void q5k_unpack(const blk_q5_K *b, int8_t *q) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)((b->qs[32 * c + l] & 0xf) | (((b->qh[l] >> (2 * c)) & 1) << 4));
            q[64 * c + 32 + l] =
                (int8_t)((b->qs[32 * c + l] >> 4) | (((b->qh[l] >> (2 * c + 1)) & 1) << 4));
        }
}
/* Q6_K: two halves of 128; in half h, with ql = ql + 64h, qh = qh + 32h and
 * l < 32, elements l, l+32, l+64, l+96 take the low nibble of ql[l], of
 * ql[l+32], the high nibble of ql[l], of ql[l+32], and bits 0-1, 2-3, 4-5,
 * 6-7 of qh[l] as their top two bits; minus 32. Element e has scale e/16. */
static void q6k_unpack(const blk_q6_K *b, int8_t *q) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
        int8_t *y = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            y[l] = (int8_t)(((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32);
            y[l + 32] = (int8_t)(((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* to_float: ggml's dequantisation, the same float operations in order        */
/* ------------------------------------------------------------------------ */

static void f32_to_float(float *dst, const void *src, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void f16_to_float(float *dst, const void *src, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) dst[i] = ld_f16(p + 2 * i);
}
static void bf16_row_to_float(float *dst, const void *src, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = dtype_bf16_to_f32(h);
    }
}
static void q4_0_to_float(float *dst, const void *src, int64_t n) {
    const blk_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK; i++, dst += QK) {
        float d = ld_f16(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            dst[j] = (float)((b[i].qs[j] & 0xf) - 8) * d;
            dst[j + QK / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}
static void q8_0_to_float(float *dst, const void *src, int64_t n) {
    const blk_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK; i++, dst += QK) {
        float d = ld_f16(b[i].d);
        for (int j = 0; j < QK; j++) dst[j] = (float)b[i].qs[j] * d;
    }
}
/* x = (d * sc_j) * q - (dmin * m_j), two rounded products and a difference */
static void k_affine_to_float(float *dst, const int8_t *q, float d, float dmin,
                              const uint8_t *scales) {
    uint8_t sc[8], mn[8];
    dtype_k_scales(scales, sc, mn);
    for (int j = 0; j < 8; j++) {
        float d1 = d * (float)sc[j], m1 = dmin * (float)mn[j];
        for (int l = 0; l < 32; l++) dst[32 * j + l] = d1 * (float)q[32 * j + l] - m1;
    }
}
/* Q4_K and Q5_K share their header (d, dmin, 12 scale bytes at offsets 0, 2,
 * 4): block i of a row unpacked into q, its header returned */
static const blk_q4_K *k_affine_block_at(const void *row, int64_t i, size_t stride, int five_bits, int8_t *q) {
    const void *p = (const uint8_t *)row + (size_t)i * stride;
    if (five_bits) {
        q5k_unpack(p, q);
        return p;
    }
    q4k_unpack(p, q);
    return p;
}
static const blk_q4_K *k_affine_block(const void *row, int64_t i, int five_bits, int8_t *q) {
    return k_affine_block_at(row, i, five_bits ? sizeof(blk_q5_K) : sizeof(blk_q4_K), five_bits, q);
}
static void k_affine_row_to_float(float *dst, const void *src, int64_t n, int five_bits) {
    int8_t q[QKK];
    for (int64_t i = 0; i < n / QKK; i++, dst += QKK) {
        const blk_q4_K *h = k_affine_block(src, i, five_bits, q);
        k_affine_to_float(dst, q, ld_f16(h->d), ld_f16(h->dmin), h->scales);
    }
}
static void q4_K_to_float(float *dst, const void *src, int64_t n) { k_affine_row_to_float(dst, src, n, 0); }
static void q5_K_to_float(float *dst, const void *src, int64_t n) { k_affine_row_to_float(dst, src, n, 1); }
static void q6_K_to_float(float *dst, const void *src, int64_t n) {
    const blk_q6_K *b = src;
    int8_t q[QKK];
    for (int64_t i = 0; i < n / QKK; i++, dst += QKK) {
        q6k_unpack(&b[i], q);
        float d = ld_f16(b[i].d);
        for (int e = 0; e < QKK; e++) dst[e] = d * (float)b[i].scales[e / 16] * (float)q[e];
    }
}
static void q8_K_to_float(float *dst, const void *src, int64_t n) {
    const dtype_q8_K_block *b = src;
    for (int64_t i = 0; i < n / QKK; i++, dst += QKK)
        for (int e = 0; e < QKK; e++) dst[e] = b[i].d * (float)b[i].qs[e];
}

/* ------------------------------------------------------------------------ */
/* activation converters (llama.cpp's x86 CPU path)                            */
/* ------------------------------------------------------------------------ */

/* max(a, b) as MAXPS computes it: b unless a > b (so a NaN in b wins) */
static inline float maxps(float a, float b) { return a > b ? a : b; }

/* VROUNDPS (nearest even) then VCVTPS2DQ then the saturating packs to int8:
 * NaN and values outside int32 become INT32_MIN, hence -128. */
static inline int8_t round_pack_i8(float v) {
    if (!(v >= -2147483648.0f && v < 2147483648.0f)) return -128;
    float r = rintf(v); /* the default rounding mode: nearest even */
    return (int8_t)(r > 127.0f ? 127 : r < -128.0f ? -128 : (int)r);
}

/* Q8_0 as llama.cpp's AVX2/AVX-512 quantize_row_q8_0: amax over the block
 * (reduced as its 8-lane MAXPS tree does, which fixes where a NaN wins),
 * d = amax / 127 stored as fp16, the multiplier 127 / amax (not 1 / d), and
 * rounding to nearest even (its scalar _ref twin uses roundf: ties away). */
static void q8_0_quantize_act(void *dst, const float *x, int64_t n) {
    blk_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float m[8];
        for (int l = 0; l < 8; l++) m[l] = fabsf(x[l]);
        for (int r = 1; r < 4; r++)
            for (int l = 0; l < 8; l++) m[l] = maxps(m[l], fabsf(x[8 * r + l]));
        float m4[4];
        for (int l = 0; l < 4; l++) m4[l] = maxps(m[4 + l], m[l]);
        float m2[2] = {maxps(m4[0], m4[2]), maxps(m4[1], m4[3])};
        float amax = maxps(m2[0], m2[1]);
        st_f16(y[i].d, amax / 127.0f);
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < QK; j++) y[i].qs[j] = round_pack_i8(x[j] * id);
    }
}

/* ggml's nearest_int: round to nearest even by adding 1.5 * 2^23 and reading
 * the mantissa (exact for |v| < 2^22; a NaN gives 0). */
static inline int magic_round(float v) {
    int32_t i;
    float s = v + 12582912.0f;
    memcpy(&i, &s, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* Q8_K as llama.cpp's quantize_row_q8_K, which on x86 is its reference
 * version: max = the first element of largest magnitude (signed),
 * iscale = -127 / max (so d < 0 when that element is positive, and it maps to
 * -127), q = min(127, nearest even of iscale * x), d = 1 / iscale, bsums =
 * sums of 16 consecutive q. An all-zero block gets d = 0 and zero quants;
 * llama.cpp leaves its bsums unwritten there, we write zeros. */
static void q8_K_quantize_act(void *dst, const float *x, int64_t n) {
    dtype_q8_K_block *y = dst;
    for (int64_t i = 0; i < n / QKK; i++, x += QKK) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QKK; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        memset(&y[i], 0, sizeof y[i]);
        if (amax == 0.0f) continue;
        float iscale = -127.0f / max;
        for (int j = 0; j < QKK; j++) {
            int v = magic_round(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QKK / 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
        y[i].d = 1.0f / iscale;
    }
}

static void f32_from_float(void *dst, const float *src, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void f16_from_float(void *dst, const float *src, int64_t n) {
    uint8_t *p = dst;
    for (int64_t i = 0; i < n; i++) st_f16(p + 2 * i, src[i]);
}
static void bf16_row_from_float(void *dst, const float *src, int64_t n) {
    uint8_t *p = dst;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = dtype_f32_to_bf16(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

/* ------------------------------------------------------------------------ */
/* weight quantisers (for writing files; any valid rounding)                  */
/* ------------------------------------------------------------------------ */

/* Q8_0 as ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d). */
static void q8_0_from_float(void *dst, const float *x, int64_t n) {
    blk_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        st_f16(y[i].d, d);
        for (int j = 0; j < QK; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* Q4_0 as ggml's quantize_row_q4_0_ref: d = max / -8 with max the signed
 * value of largest magnitude (it maps to q = 0 exactly), q = min(15,
 * trunc(x / d + 8.5)). */
static void q4_0_from_float(void *dst, const float *x, int64_t n) {
    blk_q4_0 *y = dst;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++)
            if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        st_f16(y[i].d, d);
        for (int j = 0; j < QK / 2; j++) {
            int q0 = (int8_t)(x[j] * id + 8.5f), q1 = (int8_t)(x[j + QK / 2] * id + 8.5f);
            y[i].qs[j] = (uint8_t)((q0 < 15 ? q0 : 15) | ((q1 < 15 ? q1 : 15) << 4));
        }
    }
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Our own Q4_K / Q5_K quantiser (not llama.cpp's search): each 32-element
 * sub-block j covers [lo_j, hi_j] with lo_j = min(0, min x) so that
 * x = dd_j q - mm_j with q in 0..qmax. mm_j = dmin * m_j with m_j rounded up
 * (the range starts at or below the data), then dd_j = d * sc_j with sc_j
 * rounded up from (hi_j + mm_j) / qmax (the range ends at or above it); the
 * fp16 super-scales are rounded up too so the 6-bit codes stay <= 63. Then
 * q = nearest((x + mm_j) / dd_j), so |error| <= dd_j / 2 plus rounding. */
static void k_affine_quantize(const float *x, int qmax, uint8_t *q, uint8_t *d16, uint8_t *dmin16,
                              uint8_t *scales) {
    float hi[8], neg_lo[8], max_neg = 0.0f;
    for (int j = 0; j < 8; j++) {
        float lo = 0.0f, h = -INFINITY;
        for (int l = 0; l < 32; l++) {
            lo = fminf(lo, x[32 * j + l]);
            h = fmaxf(h, x[32 * j + l]);
        }
        hi[j] = h;
        neg_lo[j] = -lo;
        max_neg = fmaxf(max_neg, -lo);
    }
    uint16_t hm = f16_scale_up(max_neg / 63.0f);
    float dmin = dtype_f16_to_f32(hm);
    uint8_t sc[8], mn[8];
    float mm[8], need[8], max_need = 0.0f;
    for (int j = 0; j < 8; j++) {
        mn[j] = dmin > 0.0f ? (uint8_t)clampi((int)ceilf(neg_lo[j] / dmin), 0, 63) : 0;
        mm[j] = dmin * (float)mn[j];
        need[j] = fmaxf(hi[j] + mm[j], 0.0f) / (float)qmax;
        max_need = fmaxf(max_need, need[j]);
    }
    uint16_t hd = f16_scale_up(max_need / 63.0f);
    float d = dtype_f16_to_f32(hd);
    for (int j = 0; j < 8; j++) {
        sc[j] = d > 0.0f ? (uint8_t)clampi((int)ceilf(need[j] / d), 0, 63) : 0;
        float dd = d * (float)sc[j], idd = dd > 0.0f ? 1.0f / dd : 0.0f;
        for (int l = 0; l < 32; l++)
            q[32 * j + l] = (uint8_t)clampi((int)rintf((x[32 * j + l] + mm[j]) * idd), 0, qmax);
    }
    memcpy(d16, &hd, 2);
    memcpy(dmin16, &hm, 2);
    k_pack_scale_min(scales, sc, mn);
}

static void q4_K_from_float(void *dst, const float *x, int64_t n) {
    blk_q4_K *y = dst;
    uint8_t q[QKK];
    for (int64_t i = 0; i < n / QKK; i++, x += QKK) {
        k_affine_quantize(x, 15, q, y[i].d, y[i].dmin, y[i].scales);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[i].qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    }
}
static void q5_K_from_float(void *dst, const float *x, int64_t n) {
    blk_q5_K *y = dst;
    uint8_t q[QKK];
    for (int64_t i = 0; i < n / QKK; i++, x += QKK) {
        k_affine_quantize(x, 31, q, y[i].d, y[i].dmin, y[i].scales);
        memset(y[i].qh, 0, sizeof y[i].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                uint8_t a = q[64 * c + l], b = q[64 * c + 32 + l];
                y[i].qs[32 * c + l] = (uint8_t)((a & 0xf) | ((b & 0xf) << 4));
                y[i].qh[l] |= (uint8_t)(((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1)));
            }
    }
}

/* Our own Q6_K quantiser: sub-block j (16 elements) gets the step
 * s_j = amax_j / 31, coded as d * sc_j with sc_j = ceil(s_j / d) <= 127;
 * q = nearest(x / (d sc_j)) in -32..31, so |error| <= d sc_j / 2. */
static void q6_K_from_float(void *dst, const float *x, int64_t n) {
    blk_q6_K *y = dst;
    for (int64_t i = 0; i < n / QKK; i++, x += QKK) {
        float s[16], smax = 0.0f;
        for (int j = 0; j < 16; j++) {
            float a = 0.0f;
            for (int l = 0; l < 16; l++) a = fmaxf(a, fabsf(x[16 * j + l]));
            s[j] = a / 31.0f;
            smax = fmaxf(smax, s[j]);
        }
        uint16_t hd = f16_scale_up(smax / 127.0f);
        float d = dtype_f16_to_f32(hd);
        uint8_t q[QKK]; /* q + 32, 0..63 */
        for (int j = 0; j < 16; j++) {
            int sc = d > 0.0f ? clampi((int)ceilf(s[j] / d), 0, 127) : 0;
            y[i].scales[j] = (int8_t)sc;
            float dd = d * (float)sc, idd = dd > 0.0f ? 1.0f / dd : 0.0f;
            for (int l = 0; l < 16; l++)
                q[16 * j + l] = (uint8_t)(clampi((int)rintf(x[16 * j + l] * idd), -32, 31) + 32);
        }
        for (int h = 0; h < 2; h++) {
            uint8_t *ql = y[i].ql + 64 * h, *qh = y[i].qh + 32 * h;
            const uint8_t *v = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((v[l] & 0xf) | ((v[l + 64] & 0xf) << 4));
                ql[l + 32] = (uint8_t)((v[l + 32] & 0xf) | ((v[l + 96] & 0xf) << 4));
                qh[l] = (uint8_t)((v[l] >> 4) | ((v[l + 32] >> 4) << 2) | ((v[l + 64] >> 4) << 4) |
                                  ((v[l + 96] >> 4) << 6));
            }
        }
        memcpy(y[i].d, &hd, 2);
    }
}

/* ------------------------------------------------------------------------ */
/* dot products: llama.cpp's x86 arithmetic (AVX2 with AVX512-VNNI)          */
/* ------------------------------------------------------------------------ */

/* These are scalar emulations of the SIMD lanes llama.cpp's x86 vec_dot
 * kernels accumulate in (what an -march=native build compiles on a CPU with
 * AVX-512 and VNNI: the __AVX2__ branches of arch/x86/quants.c, and the
 * __AVX512F__ / __AVX512BF16__ branches of vec.cpp for f16 / bf16), with the
 * same fused multiply-adds and the same horizontal sums, so that the result
 * is bit for bit llama.cpp's decode and equals our AVX-512 kernels
 * (kernels/quant_avx512.c), which the tests check against these. Integer
 * sums are exact, so only which products meet in which lane matters. */

/* The 8 float lanes added as hsum_float_8 does: halves, then pairs. */
static inline float hsum8(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}
/* 16 lanes as _mm512_reduce_add_ps: halves of 8, 4, 2, then the last pair */
static inline float hsum16(const float *v) {
    float t[8];
    for (int l = 0; l < 8; l++) t[l] = v[l] + v[l + 8];
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

/* Float rows, f32: each product rounded, the sum in double (8 interleaved
 * partial sums in a fixed order). Unused by qmatmul (f32 goes to matmul). */
static float f32_vec_dot(const void *w, const void *a, int64_t n) {
    const float *x = w, *y = a;
    double s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) s[l] += (double)(x[i + l] * y[i + l]);
    for (; i < n; i++) s[0] += (double)(x[i] * y[i]);
    return (float)(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
}

/* f16 (ggml_vec_dot_f16, AVX-512 without FP16): per 64 elements, 4 vectors
 * of 16 lanes take fused products (element i + 16j + l in vector j, lane
 * l); then v0 + v2, v1 + v3, their sum, reduced over 16 lanes; the
 * remaining n % 64 products (rounded in float) are added in double. */
static float f16_vec_dot(const void *w, const void *a, int64_t n) {
    const uint8_t *x = w, *y = a;
    float v[4][16] = {{0}};
    int64_t np = n & ~(int64_t)63, i = 0;
    for (; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) {
                int64_t e = i + 16 * j + l;
                v[j][l] = fmaf(ld_f16(x + 2 * e), ld_f16(y + 2 * e), v[j][l]);
            }
    float s[16];
    for (int l = 0; l < 16; l++) s[l] = (v[0][l] + v[2][l]) + (v[1][l] + v[3][l]);
    double sum = (double)hsum16(s);
    for (; i < n; i++) sum += (double)(ld_f16(x + 2 * i) * ld_f16(y + 2 * i));
    return (float)sum;
}

static inline float ld_bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return dtype_bf16_to_f32(h);
}
/* VDPBF16PS ignores MXCSR: subnormal inputs read as zero, subnormal results
 * are flushed to zero, rounding to nearest even */
static inline float ftz(float f) { return fabsf(f) < 0x1p-126f ? copysignf(0.0f, f) : f; }
/* one VDPBF16PS lane: the odd pair first, then the even one */
static inline float dpbf16(float c, const uint8_t *x, const uint8_t *y) {
    c = ftz(fmaf(ftz(ld_bf16(x + 2)), ftz(ld_bf16(y + 2)), c));
    return ftz(fmaf(ftz(ld_bf16(x)), ftz(ld_bf16(y)), c));
}
/* bf16 (ggml_vec_dot_bf16 with AVX512-BF16): per 64 elements, two vectors
 * of 16 lanes take pairs (lane l of the first: elements i + 2l, i + 2l + 1;
 * the second: 32 further); each reduced over its lanes and added in double,
 * then the remaining n % 64 products (exact in float) in double. */
static float bf16_vec_dot(const void *w, const void *a, int64_t n) {
    const uint8_t *x = w, *y = a;
    float c1[16] = {0}, c2[16] = {0};
    int64_t np = n & ~(int64_t)63, i = 0;
    for (; i < np; i += 64)
        for (int l = 0; l < 16; l++) {
            c1[l] = dpbf16(c1[l], x + 2 * (i + 2 * l), y + 2 * (i + 2 * l));
            c2[l] = dpbf16(c2[l], x + 2 * (i + 32 + 2 * l), y + 2 * (i + 32 + 2 * l));
        }
    double sum = 0.0;
    sum += (double)hsum16(c1);
    sum += (double)hsum16(c2);
    for (; i < n; i++) sum += (double)(ld_bf16(x + 2 * i) * ld_bf16(y + 2 * i));
    return (float)sum;
}

/* a product as VPSIGNB then VPDPBUSD form it: |x| (unsigned) times y with
 * x's sign given to it, where negating y = -128 wraps back to -128, so that
 * x < 0 against y = -128 gives -(x y). Branch-free: the row loops vectorise. */
static inline int sign_mul(int x, int y) {
    int p = x * y, wrap = (x < 0) & (y == -128);
    return wrap ? -p : p;
}
/* Q4_0 / Q8_0 against Q8_0: 8 lanes; per block, lane l takes
 * fma(dw * da, (float)(sum of products 4l .. 4l+3), lane); then hsum8. */
static float q4_0_vec_dot(const void *w, const void *a, int64_t n) {
    const blk_q4_0 *x = w;
    const blk_q8_0 *y = a;
    float acc[8] = {0};
    for (int64_t i = 0; i < n / QK; i++) {
        float d = ld_f16(x[i].d) * ld_f16(y[i].d);
        for (int l = 0; l < 8; l++) {
            int s = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) {
                int q = e < QK / 2 ? (x[i].qs[e] & 0xf) : (x[i].qs[e - QK / 2] >> 4);
                s += sign_mul(q - 8, y[i].qs[e]);
            }
            acc[l] = fmaf(d, (float)s, acc[l]);
        }
    }
    return hsum8(acc);
}
/* Q8_0's vec_dot with the weight row's block i scale at d + i * dstep and
 * quants at q + i * qstep: one body for both layouts (Q8_0, Q8_0_R8) */
static float q8_0_dot_strided(const uint8_t *d, size_t dstep, const uint8_t *q, size_t qstep,
                              const blk_q8_0 *y, int64_t n) {
    float acc[8] = {0};
    for (int64_t i = 0; i < n / QK; i++) {
        const int8_t *qs = (const int8_t *)(q + (size_t)i * qstep);
        float dd = ld_f16(d + (size_t)i * dstep) * ld_f16(y[i].d);
        for (int l = 0; l < 8; l++) {
            int s = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) s += sign_mul(qs[e], y[i].qs[e]);
            acc[l] = fmaf(dd, (float)s, acc[l]);
        }
    }
    return hsum8(acc);
}
static float q8_0_vec_dot(const void *w, const void *a, int64_t n) {
    const uint8_t *x = w;
    return q8_0_dot_strided(x, sizeof(blk_q8_0), x + 2, sizeof(blk_q8_0), a, n);
}

/* ---- Q8_0_R8: byte offsets of row r's block i within its group ---------- */
static size_t r8_scale_at(int64_t i, int64_t r) { return (size_t)(8 * i + r) * 2; }
static size_t r8_quants_at(int64_t nb, int64_t i, int64_t r) { return (size_t)nb * 16 + (size_t)(8 * i + r) * QK; }

static int q8_0_r8_pack(void *dst, const void *src, int64_t rows, int64_t C) {
    const int64_t nb = C / QK;
    const size_t group = (size_t)nb * 8 * sizeof(blk_q8_0);
    for (int64_t g = 0; g < rows / 8; g++) {
        uint8_t *o = (uint8_t *)dst + (size_t)g * group;
        const blk_q8_0 *in = (const blk_q8_0 *)((const uint8_t *)src + (size_t)g * group);
        for (int64_t r = 0; r < 8; r++)
            for (int64_t i = 0; i < nb; i++) {
                memcpy(o + r8_scale_at(i, r), in[r * nb + i].d, 2);
                memcpy(o + r8_quants_at(nb, i, r), in[r * nb + i].qs, QK);
            }
    }
    return 0;
}

static void q8_0_r8_row(void *dst, const void *src, int64_t r, int64_t C) {
    const int64_t nb = C / QK;
    const uint8_t *g = (const uint8_t *)src + (size_t)(r / 8) * (size_t)nb * 8 * sizeof(blk_q8_0);
    blk_q8_0 *out = dst;
    for (int64_t i = 0; i < nb; i++) {
        memcpy(out[i].d, g + r8_scale_at(i, r % 8), 2);
        memcpy(out[i].qs, g + r8_quants_at(nb, i, r % 8), QK);
    }
}

/* The K-quants' integer lanes: lane l of a super-block sums
 * scale(e) * q[e] * a[e] over the elements e with (e % 32) / 4 == l (each
 * 32-element run spread over the 8 lanes 4 by 4), scale(e) = sc[e / sub]. */
static inline void k_lanes(int32_t *lane, const int8_t *q, const int8_t *a, const int32_t *sc,
                           int sub) {
    for (int l = 0; l < 8; l++) lane[l] = 0;
    for (int e = 0; e < QKK; e++) lane[(e % 32) / 4] += sc[e / sub] * q[e] * a[e];
}

/* Q4_K / Q5_K against Q8_K: per super-block, d = da * dw and
 * dmin = -da * dmin_w; 8 lanes acc = fma(d, lane, acc). The min term: Q4_K
 * keeps 4 lanes, lane k = fma(dmin, m[2k] (bs[4k] + bs[4k+1]) +
 * m[2k+1] (bs[4k+2] + bs[4k+3]), lane), summed (0+2) + (1+3) at the end;
 * Q5_K one float, fma(dmin, whole integer min sum, sum) (llama.cpp's C,
 * contracted to a fused multiply-add by its compiler). Result
 * hsum8(acc) + the min term. */
/* block i of the weight row at w + i * stride (a row, or a Q4_K_R4 group's) */
static float k_affine_vec_dot(const void *w, size_t stride, const void *a, int64_t n, int five_bits) {
    const dtype_q8_K_block *y = a;
    float acc[8] = {0}, accm[4] = {0}, summs = 0.0f;
    int8_t q[QKK];
    int32_t lane[8], sc[8];
    for (int64_t i = 0; i < n / QKK; i++) {
        const blk_q4_K *h = k_affine_block_at(w, i, stride, five_bits, q);
        float d = y[i].d * ld_f16(h->d), dmin = -y[i].d * ld_f16(h->dmin);
        int32_t mpair[4] = {0};
        uint8_t s[8], m[8];
        dtype_k_scales(h->scales, s, m);
        for (int j = 0; j < 8; j++) {
            sc[j] = s[j];
            mpair[j / 2] += (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]) * m[j];
        }
        if (five_bits)
            summs = fmaf(dmin, (float)((mpair[0] + mpair[1]) + (mpair[2] + mpair[3])), summs);
        else
            for (int k = 0; k < 4; k++) accm[k] = fmaf(dmin, (float)mpair[k], accm[k]);
        k_lanes(lane, q, y[i].qs, sc, 32);
        for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lane[l], acc[l]);
    }
    float mins = five_bits ? summs : (accm[0] + accm[2]) + (accm[1] + accm[3]);
    return hsum8(acc) + mins;
}
static float q4_K_vec_dot(const void *w, const void *a, int64_t n) { return k_affine_vec_dot(w, sizeof(blk_q4_K), a, n, 0); }
static float q5_K_vec_dot(const void *w, const void *a, int64_t n) { return k_affine_vec_dot(w, sizeof(blk_q5_K), a, n, 1); }

/* Q6_K: the lanes of sc * (q + 32) * a (q + 32 in 0..63), minus per lane l
 * 32 (sc[2l] bs[2l] + sc[2l+1] bs[2l+1]) (the offset taken out through the
 * block sums, not per element); acc = fma(da * dw, lane, acc); hsum8. */
static float q6_K_dot_strided(const void *w, size_t stride, const void *a, int64_t n) {
    const dtype_q8_K_block *y = a;
    float acc[8] = {0};
    int8_t q[QKK];
    int32_t lane[8], sc[16];
    for (int64_t i = 0; i < n / QKK; i++) {
        const blk_q6_K *x = (const blk_q6_K *)((const uint8_t *)w + (size_t)i * stride);
        q6k_unpack(x, q);
        for (int e = 0; e < QKK; e++) q[e] = (int8_t)(q[e] + 32);
        for (int j = 0; j < 16; j++) sc[j] = x->scales[j];
        k_lanes(lane, q, y[i].qs, sc, 16);
        float d = y[i].d * ld_f16(x->d);
        for (int l = 0; l < 8; l++) {
            int32_t off = sc[2 * l] * y[i].bsums[2 * l] + sc[2 * l + 1] * y[i].bsums[2 * l + 1];
            acc[l] = fmaf(d, (float)(lane[l] - off * 32), acc[l]);
        }
    }
    return hsum8(acc);
}
static float q6_K_vec_dot(const void *w, const void *a, int64_t n) { return q6_K_dot_strided(w, sizeof(blk_q6_K), a, n); }

/* ------------------------------------------------------------------------ */
/* the table                                                                  */
/* ------------------------------------------------------------------------ */

#define SIZE_ONLY(nm, bl, by) {nm, bl, by, NULL, NULL, -1, NULL, NULL}
static const dtype_traits traits[DT_TABLE] = {
    [DT_F32] = {"f32", 1, 4, f32_to_float, f32_from_float, DT_F32, f32_from_float, f32_vec_dot},
    [DT_F16] = {"f16", 1, 2, f16_to_float, f16_from_float, DT_F16, f16_from_float, f16_vec_dot},
    [DT_BF16] = {"bf16", 1, 2, bf16_row_to_float, bf16_row_from_float, DT_BF16, bf16_row_from_float,
                 bf16_vec_dot},
    [DT_Q4_0] = {"q4_0", QK, 18, q4_0_to_float, q4_0_from_float, DT_Q8_0, NULL, q4_0_vec_dot},
    [DT_Q8_0] = {"q8_0", QK, 34, q8_0_to_float, q8_0_from_float, DT_Q8_0, q8_0_quantize_act,
                 q8_0_vec_dot},
    [DT_Q4_K] = {"q4_K", QKK, 144, q4_K_to_float, q4_K_from_float, DT_Q8_K, NULL, q4_K_vec_dot},
    [DT_Q5_K] = {"q5_K", QKK, 176, q5_K_to_float, q5_K_from_float, DT_Q8_K, NULL, q5_K_vec_dot},
    [DT_Q6_K] = {"q6_K", QKK, 210, q6_K_to_float, q6_K_from_float, DT_Q8_K, NULL, q6_K_vec_dot},
    [DT_Q8_K] = {"q8_K", QKK, 292, q8_K_to_float, NULL, -1, q8_K_quantize_act, NULL},
    [DT_Q4_1] = SIZE_ONLY("q4_1", QK, 20),
    [DT_Q5_0] = SIZE_ONLY("q5_0", QK, 22),
    [DT_Q5_1] = SIZE_ONLY("q5_1", QK, 24),
    [DT_Q8_1] = SIZE_ONLY("q8_1", QK, 36),
    [DT_Q2_K] = SIZE_ONLY("q2_K", QKK, 84),
    [DT_Q3_K] = SIZE_ONLY("q3_K", QKK, 110),
    [DT_IQ2_XXS] = SIZE_ONLY("iq2_xxs", QKK, 66),
    [DT_IQ2_XS] = SIZE_ONLY("iq2_xs", QKK, 74),
    [DT_IQ3_XXS] = SIZE_ONLY("iq3_xxs", QKK, 98),
    [DT_IQ1_S] = SIZE_ONLY("iq1_s", QKK, 50),
    [DT_IQ4_NL] = SIZE_ONLY("iq4_nl", QK, 18),
    [DT_IQ3_S] = SIZE_ONLY("iq3_s", QKK, 110),
    [DT_IQ2_S] = SIZE_ONLY("iq2_s", QKK, 82),
    [DT_IQ4_XS] = SIZE_ONLY("iq4_xs", QKK, 136),
    [DT_I8] = SIZE_ONLY("i8", 1, 1),
    [DT_I16] = SIZE_ONLY("i16", 1, 2),
    [DT_I32] = SIZE_ONLY("i32", 1, 4),
    [DT_I64] = SIZE_ONLY("i64", 1, 8),
    [DT_F64] = SIZE_ONLY("f64", 1, 8),
    [DT_IQ1_M] = SIZE_ONLY("iq1_m", QKK, 56),
    [DT_TQ1_0] = SIZE_ONLY("tq1_0", QKK, 54),
    [DT_TQ2_0] = SIZE_ONLY("tq2_0", QKK, 66),
    [DT_MXFP4] = SIZE_ONLY("mxfp4", QK, 17),
    [DT_Q8_0_R8] = {"q8_0_r8", QK, 34, NULL, NULL, DT_Q8_0, NULL, NULL},
    [DT_Q4_K_R4] = {"q4_K_r4", QKK, 144, NULL, NULL, DT_Q8_K, NULL, NULL},
    [DT_Q5_K_R4] = {"q5_K_r4", QKK, 176, NULL, NULL, DT_Q8_K, NULL, NULL},
    [DT_Q6_K_R4] = {"q6_K_r4", QKK, 210, NULL, NULL, DT_Q8_K, NULL, NULL},
};

const dtype_traits *dtype_traits_of(int type) {
    return type >= 0 && type < DT_TABLE && traits[type].name ? &traits[type] : NULL;
}

const char *dtype_name(int type) {
    static _Thread_local char buf[24];
    const dtype_traits *t = dtype_traits_of(type);
    if (t) return t->name;
    snprintf(buf, sizeof buf, "type %d", type);
    return buf;
}

int dtype_usable(int type) {
    const dtype_traits *t = dtype_traits_of(type);
    if (!t || !t->to_float || !t->vec_dot) return 0;
    const dtype_traits *a = dtype_traits_of(t->dot_type);
    return a && a->quantize_act && a->blck == t->blck ? 1 : 0;
}

/* sizes past INT64_MAX count as overflow: they must fit off_t and ptrdiff_t */
int dtype_row_bytes(int type, int64_t n, size_t *out) {
    const dtype_traits *t = dtype_traits_of(type);
    if (!t || n < 0 || n % t->blck) return -1;
    uint64_t blocks = (uint64_t)(n / t->blck);
    if (blocks > (uint64_t)INT64_MAX / t->block_bytes || blocks > SIZE_MAX / t->block_bytes) return -1;
    *out = (size_t)blocks * t->block_bytes;
    return 0;
}

/* ---- the repacked layouts (dtype.h) ---------------------------------------- */
/* each file type that has a repacked layout, and that layout: the one table
 * both directions read */
static const int repacked_pairs[][2] = {
    {DT_Q8_0, DT_Q8_0_R8}, {DT_Q4_K, DT_Q4_K_R4}, {DT_Q5_K, DT_Q5_K_R4}, {DT_Q6_K, DT_Q6_K_R4}};
enum { N_REPACKED = sizeof repacked_pairs / sizeof repacked_pairs[0] };
int dtype_repacked_type(int type) {
    for (int i = 0; i < N_REPACKED; i++)
        if (repacked_pairs[i][0] == type) return repacked_pairs[i][1];
    return -1;
}
int dtype_base_type(int type) {
    for (int i = 0; i < N_REPACKED; i++)
        if (repacked_pairs[i][1] == type) return repacked_pairs[i][0];
    return type;
}
int dtype_group_rows(int type) { return type == DT_Q8_0_R8 ? 8 : dtype_base_type(type) != type ? 4 : 1; }

/* the _R4 layouts: whole blocks of 4 rows interleaved, block i of row r at
 * (4 i + r) * bb within the group */
static size_t r4_block_at(int64_t i, int64_t r, size_t bb) { return (size_t)(4 * i + r) * bb; }

int dtype_repack(int rtype, void *dst, const void *src, int64_t rows, int64_t C) {
    const int gr = dtype_group_rows(rtype);
    const dtype_traits *t = dtype_traits_of(dtype_base_type(rtype));
    if (gr < 2 || !t || rows < 0 || rows % gr || C < 0 || C % t->blck) return -1;
    if (rtype == DT_Q8_0_R8) return q8_0_r8_pack(dst, src, rows, C);
    const int64_t nb = C / t->blck;
    const size_t bb = t->block_bytes, row = (size_t)nb * bb;
    for (int64_t g = 0; g < rows / 4; g++)
        for (int64_t r = 0; r < 4; r++)
            for (int64_t i = 0; i < nb; i++)
                memcpy((uint8_t *)dst + (size_t)g * 4 * row + r4_block_at(i, r, bb),
                       (const uint8_t *)src + (size_t)(4 * g + r) * row + (size_t)i * bb, bb);
    return 0;
}

void dtype_repacked_row(int rtype, void *dst, const void *src, int64_t r, int64_t C) {
    if (rtype == DT_Q8_0_R8) { q8_0_r8_row(dst, src, r, C); return; }
    const dtype_traits *t = dtype_traits_of(dtype_base_type(rtype));
    const int64_t nb = C / t->blck;
    const size_t bb = t->block_bytes;
    const uint8_t *g = (const uint8_t *)src + (size_t)(r / 4) * 4 * (size_t)nb * bb;
    for (int64_t i = 0; i < nb; i++) memcpy((uint8_t *)dst + (size_t)i * bb, g + r4_block_at(i, r % 4, bb), bb);
}

float dtype_repacked_vec_dot(int rtype, const void *group, int r, const void *a, int64_t C) {
    const uint8_t *g = group;
    switch (rtype) {
    case DT_Q8_0_R8: return q8_0_dot_strided(g + r8_scale_at(0, r), 16, g + r8_quants_at(C / QK, 0, r), 8 * QK, a, C);
    case DT_Q4_K_R4: return k_affine_vec_dot(g + r4_block_at(0, r, sizeof(blk_q4_K)), 4 * sizeof(blk_q4_K), a, C, 0);
    case DT_Q5_K_R4: return k_affine_vec_dot(g + r4_block_at(0, r, sizeof(blk_q5_K)), 4 * sizeof(blk_q5_K), a, C, 1);
    case DT_Q6_K_R4: return q6_K_dot_strided(g + r4_block_at(0, r, sizeof(blk_q6_K)), 4 * sizeof(blk_q6_K), a, C);
    default: return NAN; /* not a repacked layout */
    }
}
