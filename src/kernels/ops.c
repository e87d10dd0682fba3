/* ops: rmsnorm, rope, attention, swiglu, softmax, cross-entropy (fp32).
 *
 * Every parallel loop is partitioned by output (rows, columns or (batch, head))
 * and every sum runs in a fixed index order inside one thread, so results are
 * bit-identical for any OpenMP thread count. Sums of squares, softmax
 * denominators and other long reductions accumulate in double.
 * Only attention has a separate AVX-512 fast path (with a scalar _ref twin);
 * the elementwise ops are memory-bound and use one implementation. */
#include "kernels/kernels.h"
#include "core/core.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/* below this many elements a parallel region costs more than it saves */
#define PAR_MIN 16384.0

/* ------------------------------------------------------------------------ */
/* row helpers                                                                */
/* ------------------------------------------------------------------------ */

/* exp(x) in float from + and * only (no libm call), so loops over it vectorise
 * and give the same bits vectorised or scalar, on any target. Cody-Waite
 * reduction x = n ln2 + r, a degree-7 polynomial for exp(r) (Cephes expf
 * coefficients), then 2^n applied in two exact steps. Max error ~1.6 ulp;
 * exp(x) = 0 below -87.5 (no denormals), +inf above ~88.72; NaN propagates. */
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
static float row_max(const float *x, int n) {
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
static double dot8d(const float *x, const float *y, int n) { /* sum x*y, products in double */
    double a[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) a[l] += (double)x[j + l] * (double)y[j + l];
    for (int l = 0; j + l < n; l++) a[l] += (double)x[j + l] * (double)y[j + l];
    return SUM8_TREE(a);
}

/* dst[j] = exp(x[j] - m); returns their sum (sum8d order). dst may equal x. */
double exp_shift_sum(float *dst, const float *x, float m, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) dst[j] = fexp(x[j] - m);
    return sum8d(dst, n);
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
        double ss = dot8d(x, x, C);
        float r = (float)(1.0 / sqrt(ss / C + (double)eps));
        if (rstd) rstd[n] = r;
#pragma omp simd
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
/* RoPE                                                                       */
/* ------------------------------------------------------------------------ */

/* cos/sin of pos * base^(-2i/D), all in double, rounded to float only at the end:
 *     inv_freq = pow((double)base, -(double)(2*i) / D);  ang = pos * inv_freq;
 *     c = (float)cos(ang);  s = (float)sin(ang);
 * The PyTorch reference computes the same in float64 and casts, so both rotate
 * by the same floats. */
static void rope_angle(int i, int32_t pos, int D, double base, float *c, float *s) {
    double inv_freq = pow(base, -(double)(2 * i) / (double)D);
    double ang = (double)pos * inv_freq;
    *c = (float)cos(ang);
    *s = (float)sin(ang);
}

static void rope_angles(float *cs, float *sn, int32_t pos, int D, double base) {
    for (int i = 0; i < D / 2; i++) rope_angle(i, pos, D, base, &cs[i], &sn[i]);
}

void rope_table_fill(float *tab, int n_pos, int D, float base) {
    int half = D / 2;
    double work = (double)n_pos * half;
#pragma omp parallel for schedule(static) if (work >= 4096)
    for (int p = 0; p < n_pos; p++)
        rope_angles(tab + (size_t)p * 2 * half, tab + (size_t)p * 2 * half + half, p, D, (double)base);
}

/* Rotates pairs by +angle (dir = 1) or -angle (dir = -1):
 *   x0' = x0*c - x1*(dir*s),  x1' = x0*(dir*s) + x1*c.
 * Angles come from tab (positions below n_tab) when given; otherwise a table
 * is built here for the positions present (batches repeat positions 0..T-1,
 * so this saves most of the trig work), or, failing that, per row. Same values
 * every way. */
static void rope_apply(float *x, const int32_t *pos, int N, int H, int D, float base, int dir,
                       const float *tab, int n_tab) {
    if (N <= 0 || H <= 0 || D < 2) return;
    enum { ROWBUF = 256 };
    int half = D / 2;
    int32_t maxpos = -1;
    int table_ok = 1;
    for (int n = 0; n < N; n++) {
        if (pos[n] < 0) table_ok = 0;
        if (pos[n] > maxpos) maxpos = pos[n];
    }
    float *own = NULL;
    if (!(tab && table_ok && maxpos < n_tab)) {
        tab = NULL;
        if (table_ok && (int64_t)maxpos + 1 < N) {
            own = moe_malloc((size_t)(maxpos + 1) * 2 * half * sizeof(float));
            if (own) rope_table_fill(own, maxpos + 1, D, base);
            tab = own;
        }
    }
    const float sg = dir < 0 ? -1.0f : 1.0f;
    double work = (double)N * H * D;
#pragma omp parallel if (work >= PAR_MIN)
    {
        float cbuf[ROWBUF], sbuf[ROWBUF]; /* angles of a chunk of pairs when there is no table */
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            for (int i0 = 0; i0 < half; i0 += ROWBUF) {
                const int ni = MOE_MIN(ROWBUF, half - i0);
                const float *cs = cbuf, *sn = sbuf;
                if (tab) {
                    cs = tab + (size_t)pos[n] * 2 * half + i0;
                    sn = cs + half;
                } else {
                    for (int i = 0; i < ni; i++) rope_angle(i0 + i, pos[n], D, (double)base, &cbuf[i], &sbuf[i]);
                }
                /* pairs along the row, so the loop vectorises over pairs: two
                 * rounded products and a rounded sum, never fused */
                for (int h = 0; h < H; h++) {
                    float *v = x + ((size_t)n * H + h) * D + 2 * i0;
#pragma omp simd
                    for (int i = 0; i < ni; i++) {
                        float c = cs[i], s = sg * sn[i];
                        float x0 = v[2 * i], x1 = v[2 * i + 1];
                        v[2 * i] = x0 * c - x1 * s;
                        v[2 * i + 1] = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
    moe_free(own);
}

void rope_forward(float *x, const int32_t *pos, int N, int H, int D, float base, const float *tab,
                  int n_tab) {
    rope_apply(x, pos, N, H, D, base, 1, tab, n_tab);
}

/* The rotation is orthogonal, so the gradient rotates by the opposite angle. */
void rope_backward(float *dx, const int32_t *pos, int N, int H, int D, float base,
                   const float *tab, int n_tab) {
    rope_apply(dx, pos, N, H, D, base, -1, tab, n_tab);
}

/* ------------------------------------------------------------------------ */
/* attention                                                                  */
/* ------------------------------------------------------------------------ */

/* Turns row a[0..n) of scaled scores into probabilities in place:
 * p = exp(s - max) / sum, the sum in double (sum8d order); a[n..T) = 0. */
static void causal_softmax_row(float *a, int n, int T) {
    float mx = row_max(a, n);
    float inv = (float)(1.0 / exp_shift_sum(a, a, mx, n));
#pragma omp simd
    for (int u = 0; u < n; u++) a[u] *= inv;
    for (int u = n; u < T; u++) a[u] = 0.0f;
}

static float dot_ref(const float *a, const float *b, int D) {
    float s = 0.0f;
    for (int d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

void attention_forward_ref(float *out, float *att, const float *q, const float *k,
                           const float *v, int B, int T, int H, int KVH, int D) {
    if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || D <= 0 || H % KVH != 0) return;
    int G = H / KVH;
    float scale = (float)(1.0 / sqrt((double)D));
    double work = (double)B * H * T * T * D;
#pragma omp parallel for schedule(dynamic, 1) if (work >= PAR_MIN)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H, kvh = h / G;
        for (int t = 0; t < T; t++) {
            float *a = att + (((size_t)b * H + h) * T + t) * T;
            const float *qt = q + (((size_t)b * T + t) * H + h) * D;
            for (int u = 0; u <= t; u++)
                a[u] = dot_ref(qt, k + (((size_t)b * T + u) * KVH + kvh) * D, D) * scale;
            causal_softmax_row(a, t + 1, T);
            float *ot = out + (((size_t)b * T + t) * H + h) * D;
            for (int d = 0; d < D; d++) ot[d] = 0.0f;
            for (int u = 0; u <= t; u++) {
                const float *vu = v + (((size_t)b * T + u) * KVH + kvh) * D;
                float p = a[u];
                for (int d = 0; d < D; d++) ot[d] += p * vu[d];
            }
        }
    }
}

/* Backward of the above, with ds = p * (dp - sum_u p*dp) * scale:
 *   dq_t += sum_u ds_tu k_u,  dk_u += sum_t ds_tu q_t,  dv_u += sum_t p_tu do_t.
 * Parallel over (b, kv head): the query heads of a group run in order inside
 * one thread, so dk/dv sums are in a fixed order. No scratch: dp is recomputed. */
void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *att,
                            const float *q, const float *k, const float *v, int B, int T, int H,
                            int KVH, int D) {
    if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || D <= 0 || H % KVH != 0) return;
    int G = H / KVH;
    float scale = (float)(1.0 / sqrt((double)D));
    double work = (double)B * H * T * T * D;
#pragma omp parallel for schedule(dynamic, 1) if (work >= PAR_MIN)
    for (int bk = 0; bk < B * KVH; bk++) {
        int b = bk / KVH, kvh = bk % KVH;
        for (int h = kvh * G; h < (kvh + 1) * G; h++) {
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * T;
                const float *dot_ = dout + (((size_t)b * T + t) * H + h) * D;
                const float *qt = q + (((size_t)b * T + t) * H + h) * D;
                float *dqt = dq + (((size_t)b * T + t) * H + h) * D;
                double sum = 0.0;
                for (int u = 0; u <= t; u++)
                    sum += (double)p[u] * dot_ref(dot_, v + (((size_t)b * T + u) * KVH + kvh) * D, D);
                float fsum = (float)sum;
                for (int u = 0; u <= t; u++) {
                    size_t ku = (((size_t)b * T + u) * KVH + kvh) * D;
                    float dp = dot_ref(dot_, v + ku, D);
                    float ds = p[u] * (dp - fsum) * scale;
                    for (int d = 0; d < D; d++) {
                        dqt[d] += ds * k[ku + d];
                        dk[ku + d] += ds * qt[d];
                        dv[ku + d] += p[u] * dot_[d];
                    }
                }
            }
        }
    }
}

/* --- AVX-512 helper for the fast path ---
 * rows4: for i < ny (ny <= 4) and j < J:
 *     y[i*ldy + j] = (acc ? y[i*ldy + j] : 0) + sum_{k<K} c[i*ci + k*ck] * X[k*ldx + j]
 * summed over k in increasing order with fma. Four output rows share each load
 * of X, and j runs 64 wide (16 accumulators), so it is throughput-bound rather
 * than latency-bound. Rows past ny repeat row 0 and are not stored. Every
 * attention product is this shape: scores (X = K^T), P.V, dS.K, dS^T.Q, P^T.dO. */
#define R4_ROWS(X_) X_(0) X_(1) X_(2) X_(3)
#define R4_VECS(X_, i) X_(i, 0) X_(i, 1) X_(i, 2) X_(i, 3)
__attribute__((target("avx512f,fma"))) static void rows4(float *y, ptrdiff_t ldy, int ny,
                                                         int acc, const float *c, ptrdiff_t ci,
                                                         ptrdiff_t ck, const float *X,
                                                         ptrdiff_t ldx, int K, int J) {
    const float *c0 = c, *c1 = c + (ny > 1 ? ci : 0), *c2 = c + (ny > 2 ? 2 * ci : 0),
                *c3 = c + (ny > 3 ? 3 * ci : 0);
    for (int j0 = 0; j0 < J; j0 += 64) {
        int nj = MOE_MIN(64, J - j0);
        __mmask16 m[4];
        for (int v = 0; v < 4; v++) {
            int r = nj - 16 * v;
            m[v] = r >= 16 ? (__mmask16)0xffff : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1);
        }
#define R4_INIT1(i, v) \
    __m512 a##i##v = (acc && i < ny) ? _mm512_maskz_loadu_ps(m[v], y + i * ldy + j0 + 16 * v) \
                                     : _mm512_setzero_ps();
#define R4_INIT(i) R4_VECS(R4_INIT1, i)
        R4_ROWS(R4_INIT)
        const float *x = X + j0;
        ptrdiff_t ko = 0;
#define R4_FMA1(i, v) a##i##v = _mm512_fmadd_ps(b##i, x##v, a##i##v);
#define R4_FMA(i) { __m512 b##i = _mm512_set1_ps(c##i[ko]); R4_VECS(R4_FMA1, i) }
        if (nj == 64) {
            for (int k = 0; k < K; k++, x += ldx, ko += ck) {
                __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16),
                       x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
                R4_ROWS(R4_FMA)
            }
        } else if (nj <= 32) { /* the upper two vectors stay zero */
            for (int k = 0; k < K; k++, x += ldx, ko += ck) {
                __m512 x0 = _mm512_maskz_loadu_ps(m[0], x), x1 = _mm512_maskz_loadu_ps(m[1], x + 16);
#define R4_FMA2(i) { __m512 b##i = _mm512_set1_ps(c##i[ko]); R4_FMA1(i, 0) R4_FMA1(i, 1) }
                R4_ROWS(R4_FMA2)
#undef R4_FMA2
            }
        } else {
            for (int k = 0; k < K; k++, x += ldx, ko += ck) {
                __m512 x0 = _mm512_maskz_loadu_ps(m[0], x), x1 = _mm512_maskz_loadu_ps(m[1], x + 16),
                       x2 = _mm512_maskz_loadu_ps(m[2], x + 32), x3 = _mm512_maskz_loadu_ps(m[3], x + 48);
                R4_ROWS(R4_FMA)
            }
        }
#define R4_STORE1(i, v) _mm512_mask_storeu_ps(y + i * ldy + j0 + 16 * v, m[v], a##i##v);
#define R4_STORE(i) if (i < ny) { R4_VECS(R4_STORE1, i) }
        R4_ROWS(R4_STORE)
#undef R4_INIT1
#undef R4_INIT
#undef R4_FMA1
#undef R4_FMA
#undef R4_STORE1
#undef R4_STORE
    }
}

