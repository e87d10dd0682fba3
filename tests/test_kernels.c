/* Kernel tests: fast vs reference matmul, hand cases, finite-difference checks
 * of every backward, causality, and bit-identical results across thread counts. */
#include "harness.h"
#include "core/core.h"
#include "kernels/kernels.h"

#include <omp.h>
#include <stdlib.h>

static moe_rng rng;

static float *vec(size_t n) { /* uniform in [-1, 1) */
    float *x = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = 2.0f * moe_rng_uniform(&rng) - 1.0f;
    return x;
}
static float *zeros(size_t n) { return calloc(n ? n : 1, sizeof(float)); }
static float *copy(const float *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}
/* max|a-b| / max|b|: error relative to the size of the reference output */
static double rel_to_norm(const float *a, const float *b, size_t n) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (e > d || e != e) d = e != e ? INFINITY : e;
        if (fabs(b[i]) > s) s = fabs(b[i]);
    }
    return d / (s > 1e-30 ? s : 1e-30);
}
static double dotw(const float *x, const float *r, size_t n) { /* sum(x * r) in double */
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * r[i];
    return s;
}

/* ---- finite differences ----------------------------------------------------
 * loss(ctx) is a scalar function of the float array p; grad holds the analytic
 * gradient. Central differences with step eps; error is
 * |num - ana| / (max(|num|,|ana|) + floor), floor = 2e-2 * max|ana| + 1e-4: the
 * float forward pass leaves ~1e-4 of noise in a numerical derivative, which the
 * floor absorbs for entries much smaller than the largest. */
typedef double (*loss_fn)(void *ctx);
static double fd_check(loss_fn loss, void *ctx, float *p, const float *grad, size_t n,
                       float eps) {
    double gmax = 0, worst = 0;
    for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(grad[i]));
    size_t stride = n > 64 ? n / 64 : 1; /* at most ~64 probes per array */
    for (size_t i = 0; i < n; i += stride) {
        float keep = p[i];
        p[i] = keep + eps;
        double lp = loss(ctx);
        p[i] = keep - eps;
        double lm = loss(ctx);
        p[i] = keep;
        double num = (lp - lm) / (2.0 * eps), ana = grad[i];
        double e = fabs(num - ana) / (fmax(fabs(num), fabs(ana)) + 2e-2 * gmax + 1e-4);
        if (e > worst || e != e) worst = e != e ? INFINITY : e;
    }
    return worst;
}
#define FD_TOL 1e-2
#define FD_EPS 3e-3f /* 1e-3 leaves too much float noise (seen ~1e-2 errors) */

/* ---- matmul ---------------------------------------------------------------- */

static void test_matmul_hand(void) {
    TEST_CASE("matmul hand 2x3");
    const float in[6] = {1, 2, 3, 4, 5, 6};        /* [2][3] */
    const float w[6] = {1, 0, -1, 2, 1, 0};        /* [2][3] */
    const float bias[2] = {0.5f, -1.0f};
    const float want[4] = {-1.5f, 3.0f, -1.5f, 12.0f};
    const float dout[4] = {1, 0, 0, 1};
    for (int fast = 0; fast < 2; fast++) {
        float out[4], din[6] = {0}, dw[6] = {0}, db[2] = {0};
        if (fast) matmul_forward(out, in, w, bias, 2, 3, 2, MATMUL_FP32);
        else matmul_forward_ref(out, in, w, bias, 2, 3, 2, MATMUL_FP32);
        for (int i = 0; i < 4; i++) CHECK(out[i] == want[i], "fast=%d out[%d]=%g", fast, i, out[i]);
        if (fast) matmul_backward(din, dw, db, dout, in, w, 2, 3, 2, MATMUL_FP32);
        else matmul_backward_ref(din, dw, db, dout, in, w, 2, 3, 2, MATMUL_FP32);
        for (int i = 0; i < 6; i++) {
            CHECK(din[i] == w[i], "fast=%d din[%d]=%g", fast, i, din[i]);
            CHECK(dw[i] == in[i], "fast=%d dw[%d]=%g", fast, i, dw[i]);
        }
        CHECK(db[0] == 1 && db[1] == 1, "fast=%d dbias %g %g", fast, db[0], db[1]);
    }
    TEST_END();
}

/* one shape: fast vs reference, forward and backward (accumulating into
 * non-zero buffers), with and without bias / din / dw */
static double matmul_compare(int N, int C, int OC, int variant) {
    float *in = vec((size_t)N * C), *w = vec((size_t)OC * C), *bias = vec(OC);
    float *dout = vec((size_t)N * OC);
    float *o1 = zeros((size_t)N * OC), *o2 = zeros((size_t)N * OC);
    float *di1 = vec((size_t)N * C), *di2 = copy(di1, (size_t)N * C);
    float *dw1 = vec((size_t)OC * C), *dw2 = copy(dw1, (size_t)OC * C);
    float *db1 = vec(OC), *db2 = copy(db1, OC);
    const float *b = (variant & 1) ? bias : NULL;
    int use_din = !(variant & 2), use_dw = !(variant & 4);
    matmul_forward(o1, in, w, b, N, C, OC, MATMUL_FP32);
    matmul_forward_ref(o2, in, w, b, N, C, OC, MATMUL_FP32);
    matmul_backward(use_din ? di1 : NULL, use_dw ? dw1 : NULL, (variant & 1) ? db1 : NULL, dout,
                    in, w, N, C, OC, MATMUL_FP32);
    matmul_backward_ref(use_din ? di2 : NULL, use_dw ? dw2 : NULL, (variant & 1) ? db2 : NULL,
                        dout, in, w, N, C, OC, MATMUL_FP32);
    double e = rel_to_norm(o1, o2, (size_t)N * OC);
    e = fmax(e, rel_to_norm(di1, di2, (size_t)N * C));
    e = fmax(e, rel_to_norm(dw1, dw2, (size_t)OC * C));
    e = fmax(e, rel_to_norm(db1, db2, OC));
    free(in); free(w); free(bias); free(dout); free(o1); free(o2);
    free(di1); free(di2); free(dw1); free(dw2); free(db1); free(db2);
    return e;
}

static void test_matmul_fast_vs_ref(void) {
    TEST_CASE("matmul fast vs reference, odd shapes");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("fast kernels off (no AVX-512, or MOE_REFERENCE=1): matmul_forward is the reference");
        return;
    }
    static const int sh[] = {1, 3, 17, 64, 100, 257};
    int ns = (int)(sizeof sh / sizeof sh[0]), count = 0;
    double worst = 0;
    for (int a = 0; a < ns; a++)
        for (int b = 0; b < ns; b++)
            for (int c = 0; c < ns; c++) {
                double e = matmul_compare(sh[a], sh[b], sh[c], count++ % 8);
                CHECK(e < 1e-5, "N=%d C=%d OC=%d rel err %g", sh[a], sh[b], sh[c], e);
                worst = fmax(worst, e);
            }
    /* larger shapes: several k blocks, row blocks, panel groups and both
     * forward formulations (few rows: transposed; many rows: direct) */
    static const int big[][3] = {{300, 520, 130}, {5, 300, 700}, {40, 1030, 96}, {700, 64, 33},
                                 {2, 2, 2000}, {129, 513, 65}};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        for (int v = 0; v < 8; v += 7) {
            double e = matmul_compare(big[i][0], big[i][1], big[i][2], v);
            CHECK(e < 1e-5, "N=%d C=%d OC=%d rel err %g", big[i][0], big[i][1], big[i][2], e);
            worst = fmax(worst, e);
        }
    printf("  worst relative error %.3g\n", worst);
    TEST_END();
}

/* the fast forward's rows do not depend on the other rows in the batch, and
 * the reference switch and allocation failures fall back to the reference */
static void test_matmul_batch_invariance_and_fallback(void) {
    TEST_CASE("matmul batch invariance, reference switch, dw without scratch");
    int N = 300, C = 200, OC = 150;
    float *in = vec((size_t)N * C), *w = vec((size_t)OC * C), *bias = vec(OC);
    float *full = zeros((size_t)N * OC), *part = zeros((size_t)N * OC), *ref = zeros((size_t)N * OC);
    matmul_forward(full, in, w, bias, N, C, OC, MATMUL_FP32);
    static const int sub[] = {1, 2, 7, 31, 64, 150};
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++) {
        int off = N - sub[i];
        matmul_forward(part, in + (size_t)off * C, w, bias, sub[i], C, OC, MATMUL_FP32);
        CHECK(memcmp(part, full + (size_t)off * OC, (size_t)sub[i] * OC * sizeof(float)) == 0,
              "rows of a %d-row batch differ from the same rows of the %d-row batch", sub[i], N);
    }
    matmul_forward_ref(ref, in, w, bias, N, C, OC, MATMUL_FP32);
    int was_ref = !moe_use_fast_kernels();
    moe_set_reference_kernels(1);
    matmul_forward(part, in, w, bias, N, C, OC, MATMUL_FP32);
    moe_set_reference_kernels(was_ref);
    CHECK(memcmp(part, ref, (size_t)N * OC * sizeof(float)) == 0, "reference switch ignored");
    moe_alloc_fail_after(1);
    matmul_forward(part, in, w, bias, N, C, OC, MATMUL_FP32);
    moe_alloc_fail_after(0);
    int fallback_same = memcmp(part, ref, (size_t)N * OC * sizeof(float)) == 0;
    /* backward still works without scratch (reads B in place) */
    float *dout = vec((size_t)N * OC), *d1 = zeros((size_t)OC * C), *d2 = zeros((size_t)OC * C);
    matmul_backward(NULL, d1, NULL, dout, in, w, N, C, OC, MATMUL_FP32);
    moe_alloc_fail_after(1);
    matmul_backward(NULL, d2, NULL, dout, in, w, N, C, OC, MATMUL_FP32);
    moe_alloc_fail_after(0);
    CHECK(memcmp(d1, d2, (size_t)OC * C * sizeof(float)) == 0,
          "dw differs when scratch allocation fails");
    free(in); free(w); free(bias); free(full); free(part); free(ref);
    free(dout); free(d1); free(d2);
    TEST_END();
    TEST_CASE("matmul allocation failure falls back to the reference");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("fast kernels off (no AVX-512, or MOE_REFERENCE=1): nothing to fall back from");
        return;
    }
    CHECK(fallback_same, "allocation failure did not fall back to the reference");
    TEST_END();
}

/* matmul_backward_set_din overwrites din (NaN garbage must vanish) and equals
 * accumulating into zeros bit for bit, on both paths and both precisions */
static void test_matmul_set_din(void) {
    TEST_CASE("matmul_backward_set_din: din overwritten, equal to accumulating into zeros");
    static const int sh[][3] = {{1, 3, 5}, {37, 130, 70}, {300, 200, 150}, {5, 1030, 64}};
    int was_ref = !moe_use_fast_kernels();
    for (int ref = 0; ref < 2; ref++)
        for (int prec = 0; prec < 2; prec++)
            for (size_t i = 0; i < sizeof sh / sizeof sh[0]; i++) {
                int N = sh[i][0], C = sh[i][1], OC = sh[i][2];
                float *in = vec((size_t)N * C), *w = vec((size_t)OC * C), *dout = vec((size_t)N * OC);
                float *d1 = zeros((size_t)N * C), *d2 = malloc((size_t)N * C * sizeof(float));
                float *dw1 = vec((size_t)OC * C), *dw2 = copy(dw1, (size_t)OC * C);
                for (size_t j = 0; j < (size_t)N * C; j++) d2[j] = NAN;
                moe_set_reference_kernels(ref || was_ref);
                matmul_backward(d1, dw1, NULL, dout, in, w, N, C, OC, (matmul_precision)prec);
                matmul_backward_set_din(d2, dw2, NULL, dout, in, w, N, C, OC, (matmul_precision)prec);
                moe_set_reference_kernels(was_ref);
                CHECK(!memcmp(d1, d2, (size_t)N * C * sizeof(float)) &&
                          !memcmp(dw1, dw2, (size_t)OC * C * sizeof(float)),
                      "%s %s N=%d C=%d OC=%d: set differs from accumulate-into-zero",
                      ref ? "reference" : "fast", prec ? "bf16" : "fp32", N, C, OC);
                free(in); free(w); free(dout); free(d1); free(d2); free(dw1); free(dw2);
            }
    TEST_END();
}

/* ---- bf16 matmul ------------------------------------------------------------
 * Oracle: the exact (double) sum of the bf16-rounded products. The fp32 sum of
 * K terms may differ from it by at most about K * 2^-24 * (sum of |terms|), the
 * standard bound for recursive summation; the checks use (K + 2) * 2^-24. */

static double bf16r(float x) { return bf16_to_float(bf16_from_float(x)); }

