/* Routing telemetry, expert ablation and the routing-analytics metrics:
 *  - moe_model_route against the routing the batched training forward
 *    (a separate code path) computes for the same tokens, and on a
 *    random-weight published layout;
 *  - the tap leaves the logits unchanged; windows past the context restart;
 *  - a disabled expert leaves its slot empty with the weights computed by
 *    hand (renormalised or not), and bad specs are refused;
 *  - each metric of stats/route_stats.c against a hand-computed case. */
#include <stdint.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "harness.h"
#include "data/dataset.h"
#include "model/model.h"
#include "stats/jsonl.h"
#include "stats/route_stats.h"

static moe_config tiny(void) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 300; c.d_model = 32; c.n_layers = 3; c.n_heads = 4; c.n_kv_heads = 2;
    c.d_ff = 48; c.n_experts = 8; c.top_k = 2; c.d_expert = 16; c.max_seq = 32;
    c.moe_first_dense = 1; c.moe_every = 1;
    return c;
}

typedef struct { int n, cap, n_moe, k; int32_t tok[256]; int32_t ids[256 * 8]; float w[256 * 8]; int layers[4]; } trace_buf;
static int collect(const moe_token_route *r, void *u) {
    trace_buf *t = u;
    if (t->n >= t->cap || (size_t)t->n != r->pos) return 1;
    t->n_moe = r->n_moe; t->k = r->k;
    for (int i = 0; i < r->n_moe; i++) t->layers[i] = r->layers[i];
    t->tok[t->n] = r->token;
    memcpy(t->ids + (size_t)t->n * r->n_moe * r->k, r->experts, sizeof(int32_t) * r->n_moe * r->k);
    memcpy(t->w + (size_t)t->n * r->n_moe * r->k, r->weights, sizeof(float) * r->n_moe * r->k);
    t->n++;
    return 0;
}

static void test_trace_matches_forward(void) {
    TEST_CASE("route: experts and weights equal the batched forward's routing");
    moe_config c = tiny();
    moe_model *m;
    if (moe_model_create(&m, &c, 5)) TEST_FATAL("create: %s", moe_last_error());
    enum { N = 24 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 37 + 11) % c.vocab_size;
    static trace_buf t;
    t.cap = 256;
    CHECK(moe_model_route(m, tok, N, collect, &t) == MOE_OK, "%s", moe_last_error());
    CHECK(t.n == N && t.n_moe == 2 && t.k == 2, "n %d n_moe %d k %d", t.n, t.n_moe, t.k);
    CHECK(t.layers[0] == 1 && t.layers[1] == 2, "layers %d %d", t.layers[0], t.layers[1]);
    model_losses L;
    CHECK(model_forward(m, tok, NULL, 1, N, &L) == MOE_OK, "%s", moe_last_error());
    int id_bad = 0;
    float wmax = 0;
    for (int km = 0; km < 2; km++) {
        const moe_routing *r = &m->acts.layers[t.layers[km]].moe.r;
        for (int i = 0; i < N; i++)
            for (int j = 0; j < 2; j++) {
                size_t at = ((size_t)i * 2 + km) * 2 + j;
                id_bad += t.ids[at] != r->ids[(size_t)i * r->S + j];
                wmax = fmaxf(wmax, fabsf(t.w[at] - r->w[(size_t)i * r->S + j]));
            }
    }
    CHECK(id_bad == 0, "%d experts differ", id_bad);
    CHECK(wmax < 1e-4f, "weights differ by %g", wmax);
    for (int i = 0; i < N; i++) CHECK(t.tok[i] == tok[i], "token %d", i);
    /* the callback can stop the run */
    t.n = 0; t.cap = 5;
    CHECK(moe_model_route(m, tok, N, collect, &t) == MOE_OK && t.n == 5, "stopped after %d", t.n);
    moe_model_free(m);
    TEST_END();
}

