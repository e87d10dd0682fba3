/* MoE layer: hand-checked routing, dispatch, capacity, expert choice and
 * sequence routing; group-limited selection against brute force; the bias
 * update rule; and central finite differences for every router variant,
 * shared experts and each balance loss. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "harness.h"
#include "moe/moe_layer.h"
#include "kernels/kernels.h"

enum { N = 12, D = 8, E = 8, K = 2, F = 6, FS = 10, SEQ = 4 };
static float x[N * D], router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F], R[N * D];
static float bias[E], shg[FS * D], shu[FS * D], shd[D * FS], shi[D];

static void fill(float *p, size_t n, float scale, unsigned *seed) {
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = scale * (((*seed >> 8) & 0xffff) / 32768.0f - 1.0f);
    }
}

typedef struct {
    const char *label;
    moe_route_opts o;
    int use_bias, Fs, use_gate;
    moe_loss_scales ls;
} variant;

static moe_weights weights_of(const variant *v) {
    moe_weights w = {.router = router, .gate = gate, .up = up, .down = down,
                     .bias = v->use_bias ? bias : NULL};
    if (v->Fs) { w.sh_gate = shg; w.sh_up = shu; w.sh_down = shd; w.sh_inp = v->use_gate ? shi : NULL; }
    return w;
}

/* a cache that cannot be made fails the case and stops the program: every
 * case after it would read the missing buffers */
static void init_cache(moe_cache *c, const variant *v) {
    int64_t rows = moe_rows_needed(N, E, K, v->o.mode, v->o.capacity);
    if (moe_cache_init(c, N, D, E, K, F, v->Fs, v->o.mode, rows) != MOE_OK)
        TEST_FATAL("moe_cache_init: %s", moe_last_error());
}

/* loss = sum(out * R) + the weighted balance terms, in double */
static double layer_loss(moe_cache *c, const variant *v) {
    float out[N * D];
    moe_weights w = weights_of(v);
    moe_forward(out, c, x, &w, N, &v->o);
    double s = 0;
    for (int i = 0; i < N * D; i++) s += (double)out[i] * R[i];
    return s + v->ls.aux * c->r.aux + v->ls.z * c->r.z + v->ls.seq * c->r.seq_aux;
}

/* routing (choices and what capacity kept) must not change under the
 * perturbation, else the loss jumps */
static int same_routing(const moe_cache *c, const int32_t *ids, const int32_t *kept) {
    for (int s = 0; s < N * c->S; s++)
        if (c->r.ids[s] != ids[s] || (c->r.slot_row[s] >= 0) != kept[s]) return 0;
    return 1;
}

