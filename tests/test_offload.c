/* Expert offloading (model/offload.c, moe/expert_store.c) on tiny
 * random-weight files of every published layout:
 *  - logits of a prompt (one chunk) and of tokens decoded one at a time are
 *    bit-identical to the fully mapped run at budgets of 100%, 50%, 25% and
 *    the minimum (one expert's slices), with one and with four threads, and
 *    after switching offloading off again;
 *  - the cache's allocation (allocator counts) stays within the budget;
 *  - bytes read from the file = misses x one expert's bytes;
 *  - every policy gives the same bits;
 *  - our own models (moe train's files) of several presets and routing
 *    modes, loaded with a budget, are mapped, and give the resident (copied)
 *    load's bits through inference and the batch forward of evaluation at
 *    the same budgets; so do their quantised copies;
 *  - below the minimum, a bad budget, an in-memory model, and a file
 *    truncated under a running cache are clear errors, not crashes. */
#include <stdint.h>
#include <unistd.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "harness.h"
#include "model/model.h"
#include "kernels/qmatmul.h"
#include "moe/expert_store.h"
#include "stats/route_stats.h"

#include "arch_layouts.h"

enum { PROMPT = 9, DECODE = 7, N_TOK = PROMPT + DECODE };

/* logits[N_TOK][V]: the prompt in one chunk, then one token at a time */
static moe_status run(moe_model *m, float *logits) {
    int32_t tok[N_TOK];
    for (int i = 0; i < N_TOK; i++) tok[i] = (int32_t)((i * 37 + 11) % m->cfg.vocab_size);
    moe_status st = model_infer(m, tok, PROMPT, 0, logits, 1);
    for (int i = PROMPT; !st && i < N_TOK; i++)
        st = model_infer(m, tok + i, 1, i, logits + (size_t)i * m->cfg.vocab_size, 0);
    return st;
}

/* one expert's gate, up and down bytes (every MoE layer of these files alike) */
static size_t expert_bytes_of(const moe_model *m) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->plan[l].ffn == FFN_MOE) {
            const layer_weights *W = &m->w.layers[l];
            return (size_t)W->gate_exps.ne[1] * W->gate_exps.row_bytes + (size_t)W->up_exps.ne[1] * W->up_exps.row_bytes +
                   (size_t)W->down_exps.ne[1] * W->down_exps.row_bytes;
        }
    return 0;
}

/* the minimum the library names in its refusal of a 1-byte budget */
static size_t min_budget(moe_model *m) {
    if (moe_model_set_mem_budget(m, "1") != MOE_ERR_INVALID_ARG) return 0;
    const char *p = strstr(moe_last_error(), "minimum of ");
    unsigned long long v = 0;
    return p && sscanf(p, "minimum of %llu", &v) == 1 ? (size_t)v : 0;
}

/* writes a random model of layout L in type wtype to path and loads it (NULL: failed, checked) */
static moe_model *write_and_load(const char *path, const layout *L, int wtype, uint64_t seed) {
    moe_model *m = NULL;
    CHECK(arch_write_random(path, L->arch, &L->c, wtype, NULL, seed) == MOE_OK && moe_model_load(&m, path) == MOE_OK,
          "%s: %s", L->label, moe_last_error());
    return m;
}

/* How a check runs the model: through the KV-cached inference path (run:
 * generate, bench, eval of a published model) or the batch forward (eval
 * of our own models); logits[tokens][V] out. */
typedef struct {
    const char *name;
    moe_status (*fn)(moe_model *m, float *logits);
    int tokens;
} runner;

enum { BATCH_B = 2, BATCH_T = 8 };

/* logits[B * T][V] of the batch forward over B x T tokens with targets */
static moe_status run_batch(moe_model *m, float *logits) {
    int32_t tok[BATCH_B * BATCH_T + 1];
    for (int i = 0; i <= BATCH_B * BATCH_T; i++) tok[i] = (int32_t)((i * 53 + 5) % m->cfg.vocab_size);
    model_losses L;
    moe_status st = model_forward(m, tok, tok + 1, BATCH_B, BATCH_T, &L);
    if (!st) memcpy(logits, m->acts.logits, sizeof(float) * BATCH_B * BATCH_T * m->cfg.vocab_size);
    return st;
}

static const runner INFER = {"inference", run, N_TOK}, BATCH = {"batch forward", run_batch, BATCH_B * BATCH_T};

/* The budgets 100%, 50%, 25% and the minimum, prefetch off and on (the
 * inference path; the batch forward has none), one and four threads: the logits of r equal ref, the cache stays within its
 * budget (allocator counts), bytes read = (misses + prefetched) x one
 * expert's bytes. prefetched[2] sums the experts read ahead (off, on).
 * m has run r once before (its scratch is allocated). */
