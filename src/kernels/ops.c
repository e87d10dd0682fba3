/* ops: rmsnorm, swiglu, softmax, cross-entropy (fp32), and the row helpers
 * they share with attention.c (RoPE and attention).
 *
 * Every parallel loop is partitioned by output (rows or columns) and every sum
 * runs in a fixed index order inside one thread, so results are bit-identical
 * for any OpenMP thread count. Sums of squares, softmax denominators and other
 * long reductions accumulate in double. The elementwise ops are memory-bound
 * and use one implementation (no fast/_ref pair). */
#include "kernels/kernels.h"
#include "core/core.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define PAR_MIN KERNELS_PAR_MIN

/* ------------------------------------------------------------------------ */
/* row helpers                                                                */
/* ------------------------------------------------------------------------ */

/* exp(x) in float from + and * only (no libm call), so loops over it vectorise
 * and give the same bits vectorised or scalar, on any target. Cody-Waite
 * reduction x = n ln2 + r, a degree-7 polynomial for exp(r) (Cephes expf
 * coefficients), then 2^n applied in two exact steps. Max error 0.99 ulp
 * against exp in double (measured over every float input with a normal result;
 * test_kernels samples it); exp(x) = 0 below -87.5 (no denormals), +inf above
 * ~88.72; NaN propagates. */
static inline float fexp(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x >= -87.5f ? x : -87.5f; /* NaN -> -87.5: no NaN reaches the int conversion */
    xc = xc > 88.75f ? 88.75f : xc;
    float n = (xc * log2e + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float r = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t ni = (int32_t)n, h = ni >> 1; /* n in [-127, 128]: 2^n = 2^h * 2^(n-h) */
    int32_t b1 = (h + 127) << 23, b2 = (ni - h + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    float y = (p * s1) * s2;
    y = x < -87.5f ? 0.0f : y;
    return x != x ? x : y;
}

/* max of x[0..n), n >= 1, over 8 interleaved lanes (vectorises to maxps) */
float kernels_row_max(const float *x, int n) {
    float m[8];
    for (int l = 0; l < 8; l++) m[l] = x[0];
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (; j < n; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
    float mx = m[0];
    for (int l = 1; l < 8; l++) mx = m[l] > mx ? m[l] : mx;
    return mx;
}

/* Sums in double over 8 interleaved partial sums (lane l takes j = l mod 8),
 * combined in a fixed tree: a fixed order that vectorises. */
#define SUM8_TREE(a) ((((a)[0] + (a)[1]) + ((a)[2] + (a)[3])) + (((a)[4] + (a)[5]) + ((a)[6] + (a)[7])))
static double sum8d(const float *x, int n) {
    double a[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) a[l] += (double)x[j + l];
    for (int l = 0; j + l < n; l++) a[l] += (double)x[j + l];
    return SUM8_TREE(a);
}
double kernels_dot8d(const float *x, const float *y, int n) { /* sum x*y, products in double */
    double a[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) a[l] += (double)x[j + l] * (double)y[j + l];
    for (int l = 0; j + l < n; l++) a[l] += (double)x[j + l] * (double)y[j + l];
    return SUM8_TREE(a);
}

/* dst[j] = exp(x[j] - m); returns their sum (sum8d order). dst may equal x. */
double exp_shift_sum_ref(float *dst, const float *x, float m, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) dst[j] = fexp(x[j] - m);
    return sum8d(dst, n);
}

/* fexp on 16 lanes with exactly fexp's operations (each product and sum
 * rounded on its own, never fused), so every lane has fexp's bits. */
__attribute__((target("avx512f"))) static inline __m512 fexp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.5f), hi = _mm512_set1_ps(88.75f);
    const __m512 shift = _mm512_set1_ps(12582912.0f);
    __m512 xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), lo, x);
    xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xc, hi, _CMP_GT_OQ), xc, hi);
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                           shift), shift);
    __m512 r = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                             _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
    __m512i ni = _mm512_cvttps_epi32(n), h = _mm512_srai_epi32(ni, 1);
    const __m512i bias = _mm512_set1_epi32(127);
    __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h, bias), 23));
    __m512 s2 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, h), bias), 23));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

