/* matmul: out = in @ w^T (+ bias) and its backward, fp32 or with bf16-rounded
 * inputs (the bf16 GEMM is its own section below).
 *
 * Two implementations share the contract in kernels.h:
 *  - *_ref: plain scalar loops, parallel over output rows, float accumulation in
 *    increasing index order. The test oracle, and the path used when the CPU has
 *    no AVX-512 or MOE_REFERENCE=1.
 *  - fast: a register-blocked AVX-512 GEMM (MR x NR = 8 x 32 tile held in 16 zmm
 *    accumulators, A broadcast, B read as NR-wide panels), B repacked per call
 *    into contiguous panels when that pays off. The forward pass needs one
 *    operand transposed into panels: w for many rows, or (T = w . in^T, then
 *    out = T^T) the few rows of in, e.g. for experts with small N.
 *    Outer loops: tasks of up to 128 rows (row blocks split evenly) x panel groups
 *    run on OpenMP threads; inside, chunks of 512 columns, k blocks of 256 (the B
 *    slice stays in L1). A column-major A (dw) is packed into MR-row strips: all
 *    of it once per call when tasks split a row block's panels, else per task.
 *
 * Determinism. In the fast path every output element is computed as
 *     c = init;  for k = 0 .. K-1 in order:  c = fma(a[k], b[k], c)
 * where init is the bias (or 0) in the forward pass and the current value of the
 * gradient buffer in the backward pass (which accumulates). Blocking over k only
 * stores and reloads c between blocks, which is exact, and the tile an element
 * lands in does not change its arithmetic (partial tiles are zero-padded, not
 * handled by a different kernel). So results are identical for any thread count,
 * any task split, and any N: a token's output row does not depend on which or how
 * many other rows are in the batch. dw sums over the N rows in increasing order.
 * The reference path has the same properties with its own (non-fused) order. */
#include "kernels/kernels.h"
#include "core/core.h"

#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* reference                                                                  */
/* ------------------------------------------------------------------------ */

#define SERIAL_WORK 32768.0 /* N*C*OC below which OpenMP costs more than it gives */

/* input value as the multiply sees it: itself, or rounded to bf16 */
static inline float mm_in(float x, matmul_precision prec) {
    return prec == MATMUL_BF16 ? bf16_to_float(bf16_from_float(x)) : x;
}

void matmul_forward_ref(float *out, const float *in, const float *w, const float *bias,
                        int N, int C, int OC, matmul_precision prec) {
    double work = (double)N * C * OC;
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK)
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C;
        float *o = out + (size_t)n * OC;
        for (int j = 0; j < OC; j++) {
            const float *wr = w + (size_t)j * C;
            float s = 0.0f;
            for (int k = 0; k < C; k++) s += mm_in(x[k], prec) * mm_in(wr[k], prec);
            o[j] = bias ? s + bias[j] : s;
        }
    }
}

/* dbias[j] += sum_n dout[n][j], summed in double over n in order (shared by
 * both paths). */
static void dbias_accumulate(float *dbias, const float *dout, int N, int OC) {
    enum { CH = 64 };
    int nch = (OC + CH - 1) / CH;
    double work = (double)N * OC;
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK * 4)
    for (int ch = 0; ch < nch; ch++) {
        int j0 = ch * CH, nj = MOE_MIN(CH, OC - j0);
        double acc[CH];
        for (int j = 0; j < nj; j++) acc[j] = 0.0;
        for (int n = 0; n < N; n++) {
            const float *d = dout + (size_t)n * OC + j0;
#pragma omp simd
            for (int j = 0; j < nj; j++) acc[j] += (double)d[j];
        }
        for (int j = 0; j < nj; j++) dbias[j0 + j] += (float)acc[j];
    }
}

void matmul_backward_ref(float *din, float *dw, float *dbias, const float *dout,
                         const float *in, const float *w, int N, int C, int OC,
                         matmul_precision prec) {
    double work = (double)N * C * OC;
    if (din) {
        /* din[n][c] += sum_j dout[n][j] * w[j][c], j in increasing order */
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK)
        for (int n = 0; n < N; n++) {
            float *di = din + (size_t)n * C;
            const float *d = dout + (size_t)n * OC;
            for (int j = 0; j < OC; j++) {
                float g = mm_in(d[j], prec);
                const float *wr = w + (size_t)j * C;
#pragma omp simd
                for (int c = 0; c < C; c++) di[c] += g * mm_in(wr[c], prec);
            }
        }
    }
    if (dw) {
        /* dw[j][c] += sum_n dout[n][j] * in[n][c], n in increasing order */
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK)
        for (int j = 0; j < OC; j++) {
            float *dwr = dw + (size_t)j * C;
            for (int n = 0; n < N; n++) {
                float g = mm_in(dout[(size_t)n * OC + j], prec);
                const float *x = in + (size_t)n * C;
#pragma omp simd
                for (int c = 0; c < C; c++) dwr[c] += g * mm_in(x[c], prec);
            }
        }
    }
    if (dbias) dbias_accumulate(dbias, dout, N, OC);
}

/* ------------------------------------------------------------------------ */
/* fast path: AVX-512 GEMM  C[M][Nc] (+)= A[M][K] . B[K][Nc]                  */
/* ------------------------------------------------------------------------ */