static void test_bf16_rounding(void) {
    TEST_CASE("bf16 rounding: hand cases, and the hardware conversion where present");
    CHECK(bf16_from_float(1.0f) == 0x3f80, "1.0 -> %#x", bf16_from_float(1.0f));
    /* 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to even (1.0) */
    CHECK(bf16_from_float(1.00390625f) == 0x3f80, "tie to even down %#x", bf16_from_float(1.00390625f));
    /* 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: rounds up to even */
    CHECK(bf16_from_float(1.01171875f) == 0x3f82, "tie to even up %#x", bf16_from_float(1.01171875f));
    CHECK(bf16_from_float(-2.0f) == 0xc000, "-2 -> %#x", bf16_from_float(-2.0f));
    CHECK(bf16_from_float(1e-40f) == 0 && bf16_from_float(-1e-40f) == 0x8000, "denormals to zero");
    CHECK(bf16_from_float(INFINITY) == 0x7f80, "inf");
    CHECK(isnan(bf16_to_float(bf16_from_float(NAN))), "NaN stays NaN");
    CHECK(bf16_from_float(3.4e38f) == 0x7f80, "max float rounds to inf as RNE does");
    int hw = moe_cpu()->avx512_bf16 && moe_cpu()->avx512bw;
    if (hw) {
        /* random bit patterns (all classes) and random near-tie values */
        int bad = 0;
        for (int i = 0; i < 200000; i++) {
            uint32_t u = (uint32_t)moe_rng_u64(&rng);
            if (i & 1) u = (u & 0xffff0000u) | 0x8000u | (u & 1u); /* ties and near-ties */
            float f;
            memcpy(&f, &u, 4);
            uint16_t want = kernels_bf16_hw(f), got = bf16_from_float(f);
            int both_nan = isnan(f) && isnan(bf16_to_float(got)) && isnan(bf16_to_float(want));
            if (got != want && !both_nan && bad++ < 5)
                CHECK(0, "bits %#010x: software %#06x, VCVTNEPS2BF16 %#06x", u, got, want);
        }
        CHECK(bad == 0, "%d of 200000 conversions differ from the hardware", bad);
    } else {
        printf("  (no AVX512_BF16 here: hardware comparison skipped)\n");
    }
    TEST_END();
}

/* Worst error of got[M][Nc] (row stride ldg) against the exact sums
 * c0(m,n) + sum_k bf16(A(m,k)) * bf16(B(k,n)), as a multiple of the fp32
 * summation bound (K + 2) * 2^-24 * (|c0| + sum |terms|); A(m,k) =
 * A[m*am + k*ak], B(k,n) = B[k*bk + n*bn], c0(m,n) = c0[m*cm + n*cn]. */
static double bf16_worst(const float *got, int M, int Nc, int K, const float *A, size_t am,
                         size_t ak, const float *B, size_t bk, size_t bn, const float *c0,
                         size_t cm, size_t cn) {
    double worst = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < Nc; n++) {
            double e = c0[m * cm + n * cn], mag = fabs(e);
            for (int k = 0; k < K; k++) {
                double t = bf16r(A[m * am + k * ak]) * bf16r(B[k * bk + n * bn]);
                e += t;
                mag += fabs(t);
            }
            double r = fabs(got[(size_t)m * Nc + n] - e) / ((K + 2) * ldexp(1.0, -24) * mag + 1e-37);
            if (!(r <= worst)) worst = r != r ? INFINITY : r;
        }
    return worst;
}

static double bf16_matmul_case(int N, int C, int OC, int fast, int *differs) {
    float *in = vec((size_t)N * C), *w = vec((size_t)OC * C), *bias = vec(OC), *dout = vec((size_t)N * OC);
    float *out = zeros((size_t)N * OC), *out32 = zeros((size_t)N * OC);
    float *din0 = vec((size_t)N * C), *din = copy(din0, (size_t)N * C);
    float *dw0 = vec((size_t)OC * C), *dw = copy(dw0, (size_t)OC * C);
    if (fast) {
        matmul_forward(out, in, w, bias, N, C, OC, MATMUL_BF16);
        matmul_backward(din, dw, NULL, dout, in, w, N, C, OC, MATMUL_BF16);
    } else {
        matmul_forward_ref(out, in, w, bias, N, C, OC, MATMUL_BF16);
        matmul_backward_ref(din, dw, NULL, dout, in, w, N, C, OC, MATMUL_BF16);
    }
    matmul_forward(out32, in, w, bias, N, C, OC, MATMUL_FP32);
    for (size_t i = 0; i < (size_t)N * OC; i++)
        if (out[i] != out32[i]) *differs = 1;
    /* out = bias + in . w^T;  din = din0 + dout . w;  dw = dw0 + dout^T . in */
    double worst = bf16_worst(out, N, OC, C, in, C, 1, w, 1, C, bias, 0, 1);
    worst = fmax(worst, bf16_worst(din, N, C, OC, dout, OC, 1, w, C, 1, din0, C, 1));
    worst = fmax(worst, bf16_worst(dw, OC, C, N, dout, 1, OC, in, C, 1, dw0, C, 1));
    free(in); free(w); free(bias); free(dout); free(out); free(out32);
    free(din0); free(din); free(dw0); free(dw);
    return worst;
}

static void test_matmul_bf16(void) {
    TEST_CASE("bf16 matmul (fast and reference) vs exact sums of bf16-rounded products");
    /* odd K (zero-padded pair), one row, several k blocks, row blocks, partial
     * panels, both forward formulations, row- and column-major packing */
    static const int sh[][3] = {{1, 3, 5},    {7, 33, 65},  {37, 130, 70}, {300, 520, 130},
                                {5, 1030, 700}, {129, 513, 65}, {2, 2, 2000}, {64, 1, 33},
                                {1, 192, 384}, {200, 64, 31}};
    int differs = 0;
    for (int fast = 0; fast < 2; fast++) {
        double worst = 0;
        for (size_t i = 0; i < sizeof sh / sizeof sh[0]; i++) {
            double r = bf16_matmul_case(sh[i][0], sh[i][1], sh[i][2], fast, &differs);
            CHECK(r <= 1.0, "%s N=%d C=%d OC=%d: error %.3g x the fp32 summation bound",
                  fast ? "fast" : "reference", sh[i][0], sh[i][1], sh[i][2], r);
            worst = fmax(worst, r);
        }
        printf("  %s: worst error %.3g x the fp32 summation bound\n", fast ? "fast" : "reference",
               worst);
    }
    CHECK(differs, "bf16 results equal fp32 everywhere: inputs were not rounded");
    /* a token's row does not depend on the rest of the batch */
    int N = 300, C = 200, OC = 150;
    float *in = vec((size_t)N * C), *w = vec((size_t)OC * C);
    float *full = zeros((size_t)N * OC), *part = zeros((size_t)N * OC);
    matmul_forward(full, in, w, NULL, N, C, OC, MATMUL_BF16);
    static const int sub[] = {1, 5, 31, 150};
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++) {
        int off = N - sub[i];
        matmul_forward(part, in + (size_t)off * C, w, NULL, sub[i], C, OC, MATMUL_BF16);
        CHECK(memcmp(part, full + (size_t)off * OC, (size_t)sub[i] * OC * sizeof(float)) == 0,
              "bf16: rows of a %d-row batch differ from the same rows of the %d-row batch", sub[i], N);
    }
    free(in); free(w); free(full); free(part);
    TEST_END();
}

typedef struct {
    int N, C, OC, fast;
    float *in, *w, *bias, *out, *R;
} mm_ctx;
static double mm_loss(void *p) {
    mm_ctx *c = p;
    if (c->fast) matmul_forward(c->out, c->in, c->w, c->bias, c->N, c->C, c->OC, MATMUL_FP32);
    else matmul_forward_ref(c->out, c->in, c->w, c->bias, c->N, c->C, c->OC, MATMUL_FP32);
    return dotw(c->out, c->R, (size_t)c->N * c->OC);
}
static void test_matmul_fd(void) {
    TEST_CASE("matmul backward vs finite differences");
    for (int fast = 0; fast < 2; fast++) {
        mm_ctx c = {.N = 5, .C = 7, .OC = 6, .fast = fast};
        c.in = vec(35); c.w = vec(42); c.bias = vec(6); c.out = zeros(30); c.R = vec(30);
        float *din = zeros(35), *dw = zeros(42), *db = zeros(6);
        if (fast) matmul_backward(din, dw, db, c.R, c.in, c.w, 5, 7, 6, MATMUL_FP32);
        else matmul_backward_ref(din, dw, db, c.R, c.in, c.w, 5, 7, 6, MATMUL_FP32);
        double e1 = fd_check(mm_loss, &c, c.in, din, 35, FD_EPS);
        double e2 = fd_check(mm_loss, &c, c.w, dw, 42, FD_EPS);
        double e3 = fd_check(mm_loss, &c, c.bias, db, 6, FD_EPS);
        CHECK(e1 < FD_TOL && e2 < FD_TOL && e3 < FD_TOL, "fast=%d din %g dw %g dbias %g", fast,
              e1, e2, e3);
        free(c.in); free(c.w); free(c.bias); free(c.out); free(c.R); free(din); free(dw); free(db);
    }
    TEST_END();
}

/* ---- rmsnorm ----------------------------------------------------------------- */

typedef struct {
    int N, C;
    float *in, *w, *out, *rstd, *R;
} rms_ctx;
static double rms_loss(void *p) {
    rms_ctx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->in, c->w, c->N, c->C, 1e-5f);
    return dotw(c->out, c->R, (size_t)c->N * c->C);
}
static void test_rmsnorm(void) {
    TEST_CASE("rmsnorm forward and backward vs finite differences");
    rms_ctx c = {.N = 4, .C = 12};
    size_t n = 48;
    c.in = vec(n); c.w = vec(12); c.out = zeros(n); c.rstd = zeros(4); c.R = vec(n);
    rms_loss(&c);
    /* forward against a direct double computation */
    double worst = 0;
    for (int i = 0; i < 4; i++) {
        double ss = 0;
        for (int j = 0; j < 12; j++) ss += (double)c.in[i * 12 + j] * c.in[i * 12 + j];
        double r = 1.0 / sqrt(ss / 12 + 1e-5);
        worst = fmax(worst, fabs(c.rstd[i] - r) / r);
        for (int j = 0; j < 12; j++) {
            double want = c.in[i * 12 + j] * r * c.w[j];
            worst = fmax(worst, fabs(c.out[i * 12 + j] - want) / (fabs(want) + 1e-6));
        }
    }
    CHECK(worst < 1e-5, "forward rel err %g", worst);
    float *din = vec(n), *dw = vec(12);
    float *din0 = copy(din, n), *dw0 = copy(dw, 12);
    rmsnorm_backward(din, dw, c.R, c.in, c.w, c.rstd, 4, 12);
    for (size_t i = 0; i < n; i++) din[i] -= din0[i]; /* backward accumulates */
    for (size_t i = 0; i < 12; i++) dw[i] -= dw0[i];
    double e1 = fd_check(rms_loss, &c, c.in, din, n, FD_EPS);
    double e2 = fd_check(rms_loss, &c, c.w, dw, 12, FD_EPS);
    CHECK(e1 < FD_TOL && e2 < FD_TOL, "din %g dw %g", e1, e2);
    free(c.in); free(c.w); free(c.out); free(c.rstd); free(c.R);
    free(din); free(dw); free(din0); free(dw0);
    TEST_END();
}

/* rmsnorm_forward_ggml against its formula written out again here (each
 * square rounded to float, summed in double left to right, mean and rstd in
 * float; volatile pins each rounding), bit for bit, in place too; and it is
 * another arithmetic than rmsnorm_forward's (some output differs). */
static void test_rmsnorm_ggml(void) {
    TEST_CASE("rmsnorm_forward_ggml: llama.cpp's order bit for bit vs the formula, in place");
    static const int Cs[4] = {1, 7, 64, 257};
    int differs = 0;
    for (int ci = 0; ci < 4; ci++) {
        const int N = 5, C = Cs[ci];
        float *x = vec((size_t)N * C), *w = vec((size_t)C), *got = zeros((size_t)N * C);
        float *inplace = copy(x, (size_t)N * C), *old = zeros((size_t)N * C), *rstd = zeros(N);
        for (int j = 0; j < N * C; j++) x[j] *= (float)(1 + j % 5); /* rows of other scales */
        memcpy(inplace, x, sizeof(float) * N * C);
        rmsnorm_forward_ggml(got, x, w, N, C, 1e-6f);
        rmsnorm_forward_ggml(inplace, inplace, w, N, C, 1e-6f);
        rmsnorm_forward(old, rstd, x, w, N, C, 1e-6f);
        int ok = 1;
        for (int n = 0; n < N; n++) {
            const float *r = x + (size_t)n * C;
            double ss = 0.0;
            for (int j = 0; j < C; j++) {
                volatile float sq = r[j] * r[j];
                ss += sq;
            }
            volatile float mean = (float)(ss / C);
            volatile float sum = mean + 1e-6f;
            volatile float rs = 1.0f / sqrtf(sum);
            for (int j = 0; j < C; j++) {
                volatile float a = r[j] * rs;
                volatile float want = a * w[j];
                ok &= got[(size_t)n * C + j] == want;
            }
        }
        CHECK(ok, "C %d: differs from the formula", C);
        CHECK(memcmp(got, inplace, sizeof(float) * N * C) == 0, "C %d: in place differs", C);
        differs |= memcmp(got, old, sizeof(float) * N * C) != 0;
        free(x); free(w); free(got); free(inplace); free(old); free(rstd);
    }
    CHECK(differs, "llama.cpp's order gave rmsnorm_forward's bits on every row: the test cannot tell them apart");
    TEST_END();
}

/* ---- llama.cpp's order (kernels.h "llama.cpp's CPU arithmetic") --------------- */

/* _mm512_reduce_add_ps's pairing, written out again */
static float tree16(const float *v) {
    volatile float a[8], b[4], c0, c1;
    for (int l = 0; l < 8; l++) a[l] = v[l] + v[l + 8];
    for (int l = 0; l < 4; l++) b[l] = a[l] + a[l + 4];
    c0 = b[0] + b[2];
    c1 = b[1] + b[3];
    return c0 + c1;
}