static void fd_check(const char *name, float *param, const float *grad, size_t n, moe_cache *c,
                     const variant *v) {
    TEST_CASE(name);
    static int32_t ids0[N * E], kept0[N * E];
    layer_loss(c, v);
    for (int s = 0; s < N * c->S; s++) { ids0[s] = c->r.ids[s]; kept0[s] = c->r.slot_row[s] >= 0; }
    double worst = 0;
    int checked = 0;
    for (size_t i = 0; i < n; i += (n > 64 ? n / 48 : 1)) {
        const float eps = 1e-2f;
        float keep = param[i];
        param[i] = keep + eps;
        double lp = layer_loss(c, v);
        int ok1 = same_routing(c, ids0, kept0);
        param[i] = keep - eps;
        double lm = layer_loss(c, v);
        int ok2 = same_routing(c, ids0, kept0);
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

static void run_fd(const variant *v) {
    moe_cache c;
    init_cache(&c, v);
    float out[N * D], dx[N * D] = {0}, drouter[E * D] = {0};
    float *dgate = calloc(E * F * D, 4), *dup = calloc(E * F * D, 4), *ddown = calloc(E * D * F, 4);
    float dshg[FS * D] = {0}, dshu[FS * D] = {0}, dshd[D * FS] = {0}, dshi[D] = {0};
    moe_grads g = {.router = drouter, .gate = dgate, .up = dup, .down = ddown,
                   .sh_gate = dshg, .sh_up = dshu, .sh_down = dshd, .sh_inp = dshi};
    moe_weights w = weights_of(v);
    moe_forward(out, &c, x, &w, N, &v->o);
    moe_backward(dx, &g, R, &c, x, &w, &v->o, v->ls);
    char name[160];
#define FD(what, p, gp, n) snprintf(name, sizeof name, "%s: d " what, v->label), fd_check(name, p, gp, n, &c, v)
    FD("router", router, drouter, E * D);
    FD("input", x, dx, N * D);
    FD("gate_exps", gate, dgate, E * F * D);
    FD("up_exps", up, dup, E * F * D);
    FD("down_exps", down, ddown, E * D * F);
    if (v->Fs) {
        FD("shared gate", shg, dshg, FS * D);
        FD("shared up", shu, dshu, FS * D);
        FD("shared down", shd, dshd, D * FS);
        if (v->use_gate) FD("shared-expert gate vector", shi, dshi, D);
    }
#undef FD
    free(dgate); free(dup); free(ddown);
    moe_cache_free(&c);
}

/* a cache and options for the small hand cases (router = identity on d = E) */
static moe_route_opts hand_opts(int mode, int renorm) {
    moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = mode, .renorm = renorm, .scale = 1.0f};
    return o;
}

static void hand_route(moe_cache *c, const float *hx, int n, int e, int k, const moe_route_opts *o,
                       const float *b) {
    float ident[64 * 64];
    for (int i = 0; i < e * e; i++) ident[i] = (i / e == i % e);
    if (moe_cache_init(c, n, e, e, k, 2, 0, o->mode, moe_rows_needed(n, e, k, o->mode, o->capacity)) != MOE_OK)
        TEST_FATAL("moe_cache_init: %s", moe_last_error());
    moe_weights w = {.router = ident, .bias = b};
    moe_route(&c->r, hx, &w, n, e, o);
}

static void test_hand_cases(void) {
    {
        /* published models (ggml_order): the renormalised weights are v / (float)sum, as
         * llama.cpp divides, with the sum clamped below at 2^-14; ours are (float)(v / (double)sum) */
        TEST_CASE("renormalised top-k weights in llama.cpp's division");
        enum { NT = 64, NE = 8, K = 3 };
        float hx[NT * NE], ident[NE * NE];
        for (int i = 0; i < NE * NE; i++) ident[i] = (i / NE == i % NE);
        uint64_t rs = 7;
        for (int i = 0; i < NT * NE; i++) { rs = rs * 6364136223846793005ull + 1442695040888963407ull; hx[i] = (float)((rs >> 40) % 1000) / 250.0f - 2; }
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_TOKEN, 1);
        int bad = 0, differ = 0;
        if (moe_cache_init(&c, NT, NE, NE, K, 2, 0, o.mode, moe_rows_needed(NT, NE, K, o.mode, o.capacity)) != MOE_OK)
            TEST_FATAL("moe_cache_init: %s", moe_last_error());
        for (int g = 0; g < 2; g++) {
            moe_weights w = {.router = ident, .ggml_order = g};
            moe_route(&c.r, hx, &w, NT, NE, &o);
            for (int t = 0; t < NT; t++) {
                const float *v = c.r.topv + (size_t)t * K;
                double s = 0;
                for (int j = 0; j < K; j++) s += v[j];
                for (int j = 0; j < K; j++) {
                    const float want = g ? v[j] / (float)s : (float)(v[j] / s);
                    bad += c.r.w[t * K + j] != want;
                    differ += g && v[j] / (float)s != (float)(v[j] / s);
                }
            }
        }
        CHECK(bad == 0, "%d weights differ from their formula", bad);
        CHECK(differ > 0, "the two divisions never differed on %d weights: the case tests nothing", NT * K);
        /* the clamp: tiny scores (sigmoid of very negative logits) divide by 2^-14 */
        moe_route_opts os = o;
        os.score = MOE_ROUTER_SIGMOID;
        for (int i = 0; i < NT * NE; i++) hx[i] = -20.0f - (float)(i % 5);
        moe_weights w = {.router = ident, .ggml_order = 1};
        moe_route(&c.r, hx, &w, NT, NE, &os);
        CHECK(c.r.w[0] == c.r.topv[0] / 6.103515625e-5f && c.r.w[0] < 0.5f, "clamped division: %g from %g", c.r.w[0], c.r.topv[0]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("qwen2moe shared-expert gate in llama.cpp's arithmetic: silu(a)/a");
        int bad = 0, differ = 0;
        for (int i = -400; i <= 400; i++) {
            const float a = (float)i * 0.0371f, g = shared_gate_ggml(a);
            const double sig = 1.0 / (1.0 + exp(-(double)a));
            if (i == 0) { bad += g != 0.5f; continue; }
            bad += g != (a / (1.0f + expf(-a))) / a || fabs(g - sig) > 4e-7;
            differ += g != 1.0f / (1.0f + expf(-a));
        }
        CHECK(bad == 0, "%d gates off their formula or sigmoid", bad);
        CHECK(differ > 0, "silu(a)/a never differed from 1/(1+exp(-a)) in float: the case tests nothing");
        TEST_END();
    }
    {
        TEST_CASE("routing and dispatch, hand case");
        float hx[3 * 3] = {2, 0, 0,   0, 0, 1,   0, 3, 1};
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_TOKEN, 1);
        hand_route(&c, hx, 3, 3, 2, &o, NULL);
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
        moe_cache_free(&c);
        moe_route_opts o2 = hand_opts(MOE_ROUTING_TOKEN, 0);
        o2.scale = 2.5f;
        hand_route(&c, hx, 3, 3, 2, &o2, NULL);
        CHECK(fabs(c.r.w[0] - 2.5 * p0) < 1e-6, "raw scaled weight %g vs %g", c.r.w[0], 2.5 * p0);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        /* Capacity C = ceil(cf * k * N / E). 6 tokens, 3 experts, top-1, cf 1:
         * C = ceil(1 * 1 * 6 / 3) = 2. Expert 0 is wanted by t0, t1, t2, t4
         * (scores rising t0 < t1 < t4 < t2), expert 1 by t3, expert 2 by t5. */
        TEST_CASE("capacity: worked example, drop by position and by score");
        float hx[6 * 3] = {1, 0, 0,  1.5, 0, 0,  3, 0, 0,  0, 2, 0,  2.5, 0, 0,  0, 0, 1};
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_TOKEN, 0);
        o.capacity = 1.0f;
        o.overflow = MOE_OVERFLOW_POSITION;
        hand_route(&c, hx, 6, 3, 1, &o, NULL);
        CHECK(c.r.capacity == 2, "capacity %d, expected 2", c.r.capacity);
        int kept[6];
        for (int t = 0; t < 6; t++) kept[t] = c.r.slot_row[t] >= 0;
        CHECK(kept[0] && kept[1] && !kept[2] && kept[3] && !kept[4] && kept[5],
              "by position kept %d%d%d%d%d%d, expected 110101", kept[0], kept[1], kept[2], kept[3], kept[4], kept[5]);
        CHECK(c.r.dropped == 2 && c.r.assigned == 6, "dropped %lld of %lld", (long long)c.r.dropped, (long long)c.r.assigned);
        CHECK(c.r.counts[0] == 2 && c.r.sel_counts[0] == 4, "expert 0: %d rows, %d chosen", c.r.counts[0], c.r.sel_counts[0]);
        moe_cache_free(&c);
        o.overflow = MOE_OVERFLOW_SCORE;
        hand_route(&c, hx, 6, 3, 1, &o, NULL);
        for (int t = 0; t < 6; t++) kept[t] = c.r.slot_row[t] >= 0;
        CHECK(!kept[0] && !kept[1] && kept[2] && kept[3] && kept[4] && kept[5],
              "by score kept %d%d%d%d%d%d, expected 001111", kept[0], kept[1], kept[2], kept[3], kept[4], kept[5]);
        moe_cache_free(&c);
        o.capacity = 1.5f; /* C = ceil(1.5 * 6 / 3) = 3: one drop */
        o.overflow = MOE_OVERFLOW_POSITION;
        hand_route(&c, hx, 6, 3, 1, &o, NULL);
        CHECK(c.r.capacity == 3 && c.r.dropped == 1 && c.r.slot_row[4] < 0, "cf 1.5: capacity %d, dropped %lld", c.r.capacity, (long long)c.r.dropped);
        moe_cache_free(&c);
        o.overflow = MOE_OVERFLOW_SCORE;
        hand_route(&c, hx, 6, 3, 1, &o, NULL);
        CHECK(c.r.dropped == 1 && c.r.slot_row[0] < 0, "cf 1.5 by score: dropped %lld, t0 row %d", (long long)c.r.dropped, c.r.slot_row[0]);
        moe_cache_free(&c);
        o.capacity = 0.0f; /* dropless */
        hand_route(&c, hx, 6, 3, 1, &o, NULL);
        CHECK(c.r.dropped == 0 && c.r.counts[0] == 4, "dropless dropped %lld", (long long)c.r.dropped);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("capacity: a dropped token's layer output is zero (residual only)");
        variant v = {"cap", hand_opts(MOE_ROUTING_TOKEN, 1), 0, 0, 0, {0, 0, 0}};
        v.o.capacity = 0.5f; /* C = ceil(0.5*2*12/8) = 2 */
        moe_cache c;
        init_cache(&c, &v);
        float out[N * D];
        moe_weights w = weights_of(&v);
        moe_forward(out, &c, x, &w, N, &v.o);
        int zero_ok = 1, dropped_tokens = 0;
        for (int t = 0; t < N; t++) {
            int any = 0;
            for (int j = 0; j < K; j++) any |= c.r.slot_row[t * K + j] >= 0;
            if (!any) {
                dropped_tokens++;
                for (int i = 0; i < D; i++) zero_ok &= out[t * D + i] == 0.0f;
            }
        }
        CHECK(c.r.capacity == 2 && c.r.dropped > 0, "capacity %d dropped %lld", c.r.capacity, (long long)c.r.dropped);
        CHECK(dropped_tokens > 0, "no token lost all its experts: the zero-output check tested nothing");
        CHECK(zero_ok, "a fully dropped token has a nonzero output");
        CHECK(c.r.rows == N * K - c.r.dropped, "rows %d", c.r.rows);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        /* 4 tokens, 2 experts, k 1, cf 1.5: each expert takes c = ceil(1.5*1*4/2) = 3
         * tokens. softmax(2,0): p0 = .881; (0,1): .269; (1,0): .731; (0,3): .047 */
        TEST_CASE("expert choice: hand case");
        float hx[4 * 2] = {2, 0,  0, 1,  1, 0,  0, 3};
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_EXPERT, 0);
        o.capacity = 1.5f;
        hand_route(&c, hx, 4, 2, 1, &o, NULL);
        /* expert 0: t0, t2, t1; expert 1: t3, t1, t2 */
        const int want[8] = {0, -1,  0, 1,  0, 1,  -1, 1};
        int same = !memcmp(c.r.ids, want, sizeof want);
        CHECK(c.r.S == 2 && same, "slots %d %d | %d %d | %d %d | %d %d", c.r.ids[0], c.r.ids[1], c.r.ids[2],
              c.r.ids[3], c.r.ids[4], c.r.ids[5], c.r.ids[6], c.r.ids[7]);
        CHECK(c.r.counts[0] == 3 && c.r.counts[1] == 3, "counts %d %d", c.r.counts[0], c.r.counts[1]);
        double p10 = exp(0.0) / (exp(0.0) + exp(1.0));
        CHECK(fabs(c.r.w[2] - p10) < 1e-6 && c.r.w[1] == 0.0f, "weights %g (want %g), %g", c.r.w[2], p10, c.r.w[1]);
        /* rows: expert 0 gets tokens 0, 1, 2 in token order */
        CHECK(c.r.row_slot[0] == 0 && c.r.row_slot[1] == 2 && c.r.row_slot[2] == 4, "rows %d %d %d", c.r.row_slot[0], c.r.row_slot[1], c.r.row_slot[2]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        /* two sequences of 2 tokens, 3 experts, top-1. Sequence 0: t0 prefers
         * expert 0 strongly (2,0,0), t1 expert 2 mildly (0,0,1.5): the mean picks
         * expert 0 for both. Sequence 1 prefers expert 1. */
        TEST_CASE("sequence-level routing: hand case");
        float hx[4 * 3] = {2, 0, 0,  0, 0, 1.5f,  0, 1, 0,  0.5f, 1, 0};
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_SEQUENCE, 0);
        o.seq_len = 2;
        hand_route(&c, hx, 4, 3, 1, &o, NULL);
        CHECK(c.r.ids[0] == 0 && c.r.ids[1] == 0 && c.r.ids[2] == 1 && c.r.ids[3] == 1,
              "chose %d %d %d %d, expected 0 0 1 1", c.r.ids[0], c.r.ids[1], c.r.ids[2], c.r.ids[3]);
        double s1 = exp(1.5) + 2, p = 1.0 / s1; /* token 1's own probability of expert 0 */
        CHECK(fabs(c.r.w[1] - p) < 1e-6, "token 1 weight %g, expected its own score %g", c.r.w[1], p);
        /* decoding: the prefix mean replaces the sequence mean */
        double prefix[3] = {0};
        moe_route_opts od = o;
        od.seq_prefix = prefix;
        od.seq_len = 1;
        moe_cache d1;
        float ident[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
        if (moe_cache_init(&d1, 1, 3, 3, 1, 2, 0, MOE_ROUTING_TOKEN, 1) != MOE_OK)
            TEST_FATAL("moe_cache_init: %s", moe_last_error());
        moe_weights w = {.router = ident};
        od.mode = MOE_ROUTING_SEQUENCE;
        moe_route(&d1.r, hx + 3, &w, 1, 3, &od); /* alone, token 1 picks expert 2 */
        CHECK(d1.r.ids[0] == 2, "first token alone chose %d", d1.r.ids[0]);
        prefix[0] = prefix[1] = prefix[2] = 0;
        moe_route(&d1.r, hx, &w, 1, 3, &od);
        od.seq_prefix_n = 1;
        moe_route(&d1.r, hx + 3, &w, 1, 3, &od); /* after token 0: expert 0 */
        CHECK(d1.r.ids[0] == 0, "with the prefix chose %d", d1.r.ids[0]);
        moe_cache_free(&d1);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("sigmoid: the bias changes the selection, not the weights");
        float hx[1 * 4] = {2, 1, 0, -1};
        float b[4] = {0, 0, 0, 2};
        moe_cache c;
        moe_route_opts o = hand_opts(MOE_ROUTING_TOKEN, 1);
        o.score = MOE_ROUTER_SIGMOID;
        o.scale = 2.5f;
        hand_route(&c, hx, 1, 4, 2, &o, b);
        double s0 = 1 / (1 + exp(-2.0)), s3 = 1 / (1 + exp(1.0));
        CHECK(c.r.ids[0] == 3 && c.r.ids[1] == 0, "chose %d %d, expected 3 0", c.r.ids[0], c.r.ids[1]);
        CHECK(fabs(c.r.w[0] - 2.5 * s3 / (s0 + s3)) < 1e-6 && fabs(c.r.w[1] - 2.5 * s0 / (s0 + s3)) < 1e-6,
              "weights %g %g", c.r.w[0], c.r.w[1]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("aux-loss-free bias update rule");
        float b[4] = {0.5f, 0, -0.25f, 0};
        int64_t cnt[4] = {10, 30, 20, 20}; /* mean 20 */
        moe_bias_update(b, cnt, 4, 0.001f);
        CHECK(b[0] == 0.5f + 0.001f && b[1] == -0.001f && b[2] == -0.25f && b[3] == 0.0f,
              "bias %g %g %g %g", b[0], b[1], b[2], b[3]);
        int64_t odd[3] = {1, 1, 2}; /* mean 4/3: exact comparison, no rounding */
        float b3[3] = {0, 0, 0};
        moe_bias_update(b3, odd, 3, 0.5f);
        CHECK(b3[0] == 0.5f && b3[1] == 0.5f && b3[2] == -0.5f, "bias %g %g %g", b3[0], b3[1], b3[2]);
        TEST_END();
    }
}