#define MR 8    /* rows of A per micro-kernel (6, 12, 14 measured no better) */
#define NR 32   /* columns of B per micro-kernel (2 zmm)        */
#define KC 256  /* k block: a B panel slice of KC*NR floats = 32 KB stays in L1
                    (128 and 192 measured no better in the training step) */
#define MCB 128 /* rows per task block: A slice MCB*KC floats = 128 KB in L2  */
#define SLAB_FLOATS (4u << 20) /* packed-B scratch bound: 16 MB */
#define APF_FLOATS (4u << 20)  /* bound for packing all of a column-major A: 16 MB */

typedef struct {
    int M, Nc, K;
    const float *A; ptrdiff_t as_m, as_k; /* A(m,k) = A[m*as_m + k*as_k]               */
    const float *B; ptrdiff_t bs_k, bs_n; /* B(k,n) = B[k*bs_k + n*bs_n]; one of them 1 */
    float *Cm; ptrdiff_t ldc;             /* C(m,n) = Cm[m*ldc + n]                     */
    int init;                             /* 1: start from bias (or 0); 0: accumulate  */
    const float *bias;                    /* per column n, used when init              */
    int bf16;                             /* 1: round A and B to bf16 (gemm_run_bf16)  */
} gemm_desc;

/* Micro-kernel: C[mr][nr] tile = (load_c ? C : bias row or 0) + A rows (mr of MR
 * valid) . B panel (nr of NR valid).
 * a points at A(m0,k0); b at the panel's first k row, rows ldb apart; rows of the
 * tile past mr re-read row 0 of A and are discarded, so no special edge kernel. */
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

__attribute__((target("avx512f,fma"))) static void
ukernel(int kc, const float *a, ptrdiff_t as_m, ptrdiff_t as_k, int mr, const float *b,
        ptrdiff_t ldb, float *c, ptrdiff_t ldc, int nr, int load_c, const float *bias) {
    TILE_PROLOGUE
    UK_ROWS(TILE_DECL)
#define UK_AROW(r) const float *a##r = a + (r < mr ? r : 0) * as_m;
    UK_ROWS(UK_AROW)
#undef UK_AROW
    if (!load_c) /* the tile is only stored at the end: fetch its lines for writing now */
        for (int r = 0; r < mr; r++) {
            __builtin_prefetch(c + (ptrdiff_t)r * ldc, 1);
            __builtin_prefetch(c + (ptrdiff_t)r * ldc + 16, 1);
        }
#define UK_FMA(r)                                                                  \
    {                                                                              \
        __m512 av = _mm512_set1_ps(a##r[ko]);                                      \
        c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                                \
        c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);                                \
    }
    ptrdiff_t ko = 0;
    if (nr == NR) {
        for (int k = 0; k < kc; k++, ko += as_k, b += ldb) {
            __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
            UK_ROWS(UK_FMA)
        }
    } else {
        for (int k = 0; k < kc; k++, ko += as_k, b += ldb) {
            __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
            UK_ROWS(UK_FMA)
        }
    }
#undef UK_FMA
    UK_ROWS(TILE_STORE)
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

/* Packs panel p (columns p*NR .. +NR, zero-padded) of B over all K into
 * dst[k*NR + j]. */
__attribute__((target("avx512f"))) static void pack_panel(float *dst, const gemm_desc *g, int p) {
    int n0 = p * NR, nr = MOE_MIN(NR, g->Nc - n0), K = g->K;
    if (g->bs_n == 1) { /* rows of B are contiguous: copy NR-wide strips */
        __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
        const float *src = g->B + n0;
        for (int k = 0; k < K; k++, src += g->bs_k, dst += NR) {
            _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m0, src));
            _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + 16));
        }
        return;
    }
    /* B(k,n) = B[n*bs_n + k]: columns of B are contiguous rows in memory
     * (the forward pass's w): transpose 16x16 blocks. */
    for (int h = 0; h < 2; h++) {
        int j0 = h * 16, nj = nr - j0;
        if (nj <= 0) {
            for (int k = 0; k < K; k++) memset(dst + (size_t)k * NR + j0, 0, 16 * sizeof(float));
            continue;
        }
        const float *src = g->B + (size_t)(n0 + j0) * g->bs_n;
        int k = 0;
        if (nj == 16) {
            for (; k + 16 <= K; k += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (size_t)i * g->bs_n + k);
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)(k + i) * NR + j0, r[i]);
            }
        }
        for (; k < K; k++) {
            float *d = dst + (size_t)k * NR + j0;
            for (int j = 0; j < 16; j++) d[j] = j < nj ? src[(size_t)j * g->bs_n + k] : 0.0f;
        }
    }
}

/* Packs k rows [k0,k1) of panels [ps,pe) of a row-major B (bs_n == 1) into
 * the slab layout of pack_panel (dst holds panel ps first). Reads whole rows of
 * B in order, which streams better than one NR-wide strip at a time. */
