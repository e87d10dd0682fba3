/* Run-time routing: the number of active experts and the threshold rule.
 * moe_route against hand-computed selections and weights (softmax and
 * sigmoid, renormalised or raw, selection bias, group limits, the minimum
 * count); whole models: the override at the model's own top-k gives the same
 * bits as no override, fewer experts give other logits, the threshold at 1
 * is top-1; bad settings are refused with a message; training refuses. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "moe/moe_layer.h"
#include "model/model.h"

/* routing of n tokens whose router logits are hx (router = identity on d = e) */
static void route(moe_cache *c, const float *hx, int n, int e, int k, const moe_route_opts *o, const float *b) {
    float ident[16 * 16];
    for (int i = 0; i < e * e; i++) ident[i] = (i / e == i % e);
    if (moe_cache_init(c, n, e, e, k, 2, 0, o->mode, moe_rows_needed(n, e, k, o->mode, 0)) != MOE_OK)
        TEST_FATAL("moe_cache_init: %s", moe_last_error());
    moe_weights w = {.router = ident, .bias = b};
    moe_route(&c->r, hx, &w, n, e, o);
}

/* slot j of token t holds expert id with weight w (within 1e-6) */
static int slot_is(const moe_cache *c, int t, int j, int id, double w) {
    const size_t s = (size_t)t * c->S + j;
    return c->r.ids[s] == id && (id < 0 ? c->r.slot_row[s] < 0 : fabs(c->r.w[s] - w) < 1e-6);
}