/* group-limited top-k against brute force over every choice of groups */
static void test_group_brute_force(void) {
    TEST_CASE("group-limited selection equals brute force");
    enum { NT = 200, EG = 16, G = 4, TG = 2, KG = 4, GS = EG / G };
    static float hx[NT * EG], ident[EG * EG], b[EG];
    unsigned seed = 99;
    fill(hx, NT * EG, 3.0f, &seed);
    fill(b, EG, 0.3f, &seed);
    for (int i = 0; i < EG * EG; i++) ident[i] = (i / EG == i % EG);
    int bad = 0;
    for (int score = 0; score < 2; score++) {
        moe_cache c;
        if (moe_cache_init(&c, NT, EG, EG, KG, 2, 0, MOE_ROUTING_TOKEN, NT * KG) != MOE_OK)
            TEST_FATAL("moe_cache_init: %s", moe_last_error());
        moe_route_opts o = {.score = score, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1,
                            .n_group = G, .topk_group = TG};
        moe_weights w = {.router = ident, .bias = b};
        moe_route(&c.r, hx, &w, NT, EG, &o);
        for (int t = 0; t < NT; t++) {
            double s[EG];
            for (int e = 0; e < EG; e++) s[e] = c.r.probs[t * EG + e] + b[e];
            /* every pair of groups: keep the pair with the largest summed group score */
            double best = -1e30;
            int bg0 = -1, bg1 = -1;
            for (int g0 = 0; g0 < G; g0++)
                for (int g1 = g0 + 1; g1 < G; g1++) {
                    double tot = 0;
                    int gg[2] = {g0, g1};
                    for (int q = 0; q < 2; q++) {
                        double v[GS];
                        for (int i = 0; i < GS; i++) v[i] = s[gg[q] * GS + i];
                        for (int i = 0; i < GS; i++) /* sort descending */
                            for (int j = i + 1; j < GS; j++)
                                if (v[j] > v[i]) { double tmp = v[i]; v[i] = v[j]; v[j] = tmp; }
                        tot += v[0] + v[1];
                    }
                    if (tot > best) { best = tot; bg0 = g0; bg1 = g1; }
                }
            /* the k best experts of those groups, by exhaustive ranking */
            int chosen[EG] = {0};
            for (int j = 0; j < KG; j++) {
                int be = -1;
                for (int e = 0; e < EG; e++) {
                    int g = e / GS;
                    if ((g != bg0 && g != bg1) || chosen[e]) continue;
                    if (be < 0 || s[e] > s[be]) be = e;
                }
                chosen[be] = 1;
            }
            for (int j = 0; j < KG; j++) bad += !chosen[c.r.ids[t * KG + j]];
        }
        moe_cache_free(&c);
    }
    CHECK(bad == 0, "%d chosen experts differ from brute force", bad);
    TEST_END();
}