__attribute__((target("avx512f"))) static void pack_rows(float *dst, const gemm_desc *g, int ps,
                                                         int pe, int k0, int k1) {
    int nfull = MOE_MIN(pe, g->Nc / NR); /* panels without padding */
    size_t pstride = (size_t)g->K * NR;
    for (int k = k0; k < k1; k++) {
        const float *src = g->B + (ptrdiff_t)k * g->bs_k;
        float *d = dst + (size_t)k * NR;
        int p = ps;
        for (; p < nfull; p++) {
            float *dp = d + (size_t)(p - ps) * pstride;
            _mm512_storeu_ps(dp, _mm512_loadu_ps(src + p * NR));
            _mm512_storeu_ps(dp + 16, _mm512_loadu_ps(src + p * NR + 16));
        }
        for (; p < pe; p++) {
            int nr = g->Nc - p * NR;
            __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
            float *dp = d + (size_t)(p - ps) * pstride;
            _mm512_storeu_ps(dp, _mm512_maskz_loadu_ps(m0, src + p * NR));
            _mm512_storeu_ps(dp + 16, _mm512_maskz_loadu_ps(m1, src + p * NR + 16));
        }
    }
}

/* Packs rows [m0,m0+mr) x k [k0,k0+kc) of a column-major A (as_m == 1) into
 * ap[k*MR + r], rows past mr zero. */
__attribute__((target("avx512f"))) static void pack_a_cols(float *ap, const gemm_desc *g, int m0,
                                                           int mr, int k0, int kc) {
    const float *src = g->A + (ptrdiff_t)k0 * g->as_k + m0;
    __mmask16 mk = lanes(mr);
    for (int k = 0; k < kc; k++, src += g->as_k, ap += MR) {
        _mm256_storeu_ps(ap, _mm512_castps512_ps256(_mm512_maskz_loadu_ps(mk, src)));
    }
}

/* Packs strips [s0,s1) (MR rows each) of a column-major A (as_m == 1) over
 * all K: k block k0 (kc long) of strip s goes to dst[k0*Mp + s*kc*MR + k*MR + r]
 * with Mp = MR * (number of strips), rows past M zero. So within a k block the
 * strips are contiguous (no cache-set aliasing between them). Two strips at a
 * time read whole 64-byte rows of A. */
__attribute__((target("avx512f"))) static void pack_a_strips(float *dst, const gemm_desc *g,
                                                             int s0, int s1) {
    int K = g->K;
    size_t Mp = (size_t)((g->M + MR - 1) / MR) * MR;
    for (int s = s0; s < s1; s += 2) {
        int m0 = s * MR, rows = MOE_MIN(2 * MR, g->M - m0);
        if (s + 1 >= s1) rows = MOE_MIN(rows, MR);
        __mmask16 mk = lanes(rows);
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = MOE_MIN(KC, K - k0);
            float *d0 = dst + (size_t)k0 * Mp + (size_t)s * kc * MR;
            float *d1 = d0 + (size_t)kc * MR;
            const float *src = g->A + (ptrdiff_t)k0 * g->as_k + m0;
            if (rows > MR) {
                for (int k = 0; k < kc; k++, src += g->as_k) {
                    __m512 v = _mm512_maskz_loadu_ps(mk, src);
                    _mm256_storeu_ps(d0 + (size_t)k * MR, _mm512_castps512_ps256(v));
                    _mm256_storeu_ps(d1 + (size_t)k * MR, _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                                              _mm512_castps_pd(v), 1)));
                }
            } else {
                for (int k = 0; k < kc; k++, src += g->as_k)
                    _mm256_storeu_ps(d0 + (size_t)k * MR,
                                     _mm512_castps512_ps256(_mm512_maskz_loadu_ps(mk, src)));
            }
        }
    }
}

/* One task: rows [m0,m1) x panels [p0,p1) of C. Bp holds the packed panels
 * starting at panel pbase (NULL: read B directly, only when bs_n == 1).
 * A column-major A is read from Apf (all of A packed once per call, layout of
 * pack_a_strips) if non-NULL, else packed per k block into Ap (this thread's
 * MCB*KC floats), else (both NULL) read in place. */
static void gemm_task(const gemm_desc *g, const float *Bp, int pbase, const float *Apf, float *Ap,
                      int m0, int m1, int p0, int p1) {
    /* column chunks of PCH panels keep the C block (MCB x PCH*NR floats,
     * 256 KB) in L2 across the k blocks */
    enum { PCH = 16 };
    size_t Mp = (size_t)((g->M + MR - 1) / MR) * MR;
    for (int pc0 = p0; pc0 < p1; pc0 += PCH) {
        int pc1 = MOE_MIN(p1, pc0 + PCH);
        for (int k0 = 0; k0 < g->K; k0 += KC) {
            int kc = MOE_MIN(KC, g->K - k0);
            if (Ap) /* cheap (contiguous strips): redone per chunk */
                for (int m = m0; m < m1; m += MR)
                    pack_a_cols(Ap + (size_t)(m - m0) * kc, g, m, MOE_MIN(MR, m1 - m), k0, kc);
            for (int p = pc0; p < pc1; p++) {
                int n = p * NR, nr = MOE_MIN(NR, g->Nc - n);
                const float *b;
                ptrdiff_t ldb;
                if (Bp) {
                    b = Bp + ((size_t)(p - pbase) * g->K + k0) * NR;
                    ldb = NR;
                } else {
                    b = g->B + (ptrdiff_t)k0 * g->bs_k + n;
                    ldb = g->bs_k;
                }
                for (int m = m0; m < m1; m += MR) {
                    int mr = MOE_MIN(MR, m1 - m);
                    float *c = g->Cm + (ptrdiff_t)m * g->ldc + n;
                    int load_c = !(g->init && k0 == 0);
                    const float *bias = g->bias ? g->bias + n : NULL;
                    if (Apf)
                        ukernel(kc, Apf + (size_t)k0 * Mp + (size_t)m * kc, 1, MR, mr, b, ldb, c,
                                g->ldc, nr, load_c, bias);
                    else if (Ap)
                        ukernel(kc, Ap + (size_t)(m - m0) * kc, 1, MR, mr, b, ldb, c, g->ldc, nr,
                                load_c, bias);
                    else
                        ukernel(kc, g->A + (ptrdiff_t)m * g->as_m + (ptrdiff_t)k0 * g->as_k,
                                g->as_m, g->as_k, mr, b, ldb, c, g->ldc, nr, load_c, bias);
                }
            }
        }
    }
}

