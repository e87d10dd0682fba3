/* attention: RoPE (plain, partial, NeoX and YaRN) and causal attention (training
 * forward/backward with separate q/k and v head sizes; inference over a KV
 * cache).
 *
 * Parallel loops are partitioned by output -- (batch, head) for training
 * attention, (batch, kv head) for its backward, (query, head) over the cache,
 * rows for RoPE -- and every sum runs in a fixed order inside one thread, so
 * results are bit-identical for any OpenMP thread count. Training attention
 * has an AVX-512 fast path (rows4, FMA on purpose) with scalar _ref twins;
 * cached attention's fast path is plain C with explicit lanes (no FMA), so it
 * gives the same bits on any target. */
#include "kernels/kernels.h"
#include "core/core.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#define PAR_MIN KERNELS_PAR_MIN

/* ------------------------------------------------------------------------ */
/* RoPE                                                                       */
/* ------------------------------------------------------------------------ */

rope_params rope_params_plain(int D, float base) {
    return (rope_params){.n_rot = D, .neox = 0, .base = base, .freq_scale = 1.0f,
                         .ext_factor = 0.0f, .attn_factor = 1.0f, .beta_fast = 32.0f,
                         .beta_slow = 1.0f, .n_ctx_orig = 0, .freq_factors = NULL,
                         .ggml_angles = 0, .fused = 0};
}

static int rope_params_ok(const rope_params *p, int D) {
    return p && p->n_rot >= 2 && p->n_rot % 2 == 0 && p->n_rot <= D && p->base > 0.0f &&
           p->freq_scale > 0.0f;
}

/* The pair index at which a wavelength fits n_ctx_orig / beta times into the
 * original context: n_rot * ln(n_ctx_orig / (beta * 2 pi)) / (2 ln base), in
 * float as ggml evaluates it (floor/ceil of it decide which pairs ramp). */
static float yarn_corr_dim(int n_rot, int n_ctx_orig, float beta, float base) {
    return (float)n_rot * logf((float)n_ctx_orig / (beta * 2.0f * (float)M_PI)) / (2.0f * logf(base));
}

void rope_yarn_corr_dims(float dims[2], const rope_params *p) {
    float lo = floorf(yarn_corr_dim(p->n_rot, p->n_ctx_orig, p->beta_fast, p->base));
    float hi = ceilf(yarn_corr_dim(p->n_rot, p->n_ctx_orig, p->beta_slow, p->base));
    dims[0] = lo > 0.0f ? lo : 0.0f;
    dims[1] = hi < (float)(p->n_rot - 1) ? hi : (float)(p->n_rot - 1);
}

/* Everything about the angles that does not depend on position or pair. */
typedef struct {
    const rope_params *p;
    int half;            /* n_rot / 2 pairs */
    float theta_scale;   /* ggml_angles: base^(-2/n_rot), in float */
    float corr[2];       /* YaRN ramp ends (pair indices); used when ext_factor != 0 */
    float mscale;        /* magnitude folded into cos and sin */
} rope_plan;

static void rope_plan_init(rope_plan *rp, const rope_params *p) {
    rp->p = p;
    rp->half = p->n_rot / 2;
    rp->theta_scale = powf(p->base, -2.0f / (float)p->n_rot);
    rp->corr[0] = rp->corr[1] = 0.0f;
    rp->mscale = p->attn_factor;
    if (p->ext_factor != 0.0f) {
        rope_yarn_corr_dims(rp->corr, p);
        rp->mscale *= 1.0f + 0.1f * logf(1.0f / p->freq_scale);
    }
}

/* YaRN's share of extrapolation for pair i: 1 below corr[0], 0 above corr[1],
 * linear between, times ext_factor; in float as ggml, or in double (the ramp
 * weighs angles of thousands of radians: in float it cost 5e-5 relative error
 * in the rotated values at 160k positions against PyTorch in float64). */
