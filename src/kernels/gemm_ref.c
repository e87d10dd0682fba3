/* gemm_ref: the portable reference matmuls and GEMM, the oracle of every fast
 * backend (gemm.h) and the path used when the CPU has none or MOE_REFERENCE=1.
 *
 * matmul_forward_ref / matmul_backward_ref: plain scalar loops over the matmul
 * contract of kernels.h, parallel over output rows, float accumulation in
 * increasing index order (products and sums rounded separately).
 * gemm_backend_ref: the strided GEMM of gemm.h with each step fused, c =
 * fma(a, b, c) in increasing k, so the fp32 fast backends must match it bit
 * for bit; for bf16 the inputs are rounded first and the exact products summed
 * in fp32 in increasing k. */
#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "core/core.h"

#include <math.h>
#include <string.h>

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

/* input value as the multiply sees it: itself, or rounded to bf16 */
static inline float mm_in(float x, matmul_precision prec) {
    return prec == MATMUL_BF16 ? bf16_to_float(bf16_from_float(x)) : x;
}

void matmul_forward_ref(float *out, const float *in, const float *w, const float *bias,
                        int N, int C, int OC, matmul_precision prec) {
    double work = (double)N * C * OC;
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK)
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
void gemm_dbias_accumulate(float *dbias, const float *dout, int N, int OC) {
    enum { CH = 64 };
    int nch = (OC + CH - 1) / CH;
    double work = (double)N * OC;
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK * 4)
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
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK)
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
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK)
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
    if (dbias) gemm_dbias_accumulate(dbias, dout, N, OC);
}

/* ---- the reference backend ---------------------------------------------- */

static int ref_supports(const gemm_desc *g) { return 1; }
static size_t ref_workspace(const gemm_desc *g, int nthr) { return 0; }

/* c + sum_k A(m,k) B(k,n), each step one fused multiply-add, k in order.
 * Kept out of line: tests/test_no_fma.sh allows FMA instructions only in
 * functions that ask for them by name. */
__attribute__((noinline)) static float gemm_ref_fma_chain(const gemm_desc *g, int m, int n,
                                                          float c, matmul_precision prec) {
    for (int k = 0; k < g->K; k++)
        c = fmaf(mm_in(g->A[(ptrdiff_t)m * g->as_m + (ptrdiff_t)k * g->as_k], prec),
                 mm_in(g->B[(ptrdiff_t)k * g->bs_k + (ptrdiff_t)n * g->bs_n], prec), c);
    return c;
}

static int ref_run(const gemm_desc *g, void *ws, int nthr) {
    matmul_precision prec = g->bf16 ? MATMUL_BF16 : MATMUL_FP32;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int m = 0; m < g->M; m++) {
        float *cr = g->Cm + (ptrdiff_t)m * g->ldc;
        for (int n = 0; n < g->Nc; n++)
            cr[n] = gemm_ref_fma_chain(g, m, n, g->init ? (g->bias ? g->bias[n] : 0.0f) : cr[n], prec);
    }
    return 0;
}

const gemm_backend gemm_backend_ref = {"reference", ref_supports, ref_workspace, ref_run};