static void test_tap_keeps_logits(void) {
    TEST_CASE("route: the tap changes no logit; past the context the windows restart");
    moe_config c = tiny();
    moe_model *m;
    if (moe_model_create(&m, &c, 6)) TEST_FATAL("create: %s", moe_last_error());
    enum { N = 16 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 13 + 3) % c.vocab_size;
    float *a = malloc(sizeof(float) * N * c.vocab_size), *b = malloc(sizeof(float) * N * c.vocab_size);
    int32_t ids[N * 2 * 2];
    float w[N * 2 * 2];
    CHECK(model_infer(m, tok, N, 0, a, 1) == MOE_OK, "%s", moe_last_error());
    m->tap_ids = ids; m->tap_w = w;
    CHECK(model_infer(m, tok, N, 0, b, 1) == MOE_OK, "%s", moe_last_error());
    m->tap_ids = NULL; m->tap_w = NULL;
    CHECK(memcmp(a, b, sizeof(float) * N * c.vocab_size) == 0, "logits changed");
    /* a context of 8: tokens 8..15 route as tokens 0..7 would on their own */
    static trace_buf whole, first;
    whole.cap = first.cap = 256;
    int32_t again[N];
    for (int i = 0; i < N; i++) again[i] = tok[i % 8];
    CHECK(moe_model_set_context(m, 8) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_model_route(m, again, N, collect, &whole) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_model_route(m, tok, 8, collect, &first) == MOE_OK, "%s", moe_last_error());
    CHECK(whole.n == N && first.n == 8, "%d %d", whole.n, first.n);
    CHECK(memcmp(whole.ids + 8 * 4, first.ids, sizeof(int32_t) * 8 * 4) == 0, "second window routes differently");
    CHECK(memcmp(whole.w + 8 * 4, first.w, sizeof(float) * 8 * 4) == 0, "second window weighs differently");
    free(a); free(b);
    moe_model_free(m);
    TEST_END();
}

/* One router stage with the router weights the identity, so the logits are
 * the input: softmax(1, 3, 2, 0) picks experts 1 and 2. */
static void test_disable_by_hand(void) {
    TEST_CASE("disable: the switched-off expert's slot is empty; weights as by hand");
    enum { E = 4, K = 2, D = 4 };
    float router[E * D] = {0}, x[D] = {1, 3, 2, 0};
    for (int e = 0; e < E; e++) router[e * D + e] = 1;
    moe_weights w = {.router = router};
    moe_cache cache;
    if (moe_cache_init(&cache, 1, D, E, K, 4, 0, MOE_ROUTING_TOKEN, 0)) TEST_FATAL("cache");
    const double z = exp(1) + exp(3) + exp(2) + exp(0);
    const double p1 = exp(3) / z, p2 = exp(2) / z;
    uint8_t off[E] = {0, 1, 0, 0};
    for (int renorm = 0; renorm < 2; renorm++) {
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = renorm, .scale = 1};
        moe_route(&cache.r, x, &w, 1, D, &o);
        CHECK(cache.r.ids[0] == 1 && cache.r.ids[1] == 2, "on: %d %d", cache.r.ids[0], cache.r.ids[1]);
        double w0 = renorm ? p1 / (p1 + p2) : p1, w1 = renorm ? p2 / (p1 + p2) : p2;
        CHECK(fabs(cache.r.w[0] - w0) < 1e-6 && fabs(cache.r.w[1] - w1) < 1e-6, "on: %g %g", cache.r.w[0], cache.r.w[1]);
        o.disabled = off;
        moe_route(&cache.r, x, &w, 1, D, &o);
        /* expert 1 is still the router's choice; its place is not given to expert 0 */
        CHECK(cache.r.ids[0] == -1 && cache.r.ids[1] == 2, "off: %d %d", cache.r.ids[0], cache.r.ids[1]);
        CHECK(cache.r.w[0] == 0.0f && fabs(cache.r.w[1] - (renorm ? 1.0 : p2)) < 1e-6, "off: %g %g", cache.r.w[0], cache.r.w[1]);
        CHECK(cache.r.sel_counts[1] == 0 && cache.r.sel_counts[2] == 1 && cache.r.rows == 1, "dispatch");
    }
    moe_cache_free(&cache);
    TEST_END();
}