static float yarn_mix(const rope_plan *rp, int i) {
    float y = ((float)i - rp->corr[0]) / fmaxf(0.001f, rp->corr[1] - rp->corr[0]);
    return (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * rp->p->ext_factor;
}
static double yarn_mix_d(const rope_plan *rp, int i) {
    double y = ((double)i - rp->corr[0]) / fmax(0.001, (double)rp->corr[1] - rp->corr[0]);
    return (1.0 - fmin(1.0, fmax(0.0, y))) * rp->p->ext_factor;
}

/* Angles of pairs [i0, i0+n) at position pos, cos and sin times mscale:
 *   extrap = pos * base^(-2i/n_rot) / freq_factors[i];  interp = freq_scale * extrap
 *   theta  = interp * (1 - mix_i) + extrap * mix_i  (theta = interp when ext_factor = 0)
 * ggml_angles = 0: the angle and the ramp in double, rounded to float only as
 *   cos/sin (the plain case is exactly rope_forward's historical formula, and
 *   what the PyTorch reference computes in float64).
 * ggml_angles = 1: ggml's CPU order in float: base^(-2i/n_rot) by repeated
 *   multiplication with powf(base, -2/n_rot) starting from (float)pos, the
 *   ramp in float, cosf/sinf. */
static void rope_angles_range(float *cs, float *sn, const rope_plan *rp, int32_t pos, int i0, int n) {
    const rope_params *p = rp->p;
    const float *ff = p->freq_factors;
    if (p->ggml_angles) {
        float theta = (float)pos;
        for (int i = 0; i < i0; i++) theta *= rp->theta_scale;
        for (int i = i0; i < i0 + n; i++, theta *= rp->theta_scale) {
            float extrap = ff ? theta / ff[i] : theta, interp = p->freq_scale * extrap, th = interp;
            if (p->ext_factor != 0.0f) {
                float mix = yarn_mix(rp, i);
                th = interp * (1.0f - mix) + extrap * mix;
            }
            cs[i - i0] = cosf(th) * rp->mscale;
            sn[i - i0] = sinf(th) * rp->mscale;
        }
        return;
    }
    for (int i = i0; i < i0 + n; i++) {
        double extrap = (double)pos * pow((double)p->base, -(double)(2 * i) / (double)p->n_rot);
        if (ff) extrap /= (double)ff[i];
        double th = (double)p->freq_scale * extrap;
        if (p->ext_factor != 0.0f) {
            double mix = yarn_mix_d(rp, i);
            th = th * (1.0 - mix) + extrap * mix;
        }
        cs[i - i0] = (float)cos(th) * rp->mscale;
        sn[i - i0] = (float)sin(th) * rp->mscale;
    }
}

static void rope_plan_table(float *tab, int n_pos, const rope_plan *rp) {
    int half = rp->half;
    double work = (double)n_pos * half;
#pragma omp parallel for schedule(static) if (work >= 4096)
    for (int p = 0; p < n_pos; p++)
        rope_angles_range(tab + (size_t)p * 2 * half, tab + (size_t)p * 2 * half + half, rp, p, 0, half);
}

void rope_table_build(float *tab, int n_pos, const rope_params *p) {
    if (n_pos <= 0 || !p || p->n_rot < 2 || p->n_rot % 2) return;
    rope_plan rp;
    rope_plan_init(&rp, p);
    rope_plan_table(tab, n_pos, &rp);
}

void rope_table_fill(float *tab, int n_pos, int D, float base) {
    rope_params p = rope_params_plain(D, base);
    rope_table_build(tab, n_pos, &p);
}

/* fused = 1: the pairs (v0[i*st], v1[i*st]) of one head turned as llama.cpp's
 * native x86 build turns them (its compiler contracts ggml's rotation):
 *   x0' = fma(x0, c, -(x1*s)),  x1' = fma(x0, s, x1*c) */
__attribute__((noinline)) static void rope_turn_fma(float *v0, float *v1, int st, const float *cs,
                                                    const float *sn, float sg, int ni) {
    for (int i = 0; i < ni; i++) {
        const float c = cs[i], s = sg * sn[i];
        const float x0 = v0[(size_t)i * st], x1 = v1[(size_t)i * st];
        v0[(size_t)i * st] = fmaf(x0, c, -(x1 * s));
        v1[(size_t)i * st] = fmaf(x0, s, x1 * c);
    }
}

/* Turns the pairs of x by +angle (dir = 1) or -angle (dir = -1), magnitude
 * mscale either way (the backward is the transpose):
 *   x0' = x0*c - x1*(dir*s),  x1' = x0*(dir*s) + x1*c,
 * two rounded products and one rounded sum, never fused; pairs are
 * (v[2i], v[2i+1]) or, NeoX, (v[i], v[i + n_rot/2]). Dims past n_rot are left
 * as they are. Angles come from tab (positions below n_tab) when given;
 * otherwise a table is built here for the positions present (batches repeat
 * positions 0..T-1, so this saves most of the trig work), or, failing that,
 * per row. Same values every way. */
static void rope_apply(float *x, const int32_t *pos, int N, int H, int D, const rope_params *p,
                       int dir, const float *tab, int n_tab) {
    if (N <= 0 || H <= 0 || !rope_params_ok(p, D)) return;
    enum { ROWBUF = 256 };
    rope_plan rp;
    rope_plan_init(&rp, p);
    const int half = rp.half, neox = p->neox;
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
            if (own) rope_plan_table(own, maxpos + 1, &rp);
            tab = own;
        }
    }
    const float sg = dir < 0 ? -1.0f : 1.0f;
    double work = (double)N * H * p->n_rot;
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
                    rope_angles_range(cbuf, sbuf, &rp, pos[n], i0, ni);
                }
                for (int h = 0; h < H; h++) {
                    float *v = x + ((size_t)n * H + h) * D;
                    if (p->fused) {
                        if (neox) rope_turn_fma(v + i0, v + half + i0, 1, cs, sn, sg, ni);
                        else rope_turn_fma(v + 2 * i0, v + 2 * i0 + 1, 2, cs, sn, sg, ni);
                    } else if (neox) {
                        float *v0 = v + i0, *v1 = v + half + i0;
#pragma omp simd
                        for (int i = 0; i < ni; i++) {
                            float c = cs[i], s = sg * sn[i];
                            float x0 = v0[i], x1 = v1[i];
                            v0[i] = x0 * c - x1 * s;
                            v1[i] = x0 * s + x1 * c;
                        }
                    } else {
                        float *vp = v + 2 * i0;
#pragma omp simd
                        for (int i = 0; i < ni; i++) {
                            float c = cs[i], s = sg * sn[i];
                            float x0 = vp[2 * i], x1 = vp[2 * i + 1];
                            vp[2 * i] = x0 * c - x1 * s;
                            vp[2 * i + 1] = x0 * s + x1 * c;
                        }
                    }
                }
            }
        }
    }
    moe_free(own);
}