/* The fast twin: one pass, 16 lanes, the tail masked (no scalar remainder:
 * attention's causal rows average 64 values, where the remainder loops took
 * a third of the forward pass). The sum keeps sum8d's order: lane l of the
 * double accumulator takes j = l mod 8 in increasing j; masked-off lanes add
 * +0.0, which leaves a sum of exps (never -0.0) unchanged. Same bits. */
__attribute__((target("avx512f"))) static double exp_shift_sum_avx512(float *dst, const float *x,
                                                                      float m, int n) {
    __m512 mv = _mm512_set1_ps(m);
    __m512d acc = _mm512_setzero_pd();
    for (int j = 0; j < n; j += 16) {
        int left = n - j;
        __mmask16 k = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 y = _mm512_maskz_mov_ps(k, fexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv)));
        _mm512_mask_storeu_ps(dst + j, k, y);
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(y)));
        if (left > 8)
            acc = _mm512_add_pd(
                acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1))));
    }
    double a[8];
    _mm512_storeu_pd(a, acc);
    return SUM8_TREE(a);
}

double exp_shift_sum(float *dst, const float *x, float m, int n) {
    if (moe_use_fast_kernels()) return exp_shift_sum_avx512(dst, x, m, n);
    return exp_shift_sum_ref(dst, x, m, n);
}

/* ---- llama.cpp's CPU arithmetic (published models at inference) -----------
 * ggml's AVX-512 exp (ggml_v_expf), lane by lane: x = n ln2 + b with n from
 * the 1.5*2^23 rounding trick, ln2 in two fused steps, a degree-5 polynomial
 * in fused multiply-adds, then j * 2^n (scalef); |n| > 192 gives 0 or inf. */
__attribute__((noinline)) float expf_ggml(float x) {
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                         u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (isnan(n)) return j; /* NaN in, NaN out, as the vector code gives (and no NaN to int) */
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return ldexpf(j, (int)n);
}

/* _mm512_reduce_add_ps's tree over 16 floats */
static float reduce16(const float *v) {
    float a[8], b[4];
    for (int l = 0; l < 8; l++) a[l] = v[l + 8] + v[l];
    for (int l = 0; l < 4; l++) b[l] = a[l + 4] + a[l];
    return (b[2] + b[0]) + (b[3] + b[1]);
}

float ggml_lanes_sum(const float acc[4][16]) {
    float v[16];
    for (int l = 0; l < 16; l++) v[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    return reduce16(v);
}

static float vec_dot_ggml_ref(const float *x, const float *y, int n, int padded) {
    float acc[4][16] = {{0}};
    const int np = padded ? n : n & ~63;
    int i = 0; /* element i in accumulator (i / 16) % 4, lane i % 16 */
    for (; i + 64 <= np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) acc[j][l] = fmaf(x[i + 16 * j + l], y[i + 16 * j + l], acc[j][l]);
    for (; i < np; i++) acc[(i >> 4) & 3][i & 15] = fmaf(x[i], y[i], acc[(i >> 4) & 3][i & 15]);
    float s = ggml_lanes_sum((const float(*)[16])acc);
    for (i = np; i < n; i++) {
        const float p = x[i] * y[i];
        s += p;
    }
    return s;
}

/* ---- the AVX-512 twins (moe_use_fast_kernels): lane l of a register is
 * lane l of the scalar code above, so the bits are the same (test_kernels) */
#define GGML_AVX512 __attribute__((target("avx512f,fma")))
GGML_AVX512 static inline __m512 expf_ggml16(__m512 x) {
    const __m512 r = _mm512_set1_ps(0x1.8p23f);
    const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
    const __m512 n = _mm512_sub_ps(z, r);
    const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
    const __m512 u = _mm512_mul_ps(b, b);
    const __m512 j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)), u,
                        _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
        u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
    const __m512 res = _mm512_scalef_ps(j, n);
    const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192.0f), _CMP_GT_OQ);
    if (!big) return res;
    const __m512 alt = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_LE_OQ),
                                            _mm512_set1_ps(INFINITY), _mm512_setzero_ps());
    return _mm512_mask_blend_ps(big, res, alt);
}
/* reduce16's tree on a register */
GGML_AVX512 static inline float reduce16_avx512(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                                   _mm512_castps512_ps256(v));
    const __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    const __m128 c = _mm_add_ps(_mm_movehl_ps(b, b), b); /* b2 + b0, b3 + b1 */
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}
GGML_AVX512 static float vec_dot_ggml_avx512(const float *x, const float *y, int n, int padded) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int np = padded ? n : n & ~63;
    int i = 0;
    for (; i + 64 <= np; i += 64)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * j), _mm512_loadu_ps(y + i + 16 * j), acc[j]);
    for (int j = 0; j < 4 && i + 16 * j < np; j++) { /* padded: the last part-block, lanes past n untouched */
        const int left = np - i - 16 * j;
        const __mmask16 k = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        acc[j] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i + 16 * j), _mm512_maskz_loadu_ps(k, y + i + 16 * j),
                                       acc[j], k);
    }
    float s = reduce16_avx512(_mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3])));
    for (i = np; i < n; i++) {
        const float p = x[i] * y[i];
        s += p;
    }
    return s;
}