/* Experts run as (expert, row block) tasks when few experts hold many rows:
 * the blocks must not change a bit (one thread: one task per expert; many
 * threads: blocks of a few dozen rows). */
static void test_row_blocks(void) {
    TEST_CASE("expert row-block tasks give the same bits as whole experts");
    enum { NB = 600, DB = 16, EB = 4, FB = 24 };
    static float xb[NB * DB], rb[EB * DB], gb[EB * FB * DB], ub[EB * FB * DB], db[EB * DB * FB], o1[NB * DB], o2[NB * DB];
    unsigned seed = 11;
    fill(xb, NB * DB, 1.0f, &seed);
    fill(rb, EB * DB, 1.0f, &seed);
    fill(gb, EB * FB * DB, 0.5f, &seed);
    fill(ub, EB * FB * DB, 0.5f, &seed);
    fill(db, EB * DB * FB, 0.5f, &seed);
    moe_weights w = {.router = rb, .gate = gb, .up = ub, .down = db};
    moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1};
    moe_cache c1, c2; /* separate caches: no row of one run can stand in for the other's */
    if (moe_cache_init(&c1, NB, DB, EB, 2, FB, 0, MOE_ROUTING_TOKEN, (int64_t)NB * 2) != MOE_OK ||
        moe_cache_init(&c2, NB, DB, EB, 2, FB, 0, MOE_ROUTING_TOKEN, (int64_t)NB * 2) != MOE_OK)
        TEST_FATAL("moe_cache_init: %s", moe_last_error());
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    moe_forward(o1, &c1, xb, &w, NB, &o);
    omp_set_num_threads(16);
    moe_forward(o2, &c2, xb, &w, NB, &o);
    omp_set_num_threads(threads);
    CHECK(!memcmp(o1, o2, sizeof o1), "outputs differ between one task per expert and row blocks");
    moe_cache_free(&c1);
    moe_cache_free(&c2);
    TEST_END();
}