void rope_apply_forward(float *x, const int32_t *pos, int N, int H, int D, const rope_params *p,
                        const float *tab, int n_tab) {
    rope_apply(x, pos, N, H, D, p, 1, tab, n_tab);
}

/* The transpose of the forward's (scaled) rotation: the opposite angle. */
void rope_apply_backward(float *dx, const int32_t *pos, int N, int H, int D,
                         const rope_params *p, const float *tab, int n_tab) {
    rope_apply(dx, pos, N, H, D, p, -1, tab, n_tab);
}

void rope_forward(float *x, const int32_t *pos, int N, int H, int D, float base, const float *tab,
                  int n_tab) {
    rope_params p = rope_params_plain(D, base);
    rope_apply(x, pos, N, H, D, &p, 1, tab, n_tab);
}

void rope_backward(float *dx, const int32_t *pos, int N, int H, int D, float base,
                   const float *tab, int n_tab) {
    rope_params p = rope_params_plain(D, base);
    rope_apply(dx, pos, N, H, D, &p, -1, tab, n_tab);
}

/* ------------------------------------------------------------------------ */
/* attention                                                                  */
/* ------------------------------------------------------------------------ */

/* Turns row a[0..n) of scaled scores into probabilities in place:
 * p = exp(s - max) / sum, the sum in double (sum8d order); a[n..T) = 0. */