/* dst[d*T + u] = src[u*lds + d]: the K (or V) rows of one head, transposed. */
static void transpose_rows(float *dst, const float *src, ptrdiff_t lds, int T, int D) {
    enum { TB = 16 };
    for (int u0 = 0; u0 < T; u0 += TB)
        for (int d0 = 0; d0 < D; d0 += TB)
            for (int u = u0; u < MOE_MIN(T, u0 + TB); u++)
                for (int d = d0; d < MOE_MIN(D, d0 + TB); d++)
                    dst[(size_t)d * T + u] = src[(size_t)u * lds + d];
}

void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int H, int KVH, int D) {
    if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || D <= 0 || H % KVH != 0) return;
    double work = (double)B * H * T * T * D;
    int nthr = work >= PAR_MIN ? omp_get_max_threads() : 1;
    float *scratch = NULL;
    if (moe_use_fast_kernels()) scratch = moe_malloc((size_t)nthr * D * T * sizeof(float));
    if (!scratch) {
        attention_forward_ref(out, att, q, k, v, B, T, H, KVH, D);
        return;
    }
    int G = H / KVH;
    float scale = (float)(1.0 / sqrt((double)D));
    ptrdiff_t ldq = (ptrdiff_t)H * D, ldk = (ptrdiff_t)KVH * D;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        float *kT = scratch + (size_t)omp_get_thread_num() * D * T;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H, kvh = h / G;
            transpose_rows(kT, k + ((size_t)b * T * KVH + kvh) * D, ldk, T, D);
            const float *qb = q + ((size_t)b * T * H + h) * D;
            const float *vb = v + ((size_t)b * T * KVH + kvh) * D;
            float *ab = att + ((size_t)b * H + h) * T * T;
            float *ob = out + ((size_t)b * T * H + h) * D;
            /* four query rows at a time; row t reads keys u <= t, and the keys
             * computed past the diagonal inside the block are zeroed by softmax */
            for (int t0 = 0; t0 < T; t0 += 4) {
                int ny = MOE_MIN(4, T - t0), nk = t0 + ny;
                rows4(ab + (size_t)t0 * T, T, ny, 0, qb + t0 * ldq, ldq, 1, kT, T, D, nk);
                for (int t = t0; t < t0 + ny; t++) {
                    float *a = ab + (size_t)t * T;
#pragma omp simd
                    for (int u = 0; u <= t; u++) a[u] *= scale;
                    causal_softmax_row(a, t + 1, T);
                }
                rows4(ob + t0 * ldq, ldq, ny, 0, ab + (size_t)t0 * T, T, 1, vb, ldk, nk, D);
            }
        }
    }
    moe_free(scratch);
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                        const float *q, const float *k, const float *v, int B, int T, int H,
                        int KVH, int D) {
    if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || D <= 0 || H % KVH != 0) return;
    double work = (double)B * H * T * T * D;
    int nthr = work >= PAR_MIN ? omp_get_max_threads() : 1;
    size_t per = (size_t)D * T + (size_t)T * T; /* vT and dS */
    float *scratch = NULL;
    if (moe_use_fast_kernels()) scratch = moe_malloc((size_t)nthr * per * sizeof(float));
    if (!scratch) {
        attention_backward_ref(dq, dk, dv, dout, att, q, k, v, B, T, H, KVH, D);
        return;
    }
    int G = H / KVH;
    float scale = (float)(1.0 / sqrt((double)D));
    ptrdiff_t ldq = (ptrdiff_t)H * D, ldk = (ptrdiff_t)KVH * D;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        float *vT = scratch + (size_t)omp_get_thread_num() * per;
        float *dS = vT + (size_t)D * T;
