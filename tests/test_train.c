/* Training: checkpoint round trip, resume equivalence, thread-count
 * determinism, learning progress, and clean errors on bad input. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "io/gguf.h"
#include "model/model.h"
#include "train/train.h"

static char dir[256];
static char text_path[300];

typedef struct { float loss[64]; int n; } loss_log;
static void on_progress(const moe_train_progress *p, void *u) {
    loss_log *l = u;
    if (l->n < 64) l->loss[l->n++] = p->loss;
}

static moe_tokenizer *tok;
static moe_dataset *data;

/* the blocks an evaluation reports (moe_evaluate_full's block_fn) */
enum { MAX_BLOCKS = 4096 };
typedef struct { double s[MAX_BLOCKS]; size_t c[MAX_BLOCKS]; int n; } block_log;
static void on_block(double loss_sum, size_t targets, void *user) {
    block_log *b = user;
    if (b->n < MAX_BLOCKS) { b->s[b->n] = loss_sum; b->c[b->n] = targets; }
    b->n++;
}

static int tiny_matmul = MOE_MATMUL_FP32; /* precision of the models train_run makes */

static moe_config tiny(void) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 300; c.d_model = 32; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.d_ff = 48; c.n_experts = 4; c.top_k = 2; c.d_expert = 32; c.max_seq = 32;
    c.matmul = tiny_matmul;
    return c;
}

static moe_train_params params(const char *out, int steps) {
    moe_train_params p;
    moe_train_params_default(&p);
    p.steps = steps; p.batch = 4; p.seq = 16; p.lr = 1e-2f; p.warmup = 2; p.eval_every = 4;
    p.eval_batches = 2; p.out_path = out;
    return p;
}

/* trains from scratch; returns 0 on success */
static int train_run(const char *out, int steps, int stop_after, int threads, loss_log *log) {
    moe_config c = tiny();
    moe_model *m;
    if (moe_model_create(&m, &c, 42)) return -1;
    moe_train_params p = params(out, steps);
    p.stop_after = stop_after; p.threads = threads;
    log->n = 0;
    int rc = moe_train(m, data, &p, NULL, on_progress, log);
    if (rc) printf("  train: %s\n", moe_last_error());
    moe_model_free(m);
    return rc;
}

/* progress callback of the stop and time-based-save cases: logs losses,
 * requests a stop after step stop_at, and records the step of the checkpoint
 * file (out) as each step begins reporting (-1: no file yet) */
typedef struct { loss_log log; int stop_at; const char *out; int saved_step[64]; } stop_probe;
static void on_progress_stop(const moe_train_progress *p, void *u) {
    stop_probe *s = u;
    on_progress(p, &s->log);
    if (s->out && p->step < 64) {
        moe_model *m = NULL;
        s->saved_step[p->step] = access(s->out, F_OK) == 0 && moe_model_load(&m, s->out) == MOE_OK ? m->train_step : -1;
        moe_model_free(m);
    }
    if (p->step == s->stop_at) moe_request_stop();
}