static void check_budgets(moe_model *m, const runner *r, const float *ref, int64_t *prefetched) {
    const size_t V = (size_t)m->cfg.vocab_size, n = (size_t)r->tokens * V;
    float *got = malloc(sizeof(float) * n);
    if (!got) { CHECK(0, "out of memory"); return; }
    const size_t total = model_expert_bytes(m), one = expert_bytes_of(m), min = min_budget(m);
    CHECK(min >= one && min < one + 256, "minimum %zu for an expert of %zu bytes: %s", min, one, moe_last_error());
    CHECK(strstr(moe_last_error(), "below the minimum"), "message: %s", moe_last_error());
    char spec[4][32] = {"100%", "50%", "25%", ""};
    snprintf(spec[3], sizeof spec[3], "%zu", min);
    const int n_pf = r->fn == run_batch ? 1 : 2; /* prefetch acts in the KV-cached path only */
    for (int pf = 0; pf < n_pf; pf++)
    for (int threads = 1; threads <= 4; threads += 3) {
        moe_set_threads(threads);
        CHECK(moe_model_set_offload_prefetch(m, pf ? "on" : "off") == MOE_OK, "%s", moe_last_error());
        /* one thread: each prefetch request is read before the layer runs, so
         * that the count below does not depend on the scheduler (a loaded
         * machine may never run the reader in time); four: as users run it */
        if (pf && threads == 1) m->store_prefetch = 3;
        for (int b = 0; b < 4; b++) {
            moe_model_set_mem_budget(m, "0"); /* the previous cache goes first */
            const size_t before = moe_alloc_in_use();
            moe_status st = moe_model_set_mem_budget(m, spec[b]);
            CHECK(st == MOE_OK, "budget %s: %s", spec[b], moe_last_error());
            if (st) continue;
            moe_offload_stats s;
            moe_model_offload_stats(m, &s);
            const size_t grown = moe_alloc_in_use() - before;
            CHECK(s.cache_bytes <= s.budget && grown <= (size_t)s.budget + (size_t)s.table_bytes,
                  "budget %s: cache %lld bytes, allocated %zu (tables %lld), budget %lld", spec[b], (long long)s.cache_bytes,
                  grown, (long long)s.table_bytes, (long long)s.budget);
            CHECK(b != 0 || s.slots == s.units, "100%%: %d slots for %d experts", s.slots, s.units);
            CHECK(b != 3 || s.slots == 1, "minimum: %d slots", s.slots);
            CHECK((size_t)s.expert_bytes == total, "expert bytes %lld vs %zu", (long long)s.expert_bytes, total);
            st = r->fn(m, got);
            CHECK(st == MOE_OK, "budget %s: %s", spec[b], moe_last_error());
            CHECK(!memcmp(got, ref, sizeof(float) * n), "%s, budget %s, %d threads, prefetch %d: logits differ from the "
                  "resident run", r->name, spec[b], threads, pf);
            /* the prefetch thread allocates nothing: the cache stays what it was given */
            CHECK(moe_alloc_in_use() - before == grown, "budget %s, prefetch %d: allocation grew from %zu to %zu", spec[b], pf, grown, moe_alloc_in_use() - before);
            moe_model_offload_stats(m, &s);
            CHECK(s.bytes_read == (s.misses + s.prefetched) * (int64_t)one, "budget %s: read %lld bytes for %lld misses and "
                  "%lld prefetches of %zu", spec[b], (long long)s.bytes_read, (long long)s.misses, (long long)s.prefetched, one);
            CHECK(s.prefetch_used <= s.prefetched && s.prefetch_harm <= s.misses, "prefetch: %lld read, %lld used, %lld harm",
                  (long long)s.prefetched, (long long)s.prefetch_used, (long long)s.prefetch_harm);
            prefetched[pf] += s.prefetched;
            /* uses are counted once per expert and forward call: one call for the batch */
            const int64_t uses = r->fn == run_batch ? m->cfg.top_k : (int64_t)r->tokens * m->cfg.top_k / 2;
            CHECK(s.misses > 0 && s.hits + s.misses >= uses, "budget %s: %lld hits, %lld misses", spec[b], (long long)s.hits, (long long)s.misses);
            CHECK(b != 0 || s.misses <= s.units, "100%%: %lld misses for %d experts", (long long)s.misses, s.units);
            CHECK(s.tokens == r->tokens, "%lld tokens counted", (long long)s.tokens);
        }
    }
    moe_set_threads(0);
    free(got);
}