static int gemm_run_bf16(const gemm_desc *g);

/* Threads for one GEMM: all of them for enough work, one inside a parallel
 * region (experts run side by side) or for small work. */
static int gemm_threads(const gemm_desc *g) {
    double work = (double)g->M * g->Nc * g->K;
    int nthr = work >= SERIAL_WORK && !omp_in_parallel() ? omp_get_max_threads() : 1;
    return nthr < 1 ? 1 : nthr;
}

/* Splits nps panels into groups of *ppg so that nrb row blocks x groups make
 * about `want` tasks; returns the number of groups. */
static int panel_groups(int want, int nrb, int nps, int *ppg) {
    int groups = MOE_MAX(1, MOE_MIN((want + nrb - 1) / nrb, nps));
    *ppg = (nps + groups - 1) / groups;
    return (nps + *ppg - 1) / *ppg;
}

/* Runs the GEMM. Returns 0, or -1 when scratch could not be allocated and the
 * layout needs it (caller falls back to the reference path). */
static int gemm_run(const gemm_desc *g, int pack) {
    if (g->M <= 0 || g->Nc <= 0) return 0;
    int np = (g->Nc + NR - 1) / NR;
    if (g->K <= 0) { /* nothing to multiply: only the init */
        if (g->init)
            for (int m = 0; m < g->M; m++) {
                float *cr = g->Cm + (size_t)m * g->ldc;
                if (g->bias) memcpy(cr, g->bias, (size_t)g->Nc * sizeof(float));
                else memset(cr, 0, (size_t)g->Nc * sizeof(float));
            }
        return 0;
    }
    if (g->bf16) return gemm_run_bf16(g);
    if (g->bs_n != 1) pack = 1;
    int nthr = gemm_threads(g);

    int slab = np; /* panels packed at a time */
    float *Bp = NULL, *Ap = NULL, *Apf = NULL;
    if (pack) {
        size_t per = (size_t)g->K * NR;
        slab = (int)MOE_MAX((size_t)1, SLAB_FLOATS / per);
        if (slab > np) slab = np;
        Bp = moe_malloc((size_t)slab * per * sizeof(float));
        if (!Bp) {
            if (g->bs_n != 1) return -1;
            slab = np; /* read B in place */
        }
    }
    /* task grid: row blocks x panel groups; enough tasks to balance the threads */
    int nrb = (g->M + MCB - 1) / MCB;
    int want = nthr > 1 ? 8 * nthr : 1;
    if (g->as_m == 1 && nthr > 1 && nrb < 2 * nthr && g->M >= 4 * MR * nthr) {
        /* column-major A: split rows (blocks of at least 4 strips) rather than
         * panels, so that no two tasks pack the same rows of A */
        nrb = MOE_MIN((g->M + 4 * MR - 1) / (4 * MR), 2 * nthr);
        want = nrb;
    }
    int mcb = ((g->M + nrb - 1) / nrb + MR - 1) / MR * MR; /* even split, <= MCB */
    nrb = (g->M + mcb - 1) / mcb;
    /* A column-major (dw = dout^T . in): pack MR-row strips so the kernel reads
     * A contiguously. When panel groups split a row block across tasks, pack all
     * of A once (else every task would repack it); otherwise each task packs its
     * rows per k block. If that fails, read A in place (same arithmetic). */
    int nstrips = (g->M + MR - 1) / MR;
    if (g->as_m == 1 && g->M > 1) {
        int groups0 = MOE_MIN((want + nrb - 1) / nrb, MOE_MIN(slab, np));
        if ((groups0 > 1 || slab < np) && (size_t)nstrips * MR * g->K <= APF_FLOATS)
            Apf = moe_malloc((size_t)nstrips * MR * g->K * sizeof(float));
        if (!Apf) Ap = moe_malloc((size_t)nthr * MCB * KC * sizeof(float));
    }
    if (Apf) {
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
        for (int s = 0; s < nstrips; s += 2) pack_a_strips(Apf, g, s, MOE_MIN(nstrips, s + 2));
    }
    for (int ps = 0; ps < np; ps += slab) {
        int pe = MOE_MIN(np, ps + slab), nps = pe - ps;
        int ppg, groups = panel_groups(want, nrb, nps, &ppg);
        int ntasks = nrb * groups;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
        {
            float *ap = Ap ? Ap + (size_t)omp_get_thread_num() * MCB * KC : NULL;
            if (Bp && g->bs_n == 1) {
                enum { KR = 64 };
#pragma omp for schedule(static)
                for (int k = 0; k < g->K; k += KR)
                    pack_rows(Bp, g, ps, pe, k, MOE_MIN(g->K, k + KR));
            } else if (Bp) {
#pragma omp for schedule(static)
                for (int p = ps; p < pe; p++) pack_panel(Bp + (size_t)(p - ps) * g->K * NR, g, p);
            }
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                int rb = t / groups, gi = t % groups;
                int m0 = rb * mcb, m1 = MOE_MIN(g->M, m0 + mcb);
                int p0 = ps + gi * ppg, p1 = MOE_MIN(pe, p0 + ppg);
                gemm_task(g, Bp, ps, Apf, ap, m0, m1, p0, p1);
            }
        }
    }
    moe_free(Bp);
    moe_free(Ap);
    moe_free(Apf);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* bf16 path: inputs rounded to bfloat16, products summed in fp32           */
