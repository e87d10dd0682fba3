/* Routing and balance at the model level: config keys (enum names), presets
 * and their parameter counts, the GGUF round trip of the new fields and of the
 * selection bias, and training with every option on: 1 vs 2 threads and
 * pause/resume bit-identical, the bias moved only by the balancing rule, the
 * JSONL metrics, and generation with expert-choice and sequence routing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "model/model.h"
#include "train/train.h"

static char dir[256], text_path[300];
static moe_tokenizer *tok;
static moe_dataset *data;

typedef struct { float loss[64]; int n; } loss_log;
static void on_progress(const moe_train_progress *p, void *u) {
    loss_log *l = u;
    if (l->n < 64) l->loss[l->n++] = p->loss;
}

/* tiny, with every routing and balance option on */
static moe_config all_on(void) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 300; c.d_model = 32; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.d_ff = 48; c.n_experts = 8; c.top_k = 2; c.d_expert = 16; c.max_seq = 32;
    c.router = MOE_ROUTER_SIGMOID; c.routed_scale = 2.0f; c.n_group = 4; c.topk_group = 2;
    c.router_jitter = 0.05f; c.n_shared_experts = 2; c.d_shared = 8; c.shared_gate = 1;
    c.seq_aux_coef = 1e-2f; c.expert_bias = 1; c.bias_rate = 0.01f;
    c.capacity_factor = 1.0f; c.eval_capacity_factor = 2.0f; c.overflow = MOE_OVERFLOW_SCORE;
    return c;
}

static moe_train_params params(const char *out, int steps) {
    moe_train_params p;
    moe_train_params_default(&p);
    p.steps = steps; p.batch = 4; p.seq = 16; p.lr = 1e-2f; p.warmup = 2; p.eval_every = 3;
    p.eval_batches = 2; p.out_path = out;
    return p;
}

static int train_run(const moe_config *c, const char *out, int steps, int stop_after, int threads,
                     const char *log_path, loss_log *log) {
    moe_model *m;
    if (moe_model_create(&m, c, 42)) { printf("  create: %s\n", moe_last_error()); return -1; }
    moe_train_params p = params(out, steps);
    p.stop_after = stop_after; p.threads = threads; p.log_path = log_path;
    log->n = 0;
    int rc = moe_train(m, data, &p, NULL, on_progress, log);
    if (rc) printf("  train: %s\n", moe_last_error());
    moe_model_free(m);
    return rc;
}

static int params_equal(const char *a, const char *b) {
    moe_model *ma, *mb;
    if (moe_model_load(&ma, a)) return 0;
    if (moe_model_load(&mb, b)) { moe_model_free(ma); return 0; }
    int eq = ma->n_params == mb->n_params && !memcmp(ma->params, mb->params, ma->n_params * 4);
    moe_model_free(ma); moe_model_free(mb);
    return eq;
}

