/* MoE layer: hand-checked routing and dispatch, and central finite
 * differences for the router, the top-k weights, the experts and both
 * balancing losses. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "moe/moe_layer.h"
#include "kernels/kernels.h"

enum { N = 12, D = 8, E = 4, K = 2, F = 6 };
static float x[N * D], router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F], R[N * D];

static void fill(float *p, size_t n, float scale, unsigned *seed) {
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = scale * (((*seed >> 8) & 0xffff) / 32768.0f - 1.0f);
    }
}

/* loss = sum(out * R) + a * aux + zc * z, in double for the differences */
static double layer_loss(moe_cache *c, const moe_route_opts *o, float a, float zc) {
    float out[N * D];
    moe_forward(out, c, x, router, gate, up, down, N, o);
    double s = 0;
    for (int i = 0; i < N * D; i++) s += (double)out[i] * R[i];
    return s + a * c->r.aux + zc * c->r.z;
}

/* routing must not change under the perturbation, else the loss jumps */
static int same_routing(const moe_cache *c, const int32_t *ids) { return memcmp(c->r.ids, ids, sizeof(int32_t) * N * K) == 0; }

static void fd_check(const char *name, float *param, const float *grad, size_t n, moe_cache *c,
                     const moe_route_opts *o, float a, float zc) {
    TEST_CASE(name);
    int32_t ids0[N * K];
    layer_loss(c, o, a, zc);
    memcpy(ids0, c->r.ids, sizeof ids0);
    double worst = 0;
    int checked = 0;
    for (size_t i = 0; i < n; i += (n > 64 ? n / 48 : 1)) {
        const float eps = 1e-2f;
        float keep = param[i];
        param[i] = keep + eps;
        double lp = layer_loss(c, o, a, zc);
        int ok1 = same_routing(c, ids0);
        param[i] = keep - eps;
        double lm = layer_loss(c, o, a, zc);
        int ok2 = same_routing(c, ids0);
        param[i] = keep;
        if (!ok1 || !ok2) continue;
        double num = (lp - lm) / (2.0 * eps);
        double err = fabs(num - grad[i]) / fmax(fabs(num), 1e-2);
        if (err > worst) worst = err;
        checked++;
    }
    CHECK(checked > 0, "no element could be checked without changing the routing");
    CHECK(worst < 2e-2, "worst relative error %.3g", worst);
    TEST_END();
}

static void run_fd(int renorm, float a, float zc, const char *label) {
    moe_route_opts o = {.renorm = renorm};
    moe_cache c;
    if (moe_cache_init(&c, N, D, E, K, F)) { printf("alloc failed\n"); exit(1); }
    float out[N * D];
    float dx[N * D] = {0}, drouter[E * D] = {0};
    float *dgate = calloc(E * F * D, 4), *dup = calloc(E * F * D, 4), *ddown = calloc(E * D * F, 4);
    moe_forward(out, &c, x, router, gate, up, down, N, &o);
    moe_backward(dx, drouter, dgate, dup, ddown, R, &c, x, router, gate, up, down, &o, a, zc);
    char name[128];
    snprintf(name, sizeof name, "%s: d router", label); fd_check(name, router, drouter, E * D, &c, &o, a, zc);
    snprintf(name, sizeof name, "%s: d input", label); fd_check(name, x, dx, N * D, &c, &o, a, zc);
    snprintf(name, sizeof name, "%s: d gate_exps", label); fd_check(name, gate, dgate, E * F * D, &c, &o, a, zc);
    snprintf(name, sizeof name, "%s: d up_exps", label); fd_check(name, up, dup, E * F * D, &c, &o, a, zc);
    snprintf(name, sizeof name, "%s: d down_exps", label); fd_check(name, down, ddown, E * D * F, &c, &o, a, zc);
    free(dgate); free(dup); free(ddown);
    moe_cache_free(&c);
}