float vec_dot_ggml(const float *x, const float *y, int n, int padded) {
    return moe_use_fast_kernels() ? vec_dot_ggml_avx512(x, y, n, padded) : vec_dot_ggml_ref(x, y, n, padded);
}

/* 16 positions' scores at once: vec_dot_ggml_avx512's sums, each reduced
 * by reduce16's tree (lanes l + 8, then l + 4, then (2 + 0) + (3 + 1)),
 * run across 16 registers at once: each step adds the same two partial sums
 * as the one-register tree, two positions per shuffle pair. The network
 * leaves position (j % 4) * 4 + j / 4 of the 16 loaded in lane j, a 4 x 4
 * transpose, which is its own inverse: loading position T(j) into register
 * j puts position j in lane j. D a multiple of 64 (no scalar tail). */
#define SHUF4(a, b, i0, i1, i2, i3) _mm512_shuffle_f32x4(a, b, (i0) | (i1) << 2 | (i2) << 4 | (i3) << 6)
#define SHUF(a, b, i0, i1, i2, i3) _mm512_shuffle_ps(a, b, (i0) | (i1) << 2 | (i2) << 4 | (i3) << 6)
GGML_AVX512 static void scores16_ggml(float *s, const float *q, const float *k, size_t ks, int D, float scale) {
    __m512 v[16];
    for (int j = 0; j < 16; j++) {
        const float *kj = k + (size_t)((j % 4) * 4 + j / 4) * ks;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int i = 0; i < D; i += 64)
            for (int a = 0; a < 4; a++)
                acc[a] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16 * a), _mm512_loadu_ps(kj + i + 16 * a), acc[a]);
        v[j] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
    }
    for (int j = 0; j < 8; j++) /* lanes l + l + 8 */
        v[j] = _mm512_add_ps(SHUF4(v[2 * j], v[2 * j + 1], 0, 1, 0, 1), SHUF4(v[2 * j], v[2 * j + 1], 2, 3, 2, 3));
    for (int j = 0; j < 4; j++) /* l + l + 4 */
        v[j] = _mm512_add_ps(SHUF4(v[2 * j], v[2 * j + 1], 0, 2, 0, 2), SHUF4(v[2 * j], v[2 * j + 1], 1, 3, 1, 3));
    for (int j = 0; j < 2; j++) /* 0 + 2, 1 + 3 */
        v[j] = _mm512_add_ps(SHUF(v[2 * j], v[2 * j + 1], 0, 1, 0, 1), SHUF(v[2 * j], v[2 * j + 1], 2, 3, 2, 3));
    const __m512 r = _mm512_add_ps(SHUF(v[0], v[1], 0, 2, 0, 2), SHUF(v[0], v[1], 1, 3, 1, 3));
    _mm512_storeu_ps(s, _mm512_mul_ps(r, _mm512_set1_ps(scale)));
}