int main(void) {
    unsigned seed = 7;
    fill(x, N * D, 1.0f, &seed);
    fill(router, E * D, 1.0f, &seed);
    fill(gate, E * F * D, 0.5f, &seed);
    fill(up, E * F * D, 0.5f, &seed);
    fill(down, E * D * F, 0.5f, &seed);
    fill(R, N * D, 1.0f, &seed);
    fill(bias, E, 0.2f, &seed);
    fill(shg, FS * D, 0.5f, &seed);
    fill(shu, FS * D, 0.5f, &seed);
    fill(shd, D * FS, 0.5f, &seed);
    fill(shi, D, 0.5f, &seed);

    test_hand_cases();
    test_group_brute_force();
    test_row_blocks();
    {
        TEST_CASE("combine equals the dense sum of selected experts");
        variant v = {"combine", hand_opts(MOE_ROUTING_TOKEN, 1), 0, 0, 0, {0, 0, 0}};
        moe_cache c;
        init_cache(&c, &v);
        float out[N * D];
        moe_weights w = weights_of(&v);
        moe_forward(out, &c, x, &w, N, &v.o);
        double worst = 0;
        for (int t = 0; t < N; t++) {
            float ref[D] = {0};
            for (int j = 0; j < K; j++) {
                int e = c.r.ids[t * K + j];
                float hg[F], hu[F], a[F], y[D];
                matmul_forward_ref(hg, x + t * D, gate + (size_t)e * F * D, NULL, 1, D, F, MATMUL_FP32);
                matmul_forward_ref(hu, x + t * D, up + (size_t)e * F * D, NULL, 1, D, F, MATMUL_FP32);
                swiglu_forward(a, hg, hu, 1, F);
                matmul_forward_ref(y, a, down + (size_t)e * D * F, NULL, 1, F, D, MATMUL_FP32);
                for (int i = 0; i < D; i++) ref[i] += c.r.w[t * K + j] * y[i];
            }
            for (int i = 0; i < D; i++) worst = fmax(worst, fabs(ref[i] - out[t * D + i]));
        }
        CHECK(worst < 1e-5, "max abs difference %g", worst);
        moe_cache_free(&c);
        TEST_END();
    }
    const moe_route_opts tok = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1};
    moe_route_opts o;
    variant v;