#pragma omp for schedule(dynamic, 1)
        for (int bk = 0; bk < B * KVH; bk++) {
            int b = bk / KVH, kvh = bk % KVH;
            const float *kb = k + ((size_t)b * T * KVH + kvh) * D;
            const float *vb = v + ((size_t)b * T * KVH + kvh) * D;
            float *dkb = dk + ((size_t)b * T * KVH + kvh) * D;
            float *dvb = dv + ((size_t)b * T * KVH + kvh) * D;
            transpose_rows(vT, vb, ldk, T, D);
            for (int h = kvh * G; h < (kvh + 1) * G; h++) {
                const float *P = att + ((size_t)b * H + h) * T * T;
                const float *qb = q + ((size_t)b * T * H + h) * D;
                const float *dob = dout + ((size_t)b * T * H + h) * D;
                float *dqb = dq + ((size_t)b * T * H + h) * D;
                /* dS = P * (dP - rowsum(P * dP)) * scale, dP = dO . V^T, in blocks
                 * of four rows; dS is zeroed past the diagonal up to the end of
                 * the block so the blocked products below can read whole blocks */
                for (int t0 = 0; t0 < T; t0 += 4) {
                    int ny = MOE_MIN(4, T - t0), nk = t0 + ny;
                    rows4(dS + (size_t)t0 * T, T, ny, 0, dob + t0 * ldq, ldq, 1, vT, T, D, nk);
                    for (int t = t0; t < t0 + ny; t++) {
                        float *ds = dS + (size_t)t * T;
                        const float *p = P + (size_t)t * T;
                        float fsum = (float)dot8d(p, ds, t + 1);
#pragma omp simd
                        for (int u = 0; u <= t; u++) ds[u] = p[u] * (ds[u] - fsum) * scale;
                        for (int u = t + 1; u < nk; u++) ds[u] = 0.0f;
                    }
                    rows4(dqb + t0 * ldq, ldq, ny, 1, dS + (size_t)t0 * T, T, 1, kb, ldk, nk, D);
                }
                /* dK rows u += sum_{t>=u} dS[t][u] q_t, dV rows u += sum_{t>=u} P[t][u] dO_t */
                for (int u0 = 0; u0 < T; u0 += 4) {
                    int ny = MOE_MIN(4, T - u0);
                    rows4(dkb + u0 * ldk, ldk, ny, 1, dS + (size_t)u0 * T + u0, 1, T, qb + u0 * ldq,
                          ldq, T - u0, D);
                    rows4(dvb + u0 * ldk, ldk, ny, 1, P + (size_t)u0 * T + u0, 1, T, dob + u0 * ldq,
                          ldq, T - u0, D);
                }
            }
        }
    }
    moe_free(scratch);
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
        float mx = row_max(x, C);
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
        float fs = (float)dot8d(pr, g, C);
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
    float mx = row_max(l, V), e[CH];
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
        float mx = row_max(l, V);
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
            float inv = (float)(1.0 / exp_shift_sum(p, l, row_max(l, V), V));
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
        float mx = row_max(l, V);
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