static void test_layout(const layout *L, int wtype) {
    char name[200], path[256];
    snprintf(name, sizeof name, "offload %s (%s): budgets give the resident bits", L->label, dtype_name(wtype));
    TEST_CASE(name);
    th_tmp_path(path, sizeof path, "offload.gguf");
    moe_model *m = write_and_load(path, L, wtype, 11);
    const size_t V = (size_t)L->c.vocab_size;
    float *ref = malloc(sizeof(float) * N_TOK * V), *got = malloc(sizeof(float) * N_TOK * V);
    if (!m || !ref || !got) { free(ref); free(got); moe_model_free(m); TEST_END(); return; }
    CHECK(run(m, ref) == MOE_OK, "resident run: %s", moe_last_error());
    const size_t repacked = moe_model_repacked_bytes(m);
    if (dtype_repacked_type(wtype) >= 0) {
        /* the kernels' layout (model/repack.c) where it is taken: the file's rows give the same bits */
        const int want = qk_avx512_supported() && !getenv("MOE_REPACK") &&
                         !getenv("MOE_KERNELS");
        CHECK((repacked > 0) == want, "%zu bytes repacked, expected %s", repacked, want ? "some" : "none");
        setenv("MOE_REPACK", "0", 1);
        moe_model *rows = NULL;
        CHECK(moe_model_load(&rows, path) == MOE_OK && moe_model_repacked_bytes(rows) == 0, "MOE_REPACK=0: %s", moe_last_error());
        unsetenv("MOE_REPACK");
        CHECK(rows && run(rows, got) == MOE_OK && !memcmp(got, ref, sizeof(float) * N_TOK * V),
              "the file's rows give other logits than the repacked weights");
        moe_model_free(rows);
    }
    int64_t prefetched[2] = {0, 0}; /* by prefetch off, on */
    check_budgets(m, &INFER, ref, prefetched);
    CHECK(prefetched[0] == 0 && prefetched[1] > 0, "experts prefetched: %lld with prefetch off, %lld on",
          (long long)prefetched[0], (long long)prefetched[1]);
    const char *policies[] = {"lru", "lfu", "lrfu"};
    for (int p = 0; p < 3; p++) {
        CHECK(moe_model_set_offload_policy(m, policies[p], p == 2) == MOE_OK, "%s", moe_last_error());
        CHECK(moe_model_set_mem_budget(m, "25%") == MOE_OK, "%s", moe_last_error());
        CHECK(run(m, got) == MOE_OK && !memcmp(got, ref, sizeof(float) * N_TOK * V), "policy %s: logits differ", policies[p]);
    }
    /* warm start: every expert counted once fills a 100% cache before the run, so nothing misses */
    int64_t *counts = calloc((size_t)moe_config_n_moe_layers(&m->cfg) * L->c.n_experts, sizeof(int64_t));
    for (int i = 0; counts && i < moe_config_n_moe_layers(&m->cfg) * L->c.n_experts; i++) counts[i] = 1 + i % 3;
    CHECK(counts && moe_model_set_mem_budget(m, "100%") == MOE_OK && moe_model_offload_warm(m, counts) == MOE_OK, "warm: %s",
          moe_last_error());
    CHECK(run(m, got) == MOE_OK && !memcmp(got, ref, sizeof(float) * N_TOK * V), "warm start: logits differ");
    moe_offload_stats ws;
    moe_model_offload_stats(m, &ws);
    CHECK(ws.misses == 0 && ws.bytes_read == 0 && ws.hits > 0, "warm start: %lld misses, %lld bytes read", (long long)ws.misses,
          (long long)ws.bytes_read);
    free(counts);
    CHECK(!repacked || moe_model_repacked_bytes(m) < repacked, "the experts stayed repacked under a cache (%zu of %zu bytes)",
          moe_model_repacked_bytes(m), repacked);
    CHECK(moe_model_set_mem_budget(m, "0") == MOE_OK && !m->store, "off again: %s", moe_last_error());
    CHECK(run(m, got) == MOE_OK && !memcmp(got, ref, sizeof(float) * N_TOK * V), "budget 0 after a budget: logits differ");
    free(ref);
    free(got);
    moe_model_free(m);
    remove(path);
    TEST_END();
}

/* Our own model (moe train's file: fp32, the "moe.*" config) of a preset,
 * shrunk to a vocabulary of 300 and two MoE layers: loaded with a budget
 * it is mapped, not copied, and at every budget both the inference path
 * and the batch forward (eval) give the bits of the resident (copied)
 * load. routing: a routing mode to set, or -1 for the preset's. quant: also
 * a quantised copy (moe convert --quant) at every budget against that copy
 * fully mapped; NULL: none. */