/* ------------------------------------------------------------------------ */
/* Same GEMM shape as above, but both operands are packed as bf16 pairs along
 * k and multiplied with VDPBF16PS (AVX512_BF16): each 32-bit lane holds
 * (x[k], x[k+1]) for an even k, and one instruction adds a[k]*b[k] +
 * a[k+1]*b[k+1] into an fp32 accumulator, twice the multiplies of an fp32 FMA.
 * Products of two bf16 are exact in fp32; the sum is rounded in fp32, in
 * increasing k (pairs) order, blocked over k only by storing and reloading C,
 * so the determinism argument of the fp32 path holds unchanged: any thread
 * count, task split or batch size gives the same bits. An odd K is padded with
 * a zero pair element.
 *
 * Layouts (uint16_t elements, 32-bit words = pairs):
 *   B panel p: word (kp, j) at Bp[(p*Kp + kp)*NR + j]    (NR = 32 columns)
 *   A strip:   word (kp, r) at Ap[kp*MR + r]             (MR = 8 rows)     */

#define KCP 256 /* k pairs per block: a B panel slice of KCP*NR words = 32 KB */

/* fp32 -> bf16, round to nearest even, as VCVTNEPS2BF16: denormal inputs
 * become signed zero, NaN stays NaN (quiet). */
uint16_t bf16_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u); /* zero/denormal */
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

uint16_t BF16_TARGET kernels_bf16_hw(float f) {
    __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_set1_ps(f));
    return (uint16_t)_mm256_extract_epi16(v, 0);
}

/* 16 floats -> 16 bf16 in a ymm */
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

/* 16 rows of a row-major fp32 block (row i at src + i*ld; rows >= nrows read
 * as zero), their first min(left, 32) values (zero past left) as 16 bf16
 * pairs each, transposed: lane i of r[kp] is pair kp of row i. */
BF16_TARGET static void pairs_transposed(__m512 r[16], const float *src, ptrdiff_t ld, int nrows,
                                         int left) {
    __mmask16 l0 = lanes(left), l1 = lanes(left - 16);
    for (int i = 0; i < 16; i++) {
        if (i >= nrows) {
            r[i] = _mm512_setzero_ps();
            continue;
        }
        const float *sp = src + (ptrdiff_t)i * ld;
        r[i] = _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(cvt16(_mm512_maskz_loadu_ps(l0, sp))),
            cvt16(_mm512_maskz_loadu_ps(l1, sp + 16)), 1));
    }
    transpose16(r);
}

/* Packs panel p of B (columns p*NR.., zero-padded) over all k pairs into dst. */
BF16_TARGET static void pack_panel_bf16(uint16_t *dst, const gemm_desc *g, int p) {
    int n0 = p * NR, nr = MOE_MIN(NR, g->Nc - n0), K = g->K, Kp = (K + 1) / 2;
    if (g->bs_n == 1) { /* row-major B: interleave rows k and k+1 column by column */
        for (int h = 0; h < 2; h++) {
            __mmask16 mk = lanes(nr - h * 16);
            const float *src = g->B + n0 + h * 16;
            for (int kp = 0; kp < Kp; kp++) {
                const float *r0 = src + (ptrdiff_t)(2 * kp) * g->bs_k;
                __m512 x = _mm512_maskz_loadu_ps(mk, r0);
                __m512 y = 2 * kp + 1 < K ? _mm512_maskz_loadu_ps(mk, r0 + g->bs_k)
                                          : _mm512_setzero_ps();
                _mm512_storeu_si512(dst + ((size_t)kp * NR + h * 16) * 2, pairs_interleave(x, y));
            }
        }
        return;
    }
    /* B(k,n) = B[n*bs_n + k]: pairs are adjacent in memory. Convert 16 columns
     * x 16 pairs at a time (masked past K and past the panel's columns, so an
     * odd K gets its zero pad element) and transpose the 32-bit words. */
    uint32_t *d32 = (uint32_t *)dst;
    for (int h = 0; h < 2; h++) {
        int j0 = h * 16, nj = MOE_MAX(0, nr - j0);
        const float *src = g->B + (size_t)(n0 + j0) * g->bs_n;
        for (int kp = 0; kp < Kp; kp += 16) {
            __m512 r[16];
            pairs_transposed(r, src + 2 * kp, g->bs_n, nj, K - 2 * kp);
            int np_ = MOE_MIN(16, Kp - kp);
            for (int i = 0; i < np_; i++)
                _mm512_storeu_ps((float *)(d32 + (size_t)(kp + i) * NR + j0), r[i]);
        }
    }
}