#define RUN(lbl, opts, b, fs, gt, a, z, sq) (v = (variant){lbl, opts, b, fs, gt, {a, z, sq}}, run_fd(&v))
    RUN("renormalised top-k", tok, 0, 0, 0, 0, 0, 0);
    o = tok; o.renorm = 0; o.scale = 1.7f;
    RUN("raw top-k weights, routed scale", o, 0, 0, 0, 0, 0, 0);
    RUN("with Switch balance loss", tok, 0, 0, 0, 3.0f, 0, 0);
    o = tok; o.renorm = 0;
    RUN("with router z-loss", o, 0, 0, 0, 0, 2.0f, 0);
    o = tok; o.seq_len = SEQ;
    RUN("with sequence-wise balance loss", o, 0, 0, 0, 0, 0, 5.0f);
    o = tok; o.score = MOE_ROUTER_SIGMOID; o.scale = 2.5f; o.seq_len = SEQ;
    RUN("sigmoid + bias + scale, all losses", o, 1, 0, 0, 2.0f, 1.0f, 5.0f);
    o.n_group = 4; o.topk_group = 2;
    RUN("sigmoid, group-limited", o, 1, 0, 0, 0, 0, 1.0f);
    o = tok; o.jitter = 0.2f; o.jitter_seed = 1234;
    RUN("router jitter", o, 0, 0, 0, 1.0f, 0, 0);
    RUN("shared experts with a sigmoid gate", tok, 0, FS, 1, 0, 0, 0);
    RUN("shared experts without a gate", tok, 0, FS, 0, 0, 0, 0);
    o = tok; o.capacity = 0.6f;
    RUN("capacity with drops, by position", o, 0, 0, 0, 1.0f, 0, 0);
    o.overflow = MOE_OVERFLOW_SCORE;
    RUN("capacity with drops, by score", o, 0, 0, 0, 0, 0, 0);
    o = tok; o.mode = MOE_ROUTING_EXPERT; o.renorm = 0; o.capacity = 1.25f;
    RUN("expert choice", o, 0, 0, 0, 1.0f, 1.0f, 0);
    o = tok; o.mode = MOE_ROUTING_SEQUENCE; o.seq_len = SEQ;
    RUN("sequence-level routing", o, 1, 0, 0, 1.0f, 0, 2.0f);
#undef RUN
    TEST_MAIN_END();
}
