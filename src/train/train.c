/* train: the training loop, evaluation, the JSONL log and the training-state
 * file that makes a paused run continue bit-identically. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/dataset.h"
#include "io/gguf.h"
#include "train/train.h"

void moe_train_params_default(moe_train_params *p) {
    memset(p, 0, sizeof *p);
    p->steps = 600;
    p->batch = 16;
    p->seq = 128;
    p->grad_accum = 1;
    p->lr = 2e-3f;
    p->min_lr_frac = 0.1f;
    p->warmup = -1; /* -1: min(100, steps / 10) */
    p->weight_decay = 0.1f;
    p->beta1 = 0.9f;
    p->beta2 = 0.95f;
    p->adam_eps = 1e-8f;
    p->grad_clip = 1.0f;
    p->seed = 1;
    p->eval_every = 100;
    p->eval_batches = 8;
}

void moe_set_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
}

/* ---- training state file ----
 * magic "MOESTATE", u32 version, then the run's schedule, the data RNG, the
 * dataset fingerprint, AdamW moments, and an FNV-1a checksum of all of it. */
#define STATE_MAGIC "MOESTATE"
#define STATE_VERSION 1u
typedef struct {
    char magic[8];
    uint32_t version, reserved;
    int32_t step, steps, batch, seq, grad_accum, warmup;
    float lr, min_lr_frac, weight_decay, beta1, beta2, adam_eps, grad_clip, pad;
    uint64_t seed, rng[4], fingerprint, n_params;
} state_header;

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

typedef struct { state_header h; const float *m, *v; } state_out;

static moe_status write_state_fn(int fd, void *u) {
    state_out *s = u;
    size_t bytes = s->h.n_params * sizeof(float);
    uint64_t sum = fnv(1469598103934665603ull, &s->h, sizeof s->h);
    sum = fnv(sum, s->m, bytes);
    sum = fnv(sum, s->v, bytes);
    moe_status st = moe_write_all(fd, &s->h, sizeof s->h);
    if (!st) st = moe_write_all(fd, s->m, bytes);
    if (!st) st = moe_write_all(fd, s->v, bytes);
    if (!st) st = moe_write_all(fd, &sum, sizeof sum);
    return st;
}

static moe_status read_state(const char *path, state_header *h, float *m, float *v, size_t n_params) {
    FILE *f = fopen(path, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "cannot open training state %s", path);
    moe_status st = MOE_OK;
    size_t bytes = n_params * sizeof(float);
    uint64_t sum = 0, want;
    if (fread(h, sizeof *h, 1, f) != 1) st = moe_error(MOE_ERR_FORMAT, "training state %s is truncated", path);
    else if (memcmp(h->magic, STATE_MAGIC, 8) != 0) st = moe_error(MOE_ERR_FORMAT, "%s is not a moe training state (bad magic)", path);
    else if (h->version != STATE_VERSION) st = moe_error(MOE_ERR_FORMAT, "training state %s has version %u, expected %u", path, h->version, STATE_VERSION);
    else if (h->n_params != n_params) st = moe_error(MOE_ERR_FORMAT, "training state %s is for a model with %llu parameters, not %zu", path, (unsigned long long)h->n_params, n_params);
    else if (fread(m, 1, bytes, f) != bytes || fread(v, 1, bytes, f) != bytes || fread(&want, sizeof want, 1, f) != 1)
        st = moe_error(MOE_ERR_FORMAT, "training state %s is truncated", path);
    else if (fgetc(f) != EOF) st = moe_error(MOE_ERR_FORMAT, "training state %s has trailing bytes", path);
    else {
        sum = fnv(fnv(fnv(1469598103934665603ull, h, sizeof *h), m, bytes), v, bytes);
        if (sum != want) st = moe_error(MOE_ERR_FORMAT, "training state %s is corrupt (checksum mismatch)", path);
    }
    fclose(f);
    if (!st && (h->step < 0 || h->step > h->steps || h->batch <= 0 || h->seq < 2 || h->grad_accum <= 0 || !(h->lr > 0)))
        st = moe_error(MOE_ERR_FORMAT, "training state %s holds impossible values", path);
    return st;
}

static void state_path(char *buf, size_t cap, const char *model_path) { snprintf(buf, cap, "%s.state", model_path); }

/* Saves the model and then its state; the state names the step so a model
 * and state from different steps are detected on resume. */