static void causal_softmax_row(float *a, int n, int T) {
    float mx = kernels_row_max(a, n);
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

static int attention_shape_ok(int B, int T, int H, int KVH, int Dk, int Dv) {
    return B > 0 && T > 0 && H > 0 && KVH > 0 && Dk > 0 && Dv > 0 && H % KVH == 0;
}

static float default_scale(int D) { return (float)(1.0 / sqrt((double)D)); }

void attention_forward_ex_ref(float *out, float *att, const float *q, const float *k,
                              const float *v, int B, int T, int H, int KVH, int Dk, int Dv,
                              float scale) {
    if (!attention_shape_ok(B, T, H, KVH, Dk, Dv)) return;
    int G = H / KVH;
    double work = (double)B * H * T * T * (Dk + Dv) * 0.5;
#pragma omp parallel for schedule(dynamic, 1) if (work >= PAR_MIN)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H, kvh = h / G;
        for (int t = 0; t < T; t++) {
            float *a = att + (((size_t)b * H + h) * T + t) * T;
            const float *qt = q + (((size_t)b * T + t) * H + h) * Dk;
            for (int u = 0; u <= t; u++)
                a[u] = dot_ref(qt, k + (((size_t)b * T + u) * KVH + kvh) * Dk, Dk) * scale;
            causal_softmax_row(a, t + 1, T);
            float *ot = out + (((size_t)b * T + t) * H + h) * Dv;
            for (int d = 0; d < Dv; d++) ot[d] = 0.0f;
            for (int u = 0; u <= t; u++) {
                const float *vu = v + (((size_t)b * T + u) * KVH + kvh) * Dv;
                float p = a[u];
                for (int d = 0; d < Dv; d++) ot[d] += p * vu[d];
            }
        }
    }
}

/* Backward of the above, with ds = p * (dp - sum_u p*dp) * scale:
 *   dq_t += sum_u ds_tu k_u,  dk_u += sum_t ds_tu q_t,  dv_u += sum_t p_tu do_t.
 * Parallel over (b, kv head): the query heads of a group run in order inside
 * one thread, so dk/dv sums are in a fixed order. No scratch: dp is recomputed. */
void attention_backward_ex_ref(float *dq, float *dk, float *dv, const float *dout,
                               const float *att, const float *q, const float *k, const float *v,
                               int B, int T, int H, int KVH, int Dk, int Dv, float scale) {
    if (!attention_shape_ok(B, T, H, KVH, Dk, Dv)) return;
    int G = H / KVH;
    double work = (double)B * H * T * T * (Dk + Dv) * 0.5;
#pragma omp parallel for schedule(dynamic, 1) if (work >= PAR_MIN)
    for (int bk = 0; bk < B * KVH; bk++) {
        int b = bk / KVH, kvh = bk % KVH;
        for (int h = kvh * G; h < (kvh + 1) * G; h++) {
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * T;
                const float *dot_ = dout + (((size_t)b * T + t) * H + h) * Dv;
                const float *qt = q + (((size_t)b * T + t) * H + h) * Dk;
                float *dqt = dq + (((size_t)b * T + t) * H + h) * Dk;
                double sum = 0.0;
                for (int u = 0; u <= t; u++)
                    sum += (double)p[u] * dot_ref(dot_, v + (((size_t)b * T + u) * KVH + kvh) * Dv, Dv);
                float fsum = (float)sum;
                for (int u = 0; u <= t; u++) {
                    size_t ku = (((size_t)b * T + u) * KVH + kvh) * Dk;
                    size_t vu = (((size_t)b * T + u) * KVH + kvh) * Dv;
                    float dp = dot_ref(dot_, v + vu, Dv);
                    float ds = p[u] * (dp - fsum) * scale;
                    for (int d = 0; d < Dk; d++) {
                        dqt[d] += ds * k[ku + d];
                        dk[ku + d] += ds * qt[d];
                    }
                    for (int d = 0; d < Dv; d++) dv[vu + d] += p[u] * dot_[d];
                }
            }
        }
    }
}