static void test_ggml_order(void) {
    TEST_CASE("llama.cpp-order kernels: hand cases and their formulas, bit for bit");
    /* ggml_v_expf: exact at 0, 0 and inf past its range, and near exp: its
     * source gives about 1.5 ulp plus rounding; 2.17 measured here, in ulps of
     * float(exp(x)) upwards */
    CHECK(expf_ggml(0.0f) == 1.0f && expf_ggml(-INFINITY) == 0.0f && expf_ggml(-200.0f) == 0.0f &&
          expf_ggml(200.0f) == INFINITY && isnan(expf_ggml(NAN)), "expf_ggml special values");
    double worst = 0;
    for (int i = 0; i <= 20000; i++) {
        float x = -87.0f + 175.0f * (float)i / 20000.0f;
        double e = exp((double)x), u = nextafterf((float)e, INFINITY) - (float)e;
        worst = fmax(worst, fabs(expf_ggml(x) - e) / u);
    }
    CHECK(worst <= 2.5, "expf_ggml: %.2f ulp from exp", worst);
    /* the dots by hand: lane 0 holds 1e8 (acc 0), 1 (acc 1), -1e8 (acc 2).
     * vec_dot: (1e8 + -1e8) + (1 + 0) = 1; one chain: 1e8 + 1 = 1e8, - 1e8 = 0 */
    float x[130] = {0}, y[130];
    for (int i = 0; i < 130; i++) y[i] = 1.0f;
    x[0] = 1e8f; x[16] = 1.0f; x[32] = -1e8f;
    CHECK(vec_dot_ggml(x, y, 64, 0) == 1.0f && vec_dot_ggml_batch(x, y, 64) == 0.0f,
          "hand dots: %g %g, want 1 0", vec_dot_ggml(x, y, 64, 0), vec_dot_ggml_batch(x, y, 64));
    /* the rest past n & ~63 is added one by one after the tree: 1 + 0.25 */
    x[64] = 0.25f;
    CHECK(vec_dot_ggml(x, y, 65, 0) == 1.25f, "hand dot with a rest: %g", vec_dot_ggml(x, y, 65, 0));
    /* formulas on random rows */
    int ok = 1;
    for (int n = 1; n <= 130; n += 43) {
        float *a = vec(n), *b = vec(n);
        volatile float acc[4][16], one[16], v[16];
        memset((void *)acc, 0, sizeof acc);
        memset((void *)one, 0, sizeof one);
        int np = n & ~63;
        for (int i = 0; i < np; i += 64)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 16; l++) acc[j][l] = fmaf(a[i + 16 * j + l], b[i + 16 * j + l], acc[j][l]);
        for (int l = 0; l < 16; l++) { volatile float s02 = acc[0][l] + acc[2][l], s13 = acc[1][l] + acc[3][l]; v[l] = s02 + s13; }
        volatile float want = tree16((const float *)v);
        for (int i = np; i < n; i++) { volatile float p = a[i] * b[i]; want = want + p; }
        ok &= vec_dot_ggml(a, b, n, 0) == want;
        for (int i = 0; i < n; i++) one[i % 16] = fmaf(a[i], b[i], one[i % 16]);
        ok &= vec_dot_ggml_batch(a, b, n) == tree16((const float *)one);
        free(a); free(b);
    }
    CHECK(ok, "vec_dot_ggml / _batch differ from their formulas");
    /* softmax: a flat row is 1/n; random rows by the formula */
    float p[40], z[40] = {0};
    softmax_row_ggml(p, z, 20, 1);
    CHECK(p[0] == (float)(1.0 / 20.0) && p[19] == p[0], "flat softmax %g", p[0]);
    for (int padded = 0; padded < 2; padded++) {
        float *l = vec(37), got[37], want[37];
        softmax_row_ggml(got, l, 37, padded);
        float mx = l[0];
        for (int j = 1; j < 37; j++) mx = fmaxf(mx, l[j]);
        double sum = 0;
        for (int j0 = 0; j0 < 37; j0 += 16) {
            float blk[16] = {0};
            const int whole = j0 + 16 <= 37 || padded;
            for (int j = j0; j < j0 + 16 && j < 37; j++) {
                want[j] = whole ? expf_ggml(l[j] - mx) : expf(l[j] - mx);
                blk[j - j0] = want[j];
                if (!whole) sum += want[j];
            }
            if (whole) sum += tree16(blk);
        }
        const float inv = (float)(1.0 / sum);
        int same = 1;
        for (int j = 0; j < 37; j++) same &= got[j] == want[j] * inv;
        CHECK(same, "softmax_row_ggml (padded %d) differs from its formula", padded);
        free(l);
    }
    /* SwiGLU: 16-blocks with expf_ggml(0 - g), the rest with expf(-g); 2 rows of 21 */
    float *g = vec(42), *u = vec(42), out[42];
    for (int i = 0; i < 42; i++) g[i] *= 6.0f;
    swiglu_forward_ggml(out, g, u, 2, 21);
    int sw = 1;
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < 21; j++) {
            const float gg = g[r * 21 + j], e = j < 16 ? expf_ggml(0.0f - gg) : expf(-gg);
            volatile float den = 1.0f + e, si = gg / den;
            sw &= out[r * 21 + j] == si * u[r * 21 + j];
        }
    CHECK(sw, "swiglu_forward_ggml differs from its formula");
    /* matmul: every output the batch dot of its row and column */
    float *in = vec(3 * 70), *w = vec(5 * 70), mo[15];
    matmul_ggml_f32(mo, in, w, 3, 70, 5);
    int mm = 1;
    for (int n = 0; n < 3; n++)
        for (int o = 0; o < 5; o++) mm &= mo[n * 5 + o] == vec_dot_ggml_batch(w + o * 70, in + n * 70, 70);
    CHECK(mm, "matmul_ggml_f32 differs from its dots");
    free(g); free(u); free(in); free(w);
    TEST_END();

    TEST_CASE("attention_cached_ggml: its formula, both value orders, chunks give the same bits");
    {
        enum { T = 40, H = 2, Dk = 72, Dv = 24 };
        const size_t ks = Dk + 8, vs = Dv + 4;
        float *q = vec((size_t)T * H * Dk), *kc = vec((size_t)T * ks), *vc = vec((size_t)T * vs);
        float *sc = malloc(attention_cached_scratch(T, T, H) * sizeof(float));
        for (int batch = 0; batch < 2; batch++) {
            float *all = zeros((size_t)T * H * Dv), *chunk = zeros((size_t)T * H * Dv);
            attention_cached_ggml(all, q, kc, vc, 0, T, H, 1, Dk, Dv, ks, vs, 0.3f, sc, batch);
            for (int p0 = 0; p0 < T; p0 += 7) {
                int n = MOE_MIN(7, T - p0);
                attention_cached_ggml(chunk + (size_t)p0 * H * Dv, q + (size_t)p0 * H * Dk, kc, vc, p0, n, H, 1, Dk,
                                      Dv, ks, vs, 0.3f, sc, batch);
            }
            CHECK(memcmp(all, chunk, sizeof(float) * T * H * Dv) == 0, "batch %d: chunks differ from one call", batch);
            int ok2 = 1;
            for (int i = 0; i < T; i += 13)
                for (int h = 0; h < H; h++) {
                    float s[T], pr[T], col[T];
                    for (int t = 0; t <= i; t++) s[t] = vec_dot_ggml(q + ((size_t)i * H + h) * Dk, kc + t * ks, Dk, 0) * 0.3f;
                    softmax_row_ggml(pr, s, i + 1, 1);
                    for (int d = 0; d < Dv; d++) {
                        for (int t = 0; t <= i; t++) col[t] = vc[t * vs + d];
                        float want = batch ? vec_dot_ggml_batch(col, pr, i + 1) : vec_dot_ggml(col, pr, i + 1, 1);
                        ok2 &= all[((size_t)i * H + h) * Dv + d] == want;
                    }
                }
            CHECK(ok2, "batch %d: differs from its formula", batch);
            free(all); free(chunk);
        }
        free(q); free(kc); free(vc); free(sc);
    }
    TEST_END();
}

/* The AVX-512 twins of the llama.cpp-order kernels (taken where
 * moe_use_fast_kernels() says so) against the scalar code (the reference
 * kernels' path), bit for bit: every length, padded or not, values across
 * the whole range of exp (0 and inf past +-192 ln 2, NaN), attention too. */
/* a NaN matches any NaN (which payload survives is the compiler's operand order) */
static int same_bits_or_nan_f(const float *a, const float *b, int n) {
    for (int i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0 && !(a[i] != a[i] && b[i] != b[i])) return 0;
    return 1;
}
static void test_ggml_fast(void) {
    TEST_CASE("llama.cpp-order kernels: AVX-512 twins = scalar code bit for bit (dot, softmax, swiglu, attention)");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("no AVX-512 (or reference kernels forced): only the scalar code runs here");
        return;
    }
    enum { M = 260 };
    float *x = vec(M), *y = vec(M), *big = vec(M), fast[M], ref[M];
    for (int i = 0; i < M; i++) big[i] = 160.0f * big[i] + (i % 37 == 0 ? 200.0f : 0.0f);
    big[5] = NAN; big[77] = -INFINITY; big[78] = INFINITY;
    int bad_dot = 0, bad_sm = 0, bad_sw = 0;
    for (int n = 0; n <= M; n++)
        for (int padded = 0; padded < 2; padded++) {
            moe_set_reference_kernels(1);
            float r = vec_dot_ggml(x, y, n, padded);
            moe_set_reference_kernels(0);
            float f = vec_dot_ggml(x, y, n, padded);
            bad_dot += memcmp(&r, &f, 4) != 0;
            if (n == 0) continue;
            const float *in = n % 2 ? big + 6 : x; /* wide rows (no NaN: softmax of NaN is NaN anyway) */
            if (n > M - 6) in = x;
            float row[M];
            memcpy(row, in, sizeof(float) * n);
            if (n % 3 == 0) row[n / 2] = -INFINITY; /* a masked score */
            moe_set_reference_kernels(1);
            softmax_row_ggml(ref, row, n, padded);
            moe_set_reference_kernels(0);
            softmax_row_ggml(fast, row, n, padded);
            bad_sm += !same_bits_or_nan_f(ref, fast, n);
        }
    const int Fs[] = {1, 15, 16, 17, 33, 130, 256};
    for (int i = 0; i < 7; i++) {
        const int F = Fs[i];
        moe_set_reference_kernels(1);
        swiglu_forward_ggml(ref, big, y, 1, F);
        moe_set_reference_kernels(0);
        swiglu_forward_ggml(fast, big, y, 1, F);
        bad_sw += !same_bits_or_nan_f(ref, fast, F);
    }
    /* scores: 16 positions at a time (a transposed tree) where D is a multiple of 64 */
    int bad_sc = 0;
    for (int D = 64; D <= 192; D += 64 - 56 * (D == 128)) /* 64, 128 and 136 (the one-by-one path) */
        for (int len = 1; len <= 40; len += 3) {
            const size_t ks = (size_t)D + 8;
            float *kk = vec((size_t)len * ks), *qq = vec((size_t)D), sr[40], sf[40];
            for (size_t i = 0; i < (size_t)len * ks; i += 17) kk[i] *= 1e4f; /* a wide range of sums */
            moe_set_reference_kernels(1);
            scores_ggml(sr, qq, kk, ks, len, D, 0.125f);
            moe_set_reference_kernels(0);
            scores_ggml(sf, qq, kk, ks, len, D, 0.125f);
            bad_sc += memcmp(sr, sf, sizeof(float) * (size_t)len) != 0;
            free(kk); free(qq);
        }
    CHECK(bad_sc == 0, "%d scores_ggml shapes differ", bad_sc);
    CHECK(bad_dot == 0, "%d vec_dot_ggml lengths differ", bad_dot);
    CHECK(bad_sm == 0, "%d softmax_row_ggml rows differ", bad_sm);
    CHECK(bad_sw == 0, "%d swiglu_forward_ggml widths differ", bad_sw);
    {
        enum { T = 70, H = 4, KVH = 2, Dk = 64, Dv = 64 };
        float *q = vec((size_t)T * H * Dk), *kc = vec((size_t)T * KVH * Dk), *vc = vec((size_t)T * KVH * Dv);
        float *sc = malloc(attention_cached_scratch(T, T, H) * sizeof(float));
        float *a = zeros((size_t)T * H * Dv), *b = zeros((size_t)T * H * Dv);
        for (int batch = 0; batch < 2; batch++) {
            moe_set_reference_kernels(1);
            attention_cached_ggml(a, q, kc, vc, 0, T, H, KVH, Dk, Dv, KVH * Dk, KVH * Dv, 0.125f, sc, batch);
            moe_set_reference_kernels(0);
            attention_cached_ggml(b, q, kc, vc, 0, T, H, KVH, Dk, Dv, KVH * Dk, KVH * Dv, 0.125f, sc, batch);
            CHECK(memcmp(a, b, sizeof(float) * T * H * Dv) == 0, "attention_cached_ggml (batch %d) differs", batch);
        }
        free(q); free(kc); free(vc); free(sc); free(a); free(b);
    }
    free(x); free(y); free(big);
    TEST_END();
}

/* ---- rope -------------------------------------------------------------------- */