void scores_ggml(float *s, const float *q, const float *k, size_t ks, int len, int D, float scale) {
    if (moe_use_fast_kernels()) {
        int u = 0;
        if (D % 64 == 0 && D > 0)
            for (; u + 16 <= len; u += 16) scores16_ggml(s + u, q, k + (size_t)u * ks, ks, D, scale);
        for (; u < len; u++) s[u] = vec_dot_ggml_avx512(q, k + (size_t)u * ks, D, 0) * scale;
    } else
        for (int u = 0; u < len; u++) s[u] = vec_dot_ggml_ref(q, k + (size_t)u * ks, D, 0) * scale;
}

float vec_dot_ggml_batch(const float *x, const float *y, int n) {
    float acc[16] = {0}, v[16];
    int l0 = 0;
    for (; l0 + 16 <= n; l0 += 16)
        for (int l = 0; l < 16; l++) acc[l] = fmaf(x[l0 + l], y[l0 + l], acc[l]);
    for (int l = 0; l0 + l < n; l++) acc[l] = fmaf(x[l0 + l], y[l0 + l], acc[l]); /* tinyBLAS pads with zeros */
    for (int l = 0; l < 16; l++) v[l] = acc[l];
    return reduce16(v);
}

void matmul_ggml_f32(float *out, const float *in, const float *w, int N, int C, int OC) {
    const int64_t total = (int64_t)N * OC;
#pragma omp parallel for schedule(static) if ((double)total * C >= PAR_MIN)
    for (int64_t i = 0; i < total; i++) {
        const int n = (int)(i / OC), o = (int)(i % OC);
        out[i] = vec_dot_ggml_batch(w + (size_t)o * C, in + (size_t)n * C, C);
    }
}

/* both forms' end: libm exps of x[j..n) - mx, then the row times 1 / sum */
static void softmax_rest_ggml(float *p, const float *x, float mx, int j, int n, double sum) {
    for (; j < n; j++) {
        p[j] = expf(x[j] - mx);
        sum += (double)p[j];
    }
    const float inv = (float)(1.0 / sum);
    for (j = 0; j < n; j++) p[j] *= inv;
}

static void softmax_row_ggml_ref(float *p, const float *x, int n, int padded) {
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    double sum = 0.0;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        for (int l = 0; l < 16; l++) p[j + l] = expf_ggml(x[j + l] - mx);
        sum += (double)reduce16(p + j);
    }
    if (padded && j < n) { /* the last block's masked lanes are exps of -inf: 0 */
        float blk[16] = {0};
        for (int l = 0; j + l < n; l++) blk[l] = p[j + l] = expf_ggml(x[j + l] - mx);
        sum += (double)reduce16(blk);
        j = n;
    }
    softmax_rest_ggml(p, x, mx, j, n, sum);
}

GGML_AVX512 static void softmax_row_ggml_avx512(float *p, const float *x, int n, int padded) {
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    const __m512 mv = _mm512_set1_ps(mx);
    double sum = 0.0;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 e = expf_ggml16(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv));
        _mm512_storeu_ps(p + j, e);
        sum += (double)reduce16_avx512(e);
    }
    if (padded && j < n) { /* masked lanes: exps of -inf, 0 */
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(k, expf_ggml16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv)));
        _mm512_mask_storeu_ps(p + j, k, e);
        sum += (double)reduce16_avx512(e);
        j = n;
    }
    softmax_rest_ggml(p, x, mx, j, n, sum);
}

void softmax_row_ggml(float *p, const float *x, int n, int padded) {
    if (moe_use_fast_kernels()) softmax_row_ggml_avx512(p, x, n, padded);
    else softmax_row_ggml_ref(p, x, n, padded);
}