void attention_forward_ref(float *out, float *att, const float *q, const float *k,
                           const float *v, int B, int T, int H, int KVH, int D) {
    attention_forward_ex_ref(out, att, q, k, v, B, T, H, KVH, D, D, default_scale(D));
}

void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *att,
                            const float *q, const float *k, const float *v, int B, int T, int H,
                            int KVH, int D) {
    attention_backward_ex_ref(dq, dk, dv, dout, att, q, k, v, B, T, H, KVH, D, D, default_scale(D));
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


void attention_forward_ex(float *out, float *att, const float *q, const float *k, const float *v,
                          int B, int T, int H, int KVH, int Dk, int Dv, float scale) {
    if (!attention_shape_ok(B, T, H, KVH, Dk, Dv)) return;
    double work = (double)B * H * T * T * (Dk + Dv) * 0.5;
    int nthr = work >= PAR_MIN ? omp_get_max_threads() : 1;
    float *scratch = NULL;
    if (moe_use_fast_kernels()) scratch = moe_malloc((size_t)nthr * Dk * T * sizeof(float));
    if (!scratch) {
        attention_forward_ex_ref(out, att, q, k, v, B, T, H, KVH, Dk, Dv, scale);
        return;
    }
    int G = H / KVH;
    ptrdiff_t ldq = (ptrdiff_t)H * Dk, ldk = (ptrdiff_t)KVH * Dk;
    ptrdiff_t ldo = (ptrdiff_t)H * Dv, ldv = (ptrdiff_t)KVH * Dv;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        float *kT = scratch + (size_t)omp_get_thread_num() * Dk * T;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H, kvh = h / G;
            transpose_rows(kT, k + ((size_t)b * T * KVH + kvh) * Dk, ldk, T, Dk);
            const float *qb = q + ((size_t)b * T * H + h) * Dk;
            const float *vb = v + ((size_t)b * T * KVH + kvh) * Dv;
            float *ab = att + ((size_t)b * H + h) * T * T;
            float *ob = out + ((size_t)b * T * H + h) * Dv;
            /* four query rows at a time; row t reads keys u <= t, and the keys
             * computed past the diagonal inside the block are zeroed by softmax */
            for (int t0 = 0; t0 < T; t0 += 4) {
                int ny = MOE_MIN(4, T - t0), nk = t0 + ny;
                rows4(ab + (size_t)t0 * T, T, ny, 0, qb + t0 * ldq, ldq, 1, kT, T, Dk, nk);
                for (int t = t0; t < t0 + ny; t++) {
                    float *a = ab + (size_t)t * T;
#pragma omp simd
                    for (int u = 0; u <= t; u++) a[u] *= scale;
                    causal_softmax_row(a, t + 1, T);
                }
                rows4(ob + t0 * ldo, ldo, ny, 0, ab + (size_t)t0 * T, T, 1, vb, ldv, nk, Dv);
            }
        }
    }
    moe_free(scratch);
}