static void test_rope_hand(void) {
    TEST_CASE("rope hand cases");
    /* pos 0 is the identity, bit for bit */
    float x[16], x0[16];
    for (int i = 0; i < 16; i++) x[i] = x0[i] = (float)(i + 1) * 0.37f;
    int32_t pos0[2] = {0, 0};
    rope_forward(x, pos0, 2, 2, 4, 10000.0f, NULL, 0);
    CHECK(memcmp(x, x0, sizeof x) == 0, "pos 0 is not the identity");
    /* D = 4: pair 0 turns by pos radians, pair 1 by pos * base^(-1/2);
     * base = 4/pi^2 makes pair 1 of pos 1 a 90 degree turn */
    float y[4] = {1, 2, 1, 2};
    int32_t pos1 = 1;
    float base = (float)(4.0 / (M_PI * M_PI));
    rope_forward(y, &pos1, 1, 1, 4, base, NULL, 0);
    double c1 = cos(1.0), s1 = sin(1.0);
    CHECK(fabs(y[0] - (1 * c1 - 2 * s1)) < 1e-6 && fabs(y[1] - (1 * s1 + 2 * c1)) < 1e-6,
          "pair 0: %g %g", y[0], y[1]);
    CHECK(fabs(y[2] - (-2.0)) < 1e-6 && fabs(y[3] - 1.0) < 1e-6, "90 degrees: %g %g", y[2], y[3]);
    /* backward undoes forward; repeated positions (the angle table) agree with
     * a single row (per-row angles) bit for bit */
    int N = 6, H = 3, D = 8;
    int32_t pos[6] = {0, 1, 2, 0, 1, 2};
    float *z = vec((size_t)N * H * D), *z0 = copy(z, (size_t)N * H * D);
    rope_forward(z, pos, N, H, D, 10000.0f, NULL, 0);
    float *one = copy(z0 + (size_t)4 * H * D, (size_t)H * D);
    rope_forward(one, &pos[4], 1, H, D, 10000.0f, NULL, 0);
    CHECK(memcmp(one, z + (size_t)4 * H * D, (size_t)H * D * sizeof(float)) == 0,
          "table and per-row angles differ");
    /* a precomputed table (rope_table_fill) gives the same bits, forward and
     * backward, also for positions past its end (computed on the spot) */
    {
        int32_t pt[5] = {0, 3, 1, 7, 2};
        float tab[3 * 8];
        rope_table_fill(tab, 3, D, 10000.0f);
        float *t1 = copy(z0, (size_t)5 * H * D), *t2 = copy(z0, (size_t)5 * H * D);
        for (int k = 0; k < 2; k++) { /* tab covers positions 0..2: all but 3 and 7 */
            if (k == 0) { rope_forward(t1, pt, 5, H, D, 10000.0f, NULL, 0); rope_forward(t2, pt, 5, H, D, 10000.0f, tab, 3); }
            else { rope_backward(t1, pt, 5, H, D, 10000.0f, NULL, 0); rope_backward(t2, pt, 5, H, D, 10000.0f, tab, 3); }
            CHECK(memcmp(t1, t2, (size_t)5 * H * D * sizeof(float)) == 0, "%s: table path differs",
                  k ? "backward" : "forward");
        }
        rope_forward(t1, pt, 3, H, D, 10000.0f, NULL, 0); /* positions 0, 3, 1: one past the table */
        rope_forward(t2, pt, 3, H, D, 10000.0f, tab, 3);
        CHECK(memcmp(t1, t2, (size_t)3 * H * D * sizeof(float)) == 0, "position past the table differs");
        free(t1); free(t2);
    }
    rope_backward(z, pos, N, H, D, 10000.0f, NULL, 0);
    double e = rel_to_norm(z, z0, (size_t)N * H * D);
    CHECK(e < 1e-6, "backward(forward(x)) != x: %g", e);
    /* very wide heads (angles computed per pair) follow the documented formula */
    int32_t pw[2] = {5, 9};
    float *wv = vec(2 * 520), *w0 = copy(wv, 2 * 520);
    rope_forward(wv, pw, 2, 1, 520, 500.0f, NULL, 0);
    int exact = 1;
    for (int n = 0; n < 2; n++)
        for (int i = 0; i < 260; i++) {
            double ang = pw[n] * pow(500.0, -(double)(2 * i) / 520.0);
            float c = (float)cos(ang), s = (float)sin(ang);
            float a0 = w0[n * 520 + 2 * i], a1 = w0[n * 520 + 2 * i + 1];
            exact &= wv[n * 520 + 2 * i] == a0 * c - a1 * s && wv[n * 520 + 2 * i + 1] == a0 * s + a1 * c;
        }
    CHECK(exact, "D=520 rotation differs from the documented formula");
    free(wv); free(w0);
    /* the usual shapes too, every head: two rounded products, then one rounded
     * sum (no fused multiply-add; a compiler once fused the heads it vectorised) */
    {
        enum { RN = 5, RH = 6, RD = 32 };
        int32_t rp[RN] = {0, 1, 7, 31, 100};
        float tab[101 * RD];
        rope_table_fill(tab, 101, RD, 10000.0f);
        for (int use_tab = 0; use_tab < 2; use_tab++) {
            float *r = vec((size_t)RN * RH * RD), *r0 = copy(r, (size_t)RN * RH * RD);
            rope_forward(r, rp, RN, RH, RD, 10000.0f, use_tab ? tab : NULL, use_tab ? 101 : 0);
            int same = 1;
            for (int n = 0; n < RN; n++)
                for (int h = 0; h < RH; h++)
                    for (int i = 0; i < RD / 2; i++) {
                        double ang = rp[n] * pow(10000.0, -(double)(2 * i) / RD);
                        volatile float c = (float)cos(ang), s = (float)sin(ang);
                        const float *a = r0 + ((size_t)n * RH + h) * RD + 2 * i;
                        volatile float p0 = a[0] * c, p1 = a[1] * s, p2 = a[0] * s, p3 = a[1] * c;
                        const float *got = r + ((size_t)n * RH + h) * RD + 2 * i;
                        same &= got[0] == p0 - p1 && got[1] == p2 + p3;
                    }
            CHECK(same, "H=6 D=32 (%s): rotation differs from the documented formula",
                  use_tab ? "model's table" : "own table");
            free(r); free(r0);
        }
    }
    free(z); free(z0); free(one);
    TEST_END();
}

/* ---- attention ------------------------------------------------------------- */

typedef struct {
    int B, T, H, KVH, D, ref;
    float *q, *k, *v, *out, *att, *R;
} att_ctx;
static double att_loss(void *p) {
    att_ctx *c = p;
    if (c->ref) attention_forward_ref(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->D);
    else attention_forward(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->D);
    return dotw(c->out, c->R, (size_t)c->B * c->T * c->H * c->D);
}
static void test_attention_fd(void) {
    TEST_CASE("attention backward vs finite differences (GQA H=4 KVH=2)");
    for (int ref = 0; ref < 2; ref++) {
        att_ctx c = {.B = 2, .T = 5, .H = 4, .KVH = 2, .D = 8, .ref = ref};
        size_t nq = 2 * 5 * 4 * 8, nk = 2 * 5 * 2 * 8;
        c.q = vec(nq); c.k = vec(nk); c.v = vec(nk); c.out = zeros(nq);
        c.att = zeros(2 * 4 * 5 * 5); c.R = vec(nq);
        for (size_t i = 0; i < nq; i++) c.q[i] *= 2.0f; /* peakier softmax */
        att_loss(&c);
        float *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
        if (ref) attention_backward_ref(dq, dk, dv, c.R, c.att, c.q, c.k, c.v, 2, 5, 4, 2, 8);
        else attention_backward(dq, dk, dv, c.R, c.att, c.q, c.k, c.v, 2, 5, 4, 2, 8);
        double e1 = fd_check(att_loss, &c, c.q, dq, nq, FD_EPS);
        double e2 = fd_check(att_loss, &c, c.k, dk, nk, FD_EPS);
        double e3 = fd_check(att_loss, &c, c.v, dv, nk, FD_EPS);
        CHECK(e1 < FD_TOL && e2 < FD_TOL && e3 < FD_TOL, "ref=%d dq %g dk %g dv %g", ref, e1, e2,
              e3);
        free(c.q); free(c.k); free(c.v); free(c.out); free(c.att); free(c.R);
        free(dq); free(dk); free(dv);
    }
    TEST_END();
}

static void test_attention_fast_vs_ref_and_causal(void) {
    TEST_CASE("attention causality, probabilities");
    double worst_fast = 0;
    static const int cfg[][5] = {{2, 37, 4, 2, 16}, {1, 70, 2, 1, 24}, {1, 20, 3, 3, 128},
                                 {1, 9, 2, 2, 130}, {2, 66, 2, 1, 64}};
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        int B = cfg[ci][0], T = cfg[ci][1], H = cfg[ci][2], KVH = cfg[ci][3], D = cfg[ci][4];
        size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, na = (size_t)B * H * T * T;
        float *q = vec(nq), *k = vec(nk), *v = vec(nk), *dout = vec(nq);
        float *o1 = zeros(nq), *o2 = zeros(nq), *a1 = vec(na), *a2 = vec(na);
        attention_forward(o1, a1, q, k, v, B, T, H, KVH, D);
        attention_forward_ref(o2, a2, q, k, v, B, T, H, KVH, D);
        double e = fmax(rel_to_norm(o1, o2, nq), rel_to_norm(a1, a2, na));
        float *g1[3] = {vec(nq), vec(nk), vec(nk)}, *g2[3];
        g2[0] = copy(g1[0], nq); g2[1] = copy(g1[1], nk); g2[2] = copy(g1[2], nk);
        attention_backward(g1[0], g1[1], g1[2], dout, a1, q, k, v, B, T, H, KVH, D);
        attention_backward_ref(g2[0], g2[1], g2[2], dout, a2, q, k, v, B, T, H, KVH, D);
        e = fmax(e, rel_to_norm(g1[0], g2[0], nq));
        e = fmax(e, fmax(rel_to_norm(g1[1], g2[1], nk), rel_to_norm(g1[2], g2[2], nk)));
        if (!(e <= worst_fast)) worst_fast = e != e ? INFINITY : e;
        /* probabilities: rows sum to 1, zero above the diagonal */
        double worst = 0;
        int above = 0;
        for (int bh = 0; bh < B * H; bh++)
            for (int t = 0; t < T; t++) {
                const float *row = a1 + ((size_t)bh * T + t) * T;
                double s = 0;
                for (int u = 0; u < T; u++) {
                    s += row[u];
                    if (u > t && row[u] != 0.0f) above++;
                }
                worst = fmax(worst, fabs(s - 1.0));
            }
        CHECK(worst < 1e-5 && above == 0, "row sums off by %g, %d nonzero above diagonal", worst,
              above);
        /* changing token t0's k and v leaves every output before t0 unchanged */
        int t0 = T / 2;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < KVH * D; i++) {
                k[((size_t)b * T + t0) * KVH * D + i] += 1.5f;
                v[((size_t)b * T + t0) * KVH * D + i] -= 2.5f;
            }
        attention_forward(o2, a2, q, k, v, B, T, H, KVH, D);
        int same_before = 1, changed_after = 0;
        for (int b = 0; b < B; b++) {
            size_t row = (size_t)T * H * D, pre = (size_t)t0 * H * D;
            if (memcmp(o1 + b * row, o2 + b * row, pre * sizeof(float)) != 0) same_before = 0;
            if (memcmp(o1 + b * row + pre, o2 + b * row + pre, (row - pre) * sizeof(float)) != 0)
                changed_after = 1;
        }
        CHECK(same_before && changed_after, "causality: before same %d, after changed %d",
              same_before, changed_after);
        free(q); free(k); free(v); free(dout); free(o1); free(o2); free(a1); free(a2);
        for (int i = 0; i < 3; i++) { free(g1[i]); free(g2[i]); }
    }
    TEST_END();
    TEST_CASE("attention fast vs reference (forward and backward, 5 shapes)");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("fast kernels off (no AVX-512, or MOE_REFERENCE=1): attention_forward is the reference");
        return;
    }
    CHECK(worst_fast < 1e-5, "worst relative error %g", worst_fast);
    TEST_END();
}