/* one row; the 16-blocks' exps as expf_ggml16 or lane by lane */
GGML_AVX512 static void swiglu_row_ggml_avx512(float *out, const float *gate, const float *up, int F) {
    const int simd = F & ~15;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int j = 0; j < simd; j += 16) {
        const __m512 g = _mm512_loadu_ps(gate + j);
        const __m512 e = expf_ggml16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + j)));
    }
    for (int j = simd; j < F; j++) out[j] = (gate[j] / (1.0f + expf(-gate[j]))) * up[j];
}
static void swiglu_row_ggml_ref(float *out, const float *gate, const float *up, int F) {
    const int simd = F & ~15;
    for (int j = 0; j < F; j++) {
        const float g = gate[j];
        const float e = j < simd ? expf_ggml(0.0f - g) : expf(-g);
        out[j] = (g / (1.0f + e)) * up[j];
    }
}

void swiglu_forward_ggml(float *out, const float *gate, const float *up, int N, int F) {
    const int fast = moe_use_fast_kernels();
#pragma omp parallel for schedule(static) if ((double)N * F >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const size_t o = (size_t)n * F;
        if (fast) swiglu_row_ggml_avx512(out + o, gate + o, up + o, F);
        else swiglu_row_ggml_ref(out + o, gate + o, up + o, F);
    }
}

void sigmoid_row(float *dst, const float *x, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) dst[j] = 1.0f / (1.0f + fexp(-x[j]));
}

/* ------------------------------------------------------------------------ */
/* RMSNorm                                                                    */
/* ------------------------------------------------------------------------ */

/* rstd = 1/sqrt(mean(x^2) + eps): the sum of squares is accumulated in double
 * (dot8d order), the mean, eps and square root are in double, then rounded to
 * float once. out = (x * rstd) * w in float. */
void rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int N, int C,
                     float eps) {
#pragma omp parallel for schedule(static) if ((double)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C;
        float *o = out + (size_t)n * C;
        double ss = kernels_dot8d(x, x, C);
        float r = (float)(1.0 / sqrt(ss / C + (double)eps));
        if (rstd) rstd[n] = r;
#pragma omp simd
        for (int j = 0; j < C; j++) o[j] = (x[j] * r) * w[j];
    }
}

void rmsnorm_forward_ggml(float *out, const float *in, const float *w, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((double)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C;
        float *o = out + (size_t)n * C;
        double ss = 0.0;
        for (int j = 0; j < C; j++) {
            const float sq = x[j] * x[j];
            ss += (double)sq;
        }
        const float mean = (float)(ss / C);
        const float r = 1.0f / sqrtf(mean + eps);
        for (int j = 0; j < C; j++) o[j] = (x[j] * r) * w[j];
    }
}

/* With r = rstd and g = dout * w:
 *   din_j += r * g_j - x_j * r^3 * (sum_i g_i x_i) / C
 *   dw_j  += sum_n dout_nj * x_nj * r_n
 * din or dw may be NULL (skipped). */
void rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                      const float *rstd, int N, int C) {
    double work = (double)N * C;
    if (din) {
#pragma omp parallel for schedule(static) if (work >= PAR_MIN)
        for (int n = 0; n < N; n++) {
            const float *x = in + (size_t)n * C, *d = dout + (size_t)n * C;
            float *dx = din + (size_t)n * C;
            float r = rstd[n];
            double a[8] = {0}; /* sum_j (d_j * w_j) * x_j, in the dot8d order */
            int j = 0;
            for (; j + 8 <= C; j += 8)
                for (int l = 0; l < 8; l++) a[l] += (double)(d[j + l] * w[j + l]) * x[j + l];
            for (int l = 0; j + l < C; l++) a[l] += (double)(d[j + l] * w[j + l]) * x[j + l];
            double dot = SUM8_TREE(a);
            float coef = (float)((double)r * r * r * dot / C);
#pragma omp simd
            for (int jj = 0; jj < C; jj++) dx[jj] += (d[jj] * w[jj]) * r - x[jj] * coef;
        }
    }
    if (dw) {
        /* columns in chunks, each summed over n in order by one thread */
        enum { CH = 64 };
        int nch = (C + CH - 1) / CH;
#pragma omp parallel for schedule(static) if (work >= PAR_MIN)
        for (int ch = 0; ch < nch; ch++) {
            int j0 = ch * CH, nj = MOE_MIN(CH, C - j0);
            double acc[CH];
            for (int j = 0; j < nj; j++) acc[j] = 0.0;
            for (int n = 0; n < N; n++) {
                const float *x = in + (size_t)n * C + j0, *d = dout + (size_t)n * C + j0;
                float r = rstd[n];
#pragma omp simd
                for (int j = 0; j < nj; j++) acc[j] += (double)(d[j] * x[j] * r);
            }
            for (int j = 0; j < nj; j++) dw[j0 + j] += (float)acc[j];
        }
    }
}