static void test_hand_routing(void) {
    const double e1 = exp(1.0), e2 = exp(2.0), e3 = exp(3.0);
    {
        TEST_CASE("k override: top-3 of softmax, renormalised over the 3");
        /* logits (2, 1, 0, -1): softmax ratios e^2 : e : 1 : 1/e */
        float hx[4] = {2, 1, 0, -1};
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1};
        moe_cache c;
        route(&c, hx, 1, 4, 3, &o, NULL);
        const double s = e2 + e1 + 1;
        CHECK(slot_is(&c, 0, 0, 0, e2 / s) && slot_is(&c, 0, 1, 1, e1 / s) && slot_is(&c, 0, 2, 2, 1 / s),
              "got %d:%g %d:%g %d:%g", c.r.ids[0], c.r.w[0], c.r.ids[1], c.r.w[1], c.r.ids[2], c.r.w[2]);
        CHECK(c.r.rows == 3, "rows %d", c.r.rows);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("threshold keeps the experts within F of the best, renormalised over them");
        /* of all 4: weights relative to the best e^0, e^-1 = .37, e^-2 = .14, e^-3 = .05; F = 0.3 keeps 2 */
        float hx[4] = {2, 1, 0, -1};
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1,
                            .threshold = 0.3f, .min_keep = 1};
        moe_cache c;
        route(&c, hx, 1, 4, 4, &o, NULL);
        CHECK(slot_is(&c, 0, 0, 0, e2 / (e2 + e1)) && slot_is(&c, 0, 1, 1, e1 / (e2 + e1)) &&
              slot_is(&c, 0, 2, -1, 0) && slot_is(&c, 0, 3, -1, 0),
              "got %d:%g %d:%g %d %d", c.r.ids[0], c.r.w[0], c.r.ids[1], c.r.w[1], c.r.ids[2], c.r.ids[3]);
        CHECK(c.r.rows == 2 && c.r.counts[0] == 1 && c.r.counts[1] == 1 && c.r.counts[2] == 0, "rows %d", c.r.rows);
        moe_cache_free(&c);
        /* without renormalisation the kept weights stay the raw probabilities */
        o.renorm = 0;
        route(&c, hx, 1, 4, 4, &o, NULL);
        const double s = e2 + e1 + 1 + exp(-1.0);
        CHECK(slot_is(&c, 0, 0, 0, e2 / s) && slot_is(&c, 0, 1, 1, e1 / s) && slot_is(&c, 0, 2, -1, 0),
              "raw: %d:%g %d:%g %d", c.r.ids[0], c.r.w[0], c.r.ids[1], c.r.w[1], c.r.ids[2]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("threshold: the minimum count keeps the best of the rest");
        /* F = 0.9 passes only expert 0; min 3 adds the next two by weight */
        float hx[8] = {2, 1, 0, -1,   0, 3, 1, 3}; /* token 1: a tie at the top (experts 1 and 3) */
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1,
                            .threshold = 0.9f, .min_keep = 3};
        moe_cache c;
        route(&c, hx, 2, 4, 4, &o, NULL);
        const double s = e2 + e1 + 1;
        CHECK(slot_is(&c, 0, 0, 0, e2 / s) && slot_is(&c, 0, 1, 1, e1 / s) && slot_is(&c, 0, 2, 2, 1 / s) &&
              slot_is(&c, 0, 3, -1, 0), "token 0: %d %d %d %d", c.r.ids[0], c.r.ids[1], c.r.ids[2], c.r.ids[3]);
        /* token 1: both tied experts pass, then expert 2 (logit 1), not expert 0 */
        const double s1 = 2 * e3 + e1;
        CHECK(slot_is(&c, 1, 0, 1, e3 / s1) && slot_is(&c, 1, 1, 3, e3 / s1) && slot_is(&c, 1, 2, 2, e1 / s1) &&
              slot_is(&c, 1, 3, -1, 0), "token 1: %d %d %d %d", c.r.ids[4], c.r.ids[5], c.r.ids[6], c.r.ids[7]);
        moe_cache_free(&c);
        /* min 1 and F = 0.9: token 1 keeps both tied experts (each is >= 0.9 of the best) */
        o.min_keep = 1;
        route(&c, hx, 2, 4, 4, &o, NULL);
        CHECK(slot_is(&c, 0, 0, 0, 1.0) && slot_is(&c, 0, 1, -1, 0), "token 0 keeps %d %d", c.r.ids[0], c.r.ids[1]);
        CHECK(slot_is(&c, 1, 0, 1, 0.5) && slot_is(&c, 1, 1, 3, 0.5) && slot_is(&c, 1, 2, -1, 0), "token 1 keeps %d %d %d",
              c.r.ids[4], c.r.ids[5], c.r.ids[6]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("sigmoid with a selection bias: the threshold compares sigmoid scores, not score + bias");
        /* scores sigmoid(0, 1, -1, 2) = .5, .731, .269, .881; bias +1 on expert 0 selects {0, 3};
         * F = 0.6 of the best weight .881 is .529: expert 0's .5 falls out */
        float hx[4] = {0, 1, -1, 2}, b[4] = {1, 0, 0, 0};
        const double s0 = 1 / (1 + exp(0.0)), s3 = 1 / (1 + exp(-2.0));
        moe_route_opts o = {.score = MOE_ROUTER_SIGMOID, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 2.5f};
        moe_cache c;
        route(&c, hx, 1, 4, 2, &o, b);
        CHECK(slot_is(&c, 0, 0, 0, 2.5 * s0 / (s0 + s3)) && slot_is(&c, 0, 1, 3, 2.5 * s3 / (s0 + s3)),
              "no threshold: %d:%g %d:%g", c.r.ids[0], c.r.w[0], c.r.ids[1], c.r.w[1]);
        moe_cache_free(&c);
        o.threshold = 0.6f;
        o.min_keep = 1;
        route(&c, hx, 1, 4, 2, &o, b);
        CHECK(slot_is(&c, 0, 0, -1, 0) && slot_is(&c, 0, 1, 3, 2.5), "renormalised: %d %d:%g", c.r.ids[0], c.r.ids[1], c.r.w[1]);
        moe_cache_free(&c);
        o.renorm = 0;
        route(&c, hx, 1, 4, 2, &o, b);
        CHECK(slot_is(&c, 0, 0, -1, 0) && slot_is(&c, 0, 1, 3, 2.5 * s3), "raw: %d %d:%g", c.r.ids[0], c.r.ids[1], c.r.w[1]);
        moe_cache_free(&c);
        TEST_END();
    }
    {
        TEST_CASE("group-limited: k and threshold act on the eligible groups only");
        /* 4 groups of 2, 2 eligible; group scores (sums of the two best probabilities) rank
         * e^3 + e^2 > 2 e^2.2 > e^2.5 + e^-5 > 2: groups 0 and 3, so expert 4 (logit 2.5) is not
         * eligible; top-3 is 0, 6, 7 */
        float hx[8] = {3, 2, 0, 0, 2.5f, -5, 2.2f, 2.2f};
        const double a = exp(2.2);
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1,
                            .n_group = 4, .topk_group = 2};
        moe_cache c;
        route(&c, hx, 1, 8, 3, &o, NULL);
        const double s = e3 + 2 * a;
        CHECK(slot_is(&c, 0, 0, 0, e3 / s) && slot_is(&c, 0, 1, 6, a / s) && slot_is(&c, 0, 2, 7, a / s),
              "top-3: %d %d %d", c.r.ids[0], c.r.ids[1], c.r.ids[2]);
        moe_cache_free(&c);
        o.threshold = 0.45f; /* e^-0.8 = .449 falls out; min 2 keeps expert 6 (the tie goes to the earlier slot) */
        o.min_keep = 2;
        route(&c, hx, 1, 8, 3, &o, NULL);
        CHECK(slot_is(&c, 0, 0, 0, e3 / (e3 + a)) && slot_is(&c, 0, 1, 6, a / (e3 + a)) && slot_is(&c, 0, 2, -1, 0),
              "threshold: %d %d %d", c.r.ids[0], c.r.ids[1], c.r.ids[2]);
        moe_cache_free(&c);
        TEST_END();
    }
}