/* A as bf16 pairs in MR-row strips for the micro-kernel: pair kp of row r of
 * a strip at ap[kp*MR + r]; rows past the matrix and an odd kc's pad element
 * are zero.
 * Row-major A: rows [m0,m0+mr) x k [k0,k0+kc), mr <= 2*MR (one or two strips,
 * the second at ap + kcp*MR); each row's pairs are adjacent in memory. */
BF16_TARGET static void pack_a_rows_bf16(uint32_t *ap, const gemm_desc *g, int m0, int mr, int k0,
                                         int kc) {
    /* up to two strips per transpose: rows m0.. (mr <= 2*MR), lanes 0..7 of each
     * result go to the first strip, lanes 8..15 to the second */
    int kcp = (kc + 1) / 2;
    uint32_t *ap2 = ap + (size_t)kcp * MR;
    for (int kp = 0; kp < kcp; kp += 16) {
        __m512 v[16];
        pairs_transposed(v, g->A + (ptrdiff_t)m0 * g->as_m + (ptrdiff_t)(k0 + 2 * kp) * g->as_k,
                         g->as_m, mr, kc - 2 * kp);
        int n = MOE_MIN(16, kcp - kp);
        for (int i = 0; i < n; i++)
            _mm256_storeu_ps((float *)(ap + (size_t)(kp + i) * MR), _mm512_castps512_ps256(v[i]));
        if (mr > MR)
            for (int i = 0; i < n; i++)
                _mm256_storeu_ps((float *)(ap2 + (size_t)(kp + i) * MR),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
    }
}

/* Column-major A (as_m == 1): rows [m0,m1) x k [k0,k0+kc) as MR-row strips,
 * strip s at ap[s*kcp*MR]. Memory rows k and k+1 hold a pair for every A row, so
 * each is read once, left to right, for all the strips. */
BF16_TARGET static void pack_a_cols_bf16(uint32_t *ap, const gemm_desc *g, int m0, int m1, int k0,
                                         int kc) {
    int kcp = (kc + 1) / 2, nstr = (m1 - m0 + MR - 1) / MR;
    for (int kp = 0; kp < kcp; kp++) {
        const float *r0 = g->A + (ptrdiff_t)(k0 + 2 * kp) * g->as_k + m0;
        int has1 = 2 * kp + 1 < kc;
        for (int st = 0; st < nstr; st += 2) { /* two strips: 16 values of each row */
            __mmask16 mk = lanes(m1 - m0 - st * MR);
            __m512 x = _mm512_maskz_loadu_ps(mk, r0 + st * MR);
            __m512 y = has1 ? _mm512_maskz_loadu_ps(mk, r0 + g->as_k + st * MR) : _mm512_setzero_ps();
            __m512i o = pairs_interleave(x, y); /* strip st, then strip st+1 */
            _mm256_storeu_si256((__m256i *)(ap + ((size_t)st * kcp + kp) * MR),
                                _mm512_castsi512_si256(o));
            if (st + 1 < nstr)
                _mm256_storeu_si256((__m256i *)(ap + ((size_t)(st + 1) * kcp + kp) * MR),
                                    _mm512_extracti64x4_epi64(o, 1));
        }
    }
}

/* Micro-kernel: C tile (mr x nr) = (load_c ? C : bias or 0) + A strip . B
 * panel slice, over kcp pairs. */
BF16_TARGET static void ukernel_bf16(int kcp, const uint32_t *ap, const uint16_t *b, float *c,
                                     ptrdiff_t ldc, int mr, int nr, int load_c,
                                     const float *bias) {
    TILE_PROLOGUE
    UK_ROWS(TILE_DECL)
#define UKB_DOT(r)                                                                 \
    {                                                                              \
        __m512bh av = (__m512bh)_mm512_set1_epi32((int)ap[r]);                     \
        c##r##0 = _mm512_dpbf16_ps(c##r##0, av, b0);                               \
        c##r##1 = _mm512_dpbf16_ps(c##r##1, av, b1);                               \
    }
    for (int kp = 0; kp < kcp; kp++, ap += MR, b += 2 * NR) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + NR);
        UK_ROWS(UKB_DOT)
    }
#undef UKB_DOT
    UK_ROWS(TILE_STORE)
}

/* One task of the bf16 GEMM: rows [m0,m1) x panels [p0,p1); Bp holds the
 * packed panels from pbase; ap is this thread's strip scratch (MCB*KCP words). */
