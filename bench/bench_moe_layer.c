/* bench_moe_layer: the MoE layer alone (issue 10, target 4): grouped
 * execution (moe_forward: rows gathered by expert, every expert's work as
 * tasks shared by all threads) against a loop over the experts with a plain
 * matmul each (gather the expert's tokens, matmul_forward for gate, up and
 * down, scatter), the way a first implementation writes it, and against a
 * loop running every expert on every token (no dispatch at all). The same
 * routing and the same fp32 kernels: the difference is the execution.
 *
 *   bench_moe_layer [--quick]   (threads: OMP_NUM_THREADS, default all cores;
 *                                --quick: N = 256 only, no every-expert loop)
 *
 * Shapes: the 1.72B benchmark model's MoE layer (d 1024, 64 experts top-8,
 * hidden 512), over N = 256 tokens (a prompt) and N = 32. Median of RUNS. */
#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/moe_layer.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static float *rand_buf(size_t n, float scale, moe_rng *r) {
    float *x = moe_malloc(n * sizeof(float));
    if (x)
        for (size_t i = 0; i < n; i++) x[i] = scale * (moe_rng_uniform(r) - 0.5f);
    return x;
}

typedef struct {
    float *xe, *hg, *hu, *act, *ye; /* [N][d] or [N][F] scratch of one expert */
    int32_t *tok;                   /* [N] its tokens                         */
    float *tw;                      /* [N] their combine weights              */
} loop_scratch;

/* out[N][d] = sum over the chosen experts, one expert at a time; all_tokens:
 * every expert runs over all N tokens and the unchosen results are dropped */
static void moe_loop(float *out, const moe_routing *r, const float *x, const moe_weights *w, int N,
                     int d, int E, int F, int all_tokens, loop_scratch *s) {
    memset(out, 0, sizeof(float) * (size_t)N * d);
    for (int e = 0; e < E; e++) {
        int n = 0;
        for (int t = 0; t < N; t++) {
            float wt = 0;
            int chosen = 0;
            for (int j = 0; j < r->S; j++)
                if (r->ids[(size_t)t * r->S + j] == e) { chosen = 1; wt = r->w[(size_t)t * r->S + j]; }
            if (!chosen && !all_tokens) continue;
            s->tok[n] = t;
            s->tw[n] = wt; /* 0 for an unchosen token: its result is computed, then dropped */
            memcpy(s->xe + (size_t)n * d, x + (size_t)t * d, sizeof(float) * d);
            n++;
        }
        if (n == 0) continue;
        const float *gate = (const float *)w->gate + (size_t)e * F * d, *up = (const float *)w->up + (size_t)e * F * d;
        const float *down = (const float *)w->down + (size_t)e * d * F;
        matmul_forward(s->hg, s->xe, gate, NULL, n, d, F, MATMUL_FP32);
        matmul_forward(s->hu, s->xe, up, NULL, n, d, F, MATMUL_FP32);
        swiglu_forward(s->act, s->hg, s->hu, n, F);
        matmul_forward(s->ye, s->act, down, NULL, n, F, d, MATMUL_FP32);
        for (int i = 0; i < n; i++) {
            float *o = out + (size_t)s->tok[i] * d;
            const float *y = s->ye + (size_t)i * d;
            if (s->tw[i] != 0)
                for (int c = 0; c < d; c++) o[c] += s->tw[i] * y[c];
        }
    }
}