/* ---- whole models ---- */
enum { T = 24 };

/* logits[T][V] of the batch forward (evaluation) and of inference over the KV cache */
static int run_model(moe_model *m, const int32_t *tok, float *batch, float *inf) {
    model_losses L;
    const size_t V = m->cfg.vocab_size;
    if (model_forward(m, tok, NULL, 1, T, &L) != MOE_OK) return -1;
    memcpy(batch, m->acts.logits, sizeof(float) * T * V);
    model_infer_free(m); /* a fresh KV cache */
    return model_infer(m, tok, T, 0, inf, 1) == MOE_OK ? 0 : -1;
}

static float max_diff(const float *a, const float *b, size_t n) {
    float d = 0;
    for (size_t i = 0; i < n; i++) d = fmaxf(d, fabsf(a[i] - b[i]));
    return d;
}

static void test_model(const char *label, const char *preset, int small_k) {
    moe_config cfg;
    moe_config_preset(&cfg, preset);
    cfg.n_layers = 2;
    cfg.vocab_size = 512;
    cfg.max_seq = 64;
    char name[160];
    moe_model *m = NULL;
    if (moe_model_create(&m, &cfg, 7) != MOE_OK) TEST_FATAL("%s: %s", preset, moe_last_error());
    const size_t V = cfg.vocab_size, n = (size_t)T * V;
    int32_t tok[T];
    for (int i = 0; i < T; i++) tok[i] = (i * 37 + 11) % (int)V;
    float *ref_b = malloc(sizeof(float) * n), *ref_i = malloc(sizeof(float) * n);
    float *b = malloc(sizeof(float) * n), *in = malloc(sizeof(float) * n);
    float *b1 = malloc(sizeof(float) * n), *in1 = malloc(sizeof(float) * n);
    if (!ref_b || !ref_i || !b || !in || !b1 || !in1) TEST_FATAL("out of memory");

    snprintf(name, sizeof name, "%s: --active-experts = top-k (%d) gives the bits of the default", label, cfg.top_k);
    TEST_CASE(name);
    CHECK(run_model(m, tok, ref_b, ref_i) == 0, "default run: %s", moe_last_error());
    CHECK(moe_model_set_routing(m, cfg.top_k, 0, 0) == MOE_OK, "%s", moe_last_error());
    CHECK(run_model(m, tok, b, in) == 0, "override run: %s", moe_last_error());
    CHECK(memcmp(b, ref_b, sizeof(float) * n) == 0, "batch logits differ by %g", max_diff(b, ref_b, n));
    CHECK(memcmp(in, ref_i, sizeof(float) * n) == 0, "inference logits differ by %g", max_diff(in, ref_i, n));
    moe_model_experts_per_token(m, 1);
    CHECK(run_model(m, tok, b, in) == 0 && fabs(moe_model_experts_per_token(m, 1) - cfg.top_k) < 1e-9,
          "experts per token is not %d", cfg.top_k);
    TEST_END();

    snprintf(name, sizeof name, "%s: %d active experts change the logits (batch and inference agree)", label, small_k);
    TEST_CASE(name);
    CHECK(moe_model_set_routing(m, small_k, 0, 0) == MOE_OK, "%s", moe_last_error());
    CHECK(run_model(m, tok, b1, in1) == 0, "run: %s", moe_last_error());
    CHECK(max_diff(b1, ref_b, n) > 1e-3f, "batch logits moved only %g", max_diff(b1, ref_b, n));
    CHECK(max_diff(b1, in1, n) < 1e-3f, "batch and inference differ by %g", max_diff(b1, in1, n));
    CHECK(fabs(moe_model_experts_per_token(m, 1) - small_k) < 1e-9, "experts per token is not %d", small_k);
    /* back to the model's own routing: the default bits again */
    CHECK(moe_model_set_routing(m, 0, 0, 0) == MOE_OK, "%s", moe_last_error());
    CHECK(run_model(m, tok, b, in) == 0 && memcmp(b, ref_b, sizeof(float) * n) == 0, "reset does not restore the default");
    TEST_END();

    snprintf(name, sizeof name, "%s: the threshold uses between 1 and k experts; at F = 1, the best only", label);
    TEST_CASE(name);
    CHECK(moe_model_set_routing(m, 0, 0.5f, 1) == MOE_OK, "%s", moe_last_error());
    CHECK(run_model(m, tok, b, in) == 0, "run: %s", moe_last_error());
    double ept = moe_model_experts_per_token(m, 1);
    CHECK(ept >= 1 && ept <= cfg.top_k, "experts per token %g", ept);
    CHECK(max_diff(b, in, n) < 1e-3f, "batch and inference differ by %g", max_diff(b, in, n));
    CHECK(moe_model_set_routing(m, 0, 1.0f, 1) == MOE_OK, "%s", moe_last_error());
    CHECK(run_model(m, tok, b, in) == 0, "run: %s", moe_last_error());
    ept = moe_model_experts_per_token(m, 1);
    CHECK(ept == 1.0, "F = 1: %g experts per token (random weights have no ties)", ept);
    if (!cfg.expert_bias) { /* without a bias the best weight is the first chosen: top-1 exactly */
        CHECK(moe_model_set_routing(m, 1, 0, 0) == MOE_OK, "%s", moe_last_error());
        CHECK(run_model(m, tok, b1, in1) == 0, "run: %s", moe_last_error());
        CHECK(memcmp(b, b1, sizeof(float) * n) == 0 && memcmp(in, in1, sizeof(float) * n) == 0,
              "F = 1 differs from one active expert by %g", max_diff(b, b1, n));
    }
    TEST_END();
    moe_model_free(m);
    free(ref_b); free(ref_i); free(b); free(in); free(b1); free(in1);
}