static void test_disable_model(void) {
    TEST_CASE("disable: specs checked; the expert never appears in the trace of its layer");
    moe_config c = tiny();
    moe_model *m;
    if (moe_model_create(&m, &c, 7)) TEST_FATAL("create: %s", moe_last_error());
    CHECK(moe_model_disable_expert(m, 3, 0) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "layer 3"), "%s", moe_last_error());
    CHECK(moe_model_disable_expert(m, -1, 0) == MOE_ERR_INVALID_ARG, "negative layer");
    CHECK(moe_model_disable_expert(m, 0, 0) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "dense"), "%s", moe_last_error());
    CHECK(moe_model_disable_expert(m, 1, 8) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "expert 8"), "%s", moe_last_error());
    CHECK(m->disabled == NULL, "a refused spec allocated the mask");
    enum { N = 32 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 29 + 1) % c.vocab_size;
    static trace_buf on, off;
    on.cap = off.cap = 256;
    CHECK(moe_model_route(m, tok, N, collect, &on) == MOE_OK, "%s", moe_last_error());
    /* the expert layer 1 chooses most often */
    int cnt[8] = {0}, best = 0;
    for (int i = 0; i < N; i++) for (int j = 0; j < 2; j++) cnt[on.ids[(size_t)i * 4 + j]]++;
    for (int e = 1; e < 8; e++) if (cnt[e] > cnt[best]) best = e;
    CHECK(moe_model_disable_expert(m, 1, best) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_model_route(m, tok, N, collect, &off) == MOE_OK, "%s", moe_last_error());
    int seen = 0, empty = 0, first_same = 1;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 2; j++) {
            int32_t id = off.ids[(size_t)i * 4 + j];
            seen += id == best;
            if (on.ids[(size_t)i * 4 + j] == best) empty += id == -1 && off.w[(size_t)i * 4 + j] == 0.0f;
        }
    /* layer 1's choices are unchanged but for the empty slots (its input is
     * upstream of the ablation) */
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 2; j++) {
            int32_t a = on.ids[(size_t)i * 4 + j], b = off.ids[(size_t)i * 4 + j];
            if (a != best && a != b) first_same = 0;
        }
    CHECK(seen == 0 && empty == cnt[best] && cnt[best] > 0, "seen %d, empty %d of %d", seen, empty, cnt[best]);
    CHECK(first_same, "layer 1's other choices moved");
    moe_model_enable_experts(m);
    static trace_buf back;
    back.cap = 256;
    CHECK(moe_model_route(m, tok, N, collect, &back) == MOE_OK && memcmp(back.ids, on.ids, sizeof(int32_t) * N * 4) == 0,
          "re-enabled routing differs");
    moe_model_free(m);
    TEST_END();
}

static void test_published_layout(void) {
    TEST_CASE("route: a random-weight published layout (olmoe, Q8_0 experts)");
    moe_config c;
    moe_config_preset(&c, "default");
    c.vocab_size = 300; c.d_model = 64; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 4;
    c.d_ff = 96; c.n_experts = 4; c.top_k = 2; c.d_expert = 64; c.max_seq = 64;
    c.norm_eps = 1e-5f; c.qk_norm = MOE_QK_NORM_FULL; c.rope_neox = 1; c.renorm_topk = 0;
    char path[] = "/tmp/moe_test_stats_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) TEST_FATAL("mkstemp");
    close(fd);
    CHECK(arch_write_random(path, "olmoe", &c, DT_Q8_0, NULL, 3) == MOE_OK, "%s", moe_last_error());
    moe_model *m = NULL;
    CHECK(moe_model_load(&m, path) == MOE_OK, "%s", moe_last_error());
    if (m) {
        int32_t tok[40];
        for (int i = 0; i < 40; i++) tok[i] = (i * 7 + 2) % 300;
        static trace_buf t;
        t.cap = 256;
        CHECK(moe_model_route(m, tok, 40, collect, &t) == MOE_OK, "%s", moe_last_error());
        int bad = 0;
        for (int i = 0; i < 40; i++)
            for (int l = 0; l < 2; l++) {
                const int32_t *id = t.ids + ((size_t)i * 2 + l) * 2;
                const float *w = t.w + ((size_t)i * 2 + l) * 2;
                /* softmax without renormalisation: two distinct experts, weights in (0, 1) summing below 1 */
                bad += id[0] < 0 || id[0] >= 4 || id[1] < 0 || id[1] >= 4 || id[0] == id[1] || !(w[0] >= w[1]) ||
                       !(w[1] > 0) || !(w[0] + w[1] < 1.0f);
            }
        CHECK(t.n == 40 && t.n_moe == 2 && bad == 0, "n %d n_moe %d, %d bad", t.n, t.n_moe, bad);
        moe_model_free(m);
    }
    unlink(path);
    TEST_END();
}