static int run_shape(int N, int d, int E, int k, int F, int runs, int all_tokens) {
    moe_rng rng;
    moe_rng_seed(&rng, 11);
    const float ws = 1.0f / sqrtf((float)d);
    float *router = rand_buf((size_t)E * d, ws, &rng), *gate = rand_buf((size_t)E * F * d, ws, &rng);
    float *up = rand_buf((size_t)E * F * d, ws, &rng), *down = rand_buf((size_t)E * d * F, 1.0f / sqrtf((float)F), &rng);
    float *x = rand_buf((size_t)N * d, 2.0f, &rng), *out_g = rand_buf((size_t)N * d, 1, &rng),
          *out_l = rand_buf((size_t)N * d, 1, &rng), *out_a = rand_buf((size_t)N * d, 1, &rng);
    loop_scratch s = {rand_buf((size_t)N * d, 1, &rng), rand_buf((size_t)N * F, 1, &rng),
                      rand_buf((size_t)N * F, 1, &rng), rand_buf((size_t)N * F, 1, &rng),
                      rand_buf((size_t)N * d, 1, &rng), moe_malloc(sizeof(int32_t) * N), moe_malloc(sizeof(float) * N)};
    moe_cache c;
    int rc = 1;
    if (!router || !gate || !up || !down || !x || !out_g || !out_l || !out_a || !s.xe || !s.hg || !s.hu || !s.act || !s.ye ||
        !s.tok || !s.tw || moe_cache_init(&c, N, d, E, k, F, 0, MOE_ROUTING_TOKEN, moe_rows_needed(N, E, k, MOE_ROUTING_TOKEN, 0))) {
        fprintf(stderr, "bench_moe_layer: out of memory\n");
        goto done;
    }
    moe_weights w = {.router = router, .gate = gate, .up = up, .down = down};
    moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1,
                        .matmul = MATMUL_FP32};
    double tg[64], tl[64], ta[64];
    moe_forward(out_g, &c, x, &w, N, &o); /* warm-up (the loops take long enough without one) */
    for (int r = 0; r < runs; r++) {
        double t0 = moe_now();
        moe_forward(out_g, &c, x, &w, N, &o);
        double t1 = moe_now();
        moe_route(&c.r, x, &w, N, d, &o); /* the loop routes the same way, timed with it */
        moe_loop(out_l, &c.r, x, &w, N, d, E, F, 0, &s);
        double t2 = moe_now();
        if (all_tokens) {
            moe_route(&c.r, x, &w, N, d, &o);
            moe_loop(out_a, &c.r, x, &w, N, d, E, F, 1, &s);
        }
        tg[r] = t1 - t0;
        tl[r] = t2 - t1;
        ta[r] = moe_now() - t2;
    }
    /* the executions agree (same kernels, other row groupings: rounding only) */
    double maxd = 0, maxv = 0;
    for (size_t i = 0; i < (size_t)N * d; i++) {
        maxd = fmax(maxd, fabs((double)out_g[i] - out_l[i]));
        if (all_tokens) maxd = fmax(maxd, fabs((double)out_g[i] - out_a[i]));
        maxv = fmax(maxv, fabs((double)out_g[i]));
    }
    const double g = median(tg, runs), l = median(tl, runs), a = median(ta, runs);
    const double flops = 2.0 * 3.0 * N * k * (double)d * F;
    printf("moe layer N=%-4d d=%d E=%d k=%d F=%d | grouped %8.2f ms (%6.1f GFLOP/s) | expert loop %8.2f ms: "
           "grouped is %5.2fx faster", N, d, E, k, F, 1e3 * g, flops / g * 1e-9, 1e3 * l, l / g);
    if (all_tokens) printf(" | every expert on every token %8.2f ms = %6.2fx", 1e3 * a, a / g);
    printf(" | max |diff| %.1e of %.1e\n", maxd, maxv);
    rc = maxd <= 1e-3 * (maxv + 1) ? 0 : 1;
    if (rc) fprintf(stderr, "bench_moe_layer: the grouped and looped outputs differ\n");
    moe_cache_free(&c);
done:
    moe_free(router); moe_free(gate); moe_free(up); moe_free(down); moe_free(x); moe_free(out_g); moe_free(out_l); moe_free(out_a);
    moe_free(s.xe); moe_free(s.hg); moe_free(s.hu); moe_free(s.act); moe_free(s.ye); moe_free(s.tok); moe_free(s.tw);
    return rc;
}

int main(int argc, char **argv) {
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    const int runs = quick ? 3 : 5;
    printf("bench_moe_layer: %d threads, fast kernels %s, median of %d runs\n", omp_get_max_threads(),
           moe_use_fast_kernels() ? "on" : "off (reference only)", runs);
    /* quick: the prompt shape only, without the slowest variant */
    int rc = run_shape(256, 1024, 64, 8, 512, runs, !quick);
    if (!quick) rc |= run_shape(32, 1024, 64, 8, 512, runs, 1);
    return rc;
}
