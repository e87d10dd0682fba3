/* bench_kernels: matmul throughput of the fast and reference paths at
 * model-like shapes, set against this machine's own measured FMA peak and
 * memory bandwidth. Every figure is the median of 5 runs.
 *
 *   bench_kernels [--quick]      (threads: OMP_NUM_THREADS, default all cores)
 *   bench_kernels --qmatmul      (only the quantised-matmul section)
 *   bench_kernels --gemm         (only the per-backend GEMM section)
 *
 * Output: one line per measurement, then "ratio" lines giving the fast matmul
 * as a fraction of the measured peak at the same thread count, then the
 * quantised matmul (qmatmul) on one thread, portable vs fast, per weight type. */
#include "core/core.h"
#include "core/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "kernels/qmatmul.h"

#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RUNS 5

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- FMA peak: independent multiply-add chains, enough of them to cover the
 * FMA latency on every port; the result is consumed so nothing is elided. --- */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* bf16 = 0: FMA (16 multiply-adds per zmm); 1: VDPBF16PS (32 per zmm) */
__attribute__((target("avx512f,fma,avx512bf16"), noinline)) static float fma_loop512(long iters,
                                                                                   int bf16) {
    __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
    __m512bh mb = (__m512bh)_mm512_set1_epi16(0x3f80), cb = (__m512bh)_mm512_set1_epi16(0x3380);
#define P512_DECL(i) __m512 a##i = _mm512_set1_ps(1.0f + (float)(i));
#define P512_STEP(i) a##i = _mm512_fmadd_ps(a##i, m, c);
#define PDP_STEP(i) a##i = _mm512_dpbf16_ps(a##i, mb, cb);
#define P512_SUM(i) s = _mm512_add_ps(s, a##i);
    CHAINS(P512_DECL)
    if (bf16)
        for (long it = 0; it < iters; it++) { CHAINS(PDP_STEP) }
    else
        for (long it = 0; it < iters; it++) { CHAINS(P512_STEP) }
    __m512 s = _mm512_setzero_ps();
    CHAINS(P512_SUM)
    return _mm512_reduce_add_ps(s);
}
__attribute__((target("avx2,fma"), noinline)) static float fma_loop256(long iters) {
    __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
#define P256_DECL(i) __m256 a##i = _mm256_set1_ps(1.0f + (float)(i));
#define P256_STEP(i) a##i = _mm256_fmadd_ps(a##i, m, c);
#define P256_SUM(i) s = _mm256_add_ps(s, a##i);
    CHAINS(P256_DECL)
    for (long it = 0; it < iters; it++) { CHAINS(P256_STEP) }
    __m256 s = _mm256_setzero_ps();
    CHAINS(P256_SUM)
    float o[8];
    _mm256_storeu_ps(o, s);
    return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
}

static volatile float sink;

/* GFLOP/s of the FMA loop on nthr threads (each runs it), median of RUNS */
static double fma_peak(int nthr, const char **isa, int bf16) {
    int w512 = moe_cpu()->avx512f && moe_cpu()->fma, w256 = moe_cpu()->avx2 && moe_cpu()->fma;
    *isa = w512 ? "avx512 fma" : w256 ? "avx2 fma" : "none";
    if (!w512 && !w256) return 0.0;
    if (bf16 && !moe_cpu()->avx512_bf16) return 0.0;
    long iters = 20000000; /* ~0.1-0.2 s per run on a 3 GHz core */
    double flops_per_iter = 12.0 * (w512 ? 16 : 8) * 2.0 * (bf16 ? 2 : 1);
    double v[RUNS];
    for (int r = 0; r < RUNS; r++) {
        double t0 = moe_now();
#pragma omp parallel num_threads(nthr)
        {
            float x = w512 ? fma_loop512(iters, bf16) : fma_loop256(iters);
#pragma omp atomic
            sink += x;
        }
        double dt = moe_now() - t0;
        v[r] = flops_per_iter * iters * nthr / dt * 1e-9;
    }
    return median(v, RUNS);
}