void attention_backward_ex(float *dq, float *dk, float *dv, const float *dout, const float *att,
                           const float *q, const float *k, const float *v, int B, int T, int H,
                           int KVH, int Dk, int Dv, float scale) {
    if (!attention_shape_ok(B, T, H, KVH, Dk, Dv)) return;
    double work = (double)B * H * T * T * (Dk + Dv) * 0.5;
    int nthr = work >= PAR_MIN ? omp_get_max_threads() : 1;
    size_t per = (size_t)Dv * T + (size_t)T * T; /* vT and dS */
    float *scratch = NULL;
    if (moe_use_fast_kernels()) scratch = moe_malloc((size_t)nthr * per * sizeof(float));
    if (!scratch) {
        attention_backward_ex_ref(dq, dk, dv, dout, att, q, k, v, B, T, H, KVH, Dk, Dv, scale);
        return;
    }
    int G = H / KVH;
    ptrdiff_t ldq = (ptrdiff_t)H * Dk, ldk = (ptrdiff_t)KVH * Dk;
    ptrdiff_t ldo = (ptrdiff_t)H * Dv, ldv = (ptrdiff_t)KVH * Dv;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        float *vT = scratch + (size_t)omp_get_thread_num() * per;
        float *dS = vT + (size_t)Dv * T;
#pragma omp for schedule(dynamic, 1)
        for (int bk = 0; bk < B * KVH; bk++) {
            int b = bk / KVH, kvh = bk % KVH;
            const float *kb = k + ((size_t)b * T * KVH + kvh) * Dk;
            const float *vb = v + ((size_t)b * T * KVH + kvh) * Dv;
            float *dkb = dk + ((size_t)b * T * KVH + kvh) * Dk;
            float *dvb = dv + ((size_t)b * T * KVH + kvh) * Dv;
            transpose_rows(vT, vb, ldv, T, Dv);
            for (int h = kvh * G; h < (kvh + 1) * G; h++) {
                const float *P = att + ((size_t)b * H + h) * T * T;
                const float *qb = q + ((size_t)b * T * H + h) * Dk;
                const float *dob = dout + ((size_t)b * T * H + h) * Dv;
                float *dqb = dq + ((size_t)b * T * H + h) * Dk;
                /* dS = P * (dP - rowsum(P * dP)) * scale, dP = dO . V^T, in blocks
                 * of four rows; dS is zeroed past the diagonal up to the end of
                 * the block so the blocked products below can read whole blocks */
                for (int t0 = 0; t0 < T; t0 += 4) {
                    int ny = MOE_MIN(4, T - t0), nk = t0 + ny;
                    rows4(dS + (size_t)t0 * T, T, ny, 0, dob + t0 * ldo, ldo, 1, vT, T, Dv, nk);
                    for (int t = t0; t < t0 + ny; t++) {
                        float *ds = dS + (size_t)t * T;
                        const float *p = P + (size_t)t * T;
                        float fsum = (float)kernels_dot8d(p, ds, t + 1);
#pragma omp simd
                        for (int u = 0; u <= t; u++) ds[u] = p[u] * (ds[u] - fsum) * scale;
                        for (int u = t + 1; u < nk; u++) ds[u] = 0.0f;
                    }
                    rows4(dqb + t0 * ldq, ldq, ny, 1, dS + (size_t)t0 * T, T, 1, kb, ldk, nk, Dk);
                }
                /* dK rows u += sum_{t>=u} dS[t][u] q_t, dV rows u += sum_{t>=u} P[t][u] dO_t */
                for (int u0 = 0; u0 < T; u0 += 4) {
                    int ny = MOE_MIN(4, T - u0);
                    rows4(dkb + u0 * ldk, ldk, ny, 1, dS + (size_t)u0 * T + u0, 1, T, qb + u0 * ldq,
                          ldq, T - u0, Dk);
                    rows4(dvb + u0 * ldv, ldv, ny, 1, P + (size_t)u0 * T + u0, 1, T, dob + u0 * ldo,
                          ldo, T - u0, Dv);
                }
            }
        }
    }
    moe_free(scratch);
}