static moe_status save_checkpoint(moe_model *m, const moe_train_params *p, const moe_rng *rng,
                                  uint64_t fingerprint, const float *am, const float *av) {
    moe_status st = moe_model_save(m, p->out_path);
    if (st) return st;
    state_out s;
    memset(&s, 0, sizeof s);
    s.m = am;
    s.v = av;
    memcpy(s.h.magic, STATE_MAGIC, 8);
    s.h.version = STATE_VERSION;
    s.h.step = m->train_step; s.h.steps = p->steps; s.h.batch = p->batch; s.h.seq = p->seq;
    s.h.grad_accum = p->grad_accum; s.h.warmup = p->warmup; s.h.lr = p->lr;
    s.h.min_lr_frac = p->min_lr_frac; s.h.weight_decay = p->weight_decay; s.h.beta1 = p->beta1;
    s.h.beta2 = p->beta2; s.h.adam_eps = p->adam_eps; s.h.grad_clip = p->grad_clip;
    s.h.seed = p->seed; memcpy(s.h.rng, rng->s, sizeof s.h.rng);
    s.h.fingerprint = fingerprint; s.h.n_params = m->n_params;
    char sp[4096];
    state_path(sp, sizeof sp, p->out_path);
    return moe_write_atomic(sp, write_state_fn, &s);
}

/* ---- evaluation ---- */
static moe_status eval_windows(moe_model *m, const moe_dataset *d, int split, int B, int T,
                               size_t max_windows, double *sum, size_t *count) {
    size_t n = d->n[split];
    if (n < 2) return MOE_OK;
    int32_t *tok = moe_malloc(sizeof(int32_t) * B * T), *tgt = moe_malloc(sizeof(int32_t) * B * T);
    if (!tok || !tgt) { moe_free(tok); moe_free(tgt); return MOE_ERR_NOMEM; }
    size_t windows = (n - 1 + T - 1) / T;
    if (max_windows && windows > max_windows) windows = max_windows;
    /* evenly spaced windows when capped, all consecutive ones otherwise */
    size_t stride = max_windows ? MOE_MAX((size_t)T, (n - 1) / windows) : (size_t)T;
    moe_status st = MOE_OK;
    for (size_t w0 = 0; !st && w0 < windows; w0 += B) {
        for (int b = 0; b < B; b++) {
            size_t start = (w0 + b) * stride;
            for (int t = 0; t < T; t++) {
                size_t i = start + t;
                int ok = w0 + b < windows && i + 1 < n;
                tok[b * T + t] = ok ? d->tokens[split][i] : 0;
                tgt[b * T + t] = ok ? d->tokens[split][i + 1] : -1;
            }
        }
        model_losses L;
        st = model_forward(m, tok, tgt, B, T, &L);
        if (st) break;
        size_t counted = 0;
        for (int i = 0; i < B * T; i++) counted += tgt[i] >= 0;
        *sum += L.ce * (double)counted;
        *count += counted;
    }
    moe_free(tok);
    moe_free(tgt);
    return st;
}

moe_status moe_evaluate(moe_model *m, const moe_dataset *d, int seq, int max_batches, int use_all,
                        double *loss_out, size_t *tokens_out) {
    if (seq < 2 || seq > m->cfg.max_seq) return moe_error(MOE_ERR_INVALID_ARG, "sequence length %d must be in 2..%d", seq, m->cfg.max_seq);
    const int B = 8;
    double sum = 0;
    size_t count = 0;
    moe_status st = MOE_OK;
    if (use_all || d->n[1] < 2) {
        for (int s = 0; !st && s < 2; s++) st = eval_windows(m, d, s, B, seq, 0, &sum, &count);
    } else {
        st = eval_windows(m, d, 1, B, seq, (size_t)max_batches * B, &sum, &count);
    }
    if (st) return st;
    if (!count) return moe_error(MOE_ERR_INVALID_ARG, "no tokens to evaluate");
    *loss_out = sum / (double)count;
    if (tokens_out) *tokens_out = count;
    return MOE_OK;
}