/* ------------------------------------------------------------------------ */
/* SwiGLU                                                                     */
/* ------------------------------------------------------------------------ */

/* sigmoid(g) = 1 / (1 + exp(-g)); silu(g) = g * sigmoid(g) */
void swiglu_forward(float *out, const float *gate, const float *up, int N, int F) {
    size_t total = (size_t)N * F;
#pragma omp parallel for schedule(static) if ((double)total >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        size_t o = (size_t)n * F;
#pragma omp simd
        for (int j = 0; j < F; j++) {
            float g = gate[o + j];
            float sg = 1.0f / (1.0f + fexp(-g));
            out[o + j] = g * sg * up[o + j];
        }
    }
}

/* dgate = dout * up * sig * (1 + g * (1 - sig));  dup = dout * silu(g) (set, not added) */
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int F) {
    size_t total = (size_t)N * F;
#pragma omp parallel for schedule(static) if ((double)total >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        size_t o = (size_t)n * F;
        if (dgate && dup) {
#pragma omp simd
            for (int j = 0; j < F; j++) {
                float g = gate[o + j], d = dout[o + j];
                float sg = 1.0f / (1.0f + fexp(-g));
                dgate[o + j] = d * up[o + j] * sg * (1.0f + g * (1.0f - sg));
                dup[o + j] = d * (g * sg);
            }
        } else {
            for (int j = 0; j < F; j++) {
                float g = gate[o + j], d = dout[o + j];
                float sg = 1.0f / (1.0f + fexp(-g));
                if (dgate) dgate[o + j] = d * up[o + j] * sg * (1.0f + g * (1.0f - sg));
                if (dup) dup[o + j] = d * (g * sg);
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* softmax                                                                    */
/* ------------------------------------------------------------------------ */

/* exp(x - max) / sum, sum in double (sum8d order); in may equal out */
void softmax_forward(float *out, const float *in, int N, int C) {
#pragma omp parallel for schedule(static) if ((double)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C;
        float *o = out + (size_t)n * C;
        if (C <= 0) continue;
        float mx = kernels_row_max(x, C);
        float inv = (float)(1.0 / exp_shift_sum(o, x, mx, C));
#pragma omp simd
        for (int j = 0; j < C; j++) o[j] *= inv;
    }
}

void softmax_backward(float *din, const float *dp, const float *p, int N, int C) {
#pragma omp parallel for schedule(static) if ((double)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = dp + (size_t)n * C, *pr = p + (size_t)n * C;
        float *d = din + (size_t)n * C;
        float fs = (float)kernels_dot8d(pr, g, C);
#pragma omp simd
        for (int j = 0; j < C; j++) d[j] += pr[j] * (g[j] - fs);
    }
}

/* ------------------------------------------------------------------------ */
/* cross-entropy                                                              */
/* ------------------------------------------------------------------------ */

/* loss = log(sum_j exp(l_j - max)) + max - l_target, the sum in double
 * (sum8d order). Targets < 0 or >= V are ignored (loss 0). */
static double ce_row(const float *l, int V, int32_t target) { /* V >= 1 */
    enum { CH = 256 }; /* a multiple of 8: lanes line up with sum8d over the row */
    float mx = kernels_row_max(l, V), e[CH];
    double a[8] = {0};
    for (int j0 = 0; j0 < V; j0 += CH) {
        int n = MOE_MIN(CH, V - j0), j = 0;
#pragma omp simd
        for (int i = 0; i < n; i++) e[i] = fexp(l[j0 + i] - mx);
        for (; j + 8 <= n; j += 8)
            for (int q = 0; q < 8; q++) a[q] += (double)e[j + q];
        for (int q = 0; j + q < n; q++) a[q] += (double)e[j + q];
    }
    return log(SUM8_TREE(a)) + (double)mx - (double)l[target];
}

double crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                            int V) {
    if (N <= 0) return 0.0;
    double *rowloss = moe_malloc((size_t)N * sizeof(double));
    double total = 0.0;
    if (!rowloss) { /* serial, same per-row values and the same summation order */
        for (int n = 0; n < N; n++) {
            int32_t t = targets[n];
            double l = (t >= 0 && t < V) ? ce_row(logits + (size_t)n * V, V, t) : 0.0;
            if (losses) losses[n] = (float)l;
            total += l;
        }
        return total;
    }
#pragma omp parallel for schedule(static) if ((double)N * V >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        int32_t t = targets[n];
        rowloss[n] = (t >= 0 && t < V) ? ce_row(logits + (size_t)n * V, V, t) : 0.0;
        if (losses) losses[n] = (float)rowloss[n];
    }
    for (int n = 0; n < N; n++) total += rowloss[n];
    moe_free(rowloss);
    return total;
}