BF16_TARGET static void gemm_task_bf16(const gemm_desc *g, const uint16_t *Bp, int pbase,
                                       uint32_t *ap, int m0, int m1, int p0, int p1) {
    enum { PCH = 16 };
    int Kp = (g->K + 1) / 2, cm = g->as_m == 1;
    /* with a single k block the A block is converted once for all the chunks */
    const int one_kb = g->K <= 2 * KCP;
    for (int pc0 = p0; pc0 < p1; pc0 += PCH) {
        int pc1 = MOE_MIN(p1, pc0 + PCH);
        for (int k0 = 0; k0 < g->K; k0 += 2 * KCP) {
            int kc = MOE_MIN(2 * KCP, g->K - k0), kcp = (kc + 1) / 2;
            if (!(one_kb && pc0 > p0)) { /* else packed for the first chunk */
                if (cm)
                    pack_a_cols_bf16(ap, g, m0, m1, k0, kc);
                else
                    for (int m = m0; m < m1; m += 2 * MR)
                        pack_a_rows_bf16(ap + (size_t)(m - m0) * kcp, g, m, MOE_MIN(2 * MR, m1 - m),
                                         k0, kc);
            }
            for (int p = pc0; p < pc1; p++) {
                int n = p * NR, nr = MOE_MIN(NR, g->Nc - n);
                const uint16_t *b = Bp + ((size_t)(p - pbase) * Kp + k0 / 2) * NR * 2;
                for (int m = m0; m < m1; m += MR)
                    ukernel_bf16(kcp, ap + (size_t)(m - m0) * kcp, b, g->Cm + (ptrdiff_t)m * g->ldc + n,
                                 g->ldc, MOE_MIN(MR, m1 - m), nr, !(g->init && k0 == 0),
                                 g->bias ? g->bias + n : NULL);
            }
        }
    }
}

/* Runs the GEMM in bf16. Returns 0, or -1 when scratch is unavailable. */
static int gemm_run_bf16(const gemm_desc *g) {
    if (g->M <= 0 || g->Nc <= 0) return 0;
    int np = (g->Nc + NR - 1) / NR, Kp = (g->K + 1) / 2, nthr = gemm_threads(g);
    size_t per = (size_t)Kp * NR * 2; /* uint16 per packed panel */
    int slab = (int)MOE_MAX((size_t)1, 2 * (size_t)SLAB_FLOATS / per);
    if (slab > np) slab = np;
    /* Every task converts its rows of A for each k block, so split rows
     * (blocks of at least 2*MR) before splitting panels: 4 tasks per thread. */
    int want = nthr > 1 ? 4 * nthr : 1;
    int nrb = MOE_MAX((g->M + MCB - 1) / MCB, MOE_MIN(want, (g->M + 2 * MR - 1) / (2 * MR)));
    int mcb = ((g->M + nrb - 1) / nrb + MR - 1) / MR * MR;
    nrb = (g->M + mcb - 1) / mcb;
    uint16_t *Bp = moe_malloc((size_t)slab * per * sizeof(uint16_t));
    uint32_t *Ap = moe_malloc((size_t)nthr * mcb * KCP * sizeof(uint32_t));
    if (!Bp || !Ap) {
        moe_free(Bp);
        moe_free(Ap);
        return -1;
    }
    for (int ps = 0; ps < np; ps += slab) {
        int pe = MOE_MIN(np, ps + slab), nps = pe - ps;
        int ppg, groups = panel_groups(want, nrb, nps, &ppg);
        int ntasks = nrb * groups;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
        {
            uint32_t *ap = Ap + (size_t)omp_get_thread_num() * mcb * KCP;
#pragma omp for schedule(static)
            for (int p = ps; p < pe; p++) pack_panel_bf16(Bp + (size_t)(p - ps) * per, g, p);
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                int rb = t / groups, gi = t % groups;
                int m0 = rb * mcb, m1 = MOE_MIN(g->M, m0 + mcb);
                int p0 = ps + gi * ppg, p1 = MOE_MIN(pe, p0 + ppg);
                gemm_task_bf16(g, Bp, ps, ap, m0, m1, p0, p1);
            }
        }
    }
    moe_free(Bp);
    moe_free(Ap);
    return 0;
}

/* Packing a row-major B (a copy) pays off once its panels are reused by enough
 * rows of A and its rows are far apart (long rows alias in L1); otherwise the
 * micro-kernel reads B in place. Either way the arithmetic is the same. */
#define PACK_MIN_ROWS 64

/* Forward, transposed formulation for few rows: T[OC][N] = w . in^T, so the
 * small `in` is the operand that gets transposed into panels instead of w, and
 * out = T^T afterwards. Each element is still bias followed by fma(in, w) in
 * increasing k, so results equal the direct formulation bit for bit.
 * Returns -1 if scratch is unavailable. */
static int forward_transposed(float *out, const float *in, const float *w, const float *bias,
                              int N, int C, int OC, int bf16) {
    float *T = moe_malloc((size_t)OC * N * sizeof(float));
    if (!T) return -1;
    double work = (double)N * C * OC;
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK)
    for (int m = 0; m < OC; m++) {
        float v = bias ? bias[m] : 0.0f;
        for (int n = 0; n < N; n++) T[(size_t)m * N + n] = v;
    }
    gemm_desc g = {.M = OC, .Nc = N, .K = C, .A = w, .as_m = C, .as_k = 1,
                   .B = in, .bs_k = 1, .bs_n = C, .Cm = T, .ldc = N, .bf16 = bf16};
    if (gemm_run(&g, 1) != 0) {
        moe_free(T);
        return -1;
    }
    enum { TB = 32 };
