/* matmul: out = in @ w^T (+ bias) and its backward (contract in kernels.h),
 * fp32 or with bf16-rounded inputs, as GEMMs run by the backend this CPU
 * supports best (gemm.h; one file per backend, gemm_ref.c is the oracle).
 *
 * This file maps the three products onto gemm_desc (forward: direct, or for
 * few rows transposed; backward: din and dw), picks the backend once per
 * precision from the detected CPU, and falls back to the scalar reference
 * (matmul_*_ref) when the reference is forced (MOE_REFERENCE=1) or a backend's
 * scratch cannot be had. The fast backends compute each element as a fused
 * multiply-add chain in increasing k from its init, so results do not depend
 * on the thread count, the task split or the number of rows (a token gets the
 * same bits alone or in a batch); the reference has the same properties with
 * its own (non-fused) order. */
#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "core/core.h"

#include <omp.h>
#include <pthread.h>
#include <string.h>

/* ---- backend table ---------------------------------------------------------
 * Fastest first; a backend appears for the precision its supports() accepts on
 * this CPU. gemm_backend_ref is last and accepts everything. */
static const gemm_backend *const backends[] = {
    &gemm_backend_amx_bf16,
    &gemm_backend_avx512_bf16,
    &gemm_backend_avx512,
    &gemm_backend_ref,
};
enum { N_BACKENDS = sizeof backends / sizeof backends[0] };

static const gemm_backend *picked[2];
static pthread_once_t pick_once = PTHREAD_ONCE_INIT;

static void pick_backends(void) {
    for (int bf16 = 0; bf16 < 2; bf16++) {
        const gemm_backend *b[N_BACKENDS];
        gemm_available(b, N_BACKENDS, bf16);
        picked[bf16] = b[0];
    }
}

int gemm_available(const gemm_backend **out, int max, int bf16) {
    gemm_desc probe = {.bf16 = bf16};
    int n = 0;
    for (int i = 0; i < N_BACKENDS && n < max; i++)
        if (backends[i]->supports(&probe)) out[n++] = backends[i];
    return n;
}

const gemm_backend *gemm_pick(int bf16) {
    pthread_once(&pick_once, pick_backends);
    return picked[bf16 != 0];
}

int gemm_threads(const gemm_desc *g) {
    double work = (double)g->M * g->Nc * g->K;
    int nthr = work >= GEMM_SERIAL_WORK && !omp_in_parallel() ? omp_get_max_threads() : 1;
    return nthr < 1 ? 1 : nthr;
}

int gemm_execute(const gemm_backend *b, const gemm_desc *g) {
    if (g->M <= 0 || g->Nc <= 0) return 0;
    if (g->K <= 0) { /* nothing to multiply: only the init */
        if (g->init)
            for (int m = 0; m < g->M; m++) {
                float *cr = g->Cm + (size_t)m * g->ldc;
                if (g->bias) memcpy(cr, g->bias, (size_t)g->Nc * sizeof(float));
                else memset(cr, 0, (size_t)g->Nc * sizeof(float));
            }
        return 0;
    }
    int nthr = gemm_threads(g);
    size_t bytes = b->workspace(g, nthr);
    void *ws = bytes ? moe_malloc(bytes) : NULL;
    int rc = b->run(g, ws, nthr); /* without scratch if the allocation failed */
    moe_free(ws);
    return rc;
}

/* The backend for a matmul of this precision, or NULL for the reference
 * loops (forced, or no fast unit on this CPU). */
static const gemm_backend *fast_backend(matmul_precision prec) {
    if (!moe_use_fast_kernels()) return NULL;
    const gemm_backend *b = gemm_pick(prec == MATMUL_BF16);
    return b == &gemm_backend_ref ? NULL : b;
}

const char *matmul_backend_name(matmul_precision prec) {
    const gemm_backend *b = fast_backend(prec);
    return b ? b->name : gemm_backend_ref.name;
}

static int bf16_pays;
static pthread_once_t pays_once = PTHREAD_ONCE_INIT;