static void test_refusals(void) {
    TEST_CASE("bad settings are refused with a message; training refuses run-time routing");
    moe_config cfg;
    moe_config_preset(&cfg, "tiny"); /* 4 experts, top-2 */
    moe_model *m = NULL;
    if (moe_model_create(&m, &cfg, 1) != MOE_OK) TEST_FATAL("%s", moe_last_error());
    struct { int k; float f; int min; const char *msg; } bad[] = {
        {5, 0, 0, "must be in 1..4"}, {-1, 0, 0, "must be in 1..4"}, {0, 1.5f, 0, "must be in [0, 1]"},
        {0, -0.1f, 0, "must be in [0, 1]"}, {0, NAN, 0, "must be in [0, 1]"}, {0, 0.5f, 3, "must be in 1..2"},
        {1, 0.5f, 2, "must be in 1..1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_status st = moe_model_set_routing(m, bad[i].k, bad[i].f, bad[i].min);
        CHECK(st == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), bad[i].msg), "(%d, %g, %d): %d '%s'", bad[i].k,
              bad[i].f, bad[i].min, st, moe_last_error());
    }
    CHECK(m->route_k == 0 && m->route_threshold == 0, "a refused setting was kept");
    CHECK(moe_model_set_routing(m, 4, 0.2f, 2) == MOE_OK, "%s", moe_last_error());
    moe_train_params p;
    moe_train_params_default(&p);
    p.out_path = "/nonexistent/never-written.gguf";
    moe_status st = moe_train(m, NULL, &p, NULL, NULL, NULL);
    CHECK(st == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "inference only"), "train: %d '%s'", st, moe_last_error());
    moe_model_free(m);

    moe_config_preset(&cfg, "dense");
    cfg.n_layers = 1;
    if (moe_model_create(&m, &cfg, 1) != MOE_OK) TEST_FATAL("%s", moe_last_error());
    CHECK(moe_model_set_routing(m, 1, 0, 0) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "no experts"), "dense: '%s'",
          moe_last_error());
    CHECK(moe_model_set_routing(m, 0, 0, 0) == MOE_OK, "dense, defaults: '%s'", moe_last_error());
    moe_model_free(m);

    moe_config_preset(&cfg, "deepseek-v2"); /* 32 experts in 8 groups of 4, 3 eligible: at most 12 */
    cfg.n_layers = 2;
    if (moe_model_create(&m, &cfg, 1) != MOE_OK) TEST_FATAL("%s", moe_last_error());
    CHECK(moe_model_set_routing(m, 12, 0, 0) == MOE_OK, "12 of the eligible 12: '%s'", moe_last_error());
    CHECK(moe_model_set_routing(m, 13, 0, 0) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "groups"), "13: '%s'",
          moe_last_error());
    moe_model_free(m);

    moe_config_preset(&cfg, "tiny");
    cfg.routing = MOE_ROUTING_EXPERT;
    if (moe_model_create(&m, &cfg, 1) != MOE_OK) TEST_FATAL("%s", moe_last_error());
    CHECK(moe_model_set_routing(m, 0, 0.5f, 0) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), "expert-choice"),
          "expert choice: '%s'", moe_last_error());
    CHECK(moe_model_set_routing(m, 3, 0, 0) == MOE_OK, "expert choice, k: '%s'", moe_last_error());
    moe_model_free(m);
    TEST_END();
}

int main(void) {
    test_hand_routing();
    test_model("tiny (softmax, renormalised)", "tiny", 1);
    test_model("olmoe (softmax, raw weights)", "olmoe", 3);
    test_model("deepseek-v3 (MLA, sigmoid, bias, groups)", "deepseek-v3", 4);
    test_model("deepseek-v2 (MLA, groups, scale, shared)", "deepseek-v2", 2);
    test_refusals();
    TEST_MAIN_END();
}
