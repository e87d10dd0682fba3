/* core/machine: what the benchmarks report about the machine itself: the
 * CPU units the kernels may use and the memory bandwidth a streaming read
 * reaches, the ceiling of memory-bound decoding. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "moe.h"

void moe_cpu_describe(char *buf, size_t cap) {
    if (!buf || !cap) return;
    const moe_cpu_features *c = moe_cpu();
    const struct { int on; const char *name; } units[] = {
        {c->avx2, "avx2"}, {c->fma, "fma"}, {c->avx512f, "avx512f"}, {c->avx512bw, "avx512bw"},
        {c->avx512vl, "avx512vl"}, {c->avx512_bf16, "avx512_bf16"}, {c->avx512_vnni, "avx512_vnni"},
        {c->amx_tile, "amx_tile"}, {c->amx_bf16, "amx_bf16"}, {c->amx_int8, "amx_int8"},
    };
    size_t o = 0;
    buf[0] = 0;
    o += (size_t)snprintf(buf + o, cap - MOE_MIN(o, cap), "units:");
    int any = 0;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (units[i].on && o < cap) {
            o += (size_t)snprintf(buf + o, cap - o, " %s", units[i].name);
            any = 1;
        }
    if (!any && o < cap) o += (size_t)snprintf(buf + o, cap - o, " none");
    /* the GEMM backends of fp32 and bf16-input matmuls, and the kernels of
     * quantised (and f16/bf16) weights, each chosen once from the CPU */
    if (o < cap)
        snprintf(buf + o, cap - o, "; kernels: matmul %s (bf16 %s), quantised %s", moe_matmul_backend(0),
                 moe_matmul_backend(1), moe_cpu_kernels());
}

/* One pass over the buffer, every 64-bit word read once and folded into a
 * sum (returned, so the reads cannot be dropped); a plain loop the compiler
 * vectorises. Threads take contiguous slices, as the matmuls split weights. */
static uint64_t read_pass(const uint64_t *p, size_t n) {
    uint64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (size_t i = 0; i < n; i++) total += p[i];
    return total;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

moe_status moe_measure_bandwidth(size_t bytes, int reps, double *gbs) {
    if (!gbs) return moe_error(MOE_ERR_INVALID_ARG, "moe_measure_bandwidth: NULL result");
    *gbs = 0;
    if (bytes == 0) bytes = (size_t)512 << 20; /* far beyond any L3 of today's CPUs */
    if (reps <= 0) reps = 7;
    if (bytes < 4096 || reps > 1000)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_measure_bandwidth: %zu bytes, %d repetitions", bytes, reps);
    const size_t n = bytes / sizeof(uint64_t);
    uint64_t *p = moe_malloc(n * sizeof(uint64_t));
    double *t = moe_malloc((size_t)reps * sizeof(double));
    if (!p || !t) {
        moe_free(p);
        moe_free(t);
        return moe_error(MOE_ERR_NOMEM, "moe_measure_bandwidth: cannot allocate %zu MiB", bytes >> 20);
    }
    /* first touch by the threads that read it (pages placed near them) */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) p[i] = i;
    volatile uint64_t sink = read_pass(p, n); /* warm-up: TLB, frequency */
    for (int r = 0; r < reps; r++) {
        const double t0 = moe_now();
        sink += read_pass(p, n);
        t[r] = moe_now() - t0;
    }
    (void)sink;
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    const double med = reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
    *gbs = med > 0 ? (double)(n * sizeof(uint64_t)) / med * 1e-9 : 0;
    moe_free(p);
    moe_free(t);
    return MOE_OK;
}