/* From the CPU's identity, not from timing: a timed probe can flip on a busy
 * machine, and then two runs of one command train in different precisions
 * (a resumed run no longer matching a straight one). The rate probe
 * (gemm_bf16_dot_rate) checks the identity's premise in test_gemm. */
static void decide_bf16(void) {
    const gemm_backend *b = gemm_pick(1);
    bf16_pays = b == &gemm_backend_amx_bf16 || (b == &gemm_backend_avx512_bf16 && moe_cpu()->amd);
}

int gemm_bf16_pays(void) {
    pthread_once(&pays_once, decide_bf16);
    return bf16_pays;
}

int moe_bf16_matmul_pays(void) { return fast_backend(MATMUL_BF16) && gemm_bf16_pays(); }

const char *moe_matmul_backend(int bf16) {
    return matmul_backend_name(bf16 ? MATMUL_BF16 : MATMUL_FP32);
}

/* ---- the matmul products as GEMMs ----------------------------------------- */

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
                              int N, int C, int OC, int bf16, const gemm_backend *be) {
    float *T = moe_malloc((size_t)OC * N * sizeof(float));
    if (!T) return -1;
    double work = (double)N * C * OC;
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK)
    for (int m = 0; m < OC; m++) {
        float v = bias ? bias[m] : 0.0f;
        for (int n = 0; n < N; n++) T[(size_t)m * N + n] = v;
    }
    gemm_desc g = {.M = OC, .Nc = N, .K = C, .A = w, .as_m = C, .as_k = 1,
                   .B = in, .bs_k = 1, .bs_n = C, .Cm = T, .ldc = N, .bf16 = bf16, .pack = 1};
    if (gemm_execute(be, &g) != 0) {
        moe_free(T);
        return -1;
    }
    enum { TB = 32 };
#pragma omp parallel for schedule(static) if (work >= GEMM_SERIAL_WORK)
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

void matmul_forward(float *out, const float *in, const float *w, const float *bias, int N, int C,
                    int OC, matmul_precision prec) {
    const gemm_backend *be = fast_backend(prec);
    if (!be) {
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
        forward_transposed(out, in, w, bias, N, C, OC, bf16, be) == 0)
        return;
    gemm_desc g = {.M = N, .Nc = OC, .K = C, .A = in, .as_m = C, .as_k = 1,
                   .B = w, .bs_k = 1, .bs_n = C, .Cm = out, .ldc = OC, .init = 1, .bias = bias,
                   .bf16 = bf16, .pack = 1};
    if (gemm_execute(be, &g) != 0) matmul_forward_ref(out, in, w, bias, N, C, OC, prec);
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
    const gemm_backend *be = fast_backend(prec);
    if (!be) {
        backward_ref(din, dw, dbias, dout, in, w, N, C, OC, prec, din_set);
        return;
    }
    int bf16 = prec == MATMUL_BF16;
    if (din) { /* din[N][C] (+)= dout[N][OC] . w[OC][C] */
        gemm_desc g = {.M = N, .Nc = C, .K = OC, .A = dout, .as_m = OC, .as_k = 1,
                       .B = w, .bs_k = C, .bs_n = 1, .Cm = din, .ldc = C, .init = din_set,
                       .bf16 = bf16, .pack = N >= PACK_MIN_ROWS && C > 64};
        if (gemm_execute(be, &g) != 0)
            backward_ref(din, NULL, NULL, dout, in, w, N, C, OC, prec, din_set);
    }
    if (dw) { /* dw[OC][C] += dout^T . in, summing over n in order */
        gemm_desc g = {.M = OC, .Nc = C, .K = N, .A = dout, .as_m = 1, .as_k = OC,
                       .B = in, .bs_k = C, .bs_n = 1, .Cm = dw, .ldc = C, .bf16 = bf16,
                       .pack = OC >= PACK_MIN_ROWS && C > 64};
        if (gemm_execute(be, &g) != 0)
            matmul_backward_ref(NULL, dw, NULL, dout, in, w, N, C, OC, prec);
    }
    if (dbias) gemm_dbias_accumulate(dbias, dout, N, OC);
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