#pragma omp parallel for schedule(static) if (work >= SERIAL_WORK)
    for (int n0 = 0; n0 < N; n0 += TB) {
        int n1 = MOE_MIN(N, n0 + TB);
        for (int m0 = 0; m0 < OC; m0 += TB) {
            int m1 = MOE_MIN(OC, m0 + TB);
            for (int n = n0; n < n1; n++)
                for (int m = m0; m < m1; m++) out[(size_t)n * OC + m] = T[(size_t)m * N + n];
        }
    }
    moe_free(T);
    return 0;
}

/* The bf16 fast path needs AVX512_BF16 on top of the fp32 path's AVX-512. */
static int fast_path(matmul_precision prec) {
    if (!moe_use_fast_kernels()) return 0;
    return prec != MATMUL_BF16 ||
           (moe_cpu()->avx512_bf16 && moe_cpu()->avx512bw && moe_cpu()->avx512vl);
}

void matmul_forward(float *out, const float *in, const float *w, const float *bias, int N, int C,
                    int OC, matmul_precision prec) {
    if (!fast_path(prec)) {
        matmul_forward_ref(out, in, w, bias, N, C, OC, prec);
        return;
    }
    int bf16 = prec == MATMUL_BF16;
    if (N <= 0 || OC <= 0) return;
    /* Pick the operand to transpose into panels by a rough cost model (ns):
     * compute at ~140 flop/ns incl. padding of the vectorised dimension, packing
     * ~0.4 ns per element, transposing the result back ~0.6 ns per element
     * (bf16: twice the compute rate). */
    double cw = (double)C * OC, np8 = (N + 7) / 8 * 8.0, np32 = (N + 31) / 32 * 32.0;
    double rate = bf16 ? 280.0 : 140.0;
    double cost_direct = 2.0 * np8 * cw / rate + 0.4 * cw;
    double cost_trans = 2.0 * np32 * cw / rate + 0.4 * (double)N * C + 0.6 * (double)N * OC;
    if (C > 0 && cost_trans < cost_direct &&
        forward_transposed(out, in, w, bias, N, C, OC, bf16) == 0)
        return;
    gemm_desc g = {.M = N, .Nc = OC, .K = C, .A = in, .as_m = C, .as_k = 1,
                   .B = w, .bs_k = 1, .bs_n = C, .Cm = out, .ldc = OC, .init = 1, .bias = bias,
                   .bf16 = bf16};
    if (gemm_run(&g, 1) != 0) matmul_forward_ref(out, in, w, bias, N, C, OC, prec);
}

/* The reference backward with din set rather than accumulated when din_set. */
static void backward_ref(float *din, float *dw, float *dbias, const float *dout, const float *in,
                         const float *w, int N, int C, int OC, matmul_precision prec, int din_set) {
    if (din && din_set) memset(din, 0, (size_t)N * C * sizeof(float));
    matmul_backward_ref(din, dw, dbias, dout, in, w, N, C, OC, prec);
}

/* din_set: din starts from 0 (the GEMM's init) instead of its current value */
static void backward(float *din, float *dw, float *dbias, const float *dout, const float *in,
                     const float *w, int N, int C, int OC, matmul_precision prec, int din_set) {
    if (!fast_path(prec)) {
        backward_ref(din, dw, dbias, dout, in, w, N, C, OC, prec, din_set);
        return;
    }
    int bf16 = prec == MATMUL_BF16;
    if (din) { /* din[N][C] (+)= dout[N][OC] . w[OC][C] */
        gemm_desc g = {.M = N, .Nc = C, .K = OC, .A = dout, .as_m = OC, .as_k = 1,
                       .B = w, .bs_k = C, .bs_n = 1, .Cm = din, .ldc = C, .init = din_set,
                       .bf16 = bf16};
        if (gemm_run(&g, N >= PACK_MIN_ROWS && C > 64) != 0)
            backward_ref(din, NULL, NULL, dout, in, w, N, C, OC, prec, din_set);
    }
    if (dw) { /* dw[OC][C] += dout^T . in, summing over n in order */
        gemm_desc g = {.M = OC, .Nc = C, .K = N, .A = dout, .as_m = 1, .as_k = OC,
                       .B = in, .bs_k = C, .bs_n = 1, .Cm = dw, .ldc = C, .bf16 = bf16};
        if (gemm_run(&g, OC >= PACK_MIN_ROWS && C > 64) != 0)
            matmul_backward_ref(NULL, dw, NULL, dout, in, w, N, C, OC, prec);
    }
    if (dbias) dbias_accumulate(dbias, dout, N, OC);
}

void matmul_backward(float *din, float *dw, float *dbias, const float *dout, const float *in,
                     const float *w, int N, int C, int OC, matmul_precision prec) {
    backward(din, dw, dbias, dout, in, w, N, C, OC, prec, 0);
}

void matmul_backward_set_din(float *din, float *dw, float *dbias, const float *dout,
                             const float *in, const float *w, int N, int C, int OC,
                             matmul_precision prec) {
    backward(din, dw, dbias, dout, in, w, N, C, OC, prec, 1);
}