static void test_own(const char *preset, int routing, const char *quant) {
    char name[200], path[256], qpath[256];
    snprintf(name, sizeof name, "offload: our own %s model%s%s%s: budgets give the resident bits", preset,
             routing == MOE_ROUTING_EXPERT ? " (expert choice)" : routing == MOE_ROUTING_SEQUENCE ? " (sequence routing)" : "",
             quant ? ", and its " : "", quant ? quant : "");
    TEST_CASE(name);
    th_tmp_path(path, sizeof path, "offload-own.gguf");
    th_tmp_path(qpath, sizeof qpath, "offload-own-q.gguf");
    moe_config c;
    CHECK(moe_config_preset(&c, preset) == MOE_OK, "%s", moe_last_error());
    c.vocab_size = 300;
    c.max_seq = 32;
    c.n_layers = c.moe_first_dense + 2;
    if (routing >= 0) c.routing = routing;
    moe_model *res = NULL, *om = NULL;
    moe_status st = moe_model_create(&res, &c, 17);
    CHECK(st == MOE_OK, "%s: %s", preset, moe_last_error());
    if (st) { TEST_END(); return; }
    if (c.expert_bias) /* a selection bias that changes the choice */
        for (int l = 0; l < c.n_layers; l++)
            for (int e = 0; res->w.layers[l].exp_bias.data && e < c.n_experts; e++)
                F32(res->w.layers[l].exp_bias)[e] = 0.05f * (float)((e * 7 + l) % 5 - 2);
    CHECK((st = moe_model_save(res, path)) == MOE_OK, "save: %s", moe_last_error());
    moe_model_free(res);
    res = NULL;
    const size_t V = (size_t)c.vocab_size;
    float *ref_inf = malloc(sizeof(float) * INFER.tokens * V), *ref_bat = malloc(sizeof(float) * BATCH.tokens * V);
    float *got = malloc(sizeof(float) * (INFER.tokens + BATCH.tokens) * V);
    if (!st) st = moe_model_load(&res, path);
    CHECK(st == MOE_OK && res->params, "resident load: %s", moe_last_error());
    if (!st && ref_inf && ref_bat && got) {
        CHECK(run(res, ref_inf) == MOE_OK && run_batch(res, ref_bat) == MOE_OK, "resident runs: %s", moe_last_error());
        moe_load_options o = {.mem_budget = "0"};
        st = moe_model_load_with(&om, path, &o);
        CHECK(st == MOE_OK && om && !om->params && !om->store, "mapped load: %s", moe_last_error());
    }
    if (om) {
        /* budget 0: every expert in the mapping, the same bits; this allocates the scratch */
        CHECK(run(om, got) == MOE_OK && !memcmp(got, ref_inf, sizeof(float) * INFER.tokens * V), "mapped inference differs");
        CHECK(run_batch(om, got) == MOE_OK && !memcmp(got, ref_bat, sizeof(float) * BATCH.tokens * V), "mapped batch differs");
        int64_t prefetched[2] = {0, 0};
        check_budgets(om, &INFER, ref_inf, prefetched);
        CHECK(prefetched[0] == 0 && prefetched[1] > 0, "experts prefetched: %lld off, %lld on", (long long)prefetched[0],
              (long long)prefetched[1]);
        check_budgets(om, &BATCH, ref_bat, prefetched);
        /* inference only: neither saved nor trained (its weights are the file's pages) */
        CHECK(moe_model_save(om, qpath) == MOE_ERR_UNSUPPORTED, "a mapped own model was saved");
        moe_train_params tp;
        moe_train_params_default(&tp);
        tp.out_path = qpath;
        CHECK(moe_train(om, NULL, &tp, NULL, NULL, NULL) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), "inference only"),
              "a mapped own model trains: %s", moe_last_error());
        moe_model_free(om);
        om = NULL;
    }
    if (quant && res) { /* the quantised copy: a published layout, offloaded as one */
        st = moe_model_convert_quant(res, qpath, quant);
        CHECK(st == MOE_OK, "convert --quant %s: %s", quant, moe_last_error());
        if (!st) st = moe_model_load(&om, qpath);
        CHECK(st == MOE_OK && om && om->arch[0], "the %s copy: %s", quant, moe_last_error());
        if (!st) {
            CHECK(run(om, got) == MOE_OK, "the %s copy: %s", quant, moe_last_error());
            int64_t prefetched[2] = {0, 0};
            check_budgets(om, &INFER, got, prefetched);
        }
        moe_model_free(om);
        remove(qpath);
    }
    moe_model_free(res);
    free(ref_inf);
    free(ref_bat);
    free(got);
    remove(path);
    TEST_END();
}

/* Routing counts from a moe route --json trace (route_counts_read), by hand:
 * 2 MoE layers of 4 experts; then a 100% cache warmed from the trace of
 * the tokens it then runs misses nothing, and bad traces are refused. */