static void test_scratch_failures(void) {
    TEST_CASE("scratch allocation failures fall back (attention, rope, cross-entropy)");
    int B = 1, T = 20, H = 2, KVH = 1, D = 16;
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, na = (size_t)B * H * T * T;
    float *q = vec(nq), *k = vec(nk), *v = vec(nk), *o1 = zeros(nq), *o2 = zeros(nq);
    float *a1 = zeros(na), *a2 = zeros(na);
    float *g1[3] = {zeros(nq), zeros(nk), zeros(nk)}, *g2[3] = {zeros(nq), zeros(nk), zeros(nk)};
    attention_forward_ref(o1, a1, q, k, v, B, T, H, KVH, D);
    attention_backward_ref(g1[0], g1[1], g1[2], o1, a1, q, k, v, B, T, H, KVH, D);
    moe_alloc_fail_after(1);
    attention_forward(o2, a2, q, k, v, B, T, H, KVH, D);
    attention_backward(g2[0], g2[1], g2[2], o2, a2, q, k, v, B, T, H, KVH, D);
    moe_alloc_fail_after(0);
    int same = memcmp(o1, o2, nq * 4) == 0 && memcmp(a1, a2, na * 4) == 0;
    for (int i = 0; i < 3; i++) same &= memcmp(g1[i], g2[i], (i ? nk : nq) * 4) == 0;
    CHECK(same, "attention without scratch differs from the reference");
    /* rope: the angle table is only a cache */
    int32_t pos[40];
    for (int i = 0; i < 40; i++) pos[i] = i % 4;
    float *x1 = vec(40 * 8), *x2 = copy(x1, 40 * 8);
    rope_forward(x1, pos, 40, 1, 8, 10000.0f, NULL, 0);
    moe_alloc_fail_after(1);
    rope_forward(x2, pos, 40, 1, 8, 10000.0f, NULL, 0);
    moe_alloc_fail_after(0);
    CHECK(memcmp(x1, x2, 40 * 8 * 4) == 0, "rope without its table differs");
    /* cross-entropy: same losses and the same total */
    int32_t tg[40];
    for (int i = 0; i < 40; i++) tg[i] = i % 9 - 1;
    float *lg = vec(40 * 8), l1[40], l2[40];
    double t1 = crossentropy_forward(l1, lg, tg, 40, 8);
    moe_alloc_fail_after(1);
    double t2 = crossentropy_forward(l2, lg, tg, 40, 8);
    moe_alloc_fail_after(0);
    CHECK(t1 == t2 && memcmp(l1, l2, sizeof l1) == 0, "cross-entropy without scratch differs");
    free(q); free(k); free(v); free(o1); free(o2); free(a1); free(a2); free(x1); free(x2); free(lg);
    for (int i = 0; i < 3; i++) { free(g1[i]); free(g2[i]); }
    TEST_END();
}

/* ---- general RoPE (partial, NeoX, YaRN, freq factors, ggml angles) ---------- */

/* The documented angle of pair i at position pos, written out again here:
 * ggml_angles 0 in double, 1 in ggml's float order; volatile pins each float
 * rounding. c and s include mscale. */
static void rope_want(const rope_params *p, int i, int32_t pos, float *c, float *s) {
    float lo = 0.0f, hi = 0.0f;
    volatile float ms = p->attn_factor;
    if (p->ext_factor != 0.0f) {
        double dlo = p->n_rot * log(p->n_ctx_orig / (p->beta_fast * 2.0 * M_PI)) / (2.0 * log(p->base));
        double dhi = p->n_rot * log(p->n_ctx_orig / (p->beta_slow * 2.0 * M_PI)) / (2.0 * log(p->base));
        lo = (float)fmax(0.0, floor(dlo));
        hi = (float)fmin(p->n_rot - 1.0, ceil(dhi));
        volatile float lf = 1.0f + 0.1f * logf(1.0f / p->freq_scale);
        ms = ms * lf;
    }
    volatile float mix = 0.0f;  /* ggml: the ramp in float */
    double mixd = 0.0;          /* otherwise in double */
    if (p->ext_factor != 0.0f) {
        volatile float y = ((float)i - lo) / fmaxf(0.001f, hi - lo);
        mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * p->ext_factor;
        mixd = (1.0 - fmin(1.0, fmax(0.0, ((double)i - lo) / fmax(0.001, (double)hi - lo)))) * p->ext_factor;
    }
    float ff = p->freq_factors ? p->freq_factors[i] : 1.0f;
    if (p->ggml_angles) {
        volatile float ts = powf(p->base, -2.0f / (float)p->n_rot), theta = (float)pos;
        for (int j = 0; j < i; j++) theta = theta * ts;
        volatile float ex = theta / ff, in = p->freq_scale * ex, th = in;
        if (p->ext_factor != 0.0f) {
            volatile float a = in * (1.0f - mix), b = ex * mix;
            th = a + b;
        }
        *c = cosf(th) * ms;
        *s = sinf(th) * ms;
    } else {
        double ex = (double)pos * pow((double)p->base, -(double)(2 * i) / p->n_rot);
        if (p->freq_factors) ex /= (double)ff;
        double th = (double)p->freq_scale * ex;
        if (p->ext_factor != 0.0f) th = th * (1.0 - mixd) + ex * mixd;
        volatile float cf = (float)cos(th), sf = (float)sin(th);
        *c = cf * ms;
        *s = sf * ms;
    }
}

/* x0[N][H][D] turned by p (dir = +1 forward, -1 backward) equals got, bit for
 * bit: two rounded products and a rounded sum; dims past n_rot unchanged */
static int rope_matches_formula(const float *got, const float *x0, const int32_t *pos, int N, int H,
                                int D, const rope_params *p, int dir) {
    int half = p->n_rot / 2, ok = 1;
    for (int n = 0; n < N; n++) {
        float *cs = malloc(half * sizeof(float)), *sn = malloc(half * sizeof(float));
        for (int i = 0; i < half; i++) rope_want(p, i, pos[n], &cs[i], &sn[i]);
        for (int h = 0; h < H; h++) {
            const float *a = x0 + ((size_t)n * H + h) * D, *g = got + ((size_t)n * H + h) * D;
            for (int i = 0; i < half; i++) {
                int j0 = p->neox ? i : 2 * i, j1 = p->neox ? i + half : 2 * i + 1;
                volatile float c = cs[i], s = dir * sn[i];
                volatile float p0 = a[j0] * c, p1 = a[j1] * s, p2 = a[j0] * s, p3 = a[j1] * c;
                if (p->fused) /* one product rounded, the other fused into the sum */
                    ok &= g[j0] == fmaf(a[j0], c, -p1) && g[j1] == fmaf(a[j0], s, p3);
                else
                    ok &= g[j0] == p0 - p1 && g[j1] == p2 + p3;
            }
            for (int j = p->n_rot; j < D; j++) ok &= memcmp(&g[j], &a[j], 4) == 0;
        }
        free(cs); free(sn);
    }
    return ok;
}

static rope_params yarn_params(int n_rot, int neox, float factor, int n_ctx_orig) {
    rope_params p = rope_params_plain(n_rot, 10000.0f);
    p.neox = neox;
    p.freq_scale = 1.0f / factor;
    p.ext_factor = 1.0f;
    p.beta_fast = 32.0f;
    p.beta_slow = 1.0f;
    p.n_ctx_orig = n_ctx_orig;
    return p;
}