static void test_config(void) {
    TEST_CASE("config: enum keys take names and numbers, describe prints names");
    moe_config c;
    moe_config_preset(&c, "default");
    CHECK(moe_config_set(&c, "router", "sigmoid") == MOE_OK && c.router == MOE_ROUTER_SIGMOID, "router=sigmoid");
    CHECK(moe_config_set(&c, "routing", "expert_choice") == MOE_OK && c.routing == MOE_ROUTING_EXPERT, "routing=expert_choice");
    CHECK(moe_config_set(&c, "routing", "2") == MOE_OK && c.routing == MOE_ROUTING_SEQUENCE, "routing=2");
    CHECK(moe_config_set(&c, "overflow", "score") == MOE_OK && c.overflow == MOE_OVERFLOW_SCORE, "overflow=score");
    CHECK(moe_config_set(&c, "router", "relu") != MOE_OK && strstr(moe_last_error(), "softmax"), "router=relu accepted");
    CHECK(moe_config_set(&c, "router", "7") != MOE_OK, "router=7 accepted");
    CHECK(moe_config_set(&c, "capacity_factor", "1.25") == MOE_OK && c.capacity_factor == 1.25f, "capacity_factor");
    char buf[8192];
    moe_config_describe(&c, buf, sizeof buf);
    CHECK(strstr(buf, "router               = sigmoid") && strstr(buf, "routing              = sequence"), "describe:\n%s", buf);
    moe_config_preset(&c, "default");
    c.n_group = 3;
    CHECK(moe_config_validate(&c) != MOE_OK, "n_group 3 with 8 experts accepted");
    c.n_group = 4; c.topk_group = 1; c.top_k = 3;
    CHECK(moe_config_validate(&c) != MOE_OK, "top_k 3 from one group of 2 accepted");
    c.top_k = 2;
    CHECK(moe_config_validate(&c) == MOE_OK, "groups 4 keep 1, top-2: %s", moe_last_error());
    TEST_END();

    TEST_CASE("presets: valid, and their models build");
    const char *const *names = moe_preset_names();
    for (int i = 0; names[i]; i++) {
        moe_config_preset(&c, names[i]);
        CHECK(moe_config_validate(&c) == MOE_OK, "%s: %s", names[i], moe_last_error());
        moe_param_counts pc = moe_config_param_counts(&c);
        if (pc.total < 100000000) {
            moe_model *m = NULL;
            CHECK(model_alloc(&m, &c) == MOE_OK && (int64_t)m->n_params == pc.total, "%s: model", names[i]);
            moe_model_free(m);
        }
    }
    TEST_END();

    TEST_CASE("presets: published shapes give the published parameter counts");
    moe_config_preset(&c, "mixtral-8x7b");
    moe_param_counts pc = moe_config_param_counts(&c);
    CHECK(pc.total == 46702792704LL && pc.active == 12879925248LL, "mixtral-8x7b %lld / %lld", (long long)pc.total, (long long)pc.active);
    moe_config_preset(&c, "olmoe-1b-7b"); /* published: 6.9B total, 1.3B active */
    pc = moe_config_param_counts(&c);
    CHECK(fabs(pc.total / 6.9e9 - 1) < 0.01 && fabs(pc.active / 1.3e9 - 1) < 0.02, "olmoe %lld / %lld", (long long)pc.total, (long long)pc.active);
    moe_config_preset(&c, "deepseek-v3-671b"); /* published 671B / 37B (our active count includes the whole embedding) */
    pc = moe_config_param_counts(&c);
    CHECK(fabs(pc.total / 671e9 - 1) < 0.01 && fabs(pc.active / 37e9 - 1) < 0.05 && pc.shared == 58LL * 3 * 7168 * 2048,
          "deepseek-v3 %lld / %lld, shared %lld", (long long)pc.total, (long long)pc.active, (long long)pc.shared);
    moe_config dn, mx;
    moe_config_preset(&dn, "dense");
    moe_config_preset(&mx, "mixtral");
    moe_param_counts a = moe_config_param_counts(&dn), b = moe_config_param_counts(&mx);
    /* equal FFN work per token; the MoE adds only its routers */
    CHECK(b.active - a.active == (int64_t)mx.n_layers * mx.d_model * mx.n_experts, "dense %lld vs mixtral %lld active", (long long)a.active, (long long)b.active);
    TEST_END();
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/moe_test_routing_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    snprintf(text_path, sizeof text_path, "%s/words.txt", dir);
    th_write_word_text(text_path, 3, 30, 250);
    char path[512], path2[512], path3[600], logp[600];

    test_config();

    TEST_CASE("tokenizer and dataset");
    {
        char **texts; size_t *lens; int n;
        const char *paths[] = {text_path};
        int rc = (int)moe_read_texts(paths, 1, &texts, &lens, &n);
        rc = rc ? rc : (int)moe_tokenizer_train(&tok, (const char *const *)texts, lens, n, 300);
        if (!rc) moe_free_texts(texts, lens, n);
        rc = rc ? rc : (int)moe_dataset_load_text(&data, tok, paths, 1);
        CHECK(rc == 0, "%s", moe_last_error());
        if (rc) { TEST_END(); TEST_MAIN_END(); }
    }
    TEST_END();

    moe_config c = all_on();
    TEST_CASE("all options: GGUF round trip keeps the config and the bias");
    {
        moe_model *m, *m2 = NULL;
        int rc = moe_model_create(&m, &c, 5);
        CHECK(rc == 0, "create: %s", moe_last_error());
        if (!rc) {
            int found = 0;
            for (int i = 0; i < m->n_tensors; i++)
                if (!strcmp(m->tensors[i].name, "blk.1.exp_probs_b.bias")) {
                    found = m->tensors[i].buffer;
                    for (size_t j = 0; j < m->tensors[i].size; j++) found &= m->params[m->tensors[i].offset + j] == 0.0f;
                    m->params[m->tensors[i].offset + 3] = 0.125f;
                }
            CHECK(found, "blk.1.exp_probs_b.bias missing, learned or not zero-initialised");
            snprintf(path, sizeof path, "%s/rt.gguf", dir);
            rc = moe_model_save(m, path);
            rc = rc ? rc : (int)moe_model_load(&m2, path);
            CHECK(rc == 0, "%s", moe_last_error());
            if (m2) {
                CHECK(!memcmp(&m2->cfg, &m->cfg, sizeof c), "config differs after the round trip");
                CHECK(m2->n_params == m->n_params && !memcmp(m2->params, m->params, 4 * m->n_params), "params differ");
                CHECK(F32(m2->w.layers[1].exp_bias)[3] == 0.125f, "bias not restored");
            }
        }
        moe_model_free(m); moe_model_free(m2);
    }
    TEST_END();

    TEST_CASE("all options: 1 and 2 threads give bit-identical training");
    {
        loss_log a, b;
        snprintf(path, sizeof path, "%s/t1.gguf", dir);
        snprintf(path2, sizeof path2, "%s/t2.gguf", dir);
        int rc = train_run(&c, path, 5, 0, 1, NULL, &a) | train_run(&c, path2, 5, 0, 2, NULL, &b);
        CHECK(rc == 0 && a.n == 5 && b.n == 5, "runs failed");
        CHECK(!memcmp(a.loss, b.loss, sizeof(float) * 5), "losses differ: %.9g vs %.9g", a.loss[4], b.loss[4]);
        CHECK(params_equal(path, path2), "final weights differ");
        moe_set_threads(0);
    }
    TEST_END();

    TEST_CASE("all options: pause and resume continue bit-identically (jitter RNG, bias)");
    {
        loss_log full, first, second;
        snprintf(path, sizeof path, "%s/full.gguf", dir);
        snprintf(path2, sizeof path2, "%s/half.gguf", dir);
        int rc = train_run(&c, path, 6, 0, 0, NULL, &full);
        rc |= train_run(&c, path2, 6, 3, 0, NULL, &first);
        CHECK(rc == 0 && first.n == 3, "first half: %d steps", first.n);
        moe_model *m = NULL;
        rc = moe_model_load(&m, path2);
        CHECK(rc == 0 && m && m->train_step == 3, "paused model");
        if (m) {
            moe_train_params p = params(path2, 6);
            snprintf(path3, sizeof path3, "%s.state", path2);
            second.n = 0;
            rc = moe_train(m, data, &p, path3, on_progress, &second);
            CHECK(rc == 0 && second.n == 3, "resume: %s", rc ? moe_last_error() : "wrong step count");
            CHECK(!memcmp(full.loss, first.loss, 12) && !memcmp(full.loss + 3, second.loss, 12),
                  "losses differ after resume: %.9g vs %.9g", full.loss[5], second.loss[2]);
            moe_model_free(m);
            CHECK(params_equal(path, path2), "final weights differ");
        }
    }
    TEST_END();

    TEST_CASE("the bias: no gradient, no AdamW, moved only by gamma * sign steps");
    {
        moe_model *m = NULL;
        int rc = moe_model_load(&m, path);
        CHECK(rc == 0, "%s", moe_last_error());
        if (m) {
            double worst = 0, total = 0;
            for (int l = 0; l < 2; l++)
                for (int e = 0; e < c.n_experts; e++) {
                    double q = F32(m->w.layers[l].exp_bias)[e] / c.bias_rate; /* whole steps */
                    worst = fmax(worst, fabs(q - nearbyint(q)));
                    total += fabs(F32(m->w.layers[l].exp_bias)[e]);
                    CHECK(fabs(q) <= 6.001, "bias moved %g steps in 6 optimizer steps", q);
                }
            CHECK(worst < 1e-3 && total > 0, "bias is not a sum of +-gamma steps (off by %g) or never moved", worst);
            /* a forward/backward leaves the bias gradient exactly zero */
            model_alloc_grads(m);
            int32_t t[32], g[32];
            for (int i = 0; i < 32; i++) { t[i] = (i * 7) % 300; g[i] = (i * 11) % 300; }
            moe_zero(m->grads, m->n_params);
            m->training = 1;
            rc = model_forward(m, t, g, 2, 16, NULL);
            model_backward(m, t, g, 1.0f);
            m->training = 0;
            int zero = 1;
            for (int i = 0; i < m->n_tensors; i++)
                if (m->tensors[i].buffer)
                    for (size_t j = 0; j < m->tensors[i].size; j++) zero &= m->grads[m->tensors[i].offset + j] == 0.0f;
            CHECK(rc == 0 && zero, "the bias got a gradient");
            moe_model_free(m);
        }
        /* with gamma 0 the bias stays exactly zero: AdamW never touches it */
        moe_config c0 = c;
        c0.bias_rate = 0;
        loss_log l0;
        snprintf(path3, sizeof path3, "%s/frozen.gguf", dir);
        rc = train_run(&c0, path3, 3, 0, 0, NULL, &l0);
        m = NULL;
        if (!rc) rc = moe_model_load(&m, path3);
        CHECK(rc == 0 && m, "frozen run");
        if (m) {
            int zero = 1;
            for (int l = 0; l < 2; l++)
                for (int e = 0; e < c.n_experts; e++) zero &= F32(m->w.layers[l].exp_bias)[e] == 0.0f;
            CHECK(zero, "bias moved with bias_rate 0");
            moe_model_free(m);
        }
    }
    TEST_END();

    TEST_CASE("JSONL log has the routing metrics");
    {
        loss_log l;
        snprintf(path, sizeof path, "%s/log.gguf", dir);
        snprintf(logp, sizeof logp, "%s/log.jsonl", dir);
        moe_config cl = c;
        cl.capacity_factor = 0.5f; /* guaranteed drops */
        int rc = train_run(&cl, path, 3, 0, 0, logp, &l);
        CHECK(rc == 0, "train");
        FILE *f = fopen(logp, "r");
        char buf[16384];
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        buf[n] = 0;
        if (f) fclose(f);
        const char *keys[] = {"\"step\":1,", "\"loss\":", "\"lr\":", "\"tokens_per_s\":", "\"load\":[[",
                              "\"maxvio\":[", "\"entropy\":[", "\"router_entropy\":[", "\"dead\":[",
                              "\"drop\":[", "\"layer_aux\":[", "\"layer_z\":[", "\"layer_seq_aux\":[",
                              "\"seq_aux\":", "\"val_loss\":", "\"val_maxvio\":["};
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) CHECK(strstr(buf, keys[i]), "no %s in the log", keys[i]);
        CHECK(!strstr(buf, "\"drop\":[0,0]"), "capacity 0.5 dropped nothing");
    }
    TEST_END();

    TEST_CASE("expert-choice and sequence routing: train (1 = 2 threads) and generate");
    for (int mode = MOE_ROUTING_EXPERT; mode <= MOE_ROUTING_SEQUENCE; mode++) {
        moe_config ce = c;
        ce.routing = mode;
        ce.n_group = 1; ce.topk_group = 1;
        loss_log l, l2;
        snprintf(path, sizeof path, "%s/mode%d.gguf", dir, mode);
        snprintf(path2, sizeof path2, "%s/mode%d-2.gguf", dir, mode);
        int rc = train_run(&ce, path, 3, 0, 1, NULL, &l);
        rc |= train_run(&ce, path2, 3, 0, 2, NULL, &l2);
        moe_set_threads(0);
        CHECK(rc == 0 && l.n == 3, "mode %d: training", mode);
        CHECK(rc == 0 && !memcmp(l.loss, l2.loss, 12) && params_equal(path, path2), "mode %d: 1 and 2 threads differ", mode);
        moe_model *m = NULL;
        if (!rc) rc = moe_model_load(&m, path);
        if (m) {
            moe_model_set_tokenizer(m, NULL);
            float logits[300];
            int ok = 1;
            for (int pos = 0; pos < 6 && ok; pos++) {
                ok = model_decode(m, (pos * 13) % 300, pos, logits) == MOE_OK;
                for (int i = 0; i < 300 && ok; i++) ok = isfinite(logits[i]);
            }
            CHECK(ok, "mode %d: decoding: %s", mode, moe_last_error());
            moe_model_free(m);
        }
    }
    TEST_END();

    moe_dataset_free(data);
    moe_tokenizer_free(tok);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