static void test_warm_trace(void) {
    TEST_CASE("offload: warming the cache from a routing trace (moe route --json)");
    char path[256], tpath[256];
    th_tmp_path(path, sizeof path, "offload-warm.gguf");
    th_tmp_path(tpath, sizeof tpath, "offload-warm.jsonl");
    layout L[8];
    layouts(L);
    FILE *f = fopen(tpath, "w");
    if (f) {
        fputs("{\"pos\":0,\"token\":5,\"text\":\"a\",\"layers\":[{\"layer\":0,\"experts\":[1,2],\"weights\":[0.6,0.4]},"
              "{\"layer\":1,\"experts\":[3,1],\"weights\":[0.5,0.5]}]}\n", f);
        fputs("{\"pos\":1,\"token\":6,\"text\":\"b\",\"layers\":[{\"layer\":0,\"experts\":[2,-1],\"weights\":[1,0]},"
              "{\"layer\":1,\"experts\":[3,0],\"weights\":[0.7,0.3]}]}\n", f);
        fputs("{\"pos\":2,\"token\":7,\"text\":\"c\",\"layers\":[{\"layer\":1,\"experts\":[ 3 , 2 ]}]}\n", f);
        fclose(f);
    }
    int64_t got[8], want[8] = {0, 1, 2, 0, /* layer 1: */ 1, 1, 1, 3};
    CHECK(route_counts_read(tpath, &L[0].c, got) == MOE_OK && !memcmp(got, want, sizeof want), "counts: %s", moe_last_error());
    const char *bad[] = {"{\"layers\":[{\"layer\":0,\"experts\":[1,4]}]}\n", "{\"layers\":[{\"layer\":2,\"experts\":[1]}]}\n",
                         "{\"layers\":[{\"layer\":0,\"experts\":[1,x]}]}\n", "not a trace\n"};
    const char *why[] = {"4 experts", "MoE layer", "not a list", "no routing"};
    for (int i = 0; i < 4; i++) {
        f = fopen(tpath, "w");
        if (f) { fputs(bad[i], f); fclose(f); }
        CHECK(route_counts_read(tpath, &L[0].c, got) == MOE_ERR_FORMAT && strstr(moe_last_error(), why[i]),
              "bad trace %d: %s", i, moe_last_error());
    }
    /* the trace of the run itself: at 100% every expert it uses is read before it starts */
    moe_model *m = write_and_load(path, &L[0], DT_F32, 3);
    const size_t V = (size_t)L[0].c.vocab_size;
    float *ref = malloc(sizeof(float) * N_TOK * V), *out = malloc(sizeof(float) * N_TOK * V);
    int32_t tok[N_TOK];
    for (int i = 0; i < N_TOK; i++) tok[i] = (int32_t)((i * 37 + 11) % L[0].c.vocab_size);
    if (m && ref && out && run(m, ref) == MOE_OK && (f = fopen(tpath, "w"))) {
        moe_model_free(m);
        m = NULL;
        moe_model *r = NULL;
        CHECK(moe_model_load(&r, path) == MOE_OK, "%s", moe_last_error());
        route_trace t;
        CHECK(r && route_trace_init(&t, &r->cfg, N_TOK) == MOE_OK && moe_model_route(r, tok, N_TOK, route_trace_add, &t) == MOE_OK,
              "route: %s", moe_last_error());
        for (size_t i = 0; r && i < t.n; i++) {
            fputs("{\"layers\":[", f);
            for (int j = 0; j < t.n_moe; j++) {
                fprintf(f, "%s{\"layer\":%d,\"experts\":[", j ? "," : "", t.layers[j]);
                for (int k = 0; k < t.k; k++) fprintf(f, "%s%d", k ? "," : "", t.ids[(i * t.n_moe + j) * t.k + k]);
                fputs("]}", f);
            }
            fputs("]}\n", f);
        }
        fclose(f);
        if (r) route_trace_free(&t);
        moe_model_free(r);
        moe_load_options o = {.mem_budget = "100%", .offload_warm = tpath};
        CHECK(moe_model_load_with(&m, path, &o) == MOE_OK, "%s", moe_last_error());
        moe_offload_stats s;
        if (m) moe_model_offload_stats(m, &s);
        CHECK(m && s.misses == 0 && s.bytes_read == 0, "after warming: %lld misses", m ? (long long)s.misses : -1LL);
        CHECK(m && run(m, out) == MOE_OK && !memcmp(out, ref, sizeof(float) * N_TOK * V), "warm from a trace: logits differ");
        if (m) moe_model_offload_stats(m, &s);
        CHECK(m && s.misses == 0 && s.hits > 0, "warm from the run's own trace: %lld misses", m ? (long long)s.misses : -1LL);
    }
    free(ref);
    free(out);
    moe_model_free(m);
    remove(path);
    remove(tpath);
    TEST_END();
}

/* A cache on a file cut short after it opened: the first miss is an I/O
 * error naming the expert and the file, every later call too, no crash. */