static void test_rope_general(void) {
    TEST_CASE("rope_apply: plain parameters give rope_forward's bits");
    {
        enum { N = 7, H = 3, D = 32 };
        int32_t pos[N] = {0, 5, 2, 5, 40, 1, 2};
        float *x = vec(N * H * D), *a = copy(x, N * H * D), *b = copy(x, N * H * D);
        float t1[41 * D], t2[41 * D];
        rope_params pl = rope_params_plain(D, 5000.0f);
        rope_table_fill(t1, 41, D, 5000.0f);
        rope_table_build(t2, 41, &pl);
        CHECK(memcmp(t1, t2, sizeof t1) == 0, "rope_table_build(plain) differs from rope_table_fill");
        for (int use_tab = 0; use_tab < 2; use_tab++) {
            rope_forward(a, pos, N, H, D, 5000.0f, use_tab ? t1 : NULL, use_tab ? 41 : 0);
            rope_apply_forward(b, pos, N, H, D, &pl, use_tab ? t2 : NULL, use_tab ? 41 : 0);
            CHECK(memcmp(a, b, N * H * D * 4) == 0, "forward (table %d) differs", use_tab);
            rope_backward(a, pos, N, H, D, 5000.0f, use_tab ? t1 : NULL, use_tab ? 41 : 0);
            rope_apply_backward(b, pos, N, H, D, &pl, use_tab ? t2 : NULL, use_tab ? 41 : 0);
            CHECK(memcmp(a, b, N * H * D * 4) == 0, "backward (table %d) differs", use_tab);
        }
        free(x); free(a); free(b);
    }
    TEST_END();

    TEST_CASE("rope_apply bit for bit vs the formula: adjacent/NeoX, partial n_rot, YaRN, freq factors, ggml angles, fused");
    {
        static const float ffac[32] = {1, 1, 1.5f, 2, 2, 3, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8,
                                       1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
        rope_params cfg[8];
        int Ds[8] = {24, 24, 64, 32, 40, 40, 24, 40};
        cfg[0] = rope_params_plain(16, 10000.0f);                  /* partial, adjacent */
        cfg[1] = rope_params_plain(16, 10000.0f); cfg[1].neox = 1;  /* partial, NeoX */
        cfg[2] = yarn_params(64, 1, 8.0f, 256);                     /* YaRN, NeoX */
        cfg[3] = rope_params_plain(32, 500000.0f); cfg[3].freq_factors = ffac;
        cfg[4] = yarn_params(32, 0, 40.0f, 64); cfg[4].ggml_angles = 1; cfg[4].attn_factor = 0.8f;
        cfg[5] = rope_params_plain(40, 10000.0f); cfg[5].ggml_angles = 1; cfg[5].neox = 1;
        cfg[5].freq_scale = 0.5f;
        /* llama.cpp's fused rotation: adjacent pairs (DeepSeek's partial rope), NeoX with YaRN */
        cfg[6] = rope_params_plain(16, 10000.0f); cfg[6].ggml_angles = 1; cfg[6].fused = 1;
        cfg[7] = yarn_params(32, 1, 40.0f, 64); cfg[7].ggml_angles = 1; cfg[7].fused = 1;
        enum { N = 6, H = 3 };
        int32_t pos[N] = {0, 1, 7, 31, 100, 5000};
        for (int ci = 0; ci < 8; ci++) {
            int D = Ds[ci];
            const rope_params *p = &cfg[ci];
            float *tab = malloc((size_t)101 * p->n_rot * sizeof(float));
            rope_table_build(tab, 101, p);
            for (int use_tab = 0; use_tab < 2; use_tab++)
                for (int dir = 1; dir >= -1; dir -= 2) {
                    float *x = vec((size_t)N * H * D), *x0 = copy(x, (size_t)N * H * D);
                    if (dir > 0) rope_apply_forward(x, pos, N, H, D, p, use_tab ? tab : NULL, use_tab ? 101 : 0);
                    else rope_apply_backward(x, pos, N, H, D, p, use_tab ? tab : NULL, use_tab ? 101 : 0);
                    CHECK(rope_matches_formula(x, x0, pos, N, H, D, p, dir),
                          "config %d (%s, table %d) differs from the formula", ci,
                          dir > 0 ? "forward" : "backward", use_tab);
                    free(x); free(x0);
                }
            free(tab);
        }
        {   /* the fused rotation is another arithmetic: some element differs from the unfused one */
            rope_params uf = cfg[6];
            uf.fused = 0;
            float *x = vec((size_t)N * H * 24), *y = copy(x, (size_t)N * H * 24);
            rope_apply_forward(x, pos, N, H, 24, &cfg[6], NULL, 0);
            rope_apply_forward(y, pos, N, H, 24, &uf, NULL, 0);
            CHECK(memcmp(x, y, sizeof(float) * N * H * 24) != 0, "fused and unfused rotations gave the same bits");
            free(x); free(y);
        }
        /* NeoX on x is the adjacent rotation of x with each pair's halves interleaved */
        rope_params a = yarn_params(16, 0, 4.0f, 128), b = a;
        b.neox = 1;
        enum { D = 20 };
        float *x = vec(N * H * D), *y = zeros(N * H * D);
        for (int r = 0; r < N * H; r++) {
            for (int i = 0; i < 8; i++) {
                y[r * D + 2 * i] = x[r * D + i];
                y[r * D + 2 * i + 1] = x[r * D + 8 + i];
            }
            for (int j = 16; j < D; j++) y[r * D + j] = x[r * D + j];
        }
        rope_apply_forward(x, pos, N, H, D, &b, NULL, 0);
        rope_apply_forward(y, pos, N, H, D, &a, NULL, 0);
        int same = 1;
        for (int r = 0; r < N * H; r++)
            for (int i = 0; i < 8; i++)
                same &= x[r * D + i] == y[r * D + 2 * i] && x[r * D + 8 + i] == y[r * D + 2 * i + 1];
        CHECK(same, "NeoX differs from adjacent pairs on the interleaved halves");
        free(x); free(y);
    }
    TEST_END();

    TEST_CASE("YaRN table, DeepSeek-V2-like (factor 40, ctx 4096, beta 32/1, n_rot 64)");
    {
        rope_params p = yarn_params(64, 0, 40.0f, 4096);
        float dims[2];
        rope_yarn_corr_dims(dims, &p);
        /* by hand: 64 ln(4096 / (32 * 2pi)) / (2 ln 1e4) = 10.472 -> floor 10;
         *          64 ln(4096 / (1 * 2pi)) / (2 ln 1e4) = 22.513 -> ceil 23 */
        CHECK(dims[0] == 10.0f && dims[1] == 23.0f, "corr dims %g %g, want 10 23", dims[0], dims[1]);
        enum { NP = 4200 };
        float *tab = malloc((size_t)NP * 64 * sizeof(float));
        rope_table_build(tab, NP, &p);
        const double mscale = 1.0 + 0.1 * log(40.0); /* 1.36888794541 */
        double worst = 0;
        for (int pp = 0; pp < NP; pp += 7)
            for (int i = 0; i < 32; i++) {
                double ex = pp * pow(10000.0, -i / 32.0), in = ex / 40.0;
                double ramp = 1.0 - fmin(1.0, fmax(0.0, (i - 10.0) / 13.0));
                double th = in * (1.0 - ramp) + ex * ramp;
                double tol = 3e-7; /* float rounding of cos/sin and of mscale */
                double ec = fabs(tab[(size_t)pp * 64 + i] - cos(th) * mscale);
                double es = fabs(tab[(size_t)pp * 64 + 32 + i] - sin(th) * mscale);
                worst = fmax(worst, fmax(ec, es) / tol);
            }
        CHECK(worst <= 1.0, "table vs hand formula: max error %.3g x the allowed", worst);
        CHECK(fabs(tab[0] - mscale) < 2e-7 && tab[32] == 0.0f, "pos 0: cos %.9g (want mscale %.9g), sin %g",
              tab[0], mscale, tab[32]);
        /* ggml's float angles: the same table up to float angle rounding */
        p.ggml_angles = 1;
        float *tg = malloc((size_t)NP * 64 * sizeof(float));
        rope_table_build(tg, NP, &p);
        double near = 0, far = 0;
        for (size_t j = 0; j < (size_t)NP * 64; j++) {
            double d = fabs(tg[j] - tab[j]);
            if (j < 64 * 64) near = fmax(near, d); else far = fmax(far, d);
        }
        CHECK(near < 1e-5 && far < 1e-2, "ggml angles vs double angles: %g (pos < 64), %g", near, far);
        printf("  ggml float angles vs double: max diff %.3g below position 64, %.3g to %d\n", near, far, NP);
        free(tab); free(tg);
    }
    TEST_END();
}

typedef struct {
    int N, H, D;
    const rope_params *p;
    int32_t *pos;
    float *x, *tmp, *R;
} rope_g_ctx;
static double rope_g_loss(void *v) {
    rope_g_ctx *c = v;
    size_t n = (size_t)c->N * c->H * c->D;
    memcpy(c->tmp, c->x, n * sizeof(float));
    rope_apply_forward(c->tmp, c->pos, c->N, c->H, c->D, c->p, NULL, 0);
    return dotw(c->tmp, c->R, n);
}
static void test_rope_fd(void) {
    TEST_CASE("rope backward vs finite differences");
    int32_t pos[4] = {3, 0, 17, 5};
    rope_params plain = rope_params_plain(6, 10000.0f); /* rope_forward's bits (tested above) */
    rope_g_ctx c = {.N = 4, .H = 2, .D = 6, .p = &plain, .pos = pos};
    size_t n = 48;
    c.x = vec(n); c.tmp = zeros(n); c.R = vec(n);
    float *g = copy(c.R, n);
    rope_backward(g, pos, 4, 2, 6, 10000.0f, NULL, 0);
    double e = fd_check(rope_g_loss, &c, c.x, g, n, FD_EPS);
    CHECK(e < FD_TOL, "dx %g", e);
    free(c.x); free(c.tmp); free(c.R); free(g);
    TEST_END();
}

static void test_rope_general_backward(void) {
    TEST_CASE("rope_apply_backward: finite differences and <Rx, y> = <x, R^T y> (YaRN, NeoX, partial)");
    rope_params cfg[3] = {yarn_params(8, 1, 16.0f, 64), yarn_params(12, 0, 4.0f, 32),
                          rope_params_plain(10, 10000.0f)};
    cfg[1].ggml_angles = 1;
    cfg[2].neox = 1;
    int32_t pos[4] = {3, 0, 17, 500};
    enum { N = 4, H = 2, D = 12 };
    size_t n = N * H * D;
    for (int ci = 0; ci < 3; ci++) {
        rope_g_ctx c = {.N = N, .H = H, .D = D, .p = &cfg[ci], .pos = pos};
        c.x = vec(n); c.tmp = zeros(n); c.R = vec(n);
        float *g = copy(c.R, n);
        rope_apply_backward(g, pos, N, H, D, &cfg[ci], NULL, 0);
        double e = fd_check(rope_g_loss, &c, c.x, g, n, FD_EPS);
        CHECK(e < FD_TOL, "config %d: dx %g", ci, e);
        /* adjoint: <R x, y> = <x, R^T y> */
        float *rx = copy(c.x, n), *y = vec(n), *rty = copy(y, n);
        rope_apply_forward(rx, pos, N, H, D, &cfg[ci], NULL, 0);
        rope_apply_backward(rty, pos, N, H, D, &cfg[ci], NULL, 0);
        double l = dotw(rx, y, n), r = dotw(c.x, rty, n);
        CHECK(fabs(l - r) <= 1e-6 * (fabs(l) + 1), "config %d: <Rx,y> %.9g vs <x,R^T y> %.9g", ci, l, r);
        free(c.x); free(c.tmp); free(c.R); free(g); free(rx); free(y); free(rty);
    }
    TEST_END();
}

/* ---- attention with Dk != Dv, and over a KV cache --------------------------- */

typedef struct {
    int B, T, H, KVH, Dk, Dv, ref;
    float scale;
    float *q, *k, *v, *out, *att, *R;
} attx_ctx;
static double attx_loss(void *p) {
    attx_ctx *c = p;
    if (c->ref)
        attention_forward_ex_ref(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->Dk,
                                 c->Dv, c->scale);
    else
        attention_forward_ex(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->Dk, c->Dv,
                             c->scale);
    return dotw(c->out, c->R, (size_t)c->B * c->T * c->H * c->Dv);
}
static void test_attention_ex_fd(void) {
    TEST_CASE("attention_forward_ex/backward_ex vs finite differences (Dk 24, Dv 16, H 4, KVH 2, T 1/15/16/17)");
    static const int Ts[] = {1, 15, 16, 17};
    for (int ref = 0; ref < 2; ref++)
        for (int ti = 0; ti < 4; ti++) {
            attx_ctx c = {.B = 1, .T = Ts[ti], .H = 4, .KVH = 2, .Dk = 24, .Dv = 16, .ref = ref,
                          .scale = 0.3f};
            size_t nq = (size_t)c.T * 4 * 24, nk = (size_t)c.T * 2 * 24, nv = (size_t)c.T * 2 * 16,
                   no = (size_t)c.T * 4 * 16;
            c.q = vec(nq); c.k = vec(nk); c.v = vec(nv); c.out = zeros(no);
            c.att = zeros((size_t)4 * c.T * c.T); c.R = vec(no);
            attx_loss(&c);
            float *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nv);
            if (ref) attention_backward_ex_ref(dq, dk, dv, c.R, c.att, c.q, c.k, c.v, 1, c.T, 4, 2, 24, 16, 0.3f);
            else attention_backward_ex(dq, dk, dv, c.R, c.att, c.q, c.k, c.v, 1, c.T, 4, 2, 24, 16, 0.3f);
            double e1 = fd_check(attx_loss, &c, c.q, dq, nq, FD_EPS);
            double e2 = fd_check(attx_loss, &c, c.k, dk, nk, FD_EPS);
            double e3 = fd_check(attx_loss, &c, c.v, dv, nv, FD_EPS);
            CHECK(e1 < FD_TOL && e2 < FD_TOL && e3 < FD_TOL, "ref=%d T=%d: dq %g dk %g dv %g", ref, c.T,
                  e1, e2, e3);
            free(c.q); free(c.k); free(c.v); free(c.out); free(c.att); free(c.R);
            free(dq); free(dk); free(dv);
        }
    /* the old entry points are the Dk = Dv = D, scale = 1/sqrt(D) case */
    {
        int B = 2, T = 9, H = 4, KVH = 2, D = 16;
        size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, na = (size_t)B * H * T * T;
        float *q = vec(nq), *k = vec(nk), *v = vec(nk), *o1 = zeros(nq), *o2 = zeros(nq);
        float *a1 = zeros(na), *a2 = zeros(na);
        attention_forward(o1, a1, q, k, v, B, T, H, KVH, D);
        attention_forward_ex(o2, a2, q, k, v, B, T, H, KVH, D, D, (float)(1.0 / sqrt((double)D)));
        CHECK(!memcmp(o1, o2, nq * 4) && !memcmp(a1, a2, na * 4), "attention_forward != _ex(D, D, 1/sqrt D)");
        free(q); free(k); free(v); free(o1); free(o2); free(a1); free(a2);
    }
    TEST_END();
}

static void test_attention_ex_fast_vs_ref(void) {
    TEST_CASE("attention_forward_ex/backward_ex fast vs reference, Dk != Dv, ragged T");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("fast kernels off (no AVX-512, or MOE_REFERENCE=1): attention_forward_ex is the reference");
        return;
    }
    static const int cfg[][6] = {{1, 1, 4, 2, 24, 16},  {2, 15, 4, 2, 24, 16}, {1, 16, 4, 2, 24, 16},
                                 {1, 17, 4, 2, 24, 16}, {1, 70, 2, 1, 192, 128}, {1, 33, 2, 2, 16, 80}};
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        int B = cfg[ci][0], T = cfg[ci][1], H = cfg[ci][2], KVH = cfg[ci][3], Dk = cfg[ci][4], Dv = cfg[ci][5];
        float sc = 0.7f / sqrtf((float)Dk);
        size_t nq = (size_t)B * T * H * Dk, nk = (size_t)B * T * KVH * Dk, nv = (size_t)B * T * KVH * Dv,
               no = (size_t)B * T * H * Dv, na = (size_t)B * H * T * T;
        float *q = vec(nq), *k = vec(nk), *v = vec(nv), *dout = vec(no);
        float *o1 = zeros(no), *o2 = zeros(no), *a1 = vec(na), *a2 = vec(na);
        attention_forward_ex(o1, a1, q, k, v, B, T, H, KVH, Dk, Dv, sc);
        attention_forward_ex_ref(o2, a2, q, k, v, B, T, H, KVH, Dk, Dv, sc);
        double e = fmax(rel_to_norm(o1, o2, no), rel_to_norm(a1, a2, na));
        float *g1[3] = {vec(nq), vec(nk), vec(nv)}, *g2[3] = {copy(g1[0], nq), copy(g1[1], nk), copy(g1[2], nv)};
        attention_backward_ex(g1[0], g1[1], g1[2], dout, a1, q, k, v, B, T, H, KVH, Dk, Dv, sc);
        attention_backward_ex_ref(g2[0], g2[1], g2[2], dout, a2, q, k, v, B, T, H, KVH, Dk, Dv, sc);
        e = fmax(e, fmax(rel_to_norm(g1[0], g2[0], nq), rel_to_norm(g1[1], g2[1], nk)));
        e = fmax(e, rel_to_norm(g1[2], g2[2], nv));
        CHECK(e < 1e-5, "B=%d T=%d H=%d KVH=%d Dk=%d Dv=%d rel err %g", B, T, H, KVH, Dk, Dv, e);
        free(q); free(k); free(v); free(dout); free(o1); free(o2); free(a1); free(a2);
        for (int i = 0; i < 3; i++) { free(g1[i]); free(g2[i]); }
    }
    TEST_END();
}

/* k and v of every position interleaved in one buffer (row: KVH*Dk keys, then
 * KVH*Dv values, then padding), as a cache could lay them out */
typedef struct {
    int T, H, KVH, Dk, Dv;
    size_t stride;
    float *q, *cache, *k, *v; /* k, v: dense [T][KVH][D] copies for attention_forward_ex */
} cache_case;
static cache_case cache_case_new(int T, int H, int KVH, int Dk, int Dv) {
    cache_case c = {.T = T, .H = H, .KVH = KVH, .Dk = Dk, .Dv = Dv};
    c.stride = (size_t)KVH * (Dk + Dv) + 3;
    c.q = vec((size_t)T * H * Dk);
    c.cache = vec((size_t)T * c.stride);
    c.k = zeros((size_t)T * KVH * Dk);
    c.v = zeros((size_t)T * KVH * Dv);
    for (int t = 0; t < T; t++) {
        memcpy(c.k + (size_t)t * KVH * Dk, c.cache + t * c.stride, (size_t)KVH * Dk * 4);
        memcpy(c.v + (size_t)t * KVH * Dv, c.cache + t * c.stride + KVH * Dk, (size_t)KVH * Dv * 4);
    }
    return c;
}
static void cache_run(const cache_case *c, float *out, int pos0, int n, float scale, int ref) {
    size_t ns = attention_cached_scratch(c->T, n, c->H);
    float *scratch = malloc(ns * sizeof(float));
    const float *kc = c->cache, *vc = c->cache + (size_t)c->KVH * c->Dk;
    const float *q = c->q + (size_t)pos0 * c->H * c->Dk;
    if (ref) attention_cached_ref(out, q, kc, vc, pos0, n, c->H, c->KVH, c->Dk, c->Dv, c->stride, c->stride, scale, scratch);
    else attention_cached(out, q, kc, vc, pos0, n, c->H, c->KVH, c->Dk, c->Dv, c->stride, c->stride, scale, scratch);
    free(scratch);
}
static void cache_case_free(cache_case *c) { free(c->q); free(c->cache); free(c->k); free(c->v); }