/* ---- AMX-BF16 peak: four independent TDPBF16PS accumulators (tmm0-3) fed by
 * two A and two B tiles loaded once; each product is 16 x 16 x 32 multiply-adds.
 * The accumulators are stored at the end so nothing is elided. --- */
__attribute__((target("amx-tile,amx-bf16"), noinline)) static float amx_loop(long iters) {
    _Alignas(64) uint16_t src[16 * 32]; /* per thread: every thread fills its own */
    for (int i = 0; i < 16 * 32; i++) src[i] = 0x3c00; /* bf16 2^-7: sums stay finite */
    moe_amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    moe_amx_load_config(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, src, 64); _tile_loadd(5, src, 64); _tile_loadd(6, src, 64); _tile_loadd(7, src, 64);
    for (long it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _Alignas(64) float out[16 * 16];
    float s = 0;
    _tile_stored(0, out, 64); s += out[0];
    _tile_stored(3, out, 64); s += out[255];
    _tile_release();
    return s;
}

/* GFLOP/s of the AMX loop on nthr threads, median of RUNS; 0 without AMX-BF16
 * or the kernel's permission for the tiles */
static double amx_peak(int nthr) {
    if (!moe_cpu()->amx_bf16 || !moe_amx_enable()) return 0.0;
    long iters = 2000000;
    double flops_per_iter = 4.0 * 16 * 16 * 32 * 2;
    double v[RUNS];
    for (int r = 0; r < RUNS; r++) {
        double t0 = moe_now();
#pragma omp parallel num_threads(nthr)
        {
            float x = amx_loop(iters);
#pragma omp atomic
            sink += x;
        }
        v[r] = flops_per_iter * iters * nthr / (moe_now() - t0) * 1e-9;
    }
    return median(v, RUNS);
}

/* ---- memory bandwidth: copy and triad over arrays far larger than cache ---- */
static void bandwidth(int nthr, double *copy_gbs, double *triad_gbs) {
    size_t n = (size_t)16 << 20; /* 16M floats = 64 MB per array */
    float *a = moe_malloc(n * sizeof(float)), *b = moe_malloc(n * sizeof(float)),
          *c = moe_malloc(n * sizeof(float));
    *copy_gbs = *triad_gbs = 0.0;
    if (a && b && c) {
#pragma omp parallel for num_threads(nthr) schedule(static)
        for (size_t i = 0; i < n; i++) { a[i] = 0.0f; b[i] = 1.0f; c[i] = 2.0f; }
        double vc[RUNS], vt[RUNS];
        for (int r = 0; r < RUNS; r++) {
            double t0 = moe_now();
#pragma omp parallel for num_threads(nthr) schedule(static)
            for (size_t i = 0; i < n; i++) a[i] = b[i];
            double t1 = moe_now();
#pragma omp parallel for num_threads(nthr) schedule(static)
            for (size_t i = 0; i < n; i++) a[i] = b[i] + 3.0f * c[i];
            double t2 = moe_now();
            vc[r] = 2.0 * n * sizeof(float) / (t1 - t0) * 1e-9; /* read + write */
            vt[r] = 3.0 * n * sizeof(float) / (t2 - t1) * 1e-9; /* 2 reads + write */
        }
        sink += a[n / 2];
        *copy_gbs = median(vc, RUNS);
        *triad_gbs = median(vt, RUNS);
    }
    moe_free(a);
    moe_free(b);
    moe_free(c);
}

/* ---- matmul ---------------------------------------------------------------- */
typedef struct {
    const char *name;
    int N, C, OC;
} shape;

static float *rand_buf(size_t n, moe_rng *r) {
    float *x = moe_malloc(n * sizeof(float));
    if (x)
        for (size_t i = 0; i < n; i++) x[i] = moe_rng_uniform(r) - 0.5f;
    return x;
}

/* median GFLOP/s of forward (mode 0) or backward din+dw (mode 1), fast or ref */
static double time_matmul(const shape *s, int mode, int ref, matmul_precision prec) {
    moe_rng r;
    moe_rng_seed(&r, 7);
    size_t N = s->N, C = s->C, OC = s->OC;
    float *in = rand_buf(N * C, &r), *w = rand_buf(OC * C, &r), *out = rand_buf(N * OC, &r);
    float *din = rand_buf(N * C, &r), *dw = rand_buf(OC * C, &r);
    double res = -1.0;
    if (in && w && out && din && dw) {
        double flops = (mode ? 4.0 : 2.0) * N * C * OC, v[RUNS];
        for (int it = -1; it < RUNS; it++) { /* one warm-up */
            double t0 = moe_now();
            if (mode == 0) {
                if (ref) matmul_forward_ref(out, in, w, NULL, s->N, s->C, s->OC, prec);
                else matmul_forward(out, in, w, NULL, s->N, s->C, s->OC, prec);
            } else {
                if (ref) matmul_backward_ref(din, dw, NULL, out, in, w, s->N, s->C, s->OC, prec);
                else matmul_backward(din, dw, NULL, out, in, w, s->N, s->C, s->OC, prec);
            }
            double dt = moe_now() - t0;
            if (it >= 0) v[it] = flops / dt * 1e-9;
        }
        res = median(v, RUNS);
    }
    moe_free(in); moe_free(w); moe_free(out); moe_free(din); moe_free(dw);
    return res;
}

static double time_attention(int B, int T, int H, int KVH, int D, int bwd) {
    moe_rng r;
    moe_rng_seed(&r, 8);
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, na = (size_t)B * H * T * T;
    float *q = rand_buf(nq, &r), *k = rand_buf(nk, &r), *v = rand_buf(nk, &r);
    float *o = rand_buf(nq, &r), *att = rand_buf(na, &r);
    float *dq = rand_buf(nq, &r), *dk = rand_buf(nk, &r), *dv = rand_buf(nk, &r);
    double res = -1.0;
    if (q && k && v && o && att && dq && dk && dv) {
        /* causal: half of QK^T and PV; backward has twice the products */
        double flops = (bwd ? 2.0 : 1.0) * 2.0 * B * H * (double)T * T * D, t[RUNS];
        attention_forward(o, att, q, k, v, B, T, H, KVH, D);
        for (int it = 0; it < RUNS; it++) {
            double t0 = moe_now();
            if (bwd) attention_backward(dq, dk, dv, o, att, q, k, v, B, T, H, KVH, D);
            else attention_forward(o, att, q, k, v, B, T, H, KVH, D);
            t[it] = flops / (moe_now() - t0) * 1e-9;
        }
        res = median(t, RUNS);
    }
    moe_free(q); moe_free(k); moe_free(v); moe_free(o); moe_free(att);
    moe_free(dq); moe_free(dk); moe_free(dv);
    return res;
}

/* ---- every GEMM backend of this CPU on the default preset's training
 * products: GFLOP/s of forward (out = in . w^T) and backward (din and dw), as
 * matmul.c maps them onto gemm_desc, median of RUNS, all threads. */
static double time_gemm(const gemm_backend *be, const shape *s, int bwd, int bf16) {
    moe_rng r;
    moe_rng_seed(&r, 9);
    size_t N = s->N, C = s->C, OC = s->OC;
    float *in = rand_buf(N * C, &r), *w = rand_buf(OC * C, &r), *out = rand_buf(N * OC, &r);
    float *din = rand_buf(N * C, &r), *dw = rand_buf(OC * C, &r);
    double res = -1.0, v[RUNS];
    gemm_desc fwd = {.M = s->N, .Nc = s->OC, .K = s->C, .A = in, .as_m = s->C, .as_k = 1, .B = w,
                     .bs_k = 1, .bs_n = s->C, .Cm = out, .ldc = s->OC, .init = 1, .bf16 = bf16,
                     .pack = 1};
    gemm_desc gdin = {.M = s->N, .Nc = s->C, .K = s->OC, .A = out, .as_m = s->OC, .as_k = 1,
                      .B = w, .bs_k = s->C, .bs_n = 1, .Cm = din, .ldc = s->C, .init = 1,
                      .bf16 = bf16, .pack = 1};
    gemm_desc gdw = {.M = s->OC, .Nc = s->C, .K = s->N, .A = out, .as_m = 1, .as_k = s->OC,
                     .B = in, .bs_k = s->C, .bs_n = 1, .Cm = dw, .ldc = s->C, .bf16 = bf16,
                     .pack = 1};
    if (in && w && out && din && dw) {
        double flops = (bwd ? 4.0 : 2.0) * N * C * OC;
        int rc = 0;
        for (int it = -1; it < RUNS; it++) {
            double t0 = moe_now();
            if (bwd) rc |= gemm_execute(be, &gdin) | gemm_execute(be, &gdw);
            else rc |= gemm_execute(be, &fwd);
            if (it >= 0) v[it] = flops / (moe_now() - t0) * 1e-9;
        }
        res = rc ? -1.0 : median(v, RUNS);
    }
    moe_free(in); moe_free(w); moe_free(out); moe_free(din); moe_free(dw);
    return res;
}

static void bench_gemm_backends(void) {
    static const shape shapes[] = {
        {"default qkv", 2048, 192, 320}, {"default expert N=512", 512, 192, 384},
        {"default expert down", 512, 384, 192}, {"default lm head", 2048, 192, 4096},
    };
    const gemm_backend *bs[16];
    int n = 0;
    for (int bf16 = 0; bf16 < 2; bf16++) {
        const gemm_backend *b[8];
        int m = gemm_available(b, 8, bf16);
        for (int i = 0; i < m; i++)
            if (b[i] != &gemm_backend_ref) bs[n++] = b[i];
    }
    printf("gemm      backends of this CPU, %d threads (GFLOP/s, fwd / bwd din+dw)\n",
           omp_get_max_threads());
    printf("%-22s %5s %5s %5s", "gemm", "N", "C", "OC");
    for (int i = 0; i < n; i++) printf(" | %-17s", bs[i]->name);
    printf("\n");
    for (size_t j = 0; j < sizeof shapes / sizeof *shapes; j++) {
        const shape *s = &shapes[j];
        printf("%-22s %5d %5d %5d", s->name, s->N, s->C, s->OC);
        for (int i = 0; i < n; i++) {
            gemm_desc probe = {.bf16 = 1};
            int bf16 = bs[i]->supports(&probe);
            printf(" | %8.1f %8.1f", time_gemm(bs[i], s, 0, bf16), time_gemm(bs[i], s, 1, bf16));
        }
        printf("\n");
        fflush(stdout);
    }
}

/* ---- quantised matmul: GMAC/s of qmatmul_forward on one thread, W OC x C of
 * type wtype, N activation rows (conversion included); reference = 1 times
 * the portable path. Timed in this thread's CPU time (the work runs on it
 * alone), so that other processes' share of a loaded machine drops out;
 * repeated until 0.2 s of it have passed, median of RUNS. */
static double thread_cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double time_qmatmul(int wtype, int N, int C, int OC, int reference) {
    const dtype_traits *t = dtype_traits_of(wtype);
    size_t rb;
    if (dtype_row_bytes(wtype, C, &rb)) return 0;
    float *src = moe_malloc((size_t)C * sizeof(float)), *in = moe_malloc((size_t)N * C * sizeof(float));
    float *out = moe_malloc((size_t)N * OC * sizeof(float));
    uint8_t *w = moe_malloc((size_t)OC * rb);
    void *ws = moe_malloc(qmatmul_workspace(wtype, N, C) + 1);
    double res = 0;
    if (src && in && out && w && ws) {
        moe_rng r;
        moe_rng_seed(&r, 1);
        for (int o = 0; o < OC; o++) {
            for (int i = 0; i < C; i++) src[i] = 0.5f * moe_rng_normal(&r);
            t->from_float(w + (size_t)o * rb, src, C);
        }
        for (size_t i = 0; i < (size_t)N * C; i++) in[i] = moe_rng_normal(&r);
        moe_set_reference_kernels(reference);
        double v[RUNS];
        for (int k = 0; k < RUNS; k++) {
            int reps = 0;
            double t0 = thread_cpu_seconds(), el;
            do {
                qmatmul_forward(out, in, w, wtype, N, C, OC, ws);
                reps++;
                el = thread_cpu_seconds() - t0;
            } while (el < 0.2);
            v[k] = (double)reps * N * C * OC / el * 1e-9;
        }
        moe_set_reference_kernels(0);
        res = median(v, RUNS);
    }
    moe_free(src); moe_free(in); moe_free(out); moe_free(w); moe_free(ws);
    return res;
}

static void bench_qmatmul(void) {
    const int types[] = {DT_Q8_0, DT_Q4_0, DT_Q4_K, DT_Q5_K, DT_Q6_K, DT_F16, DT_BF16};
    enum { C = 1024, OC = 4096 };
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    printf("qmatmul   W %d x %d, 1 thread, fast path: %s (GMAC per second of the thread's CPU\n"
           "          time; the portable rate does not depend on OC, so it is timed on 512 rows)\n",
           OC, C, qmatmul_kernels());
    printf("%-6s | %9s %9s %7s | %9s %9s %7s\n", "type", "N=1 port", "N=1 fast", "speedup",
           "N=64 port", "N=64 fast", "speedup");
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        double p1 = time_qmatmul(types[i], 1, C, 512, 1), f1 = time_qmatmul(types[i], 1, C, OC, 0);
        double p64 = time_qmatmul(types[i], 64, C, 512, 1), f64 = time_qmatmul(types[i], 64, C, OC, 0);
        printf("%-6s | %9.2f %9.2f %6.1fx | %9.2f %9.2f %6.1fx\n", dtype_name(types[i]), p1, f1,
               p1 > 0 ? f1 / p1 : 0, p64, f64, p64 > 0 ? f64 / p64 : 0);
        fflush(stdout);
    }
    omp_set_num_threads(saved);
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (argc > 1 && strcmp(argv[1], "--qmatmul") == 0) { /* that section alone */
        bench_qmatmul();
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--gemm") == 0) {
        bench_gemm_backends();
        return 0;
    }
    int nthr = omp_get_max_threads();
    const char *isa;
    printf("bench_kernels: %d thread%s, fast kernels %s\n", nthr, nthr == 1 ? "" : "s",
           moe_use_fast_kernels() ? "on" : "off (reference only)");

    double peak1 = fma_peak(1, &isa, 0), peakn = nthr > 1 ? fma_peak(nthr, &isa, 0) : peak1;
    printf("peak      fma loop (%s)       1 thread %8.1f GFLOP/s   %d threads %8.1f GFLOP/s\n", isa,
           peak1, nthr, peakn);
    double bpeak1 = fma_peak(1, &isa, 1), bpeakn = nthr > 1 ? fma_peak(nthr, &isa, 1) : bpeak1;
    if (bpeakn > 0)
        printf("peak      bf16 dot loop (vdpbf16ps) 1 thread %8.1f GFLOP/s   %d threads %8.1f GFLOP/s\n",
               bpeak1, nthr, bpeakn);
    double apeak1 = amx_peak(1), apeakn = nthr > 1 && apeak1 > 0 ? amx_peak(nthr) : apeak1;
    if (apeakn > 0)
        printf("peak      amx bf16 tiles (tdpbf16ps) 1 thread %8.1f GFLOP/s   %d threads %8.1f GFLOP/s\n",
               apeak1, nthr, apeakn);
    else
        printf("peak      amx bf16 tiles: not measured (no AMX-BF16, or the kernel refused the tiles)\n");
    double bw_copy, bw_triad;
    bandwidth(nthr, &bw_copy, &bw_triad);
    printf("memory    copy %.1f GB/s   triad %.1f GB/s   (%d threads, 64 MB arrays)\n", bw_copy,
           bw_triad, nthr);

    static const shape full[] = {
        {"attn proj", 2048, 512, 512},   {"ffn up", 2048, 512, 1536},
        {"ffn down", 2048, 1536, 512},   {"lm head", 2048, 512, 8192},
        {"expert up N=128", 128, 512, 1024}, {"expert down N=128", 128, 1024, 512},
        {"expert N=32", 32, 512, 1024},
        /* the default preset's shapes: d_model 192, d_expert 384, vocab 4096, 2048 tokens */
        {"default qkv", 2048, 192, 320}, {"default expert N=512", 512, 192, 384},
        {"default lm head", 2048, 192, 4096},
    };
    static const shape small[] = {
        {"attn proj", 1024, 512, 512}, {"expert up N=128", 128, 512, 1024}, {"expert N=32", 32, 512, 1024},
    };
    const shape *shapes = quick ? small : full;
    int ns = quick ? (int)(sizeof small / sizeof small[0]) : (int)(sizeof full / sizeof full[0]);

    printf("%-20s %5s %5s %5s | %9s %9s | %9s %9s | %9s %9s | %s\n", "matmul", "N", "C", "OC",
           "fwd fast", "bwd fast", "fwd ref", "bwd ref", "fwd bf16", "bwd bf16",
           "fwd fast / fma peak, bf16 / dot peak");
    double sum_frac = 0, sum_bfrac = 0;
    for (int i = 0; i < ns; i++) {
        const shape *s = &shapes[i];
        double ff = time_matmul(s, 0, 0, MATMUL_FP32), bf = time_matmul(s, 1, 0, MATMUL_FP32);
        double fb = bpeakn > 0 ? time_matmul(s, 0, 0, MATMUL_BF16) : 0;
        double bb = bpeakn > 0 ? time_matmul(s, 1, 0, MATMUL_BF16) : 0;
        /* the scalar reference is slow: time it on at most 256 rows (its rate
         * does not depend on N) */
        shape sr = *s;
        if (sr.N > 256) sr.N = 256;
        double fr = time_matmul(&sr, 0, 1, MATMUL_FP32), br = time_matmul(&sr, 1, 1, MATMUL_FP32);
        double frac = peakn > 0 ? ff / peakn : 0, bfrac = bpeakn > 0 ? fb / bpeakn : 0;
        sum_frac += frac;
        sum_bfrac += bfrac;
        printf("%-20s %5d %5d %5d | %9.1f %9.1f | %9.2f %9.2f | %9.1f %9.1f | %5.1f%%  %5.1f%%  (GFLOP/s)\n",
               s->name, s->N, s->C, s->OC, ff, bf, fr, br, fb, bb, 100.0 * frac, 100.0 * bfrac);
        fflush(stdout);
    }
    double af = time_attention(quick ? 2 : 4, 512, 8, 4, 64, 0);
    double ab = time_attention(quick ? 2 : 4, 512, 8, 4, 64, 1);
    printf("attention B=%d T=512 H=8 KVH=4 D=64: fwd %.1f GFLOP/s, bwd %.1f GFLOP/s\n",
           quick ? 2 : 4, af, ab);
    printf("ratio     fast matmul fwd / measured peak (%d threads): mean %.1f%%\n", nthr,
           100.0 * sum_frac / ns);
    if (bpeakn > 0)
        printf("ratio     bf16 matmul fwd / measured bf16 dot peak (%d threads): mean %.1f%%\n", nthr,
               100.0 * sum_bfrac / ns);
    bench_gemm_backends();
    bench_qmatmul();
    return 0;
}