/* ---- the loop ---- */
static moe_status check_params(const moe_train_params *p, const moe_config *c) {
    if (p->steps <= 0) return moe_error(MOE_ERR_INVALID_ARG, "steps must be positive");
    if (p->batch <= 0) return moe_error(MOE_ERR_INVALID_ARG, "batch must be positive");
    if (p->seq < 2 || p->seq > c->max_seq) return moe_error(MOE_ERR_INVALID_ARG, "seq %d must be in 2..max_seq (%d)", p->seq, c->max_seq);
    if (p->grad_accum <= 0) return moe_error(MOE_ERR_INVALID_ARG, "grad_accum must be positive");
    if (!(p->lr > 0) || !(p->lr < 10)) return moe_error(MOE_ERR_INVALID_ARG, "learning rate must be in (0, 10)");
    if (!p->out_path) return moe_error(MOE_ERR_INVALID_ARG, "no output path");
    return MOE_OK;
}

static void json_float(FILE *f, const char *key, double v) {
    if (isfinite(v)) fprintf(f, ",\"%s\":%.6g", key, v);
    else fprintf(f, ",\"%s\":null", key);
}

moe_status moe_train(moe_model *m, const moe_dataset *d, const moe_train_params *p_in,
                     const char *resume_state, moe_progress_fn fn, void *user) {
    moe_train_params p = *p_in;
    if (p.warmup < 0) p.warmup = MOE_MIN(100, p.steps / 10);
    const moe_config *c = &m->cfg;
    moe_status st = p.out_path ? MOE_OK : moe_error(MOE_ERR_INVALID_ARG, "no output path");
    if (st) return st;
    if (p.threads) moe_set_threads(p.threads);
    st = model_alloc_grads(m);
    if (st) return st;
    float *am = moe_calloc(m->n_params, sizeof(float)), *av = moe_calloc(m->n_params, sizeof(float));
    size_t BT = 0;
    int32_t *tok = NULL, *tgt = NULL;
    int n_moe = 0;
    for (int l = 0; l < c->n_layers; l++) n_moe += moe_config_layer_is_moe(c, l);
    float *load = moe_calloc((size_t)MOE_MAX(n_moe, 1) * MOE_MAX(c->n_experts, 1), sizeof(float));
    FILE *log = NULL;
    if (!am || !av || !load) { st = moe_error(MOE_ERR_NOMEM, "out of memory for training buffers"); goto done; }

    moe_rng rng;
    moe_rng_seed(&rng, p.seed * 0x9E3779B97F4A7C15ull + 17);
    int start = 0;
    if (resume_state) {
        state_header h;
        st = read_state(resume_state, &h, am, av, m->n_params);
        if (st) goto done;
        if (h.step != m->train_step) {
            st = moe_error(MOE_ERR_FORMAT, "training state is at step %d but the model file is at step %d", h.step, m->train_step);
            goto done;
        }
        if (h.fingerprint != d->fingerprint) {
            st = moe_error(MOE_ERR_INVALID_ARG, "the training data differs from the data this run started with");
            goto done;
        }
        p.steps = h.steps; p.batch = h.batch; p.seq = h.seq; p.grad_accum = h.grad_accum;
        p.warmup = h.warmup; p.lr = h.lr; p.min_lr_frac = h.min_lr_frac; p.weight_decay = h.weight_decay;
        p.beta1 = h.beta1; p.beta2 = h.beta2; p.adam_eps = h.adam_eps; p.grad_clip = h.grad_clip;
        p.seed = h.seed;
        memcpy(rng.s, h.rng, sizeof rng.s);
        start = h.step;
    }
    st = check_params(&p, c); /* after resuming: the stored run's settings count */
    if (st) goto done;
    BT = (size_t)p.batch * p.seq;
    tok = moe_malloc(BT * sizeof(int32_t));
    tgt = moe_malloc(BT * sizeof(int32_t));
    if (!tok || !tgt) { st = moe_error(MOE_ERR_NOMEM, "out of memory for a batch of %d x %d", p.batch, p.seq); goto done; }
    if (d->n[0] < (size_t)p.seq + 1) {
        st = moe_error(MOE_ERR_INVALID_ARG, "the training data has %zu tokens; --seq %d needs at least %d", d->n[0], p.seq, p.seq + 1);
        goto done;
    }
    if (p.log_path) {
        log = fopen(p.log_path, resume_state ? "a" : "w");
        if (!log) { st = moe_error(MOE_ERR_IO, "cannot open log %s", p.log_path); goto done; }
    }
    const double t_begin = moe_now();
    float val_loss = -1;
    int done_here = 0;
    for (int step = start; step < p.steps; step++) {
        const double t0 = moe_now();
        moe_zero(m->grads, m->n_params);
        moe_zero(load, (size_t)MOE_MAX(n_moe, 1) * MOE_MAX(c->n_experts, 1));
        model_losses sum = {0};
        for (int micro = 0; micro < p.grad_accum; micro++) {
            st = dataset_sample(d, 0, &rng, p.batch, p.seq, tok, tgt);
            if (st) goto done;
            model_losses L;
            st = model_forward(m, tok, tgt, p.batch, p.seq, &L);
            if (st) { moe_error_prefix(st, "step %d", step + 1); goto done; }
            model_backward(m, tok, tgt, 1.0f / (float)p.grad_accum);
            sum.loss += L.loss / p.grad_accum; sum.ce += L.ce / p.grad_accum;
            sum.aux += L.aux / p.grad_accum; sum.z += L.z / p.grad_accum;
            for (int l = 0, k = 0; l < c->n_layers; l++) {
                if (!moe_config_layer_is_moe(c, l)) continue;
                const moe_routing *r = &m->acts.layers[l].moe.r;
                for (int e = 0; e < c->n_experts; e++)
                    load[k * c->n_experts + e] += (float)r->counts[e] / (float)(BT * c->top_k) / p.grad_accum;
                k++;
            }
        }
        double gn = grad_norm(m->grads, m->n_params);
        if (!isfinite(gn)) { st = moe_error(MOE_ERR_NUMERIC, "step %d: gradient norm is not finite", step + 1); goto done; }
        clip_grads(m->grads, m->n_params, gn, p.grad_clip);
        float lr = lr_at(&p, step);
        model_adamw(m, am, av, lr, &p, step + 1);
        m->train_step = step + 1;
        done_here++;
        const double dt = moe_now() - t0;
        float balance = 0;
        for (int k = 0; k < n_moe; k++) {
            float mx = 0;
            for (int e = 0; e < c->n_experts; e++) mx = MOE_MAX(mx, load[k * c->n_experts + e]);
            balance = MOE_MAX(balance, mx * c->n_experts);
        }
        int evaluated = 0;
        if ((p.eval_every > 0 && (step + 1) % p.eval_every == 0) || step + 1 == p.steps) {
            double vl;
            st = moe_evaluate(m, d, p.seq, p.eval_batches, 0, &vl, NULL);
            if (st) goto done;
            val_loss = (float)vl;
            evaluated = 1;
        }
        if (log) {
            fprintf(log, "{\"step\":%d", step + 1);
            json_float(log, "loss", sum.loss); json_float(log, "ce", sum.ce);
            json_float(log, "aux", sum.aux); json_float(log, "z", sum.z);
            json_float(log, "lr", lr); json_float(log, "grad_norm", gn);
            json_float(log, "tokens_per_s", BT * p.grad_accum / dt);
            json_float(log, "balance", balance);
            fprintf(log, ",\"load\":[");
            for (int k = 0; k < n_moe; k++) {
                fprintf(log, "%s[", k ? "," : "");
                for (int e = 0; e < c->n_experts; e++) fprintf(log, "%s%.4f", e ? "," : "", load[k * c->n_experts + e]);
                fprintf(log, "]");
            }
            fprintf(log, "]}\n");
            if (evaluated) { fprintf(log, "{\"step\":%d", step + 1); json_float(log, "val_loss", val_loss); fprintf(log, "}\n"); }
            fflush(log);
        }
        if (fn) {
            double elapsed = moe_now() - t_begin;
            moe_train_progress pr = {
                .step = step + 1, .steps = p.steps, .loss = (float)sum.loss, .val_loss = val_loss,
                .lr = lr, .tokens_per_s = (float)(BT * p.grad_accum / dt), .balance = balance,
                .elapsed_s = elapsed, .eta_s = elapsed / done_here * (p.steps - step - 1),
                .evaluated = evaluated};
            fn(&pr, user);
        }
        int pause = p.stop_after > 0 && done_here >= p.stop_after && step + 1 < p.steps;
        int periodic = p.save_every > 0 && (step + 1) % p.save_every == 0;
        if (pause || periodic || step + 1 == p.steps) {
            st = save_checkpoint(m, &p, &rng, d->fingerprint, am, av);
            if (st) goto done;
        }
        if (pause) break;
    }
    if (start >= p.steps) st = moe_error(MOE_ERR_INVALID_ARG, "the run is already complete (step %d of %d)", start, p.steps);
done:
    if (log) fclose(log);
    moe_free(am); moe_free(av); moe_free(tok); moe_free(tgt); moe_free(load);
    return st;
}