static void test_attention_cached(void) {
    TEST_CASE("attention_cached vs attention_forward_ex (causal prefix), chunked vs one at a time, 1 vs 2 threads");
    static const int cfg[][5] = {{37, 4, 2, 24, 16}, {17, 2, 1, 192, 128}, {130, 4, 4, 32, 32}};
    for (size_t ci = 0; ci < 3; ci++) {
        int T = cfg[ci][0], H = cfg[ci][1], KVH = cfg[ci][2], Dk = cfg[ci][3], Dv = cfg[ci][4];
        float sc = 0.9f / sqrtf((float)Dk);
        cache_case c = cache_case_new(T, H, KVH, Dk, Dv);
        size_t no = (size_t)T * H * Dv;
        float *ref_full = zeros(no), *att = zeros((size_t)H * T * T), *fast_full = zeros(no);
        float *cref = zeros(no), *cfast = zeros(no), *part = zeros(no), *one = zeros(no);
        attention_forward_ex_ref(ref_full, att, c.q, c.k, c.v, 1, T, H, KVH, Dk, Dv, sc);
        attention_forward_ex(fast_full, att, c.q, c.k, c.v, 1, T, H, KVH, Dk, Dv, sc);
        cache_run(&c, cref, 0, T, sc, 1);
        cache_run(&c, cfast, 0, T, sc, 0);
        /* the reference twins do the same arithmetic in the same order */
        CHECK(memcmp(cref, ref_full, no * 4) == 0, "T=%d: attention_cached_ref != attention_forward_ex_ref", T);
        double e = fmax(rel_to_norm(cfast, ref_full, no), rel_to_norm(fast_full, cfast, no));
        CHECK(e < 1e-5, "T=%d Dk=%d Dv=%d: fast cached vs reference rel err %g", T, Dk, Dv, e);
        for (int ref = 0; ref < 2; ref++) {
            float *full = ref ? cref : cfast;
            /* a chunk from pos0 and every token alone give the rows of the full run */
            int pos0 = T / 3, n = T - pos0;
            cache_run(&c, part, pos0, n, sc, ref);
            CHECK(memcmp(part, full + (size_t)pos0 * H * Dv, (size_t)n * H * Dv * 4) == 0,
                  "T=%d ref=%d: chunk from %d differs from the full prefill", T, ref, pos0);
            for (int t = 0; t < T; t++) cache_run(&c, one + (size_t)t * H * Dv, t, 1, sc, ref);
            CHECK(memcmp(one, full, no * 4) == 0, "T=%d ref=%d: one token at a time differs", T, ref);
            /* threads */
            int saved = omp_get_max_threads();
            omp_set_num_threads(1);
            cache_run(&c, part, 0, T, sc, ref);
            int same1 = memcmp(part, full, no * 4) == 0;
            omp_set_num_threads(2);
            cache_run(&c, part, 0, T, sc, ref);
            int same2 = memcmp(part, full, no * 4) == 0;
            omp_set_num_threads(saved);
            CHECK(same1 && same2, "T=%d ref=%d: 1 thread %d, 2 threads %d equal to %d threads", T, ref,
                  same1, same2, saved);
        }
        free(ref_full); free(att); free(fast_full); free(cref); free(cfast); free(part); free(one);
        cache_case_free(&c);
    }
    TEST_END();
}

/* fexp (every kernel's exp) within the error ops.c states, on a dense sample */
static void test_exp_error(void) {
    TEST_CASE("exp_shift_sum: max error 0.99 ulp against exp in double");
    enum { N = 1 << 20 };
    float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float));
    double worst = 0;
    for (int rep = 0; rep < 2; rep++) {
        for (int i = 0; i < N; i++) x[i] = -87.0f + 175.5f * moe_rng_uniform(&rng);
        if (rep) for (int i = 0; i < N; i++) x[i] *= 0.01f; /* near 0 too */
        exp_shift_sum(y, x, 0.0f, N);
        for (int i = 0; i < N; i++) {
            double e = exp((double)x[i]);
            int ex;
            frexp(e, &ex);
            double err = fabs((double)y[i] - e) / ldexp(1.0, ex - 24);
            if (!(err <= worst)) worst = err != err ? INFINITY : err;
        }
    }
    CHECK(worst <= 0.99, "max error %.3f ulp", worst);
    printf("  max error %.3f ulp over %d samples\n", worst, 2 * N);
    free(x); free(y);
    TEST_END();
}

/* exp_shift_sum's fast twin gives exp_shift_sum_ref's bits, values and sum,
 * for every length 0..300 (masked tails), in place and not, with special
 * inputs (NaN, +-inf, overflow, underflow, -0) mixed in. A NaN matches any NaN:
 * which payload survives a sum of two NaNs is the compiler's choice of operand
 * order (C leaves it open; the -O1 sanitizer build swaps them). */
static int same_bits_or_nan_d(double a, double b) {
    return memcmp(&a, &b, sizeof a) == 0 || (a != a && b != b);
}
static void test_exp_shift_sum_twins(void) {
    TEST_CASE("exp_shift_sum fast vs reference: same bits, lengths 0..300, special values");
    if (!moe_use_fast_kernels()) {
        TEST_SKIP("fast kernels off (no AVX-512, or MOE_REFERENCE=1): exp_shift_sum is the reference");
        return;
    }
    enum { NMAX = 300 };
    static const float special[] = {NAN, INFINITY, -INFINITY, 100.0f, -100.0f, 88.7f, -87.4f,
                                    -87.6f, -0.0f, 1e-40f};
    float x[NMAX + 1], y1[NMAX + 1], y2[NMAX + 1];
    int bad = 0;
    for (int n = 0; n <= NMAX; n++) {
        for (int sp = 0; sp < 2; sp++) {
            for (int i = 0; i < n; i++) x[i] = 20.0f * moe_rng_uniform(&rng) - 10.0f;
            if (sp && n)
                for (int i = 0; i < 3; i++)
                    x[moe_rng_below(&rng, (uint64_t)n)] = special[moe_rng_below(&rng, 10)];
            x[n] = 12345.0f; /* past the row: must stay */
            float m = n ? x[0] * 0.5f : 0.0f;
            memcpy(y1, x, sizeof x);
            memcpy(y2, x, sizeof x);
            double s1 = exp_shift_sum(y1, x, m, n), s2 = exp_shift_sum_ref(y2, x, m, n);
            int same = same_bits_or_nan_f(y1, y2, NMAX + 1) && same_bits_or_nan_d(s1, s2);
            float z1[NMAX + 1];
            memcpy(z1, x, sizeof x);
            double s3 = exp_shift_sum(z1, z1, m, n); /* in place */
            same = same && same_bits_or_nan_f(z1, y2, NMAX + 1) && same_bits_or_nan_d(s3, s2);
            if (!same && bad++ < 3) CHECK(0, "n %d (special values %d): fast and reference differ", n, sp);
        }
    }
    CHECK(bad == 0, "%d of %d rows differ", bad, 2 * (NMAX + 1));
    TEST_END();
}

/* ---- PyTorch cross-check (tests/ref/rope_attention_ref.py) ------------------ */

static void put_i32(FILE *f, int32_t v) { fwrite(&v, 4, 1, f); }
static void put_f32s(FILE *f, const float *x, size_t n) { fwrite(x, 4, n, f); }

static void dump_rope(FILE *f, int N, int H, int D, const rope_params *p, int32_t max_pos) {
    size_t n = (size_t)N * H * D;
    int32_t *pos = malloc(N * sizeof(int32_t));
    for (int i = 0; i < N; i++) pos[i] = (int32_t)(moe_rng_u64(&rng) % (uint64_t)(max_pos + 1));
    float *x = vec(n), *y = copy(x, n), *g = vec(n), *dx = copy(g, n);
    rope_apply_forward(y, pos, N, H, D, p, NULL, 0);
    rope_apply_backward(dx, pos, N, H, D, p, NULL, 0);
    put_i32(f, 0);
    int32_t hdr[6] = {N, H, D, p->n_rot, p->neox, p->n_ctx_orig};
    fwrite(hdr, 4, 6, f);
    float fl[6] = {p->base, p->freq_scale, p->ext_factor, p->attn_factor, p->beta_fast, p->beta_slow};
    put_f32s(f, fl, 6);
    fwrite(pos, 4, N, f);
    put_f32s(f, x, n); put_f32s(f, y, n); put_f32s(f, g, n); put_f32s(f, dx, n);
    free(pos); free(x); free(y); free(g); free(dx);
}

static void dump_attention(FILE *f, int B, int T, int H, int KVH, int Dk, int Dv, float scale) {
    size_t nq = (size_t)B * T * H * Dk, nk = (size_t)B * T * KVH * Dk, nv = (size_t)B * T * KVH * Dv,
           no = (size_t)B * T * H * Dv;
    float *q = vec(nq), *k = vec(nk), *v = vec(nv), *out = zeros(no), *g = vec(no);
    float *att = zeros((size_t)B * H * T * T), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nv);
    for (size_t i = 0; i < nq; i++) q[i] *= 2.0f;
    attention_forward_ex(out, att, q, k, v, B, T, H, KVH, Dk, Dv, scale);
    attention_backward_ex(dq, dk, dv, g, att, q, k, v, B, T, H, KVH, Dk, Dv, scale);
    put_i32(f, 1);
    int32_t hdr[6] = {B, T, H, KVH, Dk, Dv};
    fwrite(hdr, 4, 6, f);
    put_f32s(f, &scale, 1);
    put_f32s(f, q, nq); put_f32s(f, k, nk); put_f32s(f, v, nv); put_f32s(f, out, no);
    put_f32s(f, g, no); put_f32s(f, dq, nq); put_f32s(f, dk, nk); put_f32s(f, dv, nv);
    free(q); free(k); free(v); free(out); free(g); free(att); free(dq); free(dk); free(dv);
}

static void test_torch_rope_attention(void) {
    char dump_buf[512];
    const char *dump = th_tmp_path(dump_buf, sizeof dump_buf, "rope_attention.bin");
    FILE *f = fopen(dump, "wb");
    TEST_CASE("writing the RoPE / attention dump for PyTorch");
    CHECK(f != NULL, "cannot open %s", dump);
    if (!f) { TEST_END(); return; }
    fwrite("ROPEATT1", 1, 8, f);
    put_i32(f, 7);
    rope_params plain = rope_params_plain(32, 10000.0f);
    rope_params ds = yarn_params(64, 0, 40.0f, 4096); /* DeepSeek-V2-like, on a 72-dim head */
    rope_params qw = yarn_params(48, 1, 4.0f, 2048);  /* NeoX (Qwen-like), partial */
    qw.attn_factor = 0.9f;
    dump_rope(f, 9, 3, 32, &plain, 3000);
    dump_rope(f, 9, 2, 72, &ds, 160000);
    dump_rope(f, 9, 2, 64, &qw, 8000);
    dump_attention(f, 1, 17, 4, 2, 24, 16, 0.3f);
    dump_attention(f, 2, 16, 4, 2, 24, 16, 0.25f);
    dump_attention(f, 1, 5, 2, 1, 40, 24, 1.0f / sqrtf(40.0f));
    dump_attention(f, 1, 33, 2, 2, 192, 128, 0.08f);
    CHECK(fclose(f) == 0, "close failed");
    TEST_END();
    th_run_torch_checker("tests/ref/rope_attention_ref.py", dump, "torch", 3 * 2 + 4 * 4);
    remove(dump);
}

/* ---- swiglu ------------------------------------------------------------------ */

typedef struct {
    int N, F;
    float *g, *u, *out, *R;
} sw_ctx;
static double sw_loss(void *p) {
    sw_ctx *c = p;
    swiglu_forward(c->out, c->g, c->u, c->N, c->F);
    return dotw(c->out, c->R, (size_t)c->N * c->F);
}
static void test_swiglu(void) {
    TEST_CASE("swiglu forward and backward vs finite differences");
    sw_ctx c = {.N = 3, .F = 10};
    size_t n = 30;
    c.g = vec(n); c.u = vec(n); c.out = zeros(n); c.R = vec(n);
    for (size_t i = 0; i < n; i++) c.g[i] *= 4.0f;
    sw_loss(&c);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double g = c.g[i], want = g / (1.0 + exp(-g)) * c.u[i];
        worst = fmax(worst, fabs(c.out[i] - want) / (fabs(want) + 1e-6));
    }
    CHECK(worst < 1e-5, "forward rel err %g", worst);
    float *dg = zeros(n), *du = zeros(n);
    swiglu_backward(dg, du, c.R, c.g, c.u, 3, 10);
    double e1 = fd_check(sw_loss, &c, c.g, dg, n, FD_EPS);
    double e2 = fd_check(sw_loss, &c, c.u, du, n, FD_EPS);
    CHECK(e1 < FD_TOL && e2 < FD_TOL, "dgate %g dup %g", e1, e2);
    /* extreme gates stay finite */
    float big[4] = {-200.0f, 200.0f, -1e30f, 1e30f}, one[4] = {1, 1, 1, 1}, o[4], d1[4] = {0},
          d2[4] = {0};
    swiglu_forward(o, big, one, 1, 4);
    swiglu_backward(d1, d2, one, big, one, 1, 4);
    int finite = 1;
    for (int i = 0; i < 4; i++) finite &= isfinite(o[i]) && isfinite(d1[i]) && isfinite(d2[i]);
    CHECK(finite, "non-finite result for large |gate|");
    free(c.g); free(c.u); free(c.out); free(c.R); free(dg); free(du);
    TEST_END();
}

/* ---- softmax ----------------------------------------------------------------- */