void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int H, int KVH, int D) {
    attention_forward_ex(out, att, q, k, v, B, T, H, KVH, D, D, default_scale(D));
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                        const float *q, const float *k, const float *v, int B, int T, int H,
                        int KVH, int D) {
    attention_backward_ex(dq, dk, dv, dout, att, q, k, v, B, T, H, KVH, D, D, default_scale(D));
}

/* ---- attention over a KV cache ---------------------------------------------- */

/* at most this many score rows in the caller's scratch (and threads at work) */
enum { CACHED_SLOTS = 64 };
/* the arithmetic of a row: ours (reference, fast) or llama.cpp's (1-token or batch matmul) */
enum { CACHED_REF, CACHED_FAST, CACHED_GGML_SINGLE, CACHED_GGML_BATCH };

static int cached_slots(int n, int H) {
    int64_t tasks = (int64_t)n * H;
    return (int)(tasks < CACHED_SLOTS ? tasks : CACHED_SLOTS);
}

size_t attention_cached_scratch(int n_ctx, int n, int H) {
    if (n_ctx <= 0 || n <= 0 || H <= 0) return 0;
    return (size_t)cached_slots(n, H) * (size_t)n_ctx;
}

/* sum a[j]*b[j] over 16 interleaved float partial sums (lane l takes j = l mod
 * 16), combined pairwise in a fixed tree: one order that vectorises, on any
 * target. Products and sums are rounded separately (no FMA). */