static int params_equal(const char *a, const char *b) {
    moe_model *ma, *mb;
    if (moe_model_load(&ma, a)) return 0;
    if (moe_model_load(&mb, b)) { moe_model_free(ma); return 0; }
    int eq = ma->n_params == mb->n_params && !memcmp(ma->params, mb->params, ma->n_params * 4);
    moe_model_free(ma); moe_model_free(mb);
    return eq;
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/moe_test_train_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    snprintf(text_path, sizeof text_path, "%s/words.txt", dir);
    th_write_word_text(text_path, 1, 40, 300);
    char path[512], path2[512], path3[600];

    TEST_CASE("tokenizer and dataset from a text file");
    {
        char **texts; size_t *lens; int n;
        const char *paths[] = {text_path};
        int rc = (int)moe_read_texts(paths, 1, &texts, &lens, &n);
        CHECK(rc == 0, "%s", moe_last_error());
        rc = rc ? rc : (int)moe_tokenizer_train(&tok, (const char *const *)texts, lens, n, 300);
        CHECK(rc == 0, "%s", moe_last_error());
        moe_free_texts(texts, lens, n);
        rc = rc ? rc : (int)moe_dataset_load_text(&data, tok, paths, 1);
        CHECK(rc == 0, "%s", moe_last_error());
        if (rc) { TEST_END(); TEST_MAIN_END(); }
        CHECK(moe_dataset_tokens(data, 1) > 0 && moe_dataset_tokens(data, 0) > 10 * moe_dataset_tokens(data, 1) / 2,
              "train %zu val %zu", moe_dataset_tokens(data, 0), moe_dataset_tokens(data, 1));
    }
    TEST_END();

    TEST_CASE("model_adamw in one parallel region: the bits of adamw_update per tensor");
    {
        moe_config c;
        moe_config_preset(&c, "tiny"); /* > 65536 parameters: the parallel path */
        moe_model *m = NULL;
        int rc = (int)moe_model_create(&m, &c, 7);
        rc = rc ? rc : (int)model_alloc_grads(m);
        CHECK(rc == 0, "%s", moe_last_error());
        size_t n = rc ? 0 : m->n_params;
        float *buf = n ? malloc(n * sizeof(float) * 7) : NULL;
        if (buf && n > 65536) {
            float *am = buf, *av = buf + n, *p2 = buf + 2 * n, *g2 = buf + 3 * n;
            float *m2 = buf + 4 * n, *v2 = buf + 5 * n, *g0 = buf + 6 * n;
            moe_rng st;
            moe_rng_seed(&st, 99);
            for (size_t i = 0; i < n; i++) {
                g0[i] = m->grads[i] = moe_rng_normal(&st) * 1e-2f;
                am[i] = m2[i] = moe_rng_normal(&st) * 1e-3f;
                av[i] = v2[i] = fabsf(moe_rng_normal(&st)) * 1e-5f;
            }
            memcpy(p2, m->params, n * sizeof(float));
            memcpy(g2, m->grads, n * sizeof(float));
            int decayed = -1; /* one decayed element, checked by hand below */
            for (int i = 0; i < m->n_tensors && decayed < 0; i++)
                if (!m->tensors[i].buffer && m->tensors[i].decay) decayed = i;
            size_t e = decayed >= 0 ? m->tensors[decayed].offset + 1 : 0;
            double p0 = m->params[e], m0 = am[e], v0 = av[e];
            moe_train_params tp;
            moe_train_params_default(&tp);
            const float lr = 3e-3f, gs = 0.75f;
            const int t = 3;
            omp_set_num_threads(2);
            model_adamw(m, am, av, lr, &tp, t, gs);
            omp_set_num_threads(1);
            for (int i = 0; i < m->n_tensors; i++) {
                const tensor_desc *td = &m->tensors[i];
                if (td->buffer) continue;
                size_t o = td->offset;
                adamw_update(p2 + o, g2 + o, m2 + o, v2 + o, td->size, lr, tp.beta1, tp.beta2,
                             tp.adam_eps, td->decay ? tp.weight_decay : 0.0f, t, gs);
            }
            omp_set_num_threads(omp_get_num_procs());
            CHECK(!memcmp(m->params, p2, n * sizeof(float)) && !memcmp(m->grads, g2, n * sizeof(float)) &&
                  !memcmp(am, m2, n * sizeof(float)) && !memcmp(av, v2, n * sizeof(float)),
                  "params, grads or moments differ from adamw_update");
            /* the decayed element by hand, in double: AdamW with bias correction */
            CHECK(decayed >= 0, "no decayed tensor");
            if (decayed >= 0) {
                double b1 = tp.beta1, b2 = tp.beta2, g = (double)g0[e] * gs;
                double mt = b1 * m0 + (1 - b1) * g, vt = b2 * v0 + (1 - b2) * g * g;
                double mh = mt / (1 - pow(b1, t)), vh = vt / (1 - pow(b2, t));
                double want = p0 * (1 - (double)lr * tp.weight_decay) - lr * mh / (sqrt(vh) + tp.adam_eps);
                CHECK(fabs(m->params[e] - want) <= 1e-6 * fabs(want) + 1e-9 && m->grads[e] == 0.0f,
                      "param %.9g, by hand %.9g", m->params[e], want);
            }
        }
        free(buf);
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("checkpoint save and load are bit-exact");
    {
        moe_config c = tiny();
        moe_model *m, *m2 = NULL;
        moe_model_create(&m, &c, 5);
        moe_tokenizer *t2;
        snprintf(path, sizeof path, "%s/tok.gguf", dir);
        CHECK(moe_tokenizer_save(tok, path) == 0, "%s", moe_last_error());
        CHECK(moe_tokenizer_load(&t2, path) == 0, "%s", moe_last_error());
        moe_model_set_tokenizer(m, t2);
        snprintf(path, sizeof path, "%s/m.gguf", dir);
        CHECK(moe_model_save(m, path) == 0, "%s", moe_last_error());
        CHECK(moe_model_load(&m2, path) == 0, "%s", moe_last_error());
        if (m2) {
            CHECK(!memcmp(&m->cfg, &m2->cfg, sizeof m->cfg), "config differs");
            CHECK(m->n_params == m2->n_params && !memcmp(m->params, m2->params, m->n_params * 4), "weights differ");
            CHECK(m2->tok && moe_tokenizer_vocab_size(m2->tok) == moe_tokenizer_vocab_size(tok), "tokenizer missing");
        }
        CHECK(access(path, F_OK) == 0, "file missing");
        snprintf(path2, sizeof path2, "%s/m.gguf.tmp", dir);
        CHECK(access(path2, F_OK) != 0, "temporary file left behind");
        moe_model_free(m); moe_model_free(m2);
    }
    TEST_END();

    for (int prec = 0; prec < 2; prec++) {
        TEST_CASE(prec ? "KV-cached decoding matches the full forward pass (matmul=bf16)"
                       : "KV-cached decoding matches the full forward pass");
        {
            moe_config c = tiny();
            c.matmul = prec ? MOE_MATMUL_BF16 : MOE_MATMUL_FP32;
            c.moe_first_dense = 1; /* one dense and one MoE layer */
            moe_model *m;
            moe_model_create(&m, &c, 11);
            int32_t toks[16];
            for (int i = 0; i < 16; i++) toks[i] = (int32_t)((i * 37 + 5) % c.vocab_size);
            CHECK(model_forward(m, toks, NULL, 1, 16, NULL) == 0, "%s", moe_last_error());
            float *full = malloc(sizeof(float) * 16 * c.vocab_size), *one = malloc(sizeof(float) * c.vocab_size);
            memcpy(full, m->acts.logits, sizeof(float) * 16 * c.vocab_size);
            double worst = 0;
            for (int t = 0; t < 16; t++) {
                CHECK(model_decode(m, toks[t], t, one) == 0, "%s", moe_last_error());
                worst = fmax(worst, th_max_rel_err(one, full + (size_t)t * c.vocab_size, c.vocab_size, 1e-2));
            }
            CHECK(worst < 1e-4, "decode differs from forward by %g", worst);
            CHECK(model_decode(m, toks[0], c.max_seq, one) == MOE_ERR_INVALID_ARG, "position past the context accepted");
            free(full); free(one);
            moe_model_free(m);
        }
        TEST_END();
    }

    TEST_CASE("training lowers the loss");
    {
        loss_log a;
        snprintf(path, sizeof path, "%s/learn.gguf", dir);
        int rc = train_run(path, 24, 0, 0, &a);
        CHECK(rc == 0 && a.n == 24, "rc %d, %d steps", rc, a.n);
        CHECK(a.n == 24 && a.loss[23] < a.loss[0] - 1.0f, "loss %g -> %g", a.loss[0], a.loss[a.n - 1]);
    }
    TEST_END();

    TEST_CASE("1 thread and 2 threads give bit-identical losses");
    {
        loss_log a, b;
        snprintf(path, sizeof path, "%s/t1.gguf", dir);
        snprintf(path2, sizeof path2, "%s/t2.gguf", dir);
        int rc = train_run(path, 6, 0, 1, &a) | train_run(path2, 6, 0, 2, &b);
        CHECK(rc == 0 && a.n == 6 && b.n == 6, "runs failed");
        CHECK(!memcmp(a.loss, b.loss, sizeof(float) * 6), "losses differ: %.9g vs %.9g", a.loss[5], b.loss[5]);
        CHECK(params_equal(path, path2), "final weights differ");
        moe_set_threads(0);
    }
    TEST_END();

    TEST_CASE("matmul=bf16 trains close to fp32, 1 = 2 threads, kept in the checkpoint");
    {
        loss_log f, a, b;
        snprintf(path, sizeof path, "%s/f32.gguf", dir);
        int rc = train_run(path, 24, 0, 0, &f);
        tiny_matmul = MOE_MATMUL_BF16;
        snprintf(path, sizeof path, "%s/b1.gguf", dir);
        snprintf(path2, sizeof path2, "%s/b2.gguf", dir);
        rc |= train_run(path, 24, 0, 1, &a) | train_run(path2, 24, 0, 2, &b);
        tiny_matmul = MOE_MATMUL_FP32;
        moe_set_threads(0);
        CHECK(rc == 0 && f.n == 24 && a.n == 24 && b.n == 24, "runs failed");
        CHECK(!memcmp(a.loss, b.loss, sizeof(float) * 24), "bf16 losses differ between 1 and 2 threads");
        CHECK(params_equal(path, path2), "bf16 final weights differ between 1 and 2 threads");
        /* Same initial weights: the first loss differs only by bf16 rounding of
         * the matmul inputs (relative 2^-9 per value, averaging out). After
         * that the two runs follow different trajectories (lr 1e-2), so later
         * steps are only asked to learn as much. */
        int same = 1;
        for (int i = 0; i < 24 && rc == 0; i++) same &= a.loss[i] == f.loss[i];
        double first = fabs(a.loss[0] - f.loss[0]) / f.loss[0];
        double last = fabs(a.loss[23] - f.loss[23]) / f.loss[23];
        printf("  first loss %.6f (bf16) vs %.6f (fp32); after 24 steps %.4f vs %.4f\n",
               a.loss[0], f.loss[0], a.loss[23], f.loss[23]);
        CHECK(!same, "bf16 losses equal fp32 bit for bit: the precision was not applied");
        CHECK(first < 1e-4, "first bf16 loss differs from fp32 by %.3g (relative)", first);
        CHECK(a.loss[23] < a.loss[0] - 1.0f && last < 0.05, "bf16 run learned %g -> %g (fp32 %g)",
              a.loss[0], a.loss[23], f.loss[23]);
        moe_model *m;
        CHECK(moe_model_load(&m, path) == MOE_OK && m->cfg.matmul == MOE_MATMUL_BF16,
              "the checkpoint lost matmul=bf16");
        if (m) moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("pause and resume continue bit-identically");
    {
        loss_log full, first, second;
        snprintf(path, sizeof path, "%s/full.gguf", dir);
        snprintf(path2, sizeof path2, "%s/half.gguf", dir);
        int rc = train_run(path, 8, 0, 0, &full);
        rc |= train_run(path2, 8, 4, 0, &first);
        CHECK(rc == 0 && first.n == 4, "first half: %d steps", first.n);
        moe_model *m = NULL;
        rc = moe_model_load(&m, path2);
        CHECK(rc == 0 && m->train_step == 4, "paused model at step %d", m ? m->train_step : -1);
        if (m) {
            moe_train_params p = params(path2, 8);
            snprintf(path3, sizeof path3, "%s.state", path2);
            second.n = 0;
            rc = moe_train(m, data, &p, path3, on_progress, &second);
            CHECK(rc == 0 && second.n == 4, "resume: %s", rc ? moe_last_error() : "wrong step count");
            CHECK(!memcmp(full.loss, first.loss, 16) && !memcmp(full.loss + 4, second.loss, 16),
                  "losses differ after resume: %.9g vs %.9g", full.loss[7], second.loss[3]);
            moe_model_free(m);
            CHECK(params_equal(path, path2), "final weights differ");
        }
    }
    TEST_END();

    TEST_CASE("a stop request saves after the current step; resuming continues bit-identically");
    {
        loss_log full;
        snprintf(path, sizeof path, "%s/stopfull.gguf", dir);
        snprintf(path2, sizeof path2, "%s/stopped.gguf", dir);
        snprintf(path3, sizeof path3, "%s.state", path2);
        int rc = train_run(path, 8, 0, 0, &full);
        moe_config c = tiny();
        moe_model *m = NULL;
        rc |= moe_model_create(&m, &c, 42);
        stop_probe probe = {.stop_at = 3};
        moe_train_params p = params(path2, 8);
        if (!rc) rc = moe_train(m, data, &p, NULL, on_progress_stop, &probe);
        CHECK(rc == MOE_ERR_INTERRUPTED && probe.log.n == 3 && strstr(moe_last_error(), "after step 3 of 8"),
              "status %d after %d steps: %s", rc, probe.log.n, moe_last_error());
        moe_model_free(m);
        m = NULL;
        CHECK(moe_model_load(&m, path2) == MOE_OK && m->train_step == 3, "the checkpoint is not at step 3");
        CHECK(access(path3, F_OK) == 0, "no training state after the stop");
        if (m) {
            loss_log second = {.n = 0};
            rc = moe_train(m, data, &p, path3, on_progress, &second); /* the request was cleared */
            CHECK(rc == MOE_OK && second.n == 5, "resume: %s (%d steps)", rc ? moe_last_error() : "ok", second.n);
            CHECK(!memcmp(full.loss, probe.log.loss, 3 * sizeof(float)) && !memcmp(full.loss + 3, second.loss, 5 * sizeof(float)),
                  "losses differ after the stop and resume");
            moe_model_free(m);
            CHECK(params_equal(path, path2), "final weights differ from the uninterrupted run");
        }
        /* a request before the first step: nothing trained, nothing written */
        snprintf(path2, sizeof path2, "%s/never.gguf", dir);
        m = NULL;
        moe_model_create(&m, &c, 42);
        p = params(path2, 8);
        moe_request_stop();
        loss_log none = {.n = 0};
        rc = moe_train(m, data, &p, NULL, on_progress, &none);
        CHECK(rc == MOE_ERR_INTERRUPTED && none.n == 0 && access(path2, F_OK) != 0,
              "status %d, %d steps, file %s", rc, none.n, access(path2, F_OK) == 0 ? "written" : "absent");
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("save_minutes checkpoints on a time interval, and only then");
    {
        for (int timed = 0; timed < 2; timed++) {
            snprintf(path, sizeof path, "%s/timed%d.gguf", dir, timed);
            moe_config c = tiny();
            moe_model *m = NULL;
            moe_model_create(&m, &c, 42);
            stop_probe probe = {.stop_at = -1, .out = path};
            moe_train_params p = params(path, 6);
            p.save_minutes = timed ? 1e-9f : 0; /* 60 ns: due after every step */
            int rc = moe_train(m, data, &p, NULL, on_progress_stop, &probe);
            CHECK(rc == MOE_OK && probe.log.n == 6, "status %d: %s", rc, moe_last_error());
            for (int step = 2; step <= 6; step++)
                CHECK(probe.saved_step[step] == (timed ? step - 1 : -1), "save_minutes %s: at step %d the file holds step %d",
                      timed ? "1e-9" : "0", step, probe.saved_step[step]);
            moe_model_free(m);
        }
        moe_train_params p;
        moe_train_params_default(&p);
        CHECK(p.save_minutes == 10, "default save_minutes %g", (double)p.save_minutes);
    }
    TEST_END();

    TEST_CASE("an evaluation stops after a batch on request, with the partial result");
    {
        moe_config c = tiny();
        moe_model *m = NULL;
        moe_model_create(&m, &c, 42);
        double all = 0, part = -1;
        size_t n_all = 0, n_part = 0;
        int rc = moe_evaluate(m, data, 16, 0, 1, &all, &n_all);
        moe_request_stop();
        int rc2 = moe_evaluate(m, data, 16, 0, 1, &part, &n_part);
        CHECK(rc == MOE_OK && rc2 == MOE_ERR_INTERRUPTED, "status %d then %d", rc, rc2);
        /* one batch: 8 windows of 16 positions, each 15 or 16 targets */
        CHECK(n_part > 0 && n_part <= 8 * 16 && n_part < n_all && isfinite(part) && part > 0,
              "partial: %zu of %zu tokens, loss %g", n_part, n_all, part);
        rc = moe_evaluate(m, data, 16, 0, 1, &part, &n_part);
        CHECK(rc == MOE_OK && n_part == n_all && part == all, "after the stop: status %d, %zu tokens", rc, n_part);
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("an evaluation's standard error over blocks: its blocks, recomputed in two passes");
    {
        moe_config c = tiny();
        moe_model *m = NULL;
        moe_model_create(&m, &c, 42);
        double plain = 0;
        size_t n_plain = 0;
        CHECK(moe_evaluate(m, data, 16, 0, 1, &plain, &n_plain) == MOE_OK, "%s", moe_last_error());
        block_log bl = {0};
        moe_eval_result r;
        CHECK(moe_evaluate_full(m, data, 16, 1, &r, NULL, NULL, NULL, on_block, &bl) == MOE_OK, "%s", moe_last_error());
        CHECK(r.loss == plain && r.tokens == n_plain && r.block_tokens == 8 * 16 && r.blocks == (size_t)bl.n && bl.n >= 32,
              "loss %.17g vs %.17g, %zu vs %zu tokens, %zu blocks of %zu (logged %d)", r.loss, plain, r.tokens, n_plain,
              r.blocks, r.block_tokens, bl.n);
        /* the blocks add up to the loss, in the order the evaluation adds them */
        double S = 0, C = 0;
        for (int i = 0; i < bl.n; i++) { S += bl.s[i]; C += (double)bl.c[i]; }
        CHECK(S / C == r.loss && (size_t)C == r.tokens, "blocks: %.17g over %g", S / C, C);
        /* two passes, by definition: sqrt(n/(n-1) * sum (s_b - mean c_b)^2) / C, over
         * the blocks and over groups of 16 of them (the last group shorter) */
        for (int wide = 0; wide < 2; wide++) {
            const int g = wide ? 16 : 1;
            double gs[MAX_BLOCKS], gc[MAX_BLOCKS], acc = 0;
            int ng = 0;
            for (int i = 0; i < bl.n; i += g, ng++) {
                gs[ng] = gc[ng] = 0;
                for (int j = i; j < bl.n && j < i + g; j++) { gs[ng] += bl.s[j]; gc[ng] += (double)bl.c[j]; }
            }
            for (int k = 0; k < ng; k++) acc += (gs[k] - r.loss * gc[k]) * (gs[k] - r.loss * gc[k]);
            const double want = sqrt(acc * ng / (ng - 1)) / C, got = wide ? r.se_wide : r.se_block;
            CHECK(fabs(got - want) <= 1e-9 * want && want > 0, "%s: %.17g, two passes %.17g", wide ? "wide" : "blocks", got, want);
        }
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("broken checkpoints fail cleanly");
    {
        snprintf(path, sizeof path, "%s/full.gguf", dir);
        FILE *f = fopen(path, "rb");
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *buf = malloc(size);
        CHECK(fread(buf, 1, size, f) == (size_t)size, "read");
        fclose(f);
        moe_model *m = NULL;
        snprintf(path2, sizeof path2, "%s/broken.gguf", dir);
        long cuts[] = {0, 3, 20, size / 3, size / 2, size - 1};
        for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
            f = fopen(path2, "wb"); fwrite(buf, 1, cuts[i], f); fclose(f);
            int rc = moe_model_load(&m, path2);
            CHECK(rc == MOE_ERR_FORMAT && m == NULL, "truncated to %ld bytes: status %d", cuts[i], rc);
        }
        buf[0] = 'X';
        f = fopen(path2, "wb"); fwrite(buf, 1, size, f); fclose(f);
        int rc = moe_model_load(&m, path2);
        CHECK(rc == MOE_ERR_FORMAT && strstr(moe_last_error(), "magic"), "bad magic: %d %s", rc, moe_last_error());
        rc = moe_model_load(&m, "/nonexistent/model.gguf");
        CHECK(rc == MOE_ERR_IO, "missing file: %d", rc);
        snprintf(path3, sizeof path3, "%s/full.gguf.state", dir);
        f = fopen(path3, "r+b"); fseek(f, 100, SEEK_SET); fputc(0x55, f); fclose(f);
        moe_model *mm;
        moe_model_load(&mm, path);
        moe_train_params p = params(path, 8);
        rc = moe_train(mm, data, &p, path3, NULL, NULL);
        CHECK(rc == MOE_ERR_FORMAT, "corrupt state accepted: %d", rc);
        moe_model_free(mm);
        free(buf);
        /* a small file whose config claims a big model (fuzzing found a 12 KB
         * file asking for 12.9 GB): refused before anything is allocated */
        moe_config big;
        moe_config_preset(&big, "default");
        big.d_model = 1024; big.n_heads = 8; big.n_kv_heads = 8; big.d_expert = 4096; big.n_experts = 4;
        gguf_writer *w = gguf_writer_create();
        char key[96];
        for (int i = 0; w && i < moe_config_n_fields(); i++) {
            int is_float;
            const char *name = moe_config_field(i, &is_float);
            snprintf(key, sizeof key, "moe.%s", name);
            double v = moe_config_get_field(&big, i);
            if (is_float) gguf_set_f32(w, key, (float)v); else gguf_set_i32(w, key, (int32_t)v);
        }
        float small[64] = {0};
        int64_t ne[1] = {64};
        snprintf(path2, sizeof path2, "%s/claims_big.gguf", dir);
        CHECK(w && gguf_add_tensor(w, "token_embd.weight", GGML_TYPE_F32, 1, ne, small) == MOE_OK &&
                  gguf_write_file(w, path2) == MOE_OK, "writing the test file");
        gguf_writer_free(w);
        size_t peak0 = moe_alloc_peak();
        m = NULL;
        rc = moe_model_load(&m, path2);
        CHECK(rc == MOE_ERR_FORMAT && m == NULL && strstr(moe_last_error(), "holds only"),
              "config larger than the file's data: status %d (%s)", rc, moe_last_error());
        CHECK(moe_alloc_peak() - peak0 < ((size_t)64 << 20), "allocated %zu MB before refusing",
              (moe_alloc_peak() - peak0) >> 20);
    }
    TEST_END();

    TEST_CASE("impossible configs are refused with the reason");
    {
        moe_config c = tiny();
        moe_model *m = NULL;
        c.top_k = 5;
        CHECK(moe_model_create(&m, &c, 1) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "top_k"), "%s", moe_last_error());
        c = tiny(); c.n_heads = 5;
        CHECK(moe_model_create(&m, &c, 1) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "n_heads"), "%s", moe_last_error());
        c = tiny(); c.n_kv_heads = 3;
        CHECK(moe_model_create(&m, &c, 1) == MOE_ERR_INVALID_ARG, "n_kv_heads 3 accepted");
        CHECK(moe_config_set(&c, "no_such_key", "1") == MOE_ERR_INVALID_ARG, "unknown key accepted");
        CHECK(moe_config_set(&c, "d_model", "12x") == MOE_ERR_INVALID_ARG, "bad number accepted");
        CHECK(m == NULL, "model created");
        /* unused sizes must still be sane (fuzzing: a negative d_ff in an all-MoE
         * model overflowed the decoder's scratch size) ... */
        c = tiny(); c.moe_first_dense = 0; c.d_ff = -5;
        CHECK(moe_model_create(&m, &c, 1) == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "d_ff"), "%s", moe_last_error());
        /* ... and a huge unused d_ff costs nothing when decoding */
        c.d_ff = 2000000000;
        CHECK(moe_model_create(&m, &c, 1) == MOE_OK, "%s", moe_last_error());
        size_t peak0 = moe_alloc_peak();
        int32_t prompt[1] = {1};
        moe_sample_params greedy = {.max_tokens = 2, .temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
        CHECK(m && moe_generate(m, prompt, 1, &greedy, NULL, NULL) == MOE_OK, "%s", moe_last_error());
        CHECK(moe_alloc_peak() - peak0 < ((size_t)64 << 20), "decoding allocated %zu MB", (moe_alloc_peak() - peak0) >> 20);
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("empty data is refused");
    {
        snprintf(path, sizeof path, "%s/empty.txt", dir);
        fclose(fopen(path, "w"));
        const char *paths[] = {path};
        moe_dataset *d = NULL;
        int rc = moe_dataset_load_text(&d, tok, paths, 1);
        CHECK(rc == MOE_ERR_INVALID_ARG && d == NULL, "status %d", rc);
        char **t; size_t *l; int n;
        CHECK(moe_read_texts(paths, 1, &t, &l, &n) == MOE_ERR_INVALID_ARG, "read_texts accepted empty data");
    }
    TEST_END();

    TEST_CASE("a failed save keeps the previous file");
    {
        moe_config c = tiny();
        moe_model *m;
        moe_model_create(&m, &c, 3);
        snprintf(path, sizeof path, "%s/missing_dir/x.gguf", dir);
        CHECK(moe_model_save(m, path) == MOE_ERR_IO, "save into a missing directory: %s", moe_last_error());
        moe_model_free(m);
    }
    TEST_END();

    moe_dataset_free(data);
    moe_tokenizer_free(tok);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