typedef struct {
    int N, C;
    float *in, *out, *R;
} sm_ctx;
static double sm_loss(void *p) {
    sm_ctx *c = p;
    softmax_forward(c->out, c->in, c->N, c->C);
    return dotw(c->out, c->R, (size_t)c->N * c->C);
}
static void test_softmax(void) {
    TEST_CASE("softmax forward (in place, large inputs) and backward vs finite differences");
    sm_ctx c = {.N = 3, .C = 9};
    size_t n = 27;
    c.in = vec(n); c.out = zeros(n); c.R = vec(n);
    for (size_t i = 0; i < n; i++) c.in[i] *= 3.0f;
    sm_loss(&c);
    float *inplace = copy(c.in, n);
    softmax_forward(inplace, inplace, 3, 9);
    CHECK(memcmp(inplace, c.out, n * sizeof(float)) == 0, "in-place result differs");
    float huge[3] = {1000.0f, 1001.0f, -1000.0f}, p[3];
    softmax_forward(p, huge, 1, 3);
    double want = 1.0 / (1.0 + exp(1.0));
    CHECK(fabs(p[0] - want) < 1e-6 && p[2] == 0.0f && isfinite(p[1]), "large logits: %g %g %g",
          p[0], p[1], p[2]);
    float *din = vec(n), *din0 = copy(din, n);
    softmax_backward(din, c.R, c.out, 3, 9);
    for (size_t i = 0; i < n; i++) din[i] -= din0[i];
    double e = fd_check(sm_loss, &c, c.in, din, n, FD_EPS);
    CHECK(e < FD_TOL, "din %g", e);
    free(c.in); free(c.out); free(c.R); free(inplace); free(din); free(din0);
    TEST_END();
}

/* ---- cross-entropy ----------------------------------------------------------- */

typedef struct {
    int N, V;
    float *logits;
    int32_t *tg;
    float scale;
} ce_ctx;
static double ce_loss(void *p) {
    ce_ctx *c = p;
    return c->scale * crossentropy_forward(NULL, c->logits, c->tg, c->N, c->V);
}
static void test_crossentropy(void) {
    TEST_CASE("cross-entropy forward and backward vs finite differences, ignored targets");
    int32_t tg[5] = {2, -1, 0, 6, -7};
    ce_ctx c = {.N = 5, .V = 7, .tg = tg, .scale = 1.0f / 3.0f};
    size_t n = 35;
    c.logits = vec(n);
    for (size_t i = 0; i < n; i++) c.logits[i] *= 4.0f;
    float losses[5];
    double total = crossentropy_forward(losses, c.logits, tg, 5, 7);
    double want_total = 0, worst = 0;
    for (int i = 0; i < 5; i++) {
        if (tg[i] < 0) {
            CHECK(losses[i] == 0.0f, "ignored row %d has loss %g", i, losses[i]);
            continue;
        }
        double s = 0;
        for (int j = 0; j < 7; j++) s += exp((double)c.logits[i * 7 + j]);
        double l = log(s) - c.logits[i * 7 + tg[i]];
        want_total += l;
        worst = fmax(worst, fabs(losses[i] - l) / l);
    }
    CHECK(worst < 1e-5 && fabs(total - want_total) < 1e-5 * want_total, "loss err %g total %g vs %g",
          worst, total, want_total);
    float *d = vec(n);
    crossentropy_backward(d, c.logits, tg, 5, 7, c.scale);
    int zero_rows = 1;
    for (int j = 0; j < 7; j++) zero_rows &= d[7 + j] == 0.0f && d[28 + j] == 0.0f;
    CHECK(zero_rows, "ignored rows not zeroed");
    double e = fd_check(ce_loss, &c, c.logits, d, n, FD_EPS);
    CHECK(e < FD_TOL, "dlogits %g", e);
    /* in place, and large logits stay finite */
    float *inplace = copy(c.logits, n);
    crossentropy_backward(inplace, inplace, tg, 5, 7, c.scale);
    CHECK(memcmp(inplace, d, n * sizeof(float)) == 0, "in-place backward differs");
    float big[3] = {1e4f, -1e4f, 0.0f};
    int32_t t1 = 1;
    double l = crossentropy_forward(NULL, big, &t1, 1, 3);
    CHECK(isfinite(l) && fabs(l - 2e4) < 1.0, "large logits loss %g", l);
    free(c.logits); free(d); free(inplace);
    TEST_END();
}

/* ---- determinism across thread counts ------------------------------------ */

typedef struct {
    float *bufs[48];
    size_t sizes[48];
    int n;
    double ce;
} run_out;

static void run_all(run_out *r, uint64_t seed) {
    moe_rng_seed(&rng, seed);
    r->n = 0;
#define KEEP(p, cnt) \
    (r->n < 48 ? (void)(r->bufs[r->n] = (p), r->sizes[r->n] = (cnt), r->n++) : abort())
    /* matmul: large enough for the parallel paths, both forward formulations */
    static const int mm[][3] = {{300, 200, 260}, {24, 300, 520}};
    for (int s = 0; s < 2; s++) {
        int N = mm[s][0], C = mm[s][1], OC = mm[s][2];
        float *in = vec((size_t)N * C), *w = vec((size_t)OC * C), *b = vec(OC);
        float *out = zeros((size_t)N * OC), *din = vec((size_t)N * C), *dw = vec((size_t)OC * C),
              *db = vec(OC);
        matmul_forward(out, in, w, b, N, C, OC, MATMUL_FP32);
        matmul_backward(din, dw, db, out, in, w, N, C, OC, MATMUL_FP32);
        float *ob = zeros((size_t)N * OC), *dib = vec((size_t)N * C), *dwb = vec((size_t)OC * C);
        matmul_forward(ob, in, w, b, N, C, OC, MATMUL_BF16);
        matmul_backward(dib, dwb, NULL, ob, in, w, N, C, OC, MATMUL_BF16);
        free(in); free(w); free(b);
        KEEP(out, (size_t)N * OC); KEEP(din, (size_t)N * C); KEEP(dw, (size_t)OC * C);
        KEEP(db, (size_t)OC);
        KEEP(ob, (size_t)N * OC); KEEP(dib, (size_t)N * C); KEEP(dwb, (size_t)OC * C);
    }
    {
        int B = 2, T = 64, H = 4, KVH = 2, D = 32;
        size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D;
        float *q = vec(nq), *k = vec(nk), *v = vec(nk), *out = zeros(nq),
              *att = zeros((size_t)B * H * T * T);
        attention_forward(out, att, q, k, v, B, T, H, KVH, D);
        float *dq = vec(nq), *dk = vec(nk), *dv = vec(nk);
        attention_backward(dq, dk, dv, out, att, q, k, v, B, T, H, KVH, D);
        free(q); free(k); free(v);
        KEEP(out, nq); KEEP(att, (size_t)B * H * T * T); KEEP(dq, nq); KEEP(dk, nk); KEEP(dv, nk);
    }
    { /* Dk != Dv attention, its cache form, and YaRN NeoX partial RoPE */
        int B = 2, T = 64, H = 4, KVH = 2, Dk = 24, Dv = 16;
        size_t nq = (size_t)B * T * H * Dk, nk = (size_t)B * T * KVH * Dk, nv = (size_t)B * T * KVH * Dv,
               no = (size_t)B * T * H * Dv, na = (size_t)B * H * T * T;
        float *q = vec(nq), *k = vec(nk), *v = vec(nv), *out = zeros(no), *att = zeros(na);
        attention_forward_ex(out, att, q, k, v, B, T, H, KVH, Dk, Dv, 0.25f);
        float *dq = vec(nq), *dk = vec(nk), *dv = vec(nv);
        attention_backward_ex(dq, dk, dv, out, att, q, k, v, B, T, H, KVH, Dk, Dv, 0.25f);
        float *co = zeros((size_t)T * H * Dv), *scr = malloc(attention_cached_scratch(T, T - 5, H) * 4);
        attention_cached(co, q + (size_t)5 * H * Dk, k, v, 5, T - 5, H, KVH, Dk, Dv,
                         (size_t)KVH * Dk, (size_t)KVH * Dv, 0.25f, scr);
        rope_params rp = yarn_params(16, 1, 8.0f, 32);
        int32_t *pos = malloc(B * T * sizeof(int32_t));
        for (int i = 0; i < B * T; i++) pos[i] = i % T;
        rope_apply_forward(q, pos, B * T, H, Dk, &rp, NULL, 0);
        free(k); free(v); free(scr); free(pos);
        KEEP(out, no); KEEP(att, na); KEEP(dq, nq); KEEP(dk, nk); KEEP(dv, nv);
        KEEP(co, (size_t)(T - 5) * H * Dv); KEEP(q, nq);
    }
    {
        int N = 256, C = 130;
        size_t n = (size_t)N * C;
        float *x = vec(n), *w = vec(C), *out = zeros(n), *rstd = zeros(N), *din = vec(n),
              *dw = vec(C);
        rmsnorm_forward(out, rstd, x, w, N, C, 1e-5f);
        rmsnorm_backward(din, dw, out, x, w, rstd, N, C);
        int32_t *pos = malloc(N * sizeof(int32_t));
        for (int i = 0; i < N; i++) pos[i] = i % 37;
        rope_forward(x, pos, N, 5, 26, 10000.0f, NULL, 0);
        float *sm = zeros(n), *dsm = vec(n), *sw = zeros(n), *dg = vec(n), *du = vec(n);
        softmax_forward(sm, out, N, C);
        softmax_backward(dsm, din, sm, N, C);
        swiglu_forward(sw, x, out, N, C);
        swiglu_backward(dg, du, din, x, out, N, C);
        int32_t *tg = malloc(N * sizeof(int32_t));
        for (int i = 0; i < N; i++) tg[i] = (i % 5 == 0) ? -1 : (i * 7) % C;
        float *losses = zeros(N), *dl = zeros(n);
        r->ce = crossentropy_forward(losses, out, tg, N, C);
        crossentropy_backward(dl, out, tg, N, C, 0.01f);
        free(w); free(pos); free(tg);
        KEEP(out, n); KEEP(rstd, N); KEEP(din, n); KEEP(dw, C); KEEP(x, n); KEEP(sm, n);
        KEEP(dsm, n); KEEP(sw, n); KEEP(dg, n); KEEP(du, n); KEEP(losses, N); KEEP(dl, n);
    }
#undef KEEP
}

static void test_crossentropy_fused(void) {
    TEST_CASE("fused cross-entropy equals the two-pass form");
    enum { N = 7, V = 300 };
    static float logits[N * V], probs[N * V], dref[N * V];
    int32_t targets[N] = {0, 5, -1, 299, 17, 300, 42}; /* -1 and V are ignored */
    for (int i = 0; i < N * V; i++) logits[i] = 4.0f * (moe_rng_uniform(&rng) - 0.5f);
    double a = crossentropy_forward(NULL, logits, targets, N, V);
    crossentropy_backward(dref, logits, targets, N, V, 0.25f);
    double b = crossentropy_softmax(probs, logits, targets, N, V);
    crossentropy_softmax_backward(probs, targets, N, V, 0.25f);
    CHECK(fabs(a - b) <= 1e-12 * fabs(a), "loss %.17g vs %.17g", a, b);
    CHECK(memcmp(probs, dref, sizeof probs) == 0, "gradients differ");
    moe_alloc_fail_after(1); /* no scratch: same results through the fallback */
    double c = crossentropy_softmax(probs, logits, targets, N, V);
    moe_alloc_fail_after(0);
    crossentropy_softmax_backward(probs, targets, N, V, 0.25f);
    CHECK(fabs(a - c) <= 1e-12 * fabs(a), "fallback loss %.17g vs %.17g", a, c);
    CHECK(memcmp(probs, dref, sizeof probs) == 0, "fallback gradients differ");
    TEST_END();
}

static void test_thread_determinism(void) {
    TEST_CASE("bit-identical results for 1, 2 and 3 threads");
    int saved = omp_get_max_threads();
    run_out r1, r2;
    omp_set_num_threads(1);
    run_all(&r1, 99);
    for (int nt = 2; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        run_all(&r2, 99);
        for (int i = 0; i < r1.n; i++) {
            size_t first = 0;
            while (first < r1.sizes[i] && memcmp(&r1.bufs[i][first], &r2.bufs[i][first], 4) == 0) first++;
            CHECK(first == r1.sizes[i], "buffer %d differs between 1 and %d threads at %zu: %.9g vs %.9g",
                  i, nt, first, first < r1.sizes[i] ? r1.bufs[i][first] : 0.0,
                  first < r1.sizes[i] ? r2.bufs[i][first] : 0.0);
            free(r2.bufs[i]);
        }
        CHECK(memcmp(&r1.ce, &r2.ce, sizeof(double)) == 0, "cross-entropy sum differs (%d threads)",
              nt);
    }
    for (int i = 0; i < r1.n; i++) free(r1.bufs[i]);
    omp_set_num_threads(saved);
    TEST_END();
}

int main(void) {
    const char *seed = getenv("TEST_SEED"); /* to probe margins: TEST_SEED=n */
    moe_rng_seed(&rng, seed ? strtoull(seed, NULL, 10) : 12345);
    printf("fast kernels: %s\n", moe_use_fast_kernels() ? "yes" : "no (reference only)");
    test_matmul_hand();
    test_matmul_fast_vs_ref();
    test_matmul_batch_invariance_and_fallback();
    test_matmul_fd();
    test_matmul_set_din();
    test_bf16_rounding();
    test_matmul_bf16();
    test_rmsnorm();
    test_rmsnorm_ggml();
    test_ggml_order();
    test_ggml_fast();
    test_rope_hand();
    test_rope_fd();
    test_attention_fd();
    test_attention_fast_vs_ref_and_causal();
    test_rope_general();
    test_rope_general_backward();
    test_attention_ex_fd();
    test_attention_ex_fast_vs_ref();
    test_attention_cached();
    test_exp_error();
    test_exp_shift_sum_twins();
    test_torch_rope_attention();
    test_scratch_failures();
    test_swiglu();
    test_softmax();
    test_crossentropy();
    test_crossentropy_fused();
    test_thread_determinism();
    TEST_MAIN_END();
}