int main(void) {
    unsigned seed = 7;
    fill(x, N * D, 1.0f, &seed);
    fill(router, E * D, 1.0f, &seed);
    fill(gate, E * F * D, 0.5f, &seed);
    fill(up, E * F * D, 0.5f, &seed);
    fill(down, E * D * F, 0.5f, &seed);
    fill(R, N * D, 1.0f, &seed);

    /* hand case: 3 tokens, 3 experts, top-2, logits chosen directly via an
     * identity-like router on a 3-dim input */
    {
        TEST_CASE("routing and dispatch, hand case");
        float hx[3 * 3] = {2, 0, 0,   0, 0, 1,   0, 3, 1};
        float hr[3 * 3] = {1, 0, 0, 0, 1, 0, 0, 0, 1}; /* logits = x */
        moe_cache c;
        moe_cache_init(&c, 3, 3, 3, 2, 2);
        moe_route_opts o = {.renorm = 1};
        moe_route(&c.r, hx, hr, 3, 3, 3, 2, &o);
        /* token 0: logits (2,0,0): expert 0 then expert 1 (tie with 2 goes to the lower id) */
        CHECK(c.r.ids[0] == 0 && c.r.ids[1] == 1, "token 0 chose %d,%d", c.r.ids[0], c.r.ids[1]);
        CHECK(c.r.ids[2] == 2 && c.r.ids[3] == 0, "token 1 chose %d,%d", c.r.ids[2], c.r.ids[3]);
        CHECK(c.r.ids[4] == 1 && c.r.ids[5] == 2, "token 2 chose %d,%d", c.r.ids[4], c.r.ids[5]);
        double e2 = exp(2.0), p0 = e2 / (e2 + 2), p1 = 1 / (e2 + 2);
        CHECK(fabs(c.r.w[0] - p0 / (p0 + p1)) < 1e-6 && fabs(c.r.w[1] - p1 / (p0 + p1)) < 1e-6, "renormalised weights %g %g", c.r.w[0], c.r.w[1]);
        CHECK(c.r.counts[0] == 2 && c.r.counts[1] == 2 && c.r.counts[2] == 2, "counts %d %d %d", c.r.counts[0], c.r.counts[1], c.r.counts[2]);
        /* rows grouped by expert, token order inside: expert 0 gets slots 0 (t0) and 3 (t1) */
        CHECK(c.r.row_slot[0] == 0 && c.r.row_slot[1] == 3, "expert 0 rows hold slots %d,%d", c.r.row_slot[0], c.r.row_slot[1]);
        CHECK(c.r.slot_row[5] == 5 && c.r.slot_row[4] == 3, "slot_row %d %d", c.r.slot_row[4], c.r.slot_row[5]);
        /* z-loss and Switch loss by hand */
        double z = 0, P[3] = {0};
        for (int t = 0; t < 3; t++) {
            double s = 0;
            for (int e = 0; e < 3; e++) s += exp(hx[t * 3 + e]);
            z += log(s) * log(s);
            for (int e = 0; e < 3; e++) P[e] += exp(hx[t * 3 + e]) / s / 3;
        }
        double aux = 3 * (P[0] + P[1] + P[2]) * (2.0 / 6.0);
        CHECK(fabs(c.r.z - z / 3) < 1e-5, "z %g vs %g", c.r.z, z / 3);
        CHECK(fabs(c.r.aux - aux) < 1e-6, "aux %g vs %g", c.r.aux, aux);
        moe_route_opts o2 = {.renorm = 0};
        moe_route(&c.r, hx, hr, 3, 3, 3, 2, &o2);
        CHECK(fabs(c.r.w[0] - p0) < 1e-6, "raw weight %g vs %g", c.r.w[0], p0);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("combine equals the dense sum of selected experts");
        moe_cache c;
        moe_cache_init(&c, N, D, E, K, F);
        moe_route_opts o = {.renorm = 1};
        float out[N * D];
        moe_forward(out, &c, x, router, gate, up, down, N, &o);
        double worst = 0;
        for (int t = 0; t < N; t++) {
            float ref[D] = {0};
            for (int j = 0; j < K; j++) {
                int e = c.r.ids[t * K + j];
                float hg[F], hu[F], a[F], y[D];
                matmul_forward_ref(hg, x + t * D, gate + (size_t)e * F * D, NULL, 1, D, F);
                matmul_forward_ref(hu, x + t * D, up + (size_t)e * F * D, NULL, 1, D, F);
                swiglu_forward(a, hg, hu, 1, F);
                matmul_forward_ref(y, a, down + (size_t)e * D * F, NULL, 1, F, D);
                for (int i = 0; i < D; i++) ref[i] += c.r.w[t * K + j] * y[i];
            }
            for (int i = 0; i < D; i++) worst = fmax(worst, fabs(ref[i] - out[t * D + i]));
        }
        CHECK(worst < 1e-5, "max abs difference %g", worst);
        moe_cache_free(&c);
        TEST_END();
    }
    run_fd(1, 0.0f, 0.0f, "renormalised top-k");
    run_fd(0, 0.0f, 0.0f, "raw top-k weights");
    run_fd(1, 3.0f, 0.0f, "with Switch balance loss");
    run_fd(0, 0.0f, 2.0f, "with router z-loss");
    TEST_MAIN_END();
}