static void write_text(const char *path, const char *words, int lines, unsigned seed) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    char w[32][16];
    int nw = 0;
    for (const char *p = words; *p && nw < 32;) {
        int n = 0;
        while (*p && *p != ' ' && n < 15) w[nw][n++] = *p++;
        w[nw++][n] = 0;
        while (*p == ' ') p++;
    }
    for (int i = 0; i < lines; i++) {
        for (int j = 0; j < 10; j++) {
            seed = seed * 1103515245u + 12345u;
            fprintf(f, "%s ", w[(seed >> 16) % nw]);
        }
        fprintf(f, ".\n%s", i % 8 == 7 ? "\f\n" : "");
    }
    fclose(f);
}

static void test_eval_domains(void) {
    TEST_CASE("eval: per-domain losses; nothing disabled = plain eval bit for bit; an ablation moves the loss");
    char dir[] = "/tmp/moe_test_stats_dXXXXXX";
    if (!mkdtemp(dir)) TEST_FATAL("mkdtemp");
    char a[300], b[300];
    snprintf(a, sizeof a, "%s/alpha.txt", dir);
    snprintf(b, sizeof b, "%s/beta.txt", dir);
    write_text(a, "the quick brown fox jumps over a lazy dog river tree stone", 160, 1);
    write_text(b, "def return import class self for while print lambda yield", 160, 2);
    const char *paths[2] = {a, b};
    char **texts; size_t *lens; int nt;
    moe_tokenizer *tok = NULL;
    moe_dataset *d = NULL;
    moe_model *m = NULL;
    CHECK(moe_read_texts(paths, 2, &texts, &lens, &nt) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_tokenizer_train(&tok, (const char *const *)texts, lens, nt, 300) == MOE_OK, "%s", moe_last_error());
    moe_free_texts(texts, lens, nt);
    CHECK(moe_dataset_load_text(&d, tok, paths, 2) == MOE_OK, "%s", moe_last_error());
    moe_config c = tiny();
    CHECK(moe_model_create(&m, &c, 11) == MOE_OK, "%s", moe_last_error());
    if (!tok || !d || !m) TEST_FATAL("setup");
    char out[320];
    snprintf(out, sizeof out, "%s/m.gguf", dir);
    moe_train_params p;
    moe_train_params_default(&p);
    p.steps = 30; p.batch = 4; p.seq = 16; p.lr = 1e-2f; p.warmup = 2; p.eval_every = 0; p.eval_batches = 1;
    p.out_path = out; p.threads = 2;
    CHECK(moe_train(m, d, &p, NULL, NULL, NULL) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_dataset_n_domains(d) == 2 && !strcmp(moe_dataset_domain_name(d, 0), "alpha") &&
          !strcmp(moe_dataset_domain_name(d, 1), "beta") && !moe_dataset_domain_name(d, 2), "domain names");
    double plain, all, dl[2], dl2[2], off, back;
    size_t n_plain, n_all, dt[2], dt2[2], n_off;
    CHECK(moe_evaluate(m, d, 16, 0, 1, &plain, &n_plain) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_evaluate_domains(m, d, 16, 1, &all, &n_all, dl, dt, NULL, NULL) == MOE_OK, "%s", moe_last_error());
    CHECK(memcmp(&plain, &all, sizeof plain) == 0 && n_plain == n_all, "%.17g vs %.17g", plain, all);
    CHECK(dt[0] > 100 && dt[1] > 100 && dt[0] + dt[1] == n_all, "domain tokens %zu + %zu of %zu", dt[0], dt[1], n_all);
    double mix = (dl[0] * dt[0] + dl[1] * dt[1]) / (double)n_all;
    CHECK(fabs(mix - all) < 1e-5 * all, "domains average %.9g, overall %.9g", mix, all);
    /* switch off layer 1's busiest expert (on the first domain's text) */
    int cnt[8] = {0}, best = 0;
    static trace_buf t;
    t.cap = 256;
    CHECK(moe_model_route(m, d->tokens[0], 200, collect, &t) == MOE_OK, "%s", moe_last_error());
    for (int i = 0; i < t.n; i++) for (int j = 0; j < 2; j++) cnt[t.ids[(size_t)i * 4 + j]]++;
    for (int e = 1; e < 8; e++) if (cnt[e] > cnt[best]) best = e;
    CHECK(moe_model_disable_expert(m, 1, best) == MOE_OK, "%s", moe_last_error());
    CHECK(moe_evaluate_domains(m, d, 16, 1, &off, &n_off, dl2, dt2, NULL, NULL) == MOE_OK, "%s", moe_last_error());
    CHECK(n_off == n_all && dt2[0] == dt[0] && off != all && dl2[0] != dl[0] && dl2[1] != dl[1],
          "disabling expert %d: %.6f -> %.6f (alpha %.6f -> %.6f, beta %.6f -> %.6f)", best, all, off, dl[0], dl2[0], dl[1], dl2[1]);
    printf("  layer 1 expert %d off: loss %.4f -> %.4f\n", best, all, off);
    moe_model_enable_experts(m);
    CHECK(moe_evaluate(m, d, 16, 0, 1, &back, NULL) == MOE_OK && memcmp(&back, &plain, sizeof back) == 0,
          "re-enabled: %.17g vs %.17g", back, plain);
    /* a trace of all the data reads every token once, in order, with its domain;
     * a capped one samples both domains */
    route_trace rt;
    const size_t all_n = d->n[0] + d->n[1];
    CHECK(route_trace_init(&rt, &m->cfg, all_n) == MOE_OK, "%s", moe_last_error());
    CHECK(route_trace_dataset(&rt, m, d, 0, NULL, NULL) == MOE_OK && rt.n == all_n, "traced %zu of %zu", rt.n, all_n);
    int order_bad = 0;
    for (size_t i = 0; i < rt.n; i++) {
        const int s2 = i >= d->n[0];
        const size_t j = s2 ? i - d->n[0] : i;
        order_bad += rt.tokens[i] != d->tokens[s2][j] || rt.domain[i] != d->domain[s2][j];
    }
    CHECK(order_bad == 0, "%d tokens out of place", order_bad);
    route_trace_free(&rt);
    CHECK(route_trace_init(&rt, &m->cfg, 320) == MOE_OK, "%s", moe_last_error());
    size_t per_dom[2];
    double share[16];
    CHECK(route_trace_dataset(&rt, m, d, 320, NULL, NULL) == MOE_OK && rt.n == 320, "capped: %zu", rt.n);
    route_domain_share(&rt, 0, 2, share, per_dom);
    CHECK(per_dom[0] >= 32 && per_dom[1] >= 32, "10 windows over the data: domains sampled %zu and %zu", per_dom[0], per_dom[1]);
    route_trace_free(&rt);
    moe_model_free(m);
    moe_dataset_free(d);
    moe_tokenizer_free(tok);
    unlink(a); unlink(b); unlink(out);
    char st[340];
    snprintf(st, sizeof st, "%s.state", out);
    unlink(st);
    rmdir(dir);
    TEST_END();
}