/* dlogits = scale * (softmax - onehot), softmax as in softmax_forward; may run
 * in place (dlogits == logits). */
void crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, int N,
                           int V, float scale) {
#pragma omp parallel for schedule(static) if ((double)N * V >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        int32_t t = targets[n];
        if (t < 0 || t >= V) {
            memset(d, 0, (size_t)V * sizeof(float));
            continue;
        }
        float mx = kernels_row_max(l, V);
        float inv = (float)(1.0 / exp_shift_sum(d, l, mx, V));
        float pt = d[t] * inv;
#pragma omp simd
        for (int j = 0; j < V; j++) d[j] = scale * (d[j] * inv);
        d[t] = scale * (pt - 1.0f);
    }
}

/* Training's fused cross-entropy: one pass computes each row's softmax into
 * probs (as crossentropy_backward would) and the loss, so the backward pass
 * needs no second exponential sweep. Returns the summed loss. */
double crossentropy_softmax(float *probs, const float *logits, const int32_t *targets, int N,
                            int V) {
    if (N <= 0) return 0.0;
    double *rowloss = moe_malloc((size_t)N * sizeof(double));
    if (!rowloss) { /* no scratch: the two-pass path gives the same values */
        double total = crossentropy_forward(NULL, logits, targets, N, V);
        for (int n = 0; n < N; n++) {
            const float *l = logits + (size_t)n * V;
            float *p = probs + (size_t)n * V;
            float inv = (float)(1.0 / exp_shift_sum(p, l, kernels_row_max(l, V), V));
#pragma omp simd
            for (int j = 0; j < V; j++) p[j] *= inv;
        }
        return total;
    }
#pragma omp parallel for schedule(static) if ((double)N * V >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        int32_t t = targets[n];
        float mx = kernels_row_max(l, V);
        double sum = exp_shift_sum(p, l, mx, V);
        rowloss[n] = (t >= 0 && t < V) ? log(sum) + (double)mx - (double)l[t] : 0.0;
        float inv = (float)(1.0 / sum);
#pragma omp simd
        for (int j = 0; j < V; j++) p[j] *= inv;
    }
    double total = 0.0;
    for (int n = 0; n < N; n++) total += rowloss[n];
    moe_free(rowloss);
    return total;
}

/* dlogits = scale * (probs - onehot) in place over the probabilities; rows with
 * ignored targets become 0. */
void crossentropy_softmax_backward(float *probs, const int32_t *targets, int N, int V,
                                   float scale) {
#pragma omp parallel for schedule(static) if ((double)N * V >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        float *d = probs + (size_t)n * V;
        int32_t t = targets[n];
        if (t < 0 || t >= V) {
            memset(d, 0, (size_t)V * sizeof(float));
            continue;
        }
        float pt = d[t];
#pragma omp simd
        for (int j = 0; j < V; j++) d[j] = scale * d[j];
        d[t] = scale * (pt - 1.0f);
    }
}