static void test_truncated(void) {
    TEST_CASE("offload: a file truncated under the cache is a clear error");
    char path[256], cut[256];
    th_tmp_path(path, sizeof path, "offload-full.gguf");
    th_tmp_path(cut, sizeof cut, "offload-cut.gguf");
    layout L[8];
    layouts(L);
    moe_model *m = write_and_load(path, &L[0], DT_Q8_0, 5);
    size_t n = 0;
    char *bytes = NULL;
    CHECK(moe_read_file(path, &bytes, &n) == MOE_OK, "%s", moe_last_error());
    FILE *f = fopen(cut, "wb");
    CHECK(f && fwrite(bytes, 1, n, f) == n && fclose(f) == 0, "writing the copy");
    moe_free(bytes);
    if (!m) { TEST_END(); return; }
    /* the cache reads the copy (the model's own mapping stays whole) */
    moe_free(m->path);
    m->path = moe_strdup(cut);
    CHECK(moe_model_set_mem_budget(m, "25%") == MOE_OK, "%s", moe_last_error());
    CHECK(truncate(cut, 4096) == 0, "truncate");
    float *logits = malloc(sizeof(float) * N_TOK * L[0].c.vocab_size);
    moe_status st = run(m, logits);
    CHECK(st == MOE_ERR_IO, "status %d: %s", st, moe_last_error());
    CHECK(strstr(moe_last_error(), "ends early") && strstr(moe_last_error(), "offload-cut.gguf"), "message: %s", moe_last_error());
    CHECK(run(m, logits) == MOE_ERR_IO, "a second run after the error");
    /* opening a cache on a file too short for its experts is refused at once */
    CHECK(moe_model_set_mem_budget(m, "50%") == MOE_ERR_FORMAT && strstr(moe_last_error(), "outside"), "%s", moe_last_error());
    free(logits);
    moe_model_free(m);
    remove(path);
    remove(cut);
    TEST_END();
}

/* A model the memory check refuses loads when its experts are offloaded:
 * the check (with MOE_PHYSICAL_MEMORY pretending a small machine) then
 * counts the budget instead of the experts, and the logits are the mapped
 * run's. */
static void test_larger_than_memory(void) {
    TEST_CASE("offload: a model larger than memory loads with a budget (moe_model_load_with)");
    char path[256];
    th_tmp_path(path, sizeof path, "offload-big.gguf");
    layout L[8];
    layouts(L);
    moe_model *m = write_and_load(path, &L[0], DT_F32, 9);
    if (!m) { TEST_END(); return; }
    const size_t V = (size_t)m->cfg.vocab_size, ctx = 32;
    float *want = malloc(sizeof(float) * N_TOK * V), *got = malloc(sizeof(float) * N_TOK * V);
    CHECK(moe_model_set_context(m, (int)ctx) == MOE_OK && run(m, want) == MOE_OK, "%s", moe_last_error());
    const double weights = (double)gguf_data_size(m->file), experts = (double)model_expert_bytes(m);
    const double kv = (double)model_kv_bytes(&m->cfg, (int)ctx);
    moe_model_free(m);
    m = NULL;
    /* a machine where all weights do not fit in 90% but a quarter of the experts does */
    const double need_all = weights + kv, need_quarter = weights - 0.75 * experts + kv;
    CHECK(need_quarter < 0.85 * need_all, "experts are too small a part of this file to test with");
    char mem[32];
    snprintf(mem, sizeof mem, "%.0f", (need_all / 0.9 + need_quarter / 0.9) / 2);
    setenv("MOE_PHYSICAL_MEMORY", mem, 1);
    moe_load_options all = {.n_ctx = (int)ctx}, quarter = {.mem_budget = "25%", .n_ctx = (int)ctx};
    moe_status st = moe_model_load_with(&m, path, &all);
    CHECK(st == MOE_ERR_NOMEM && !m && strstr(moe_last_error(), "memory"), "all mapped: status %d: %s", st, moe_last_error());
    moe_model_free(m);
    m = NULL;
    st = moe_model_load_with(&m, path, &quarter);
    CHECK(st == MOE_OK && m && m->store, "a quarter of the experts: %s", moe_last_error());
    if (m) CHECK(run(m, got) == MOE_OK && !memcmp(want, got, sizeof(float) * N_TOK * V), "logits differ from the mapped run");
    unsetenv("MOE_PHYSICAL_MEMORY");
    moe_model_free(m);
    free(want);
    free(got);
    remove(path);
    TEST_END();
}

static void test_refusals(void) {
    TEST_CASE("offload: bad budgets and in-memory models are refused with a reason");
    char path[256];
    th_tmp_path(path, sizeof path, "offload-bad.gguf");
    layout L[8];
    layouts(L);
    moe_model *m = write_and_load(path, &L[0], DT_F32, 5);
    const char *bad[] = {"", "abc", "-1", "150%", "12X", "1.5.2G"};
    for (int i = 0; m && i < 6; i++)
        CHECK(moe_model_set_mem_budget(m, bad[i]) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "memory budget"),
              "'%s': %s", bad[i], moe_last_error());
    CHECK(!m || moe_model_set_offload_policy(m, "fifo", 0) == MOE_ERR_INVALID_ARG, "policy fifo accepted");
    CHECK(!m || moe_model_set_offload_prefetch(m, "yes") == MOE_ERR_INVALID_ARG, "prefetch yes accepted");
    CHECK(!m || (moe_model_set_mem_budget(m, "1M") == MOE_OK && m->store_budget == 1048576), "1M: %s", moe_last_error());
    moe_model_free(m);
    remove(path);
    moe_model *own = NULL;
    CHECK(moe_model_create(&own, &L[0].c, 1) == MOE_OK, "%s", moe_last_error());
    CHECK(!own || (moe_model_set_mem_budget(own, "50%") == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), "when loading")),
          "own model: %s", moe_last_error());
    CHECK(!own || moe_model_set_mem_budget(own, "0") == MOE_OK, "own model, budget 0: %s", moe_last_error());
    moe_model_free(own);
    TEST_END();
}