/* Five tokens of one MoE layer with 4 experts, top-2 (-1: an empty slot):
 *   token  5 7 5 9 5    domain 0 0 1 1 1
 *   chosen {0,1} {0,2} {1,-} {3,0} {2,3}
 * and an older checkpoint's choices {1,0} {3,2} {1,2} {2,1} {2,3}. */
static void hand_trace(route_trace *t, const int32_t *ids) {
    static int layer = 1;
    static int32_t tok[5] = {5, 7, 5, 9, 5};
    static uint8_t dom[5] = {0, 0, 1, 1, 1};
    memset(t, 0, sizeof *t);
    t->n = t->cap = 5; t->n_moe = 1; t->k = 2; t->E = 4;
    t->layers = &layer; t->tokens = tok; t->domain = dom; t->ids = (int32_t *)ids;
}

#define NEAR(a, b) (fabs((a) - (b)) < 1e-12)
static void test_metrics_by_hand(void) {
    TEST_CASE("metrics: load, domain share, co-activation, overlap, vocabulary against hand counts");
    static const int32_t now[10] = {0, 1, 0, 2, 1, -1, 3, 0, 2, 3}, old[10] = {1, 0, 3, 2, 1, 2, 2, 1, 2, 3};
    route_trace t, o;
    hand_trace(&t, now);
    hand_trace(&o, old);
    double load[4];
    route_load(&t, 0, load); /* 3, 2, 2, 2 of 9 assignments */
    CHECK(NEAR(load[0], 3 / 9.0) && NEAR(load[1], 2 / 9.0) && NEAR(load[2], 2 / 9.0) && NEAR(load[3], 2 / 9.0),
          "load %g %g %g %g", load[0], load[1], load[2], load[3]);
    double sh[8];
    size_t nt[2];
    route_domain_share(&t, 0, 2, sh, nt);
    const double want_sh[8] = {1, 0.5, 0.5, 0, 1 / 3.0, 1 / 3.0, 1 / 3.0, 2 / 3.0};
    int bad = 0;
    for (int i = 0; i < 8; i++) bad += !NEAR(sh[i], want_sh[i]);
    CHECK(!bad && nt[0] == 2 && nt[1] == 3, "domain share (%d wrong), tokens %zu %zu", bad, nt[0], nt[1]);
    double p[16];
    route_coactivation(&t, 0, p);
    const double want_p[16] = {1, 1 / 3.0, 1 / 3.0, 1 / 3.0, 0.5, 1, 0, 0, 0.5, 0, 1, 0.5, 0.5, 0, 0.5, 1};
    bad = 0;
    for (int i = 0; i < 16; i++) bad += !NEAR(p[i], want_p[i]);
    CHECK(!bad, "co-activation: %d entries wrong (row 2: %g %g %g %g)", bad, p[8], p[9], p[10], p[11]);
    /* common experts 2, 1, 1, 0, 2 of k = 2 */
    CHECK(NEAR(route_overlap(&t, &o, 0), 0.6), "overlap %g", route_overlap(&t, &o, 0));
    CHECK(NEAR(route_overlap(&t, &t, 0), 0.9), "self overlap %g (an empty slot matches nothing)", route_overlap(&t, &t, 0));
    route_vocab_entry top[8];
    double fav;
    size_t counted;
    /* token 5: experts 0,1,1,2,3 over 3 occurrences (favourite 1: 2/3); tokens 7 and 9 once each (1) */
    CHECK(route_vocab(&t, 0, 2, 1, top, &fav, &counted) == MOE_OK, "%s", moe_last_error());
    CHECK(NEAR(fav, (2 / 3.0 + 1 + 1) / 3) && counted == 3, "favourite share %g over %zu", fav, counted);
    CHECK(top[0].token == 5 && top[0].count == 1 && top[0].occurrences == 3 && top[1].token == 7, "expert 0: %d %d", top[0].token, top[1].token);
    CHECK(top[2].token == 5 && top[2].count == 2 && top[3].token == -1, "expert 1: %d (%lld) %d", top[2].token, (long long)top[2].count, top[3].token);
    CHECK(top[4].token == 5 && top[5].token == 7 && top[6].token == 5 && top[7].token == 9, "experts 2, 3");
    CHECK(route_vocab(&t, 0, 2, 2, top, &fav, &counted) == MOE_OK && NEAR(fav, 2 / 3.0) && counted == 1,
          "min_occ 2: %g over %zu", fav, counted);
    TEST_END();
}