static float dot16(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[j + l] * b[j + l];
    for (int l = 0; j + l < n; l++) acc[l] += a[j + l] * b[j + l];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* One query row of one head over cache positions [0, len): scores into s,
 * softmax in place (causal_softmax_row), then o = sum_u p_u v_u in u order. */
static void cached_row(float *o, float *s, const float *qh, const float *kc, const float *vc,
                       int len, int Dk, int Dv, size_t ks, size_t vs, float scale, int fast) {
    for (int u = 0; u < len; u++) {
        const float *ku = kc + (size_t)u * ks;
        s[u] = (fast ? dot16(qh, ku, Dk) : dot_ref(qh, ku, Dk)) * scale;
    }
    causal_softmax_row(s, len, len);
    for (int d = 0; d < Dv; d++) o[d] = 0.0f;
    for (int u = 0; u < len; u++) {
        const float *vu = vc + (size_t)u * vs;
        float p = s[u];
        if (fast) {
#pragma omp simd
            for (int d = 0; d < Dv; d++) o[d] += p * vu[d];
        } else {
            for (int d = 0; d < Dv; d++) o[d] += p * vu[d];
        }
    }
}

/* The same row in llama.cpp's order (attention_cached_ggml). The value sums
 * run over the cache rows in order, VB output dims at a time, each dim with
 * its own lanes: lane u % 16 of accumulator (u / 16) % 4 (batch = 0: the
 * 1-token dot) or of the one chain (batch = 1), then each dim's reduction. */
enum { VB = 32 };
static void cached_row_ggml(float *o, float *s, const float *qh, const float *kc, const float *vc, int len,
                            int Dk, int Dv, size_t ks, size_t vs, float scale, int batch) {
    scores_ggml(s, qh, kc, ks, len, Dk, scale);
    softmax_row_ggml(s, s, len, 1);
    float acc[4][16][VB], v[16][VB];
    for (int d0 = 0; d0 < Dv; d0 += VB) {
        const int nd = MOE_MIN(VB, Dv - d0);
        memset(acc, 0, sizeof acc);
        for (int u = 0; u < len; u++) {
            const float p = s[u], *vu = vc + (size_t)u * vs + d0;
            float *ac = acc[batch ? 0 : (u >> 4) & 3][u & 15];
            for (int d = 0; d < nd; d++) ac[d] = fmaf(vu[d], p, ac[d]);
        }
        /* each dim's ggml_lanes_sum, written over the dims so that it vectorises:
         * (0 + 2) + (1 + 3), then lanes l + l+8, + l+4, then (2 + 0) + (3 + 1) */
        for (int l = 0; l < 16; l++)
            for (int d = 0; d < VB; d++) v[l][d] = (acc[0][l][d] + acc[2][l][d]) + (acc[1][l][d] + acc[3][l][d]);
        for (int l = 0; l < 8; l++)
            for (int d = 0; d < VB; d++) v[l][d] = v[l + 8][d] + v[l][d];
        for (int l = 0; l < 4; l++)
            for (int d = 0; d < VB; d++) v[l][d] = v[l + 4][d] + v[l][d];
        for (int d = 0; d < nd; d++) o[d0 + d] = (v[2][d] + v[0][d]) + (v[3][d] + v[1][d]);
    }
}

/* Every (query, head) is one task computed start to finish by one thread, with
 * an arithmetic that depends only on its own query row and cache prefix: the
 * same bits for any thread count, chunk size n or pos0. */
static void cached_run(float *out, const float *q, const float *kc, const float *vc, int pos0,
                       int n, int H, int KVH, int Dk, int Dv, size_t k_stride, size_t v_stride,
                       float scale, float *scratch, int mode) {
    if (n <= 0 || pos0 < 0 || !attention_shape_ok(1, 1, H, KVH, Dk, Dv) || !scratch) return;
    const int G = H / KVH, slots = cached_slots(n, H), ntask = n * H;
    const size_t row = (size_t)pos0 + n; /* the longest prefix: query n-1 sees pos0+n keys */
    double work = (double)H * n * ((double)pos0 + 0.5 * n) * (Dk + Dv);
    int nthr = work >= PAR_MIN ? MOE_MIN(omp_get_max_threads(), slots) : 1;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        float *s = scratch + (size_t)omp_get_thread_num() * row;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntask; task++) {
            int i = task / H, h = task % H, kvh = h / G;
            float *o = out + ((size_t)i * H + h) * Dv;
            const float *qh = q + ((size_t)i * H + h) * Dk, *kh = kc + (size_t)kvh * Dk, *vh = vc + (size_t)kvh * Dv;
            if (mode < CACHED_GGML_SINGLE)
                cached_row(o, s, qh, kh, vh, pos0 + i + 1, Dk, Dv, k_stride, v_stride, scale, mode == CACHED_FAST);
            else
                cached_row_ggml(o, s, qh, kh, vh, pos0 + i + 1, Dk, Dv, k_stride, v_stride, scale,
                                mode == CACHED_GGML_BATCH);
        }
    }
}

void attention_cached(float *out, const float *q, const float *kc, const float *vc, int pos0,
                      int n, int H, int KVH, int Dk, int Dv, size_t k_stride, size_t v_stride,
                      float scale, float *scratch) {
    cached_run(out, q, kc, vc, pos0, n, H, KVH, Dk, Dv, k_stride, v_stride, scale, scratch,
               moe_use_fast_kernels() ? CACHED_FAST : CACHED_REF);
}

void attention_cached_ggml(float *out, const float *q, const float *kc, const float *vc, int pos0,
                           int n, int H, int KVH, int Dk, int Dv, size_t k_stride, size_t v_stride,
                           float scale, float *scratch, int batch) {
    cached_run(out, q, kc, vc, pos0, n, H, KVH, Dk, Dv, k_stride, v_stride, scale, scratch,
               batch ? CACHED_GGML_BATCH : CACHED_GGML_SINGLE);
}

void attention_cached_ref(float *out, const float *q, const float *kc, const float *vc, int pos0,
                          int n, int H, int KVH, int Dk, int Dv, size_t k_stride,
                          size_t v_stride, float scale, float *scratch) {
    cached_run(out, q, kc, vc, pos0, n, H, KVH, Dk, Dv, k_stride, v_stride, scale, scratch, CACHED_REF);
}