/* Expert parallelism: a store limited to experts [first, first + count)
 * has slots for those only, reads only those, and refuses the others
 * (recorded like a read error) without reading a byte. */
static void test_held_range(void) {
    TEST_CASE("offload: a store holding experts 1..2 of 4 reads only those and refuses the others");
    char path[256];
    th_tmp_path(path, sizeof path, "offload-range.bin");
    enum { EX = 4, SL = 128 }; /* per expert: gate, up, down slices of SL bytes */
    unsigned char bytes[3 * EX * SL];
    for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (unsigned char)(i * 7 + 3);
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(bytes, 1, sizeof bytes, f) == sizeof bytes && fclose(f) == 0, "writing %s", path);
    expert_store_layer lay = {.off = {0, EX * SL, 2 * EX * SL}, .bytes = {SL, SL, SL}};
    expert_store_opts o = {.policy = EXPERT_EVICT_LRU, .halflife = 1, .first = 1, .count = 2};
    expert_store *s = NULL;
    CHECK(expert_store_open(&s, path, &lay, 1, EX, 1 << 20, &o) == MOE_OK, "%s", moe_last_error());
    if (!s) { TEST_END(); return; }
    expert_store_stats st;
    expert_store_get_stats(s, &st);
    CHECK(st.n_slots == 2, "%d slots for 2 experts held", st.n_slots);
    const void *g, *u, *d;
    for (int e = 1; e <= 2; e++) {
        CHECK(expert_store_acquire(s, 0, e, 1, &g, &u, &d) == 0, "expert %d: %s", e, moe_last_error());
        CHECK(!memcmp(g, bytes + e * SL, SL) && !memcmp(u, bytes + (EX + e) * SL, SL) && !memcmp(d, bytes + (2 * EX + e) * SL, SL),
              "expert %d: wrong bytes", e);
        expert_store_release(s, 0, e);
    }
    expert_store_get_stats(s, &st);
    CHECK(st.bytes_read == 2 * 3 * SL, "read %lld bytes, want %d", (long long)st.bytes_read, 2 * 3 * SL);
    CHECK(expert_store_acquire(s, 0, 3, 1, &g, &u, &d) == -1, "expert 3 of another rank acquired");
    CHECK(expert_store_check(s) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "belongs to another rank"), "%s", moe_last_error());
    expert_store_get_stats(s, &st);
    CHECK(st.bytes_read == 2 * 3 * SL, "refusing read %lld bytes", (long long)st.bytes_read);
    expert_store_free(s);
    o.first = 3;
    CHECK(expert_store_open(&s, path, &lay, 1, EX, 1 << 20, &o) == MOE_ERR_INVALID_ARG, "experts 3..4 of 4 accepted");
    remove(path);
    TEST_END();
}

/* expert parallelism needs the job's ranks: one process refuses it, saying how */
static void test_ep_refused(void) {
    TEST_CASE("offload: --expert-parallel on one process is refused with the launch to use");
    char path[256];
    th_tmp_path(path, sizeof path, "offload-ep.gguf");
    layout L[8];
    layouts(L);
    moe_model *m = NULL;
    CHECK(arch_write_random(path, L[0].arch, &L[0].c, DT_F32, NULL, 3) == MOE_OK, "%s", moe_last_error());
    const moe_load_options o = {.expert_parallel = 2};
    CHECK(moe_model_load_with(&m, path, &o) == MOE_ERR_INVALID_ARG && !m && strstr(moe_last_error(), "must equal the job's 1 rank"),
          "%s", moe_last_error());
    moe_model_free(m);
    remove(path);
    TEST_END();
}

/* a store on a file of known bytes: byte i of the file is i * 7 + 3 */
static expert_store *pattern_store(const char *path, int n_slots, int prefetch) {
    enum { FILE_BYTES = 2 * 4 * 3 * 64 };
    unsigned char b[FILE_BYTES];
    for (int i = 0; i < FILE_BYTES; i++) b[i] = (unsigned char)(i * 7 + 3);
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(b, 1, sizeof b, f) == sizeof b && fclose(f) == 0, "writing %s", path);
    expert_store_layer layers[2];
    for (int l = 0; l < 2; l++)
        for (int k = 0; k < 3; k++) { layers[l].off[k] = (l * 3 + k) * 4 * 64; layers[l].bytes[k] = 64; }
    expert_store_opts o = {.policy = EXPERT_EVICT_LRU, .halflife = 8, .prefetch = prefetch};
    expert_store *s = NULL;
    CHECK(expert_store_open(&s, path, layers, 2, 4, (size_t)n_slots * 192, &o) == MOE_OK, "%s", moe_last_error());
    return s;
}