static void test_jsonl(void) {
    TEST_CASE("jsonl: strings escaped (HTML-safe, invalid UTF-8 as U+FFFD); log numbers read back");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    const char s[] = "a\"b\\c\n\t\x01<x>&\xc3\xa9\xff\xe2\x82";
    json_string(f, s, sizeof s - 1);
    fputc(' ', f);
    json_number(f, 0.25);
    fputc(' ', f);
    json_number(f, NAN);
    fclose(f);
    const char want[] = "\"a\\\"b\\\\c\\n\\t\\u0001\\u003cx\\u003e\\u0026\xc3\xa9\\ufffd\\ufffd\\ufffd\" 0.25 null";
    CHECK(len == strlen(want) && !memcmp(buf, want, len), "got %s", buf);
    free(buf);
    const char *line = "{\"step\":12,\"loss\":3.5,\"maxvio\":[0.25,null,1e-3],\"load\":[[0.5,0.5]],\"x\":\"\\\"maxvio\\\":[9]\"}";
    double v[4], x;
    CHECK(jsonl_number(line, "step", &x) && x == 12, "step");
    CHECK(jsonl_array(line, "maxvio", v, 4) == 3 && v[0] == 0.25 && isnan(v[1]) && v[2] == 1e-3, "maxvio");
    CHECK(jsonl_array(line, "maxvio", v, 2) == 2, "capped");
    CHECK(jsonl_array(line, "dead", v, 4) == -1 && !jsonl_number(line, "dead", &x), "absent key");
    CHECK(jsonl_array(line, "load", v, 4) == -1, "nested arrays are not numbers");
    TEST_END();
}

int main(void) {
    moe_set_threads(2);
    test_trace_matches_forward();
    test_tap_keeps_logits();
    test_disable_by_hand();
    test_disable_model();
    test_published_layout();
    test_eval_domains();
    test_metrics_by_hand();
    test_jsonl();
    TEST_MAIN_END();
}