/* waits up to 5 s for the prefetch thread to have read n units */
static int64_t wait_prefetched(expert_store *s, int64_t n) {
    expert_store_stats st;
    for (int i = 0; i < 5000; i++) {
        expert_store_get_stats(s, &st);
        if (st.prefetched >= n) break;
        usleep(1000);
    }
    usleep(2000); /* and for its last read to land */
    expert_store_get_stats(s, &st);
    return st.prefetched;
}

/* The prefetch thread on its own: it reads what it is asked into free
 * slots (the bytes the file has), acquires then hit, it does not evict the
 * busy layer, a miss on a unit it evicted is counted, and freeing the store
 * with a request pending joins the thread (run under ASan and TSan). */
static void test_prefetch_thread(void) {
    TEST_CASE("offload: the prefetch thread fills, accounts and shuts down cleanly");
    char path[256];
    th_tmp_path(path, sizeof path, "offload-pattern.bin");
    expert_store *s = pattern_store(path, 3, 1);
    if (!s) { TEST_END(); return; }
    const int32_t all[4] = {0, 1, 2, 3};
    expert_store_prefetch(s, 1, all, 4, 0);
    CHECK(wait_prefetched(s, 3) == 3, "3 free slots, 4 asked: prefetched %lld", (long long)wait_prefetched(s, 3));
    const void *g, *u, *d;
    CHECK(expert_store_acquire(s, 1, 2, 1, &g, &u, &d) == 0, "acquire");
    const unsigned char *gb = g, *db = d;
    /* layer 1, expert 2: gate at (3 * 4 + 2) * 64, down at (5 * 4 + 2) * 64 */
    CHECK(gb[0] == (unsigned char)((14 * 64) * 7 + 3) && db[63] == (unsigned char)((22 * 64 + 63) * 7 + 3), "wrong bytes");
    expert_store_release(s, 1, 2);
    expert_store_stats st;
    expert_store_get_stats(s, &st);
    CHECK(st.hits == 1 && st.misses == 0 && st.prefetch_used == 1 && st.bytes_read == 3 * 192,
          "hits %lld misses %lld used %lld read %lld", (long long)st.hits, (long long)st.misses, (long long)st.prefetch_used,
          (long long)st.bytes_read);
    expert_store_free(s);

    /* two slots holding layer 0's experts 0 and 1 */
    s = pattern_store(path, 2, 1);
    if (!s) { TEST_END(); return; }
    for (int e = 0; e < 2; e++) {
        CHECK(expert_store_acquire(s, 0, e, 1, &g, &u, &d) == 0, "acquire");
        expert_store_release(s, 0, e);
    }
    expert_store_prefetch(s, 1, all, 2, 0); /* layer 0 busy: nothing may go */
    usleep(20000);
    expert_store_get_stats(s, &st);
    CHECK(st.prefetched == 0, "evicted the busy layer: %lld prefetched", (long long)st.prefetched);
    expert_store_prefetch(s, 1, all, 2, -1); /* nothing busy: both go */
    CHECK(wait_prefetched(s, 2) == 2, "prefetched %lld", (long long)wait_prefetched(s, 2));
    CHECK(expert_store_acquire(s, 0, 0, 1, &g, &u, &d) == 0, "acquire");
    expert_store_release(s, 0, 0);
    expert_store_get_stats(s, &st);
    CHECK(st.misses == 3 && st.prefetch_harm == 1, "misses %lld, harm %lld", (long long)st.misses, (long long)st.prefetch_harm);
    /* freed with a request in flight, many times over */
    expert_store_free(s);
    for (int i = 0; i < 50; i++) {
        s = pattern_store(path, 2, 1);
        if (!s) break;
        expert_store_prefetch(s, i % 2, all, 4, -1);
        expert_store_free(s);
    }
    remove(path);
    TEST_END();
}

int main(void) {
    layout L[8];
    const int n = layouts(L);
    for (int i = 0; i < n; i++) test_layout(&L[i], i % 2 ? DT_Q8_0 : DT_F32);
    test_layout(&L[0], DT_Q4_K);
    test_own("default", -1, "q4_0");
    test_own("deepseek-v2", -1, NULL);
    test_own("deepseek-v3", -1, "q8_0");
    test_own("olmoe", -1, NULL);
    test_own("switch", -1, NULL);
    test_own("tiny", MOE_ROUTING_EXPERT, NULL);
    test_own("tiny", MOE_ROUTING_SEQUENCE, NULL);
    test_warm_trace();
    test_truncated();
    test_larger_than_memory();
    test_refusals();
    test_held_range();
    test_ep_refused();
    test_prefetch_thread();
    TEST_MAIN_END();
}
