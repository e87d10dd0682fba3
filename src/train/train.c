/* train: the training loop, evaluation, the JSONL log and the training-state
 * file that makes a paused run continue bit-identically. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/hash.h"
#include "data/dataset.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
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
    p->save_minutes = 10;
}

void moe_set_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
}

/* ---- stop requests ----
 * Set by moe_request_stop, typically from a signal handler on any thread, and
 * read between steps or batches: a lock-free atomic is safe for both. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "a stop request must be settable from a signal handler");
static atomic_int stop_request;

void moe_request_stop(void) { atomic_store_explicit(&stop_request, 1, memory_order_relaxed); }

static int stop_requested(void) { return atomic_load_explicit(&stop_request, memory_order_relaxed); }

/* The caller honours the request: the next call starts afresh. */
static void stop_honoured(void) { atomic_store_explicit(&stop_request, 0, memory_order_relaxed); }

/* ---- training state file ----
 * magic "MOESTATE", u32 version, then the run's schedule, the data RNG, the
 * dataset fingerprint, AdamW moments, and an FNV-1a checksum of all of it. */
typedef struct { state_header h; const float *m, *v; } state_out;

static moe_status write_state_fn(int fd, void *u) {
    state_out *s = u;
    size_t bytes = s->h.n_params * sizeof(float);
    uint64_t sum = moe_fnv1a64(MOE_FNV1A64_BASIS, &s->h, sizeof s->h);
    sum = moe_fnv1a64(sum, s->m, bytes);
    sum = moe_fnv1a64(sum, s->v, bytes);
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
        sum = moe_fnv1a64(moe_fnv1a64(moe_fnv1a64(MOE_FNV1A64_BASIS, h, sizeof *h), m, bytes), v, bytes);
        if (sum != want) st = moe_error(MOE_ERR_FORMAT, "training state %s is corrupt (checksum mismatch)", path);
    }
    fclose(f);
    if (!st && (h->step < 0 || h->step > h->steps || h->batch <= 0 || h->seq < 2 || h->grad_accum <= 0 || !(h->lr > 0)))
        st = moe_error(MOE_ERR_FORMAT, "training state %s holds impossible values", path);
    return st;
}

moe_status train_state_check(const char *path, size_t n_params, int *step) {
    float *m = moe_calloc(n_params ? n_params : 1, sizeof(float));
    float *v = moe_calloc(n_params ? n_params : 1, sizeof(float));
    moe_status st = m && v ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory for the optimizer state");
    state_header h;
    if (!st) st = read_state(path, &h, m, v, n_params);
    if (!st && step) *step = h.step;
    moe_free(m);
    moe_free(v);
    return st;
}

static void state_path(char *buf, size_t cap, const char *model_path) { snprintf(buf, cap, "%s.state", model_path); }

/* ---- numerical faults ----
 * Name of the first tensor holding a non-finite value of buf (params or
 * grads, same layout), or NULL when all are finite. */
static const char *first_nonfinite_tensor(const moe_model *m, const float *buf) {
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        const float *x = buf + t->offset;
        float acc = 0; /* inf - inf or nan * 0 stay nan: one test per tensor */
        for (size_t j = 0; j < t->size; j++) acc += x[j] * 0.0f;
        if (acc != 0) return t->name;
    }
    return NULL;
}

static int all_finite(const float *x, size_t n) {
    float acc = 0;
    for (size_t i = 0; i < n; i++) acc += x[i] * 0.0f;
    return acc == 0;
}

/* The loss of step `step` is not finite: names the first layer whose output
 * (the residual stream after it) holds a NaN or Inf. */
static moe_status nonfinite_loss(const moe_model *m, int step, double loss, int B, int T) {
    const moe_config *c = &m->cfg;
    size_t n = (size_t)B * T * c->d_model;
    for (int l = 0; l < c->n_layers; l++) {
        const float *out = l + 1 < c->n_layers ? m->acts.layers[l + 1].x_in : m->acts.x_final;
        if (!all_finite(m->acts.layers[l].x_mid, n))
            return moe_error(MOE_ERR_NUMERIC, "step %d: loss is %g: the attention output of layer %d is not finite "
                             "(NaN or Inf); stopped, the last checkpoint is kept", step, loss, l);
        if (!all_finite(out, n))
            return moe_error(MOE_ERR_NUMERIC, "step %d: loss is %g: the output of layer %d (%s) is not finite "
                             "(NaN or Inf); stopped, the last checkpoint is kept", step, loss, l,
                             moe_config_layer_is_moe(c, l) ? "MoE" : "dense");
    }
    return moe_error(MOE_ERR_NUMERIC, "step %d: loss is %g (every layer's output is finite: the output head "
                     "or a loss term overflowed); stopped, the last checkpoint is kept", step, loss);
}

/* Saves a checkpoint so that a kill at any moment leaves a model and a state
 * of the same step: the state goes to STATE.tmp first (itself atomically),
 * then the model is saved atomically, then STATE.tmp is renamed over STATE.
 * A kill between the two renames leaves the model one step ahead of STATE
 * with STATE.tmp matching it; resuming picks that up (load_state). Refuses to
 * save weights that are not finite. */
static moe_status save_checkpoint(moe_model *m, const moe_train_params *p, const moe_rng *rng,
                                  uint64_t fingerprint, const float *am, const float *av) {
    const char *bad = first_nonfinite_tensor(m, m->params);
    if (bad)
        return moe_error(MOE_ERR_NUMERIC, "step %d: tensor %s is not finite after the update; not saved, "
                         "the last checkpoint is kept", m->train_step, bad);
    moe_status st;
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
    char sp[4096], tmp[4100];
    state_path(sp, sizeof sp, p->out_path);
    snprintf(tmp, sizeof tmp, "%s.tmp", sp);
    if ((st = moe_write_atomic(tmp, write_state_fn, &s))) return st;
    if ((st = moe_model_save(m, p->out_path))) { unlink(tmp); return st; }
    if (rename(tmp, sp) != 0) return moe_error(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, sp, strerror(errno));
    return MOE_OK;
}

/* Reads the state for resuming the model m: STATE, or STATE.tmp when a kill
 * interrupted a save between its two renames (see save_checkpoint). */
static moe_status load_state(const char *path, const moe_model *m, state_header *h, float *am, float *av) {
    moe_status st = read_state(path, h, am, av, m->n_params);
    if (!st && h->step == m->train_step) return MOE_OK;
    char first[512];
    if (st) snprintf(first, sizeof first, "%s", moe_last_error());
    else snprintf(first, sizeof first, "training state is at step %d but the model file is at step %d", h->step, m->train_step);
    char tmp[4100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (access(tmp, F_OK) == 0 && !read_state(tmp, h, am, av, m->n_params) && h->step == m->train_step) {
        if (rename(tmp, path) != 0) { /* usable even where it is */ }
        return MOE_OK;
    }
    return moe_error(st ? st : MOE_ERR_FORMAT, "%s", first);
}

moe_status moe_train_resume_point(const moe_model *m, const char *state_path, int *step, int *steps) {
    if (!m || !state_path || !step || !steps)
        return moe_error(MOE_ERR_INVALID_ARG, "moe_train_resume_point: NULL argument");
    float *am = moe_calloc(m->n_params ? m->n_params : 1, sizeof(float));
    float *av = moe_calloc(m->n_params ? m->n_params : 1, sizeof(float));
    moe_status st = am && av ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory for the optimizer state");
    state_header h;
    if (!st) st = load_state(state_path, m, &h, am, av);
    if (!st) { *step = h.step; *steps = h.steps; }
    moe_free(am);
    moe_free(av);
    return st;
}

/* ---- evaluation ---- */
/* Sums for the standard error of a mean loss S/C over blocks b of tokens,
 * each with loss sum s_b over c_b tokens (a ratio estimator, the blocks as
 * the sampling units: tokens of one block are not independent). */
typedef struct { double s, c, s2, sc, c2; size_t n; } se_sums;
static void se_add(se_sums *a, double s, double c) {
    a->s += s; a->c += c; a->s2 += s * s; a->sc += s * c; a->c2 += c * c; a->n++;
}
static double se_of(const se_sums *a) {
    if (a->n < 2 || a->c <= 0) return 0;
    const double m = a->s / a->c, r = a->s2 - 2 * m * a->sc + m * m * a->c2;
    return sqrt(MOE_MAX(r, 0.0) * (double)a->n / (double)(a->n - 1)) / a->c;
}
enum { SE_WIDE = 16 }; /* batches per wide block */

typedef struct {
    moe_eval_progress_fn fn;
    void *user;
    size_t done, total;
    int stoppable, stopped;           /* stoppable: stop after a batch on a stop request */
    double *dom_sum; size_t *dom_cnt; /* [n_domains] per-domain loss sums, or NULL */
    float *losses;                    /* [B*T] per-token losses (with dom_sum)     */
    uint8_t *dom;                     /* [B*T] domain of each target               */
    se_sums blk, wide, wide_part;     /* batches as blocks; SE_WIDE batches as blocks */
    moe_eval_block_fn block_fn;       /* each batch's loss sum and count, or NULL  */
    int wide_k;                       /* batches in wide_part                      */
} eval_progress;

static void se_batch(eval_progress *pr, double s, size_t c) {
    if (!c) return;
    if (pr->block_fn) pr->block_fn(s, c, pr->user);
    se_add(&pr->blk, s, (double)c);
    pr->wide_part.s += s; pr->wide_part.c += (double)c;
    if (++pr->wide_k == SE_WIDE) {
        se_add(&pr->wide, pr->wide_part.s, pr->wide_part.c);
        pr->wide_part = (se_sums){0};
        pr->wide_k = 0;
    }
}

/* windows of T tokens evaluate_windows will read from split (at most max_windows, 0 = all) */
static size_t eval_window_count(const moe_dataset *d, int split, int T, size_t max_windows) {
    size_t n = d->n[split];
    if (n < 2) return 0;
    size_t windows = (n - 1 + T - 1) / T;
    return max_windows && windows > max_windows ? max_windows : windows;
}

enum { EVAL_CHUNK = 64 }; /* positions per inference call when evaluating a published model */

/* A stop request after a batch; under expert-parallel inference the ranks
 * run the same batches in step, so they agree on it (any rank's request
 * stops all of them after the same batch). A failed agreement (a rank died
 * or hangs) is an error, not a stop: its status is returned in *st. */
static int eval_stop(const moe_model *m, moe_status *st) {
    int stop = stop_requested();
    if (m->ep_infer && (*st = dist_any(&stop))) stop = 1;
    return stop;
}

static moe_status eval_windows(moe_model *m, const moe_dataset *d, int split, int B, int T,
                               size_t max_windows, double *sum, size_t *count, eval_progress *pr) {
    size_t n = d->n[split];
    if (n < 2) return MOE_OK;
    int32_t *tok = moe_malloc(sizeof(int32_t) * B * T), *tgt = moe_malloc(sizeof(int32_t) * B * T);
    const int batch_forward = !m->arch[0]; /* our own models, in memory or mapped (expert parallelism) */
    float *logits = batch_forward ? NULL : moe_malloc(sizeof(float) * (size_t)EVAL_CHUNK * m->cfg.vocab_size);
    if (!tok || !tgt || (!batch_forward && !logits)) { moe_free(tok); moe_free(tgt); moe_free(logits); return MOE_ERR_NOMEM; }
    size_t windows = eval_window_count(d, split, T, max_windows);
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
                if (pr->dom) pr->dom[b * T + t] = ok ? d->domain[split][i + 1] : 0;
            }
        }
        size_t counted = 0;
        for (int i = 0; i < B * T; i++) counted += tgt[i] >= 0;
        if (logits) { /* a published model: each window through the KV-cached inference path,
                       * EVAL_CHUNK positions at a time (scratch and logits stay small) */
            double ce = 0;
            for (int b = 0; !st && b < B; b++) {
                if (tgt[b * T] < 0) continue;
                for (int p0 = 0; !st && p0 < T; p0 += EVAL_CHUNK) {
                    const int n = MOE_MIN(EVAL_CHUNK, T - p0);
                    const size_t at = (size_t)b * T + p0;
                    st = model_infer(m, tok + at, n, p0, logits, 1);
                    if (!st) ce += crossentropy_forward(pr->losses ? pr->losses + at : NULL, logits, tgt + at, n, m->cfg.vocab_size);
                }
            }
            if (st) break;
            *sum += ce;
            se_batch(pr, ce, counted);
        } else {
            model_losses L;
            st = model_forward(m, tok, tgt, B, T, &L);
            if (st) break;
            *sum += L.ce * (double)counted;
            se_batch(pr, L.ce * (double)counted, counted);
            if (pr->losses) crossentropy_forward(pr->losses, m->acts.logits, tgt, B * T, m->cfg.vocab_size);
        }
        if (pr->dom_sum) /* rows of windows the published path skipped hold no target */
            for (int i = 0; i < B * T; i++)
                if (tgt[i] >= 0) { pr->dom_sum[pr->dom[i]] += pr->losses[i]; pr->dom_cnt[pr->dom[i]]++; }
        *count += counted;
        pr->done += (size_t)MOE_MIN((size_t)B, windows - w0) * T;
        if (pr->fn) pr->fn(MOE_MIN(pr->done, pr->total), pr->total, pr->user);
        /* after the last batch there is nothing left to stop: the result is whole */
        if (pr->stoppable && pr->done < pr->total && eval_stop(m, &st)) { pr->stopped = !st; break; }
    }
    moe_free(tok);
    moe_free(tgt);
    moe_free(logits);
    return st;
}

/* pr: progress, stop and per-domain settings (stoppable = 0 inside
 * training: a stop request is the loop's to honour, after the step and its
 * evaluation) */
static moe_status evaluate(moe_model *m, const moe_dataset *d, int seq, int max_batches, int use_all,
                           double *loss_out, size_t *tokens_out, eval_progress *pr) {
    const int ctx = moe_model_context(m);
    if (seq < 2 || seq > ctx) return moe_error(MOE_ERR_INVALID_ARG, "sequence length %d must be in 2..%d (the context)", seq, ctx);
    const int B = 8;
    double sum = 0;
    size_t count = 0;
    moe_status st = MOE_OK;
    if (use_all || d->n[1] < 2) {
        for (int s = 0; s < 2; s++) pr->total += eval_window_count(d, s, seq, 0) * seq;
        for (int s = 0; !st && !pr->stopped && s < 2; s++) st = eval_windows(m, d, s, B, seq, 0, &sum, &count, pr);
    } else {
        pr->total = eval_window_count(d, 1, seq, (size_t)max_batches * B) * seq;
        st = eval_windows(m, d, 1, B, seq, (size_t)max_batches * B, &sum, &count, pr);
    }
    if (st) return st;
    if (pr->wide_k) se_add(&pr->wide, pr->wide_part.s, pr->wide_part.c); /* the last, shorter block */
    if (!count && !pr->stopped) return moe_error(MOE_ERR_INVALID_ARG, "no tokens to evaluate");
    *loss_out = count ? sum / (double)count : 0.0;
    if (tokens_out) *tokens_out = count;
    if (pr->stopped) {
        stop_honoured();
        return moe_error(MOE_ERR_INTERRUPTED, "evaluation stopped on request after %zu of %zu positions",
                         MOE_MIN(pr->done, pr->total), pr->total);
    }
    return MOE_OK;
}

moe_status moe_evaluate(moe_model *m, const moe_dataset *d, int seq, int max_batches, int use_all,
                        double *loss_out, size_t *tokens_out) {
    eval_progress pr = {.stoppable = 1};
    return evaluate(m, d, seq, max_batches, use_all, loss_out, tokens_out, &pr);
}

moe_status moe_evaluate_progress(moe_model *m, const moe_dataset *d, int seq, int max_batches,
                                 int use_all, double *loss_out, size_t *tokens_out,
                                 moe_eval_progress_fn fn, void *user) {
    eval_progress pr = {.fn = fn, .user = user, .stoppable = 1};
    return evaluate(m, d, seq, max_batches, use_all, loss_out, tokens_out, &pr);
}

moe_status moe_evaluate_full(moe_model *m, const moe_dataset *d, int seq, int use_all, moe_eval_result *res,
                             double *dom_loss, size_t *dom_tokens, moe_eval_progress_fn fn,
                             moe_eval_block_fn block_fn, void *user) {
    const size_t BT = (size_t)8 * (size_t)MOE_MAX(seq, 1);
    eval_progress pr = {.fn = fn, .user = user, .stoppable = 1, .dom_sum = dom_loss, .dom_cnt = dom_tokens,
                        .block_fn = block_fn};
    moe_status st = MOE_OK;
    if (dom_loss) {
        pr.losses = moe_malloc(BT * sizeof(float));
        pr.dom = moe_malloc(BT);
        if (!pr.losses || !pr.dom) st = moe_error(MOE_ERR_NOMEM, "per-domain evaluation buffers");
        for (int i = 0; i < d->n_domains; i++) { dom_loss[i] = 0; dom_tokens[i] = 0; }
    }
    *res = (moe_eval_result){0};
    if (!st) st = evaluate(m, d, seq, 0, use_all, &res->loss, &res->tokens, &pr);
    for (int i = 0; dom_loss && (!st || st == MOE_ERR_INTERRUPTED) && i < d->n_domains; i++)
        if (dom_tokens[i]) dom_loss[i] /= (double)dom_tokens[i];
    res->block_tokens = BT;
    res->wide_tokens = BT * SE_WIDE;
    res->blocks = pr.blk.n;
    res->se_block = se_of(&pr.blk);
    res->se_wide = se_of(&pr.wide);
    moe_free(pr.losses);
    moe_free(pr.dom);
    return st;
}

moe_status moe_evaluate_domains(moe_model *m, const moe_dataset *d, int seq, int use_all, double *loss_out,
                                size_t *tokens_out, double *dom_loss, size_t *dom_tokens,
                                moe_eval_progress_fn fn, void *user) {
    moe_eval_result r;
    moe_status st = moe_evaluate_full(m, d, seq, use_all, &r, dom_loss, dom_tokens, fn, NULL, user);
    *loss_out = r.loss;
    if (tokens_out) *tokens_out = r.tokens;
    return st;
}

/* ---- the loop ---- */
enum { REQ_STOP = 1, REQ_SAVE = 2 };

/* What this process asks of the step just finished: to stop (moe_request_stop)
 * and to save (save_minutes have passed since the last save). With several
 * ranks this is the one value to OR across them (a single allreduce) so that
 * every rank saves and stops after the same step. */
static int step_requests(const moe_train_params *p, double since_save_s) {
    int r = stop_requested() ? REQ_STOP : 0;
    if (p->save_minutes > 0 && since_save_s >= 60.0 * (double)p->save_minutes) r |= REQ_SAVE;
    return r;
}

static moe_status check_params(const moe_train_params *p, const moe_config *c) {
    if (p->steps <= 0) return moe_error(MOE_ERR_INVALID_ARG, "steps must be positive");
    if (p->batch <= 0) return moe_error(MOE_ERR_INVALID_ARG, "batch must be positive");
    if (p->seq < 2 || p->seq > c->max_seq) return moe_error(MOE_ERR_INVALID_ARG, "seq %d must be in 2..max_seq (%d)", p->seq, c->max_seq);
    if (p->grad_accum <= 0) return moe_error(MOE_ERR_INVALID_ARG, "grad_accum must be positive");
    if (!(p->lr > 0) || !(p->lr < 10)) return moe_error(MOE_ERR_INVALID_ARG, "learning rate must be in (0, 10)");
    if (!p->out_path) return moe_error(MOE_ERR_INVALID_ARG, "no output path");
    if (!(p->save_minutes >= 0 && p->save_minutes <= 1e7))
        return moe_error(MOE_ERR_INVALID_ARG, "save_minutes must be in 0..1e7 (0 = off)");
    return MOE_OK;
}

static void json_float(FILE *f, const char *key, double v) {
    if (isfinite(v)) fprintf(f, ",\"%s\":%.6g", key, v);
    else fprintf(f, ",\"%s\":null", key);
}

/* Routing metrics of MoE layer k from the model's stats (since the last reset). */
enum { M_MAXVIO, M_ENTROPY, M_ROUTER_ENTROPY, M_DEAD, M_DROP, M_AUX, M_Z, M_SEQ, M_VAL_MAXVIO, M_N };
static void route_metrics(const moe_model *m, int k, double *out) {
    const route_stats *rs = &m->stats;
    const int E = rs->E;
    const int64_t *cnt = rs->counts + (size_t)k * E;
    int64_t total = 0, mx = 0;
    for (int e = 0; e < E; e++) { total += cnt[e]; mx = MOE_MAX(mx, cnt[e]); }
    double mean = (double)total / E, h = 0;
    int dead = 0;
    for (int e = 0; e < E; e++) {
        double f = total ? (double)cnt[e] / (double)total : 0.0;
        if (f > 0) h -= f * log(f);
        dead += f < 0.1 / E;
    }
    double calls = rs->calls > 0 ? rs->calls : 1;
    out[M_MAXVIO] = total ? ((double)mx - mean) / mean : 0.0;
    out[M_ENTROPY] = E > 1 ? h / log((double)E) : 1.0;
    out[M_ROUTER_ENTROPY] = rs->entropy[k] / calls;
    out[M_DEAD] = (double)dead / E;
    out[M_DROP] = rs->assigned[k] ? (double)rs->dropped[k] / (double)rs->assigned[k] : 0.0;
    out[M_AUX] = rs->aux[k] / calls;
    out[M_Z] = rs->z[k] / calls;
    out[M_SEQ] = rs->seq_aux[k] / calls;
}

static void json_layers(FILE *f, const char *key, const double *met, int n_moe, int which) {
    fprintf(f, ",\"%s\":[", key);
    for (int k = 0; k < n_moe; k++) {
        double v = met[(size_t)k * M_N + which];
        if (isfinite(v)) fprintf(f, "%s%.6g", k ? "," : "", v);
        else fprintf(f, "%snull", k ? "," : "");
    }
    fprintf(f, "]");
}

/* The global gradient norm when each rank holds only its shard of g (whole
 * units): each rank's units, summed over the ranks (the others contribute
 * exact zeros), then added in order as grad_norm does. */
static moe_status shard_grad_norm(const float *g, size_t n, double *parts, double *norm) {
    const size_t units = (n + GRAD_NORM_UNIT - 1) / GRAD_NORM_UNIT;
    if (dist_world()->size == 1) { *norm = grad_norm(g, n); return MOE_OK; }
    size_t off, len;
    dist_shard(n, GRAD_NORM_UNIT, dist_world()->rank, &off, &len);
    memset(parts, 0, units * sizeof(double));
    const size_t u0 = off / GRAD_NORM_UNIT, u1 = (off + len + GRAD_NORM_UNIT - 1) / GRAD_NORM_UNIT;
    grad_norm_parts(g, n, u0, u1, parts + u0);
    if (units > (size_t)INT_MAX) return moe_error(MOE_ERR_INVALID_ARG, "too many parameters for one reduction");
    moe_status st = dist_sum_f64(parts, (int)units);
    if (!st) *norm = grad_norm_total(parts, n);
    return st;
}

/* The routing statistics of all ranks' shards, so that the bias update and
 * the metrics see the whole global batch (counts are exact integers; the
 * sums of per-call values add in rank order). */
static moe_status stats_allreduce(moe_model *m) {
    route_stats *rs = &m->stats;
    if (dist_world()->size == 1 || !rs->n_moe) return MOE_OK;
    const int nl = rs->n_moe;
    double calls = rs->calls;
    moe_status st = dist_sum_i64(rs->counts, nl * rs->E);
    if (!st) st = dist_sum_i64(rs->assigned, nl);
    if (!st) st = dist_sum_i64(rs->dropped, nl);
    if (!st) st = dist_sum_f64(rs->aux, 4 * nl); /* aux, z, seq_aux, entropy: one block */
    if (!st) st = dist_sum_f64(&calls, 1);
    rs->calls = (int)calls;
    return st;
}

/* What each rank did in a step of a distributed run, for the log. */
enum { RK_A2A_SENT, RK_A2A_RECV, RK_RED_SENT, RK_RED_RECV, RK_T_A2A, RK_T_RED, RK_T_STEP, RK_ROWS_OUT, RK_N };

static void json_rank_field(FILE *f, const char *key, const double *all, int R, int stride, int which, int integer) {
    fprintf(f, ",\"%s\":[", key);
    for (int r = 0; r < R; r++) {
        double v = all[(size_t)r * stride + which];
        if (integer) fprintf(f, "%s%.0f", r ? "," : "", v);
        else fprintf(f, "%s%.6g", r ? "," : "", v);
    }
    fprintf(f, "]");
}

/* The per-rank traffic, times and routed rows per expert (summed over the
 * MoE layers, from this rank's own routing) in the JSONL log. */
static void json_ranks(FILE *f, const double *all, int R, int E) {
    const int stride = RK_N + E;
    fprintf(f, ",\"ranks\":%d,\"ep\":%d", R, dist_world()->ep);
    json_rank_field(f, "a2a_sent", all, R, stride, RK_A2A_SENT, 1);
    json_rank_field(f, "a2a_recv", all, R, stride, RK_A2A_RECV, 1);
    json_rank_field(f, "reduce_sent", all, R, stride, RK_RED_SENT, 1);
    json_rank_field(f, "reduce_recv", all, R, stride, RK_RED_RECV, 1);
    json_rank_field(f, "t_a2a", all, R, stride, RK_T_A2A, 0);
    json_rank_field(f, "t_reduce", all, R, stride, RK_T_RED, 0);
    fprintf(f, ",\"t_compute\":[");
    for (int r = 0; r < R; r++) {
        const double *a = all + (size_t)r * stride;
        fprintf(f, "%s%.6g", r ? "," : "", a[RK_T_STEP] - a[RK_T_A2A] - a[RK_T_RED]);
    }
    fprintf(f, "]");
    json_rank_field(f, "a2a_rows_out", all, R, stride, RK_ROWS_OUT, 1);
    fprintf(f, ",\"rank_rows\":[");
    for (int r = 0; r < R; r++) {
        fprintf(f, "%s[", r ? "," : "");
        for (int e = 0; e < E; e++) fprintf(f, "%s%.0f", e ? "," : "", all[(size_t)r * stride + RK_N + e]);
        fprintf(f, "]");
    }
    fprintf(f, "]");
}

moe_status moe_train(moe_model *m, const moe_dataset *d, const moe_train_params *p_in,
                     const char *resume_state, moe_progress_fn fn, void *user) {
    moe_train_params p = *p_in;
    if (p.warmup < 0) p.warmup = MOE_MIN(100, p.steps / 10);
    const moe_config *c = &m->cfg;
    moe_status st = p.out_path ? MOE_OK : moe_error(MOE_ERR_INVALID_ARG, "no output path");
    if (st) return st;
    if (!m->params)
        return moe_error(MOE_ERR_UNSUPPORTED, "this model's weights are views of its file (a published model, or one "
                         "loaded with a memory budget or expert parallelism, for inference only), not parameters to train");
    if (m->route_k || m->route_threshold > 0)
        return moe_error(MOE_ERR_INVALID_ARG, "run-time routing (active experts %d, threshold %g) is for inference only: "
                         "training uses the model's top-k (clear it with moe_model_set_routing(m, 0, 0, 0))",
                         m->route_k, m->route_threshold);
    if (p.threads) moe_set_threads(p.threads);
    /* weights + gradients + two AdamW moments, before anything is allocated */
    double need = 16.0 * (double)m->n_params;
    if (need > 0.85 * (double)moe_physical_memory())
        return moe_error(MOE_ERR_NOMEM, "training this model needs %.1f GiB for weights, gradients and AdamW moments; this machine has %.1f GiB",
                         need / (1 << 30), (double)moe_physical_memory() / (1 << 30));
    st = model_alloc_grads(m);
    if (st) return st;
    moe_zero(m->grads, m->n_params); /* from here on each AdamW pass leaves them zero */
    float *am = moe_calloc(m->n_params, sizeof(float)), *av = moe_calloc(m->n_params, sizeof(float));
    size_t BT = 0;
    int32_t *tok = NULL, *tgt = NULL;
    const int n_moe = moe_config_n_moe_layers(c);
    float *load = moe_calloc((size_t)MOE_MAX(n_moe, 1) * MOE_MAX(c->n_experts, 1), sizeof(float));
    double *met = moe_calloc((size_t)MOE_MAX(n_moe, 1) * M_N, sizeof(double));
    FILE *log = NULL;
    /* a distributed run: each rank takes batch / ranks sequences of every
     * micro-batch (a shard, routed as its own group); the shards' gradients
     * are added in the order one process adds its micro-batches */
    moe_dist *dw = dist_world();
    const int R = dw->size, me = dw->rank;
    float *acc = NULL;
    double *gnorm_parts = NULL;
    int32_t *tok_other = NULL, *tgt_other = NULL;
    double *rank_all = NULL, *rank_mine = NULL, *loss_all = NULL;
    expert_parallel *ep = NULL;
    if (!am || !av || !load || !met) { st = moe_error(MOE_ERR_NOMEM, "out of memory for training buffers"); goto done; }

    moe_rng rng;
    moe_rng_seed(&rng, p.seed * 0x9E3779B97F4A7C15ull + 17);
    int start = 0;
    if (resume_state) {
        state_header h;
        st = load_state(resume_state, m, &h, am, av);
        if (st) goto done;
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
    if (p.batch % R) {
        st = moe_error(MOE_ERR_INVALID_ARG, "the batch of %d sequences does not split over %d ranks "
                       "(each rank takes batch / ranks of them)", p.batch, R);
        goto done;
    }
    if ((st = dist_set_expert_parallel(p.expert_parallel > 0 ? p.expert_parallel : 1, c->n_experts))) goto done;
    if (dw->ep > 1) {
        if ((st = expert_parallel_create(&ep, n_moe, c->n_experts, EP_SHARDED_TOKENS))) goto done;
        m->ep = ep;
    }
    const int Bl = p.batch / R, shards = p.grad_accum * R;
    BT = (size_t)p.batch * p.seq; /* the global batch: tokens per micro-batch over all ranks */
    const size_t BTl = (size_t)Bl * p.seq;
    tok = moe_malloc(BTl * sizeof(int32_t));
    tgt = moe_malloc(BTl * sizeof(int32_t));
    if (!tok || !tgt) { st = moe_error(MOE_ERR_NOMEM, "out of memory for a batch of %d x %d", Bl, p.seq); goto done; }
    if (R > 1) {
        tok_other = moe_malloc(BTl * sizeof(int32_t));
        tgt_other = moe_malloc(BTl * sizeof(int32_t));
        rank_all = moe_calloc((size_t)R * (RK_N + MOE_MAX(c->n_experts, 1)), sizeof(double));
        rank_mine = moe_calloc(RK_N + MOE_MAX(c->n_experts, 1), sizeof(double));
        loss_all = moe_calloc((size_t)R * 5, sizeof(double));
        if (!tok_other || !tgt_other || !rank_all || !rank_mine || !loss_all) {
            st = moe_error(MOE_ERR_NOMEM, "out of memory for the distributed run");
            goto done;
        }
    }
    if (shards > 1) { /* each micro-batch's gradient from zero, then added in order */
        acc = moe_calloc(m->n_params ? m->n_params : 1, sizeof(float));
        if (!acc) { st = moe_error(MOE_ERR_NOMEM, "out of memory for gradient accumulation"); goto done; }
    }
    size_t shard_off, shard_len; /* the parameters this rank's optimizer updates */
    dist_shard(m->n_params, GRAD_NORM_UNIT, me, &shard_off, &shard_len);
    gnorm_parts = moe_calloc((m->n_params + GRAD_NORM_UNIT - 1) / GRAD_NORM_UNIT + 1, sizeof(double));
    if (!gnorm_parts) { st = moe_error(MOE_ERR_NOMEM, "out of memory for the gradient norm"); goto done; }
    if (d->n[0] < (size_t)p.seq + 1) {
        st = moe_error(MOE_ERR_INVALID_ARG, "the training data has %zu tokens; --seq %d needs at least %d", d->n[0], p.seq, p.seq + 1);
        goto done;
    }
    if (p.log_path && me == 0) {
        log = fopen(p.log_path, resume_state ? "a" : "w");
        if (!log) { st = moe_error(MOE_ERR_IO, "cannot open log %s", p.log_path); goto done; }
    }
    if (start < p.steps && (step_requests(&p, 0) & REQ_STOP)) {
        stop_honoured();
        st = moe_error(MOE_ERR_INTERRUPTED, "stopped on request before the first step; nothing saved");
        goto done;
    }
    const double t_begin = moe_now();
    double t_saved = t_begin; /* the time-based interval counts from here */
    float val_loss = -1;
    int done_here = 0;
    for (int step = start; step < p.steps; step++) {
        const double t0 = moe_now();
        /* the gradients are zero here: allocated zeroed, and each step's AdamW
         * pass zeroes what it consumed (buffers never get a gradient) */
        moe_zero(load, (size_t)MOE_MAX(n_moe, 1) * MOE_MAX(c->n_experts, 1));
        model_stats_reset(m);
        model_losses sum = {0};
        dist_counters_reset(dw);
        if (ep) expert_parallel_reset(ep);
        for (int micro = 0; micro < p.grad_accum; micro++) {
            /* every rank draws every shard, so the data RNG stays the one
             * stream of a single process running shards micro-batches */
            for (int r = 0; r < R; r++) {
                const int mine = r == me;
                PROF_RUN(PROF_DATA, st = dataset_sample(d, 0, &rng, Bl, p.seq, mine ? tok : tok_other, mine ? tgt : tgt_other));
                if (st) goto done;
                /* router jitter draws its seed from the run's RNG (saved in the state file) */
                if (c->router_jitter > 0) {
                    uint64_t js = moe_rng_u64(&rng);
                    if (mine) m->jitter_seed = js;
                }
            }
            model_losses L;
            m->training = 1;
            st = model_forward(m, tok, tgt, Bl, p.seq, &L);
            if (st == MOE_ERR_NUMERIC) { st = nonfinite_loss(m, step + 1, L.loss, Bl, p.seq); goto done; }
            if (st) { moe_error_prefix(st, "step %d", step + 1); goto done; }
            model_backward(m, tok, tgt, 1.0f / (float)shards);
            m->training = 0;
            if (ep && (st = expert_parallel_status(ep))) { moe_error_prefix(st, "step %d", step + 1); goto done; }
            if (acc) { /* this rank's shard of the sum, in shard order */
                if ((st = dist_reduce_scatter_add(acc, m->grads, m->n_params, GRAD_NORM_UNIT))) {
                    moe_error_prefix(st, "step %d", step + 1);
                    goto done;
                }
                moe_zero(m->grads, m->n_params);
            }
            double mine_l[5] = {L.loss, L.ce, L.aux, L.z, L.seq_aux}, one[5];
            double *all_l = R > 1 ? loss_all : one;
            if ((st = dist_gather_f64(all_l, mine_l, 5))) goto done;
            for (int r = 0; r < R; r++) { /* in shard order, as one process sums its micro-batches */
                const double *l = all_l + (size_t)r * 5;
                sum.loss += l[0] / shards; sum.ce += l[1] / shards;
                sum.aux += l[2] / shards; sum.z += l[3] / shards;
                sum.seq_aux += l[4] / shards;
            }
        }
        if (R > 1) { /* this rank's own routing, before the statistics become global */
            for (int e = 0; e < c->n_experts; e++) {
                int64_t n = 0;
                for (int k = 0; k < n_moe; k++) n += m->stats.counts[(size_t)k * c->n_experts + e];
                rank_mine[RK_N + e] = (double)n;
            }
            if ((st = stats_allreduce(m))) goto done;
        }
        for (int k = 0; k < n_moe; k++) { /* share of the chosen assignments per expert */
            const int64_t *cnt = m->stats.counts + (size_t)k * c->n_experts;
            int64_t total = 0;
            for (int e = 0; e < c->n_experts; e++) total += cnt[e];
            for (int e = 0; e < c->n_experts; e++) load[k * c->n_experts + e] = total ? (float)((double)cnt[e] / (double)total) : 0.0f;
            route_metrics(m, k, met + (size_t)k * M_N);
        }
        /* The optimizer is sharded over the ranks: each updates its own shard
         * of the parameters from its shard of the summed gradient (in acc),
         * then the shards are gathered. Elementwise, and the norm's units
         * are whole in a shard, so the bits are those of one process. */
        float *g = acc ? acc : m->grads;
        double gn = 0;
        PROF_RUN(PROF_GRAD_NORM, st = shard_grad_norm(g, m->n_params, gnorm_parts, &gn));
        if (st) goto done;
        if (!isfinite(gn)) {
            if (R > 1) (void)dist_allgather_shards(g, m->n_params, GRAD_NORM_UNIT); /* to name the tensor */
            const char *t = first_nonfinite_tensor(m, g);
            st = moe_error(MOE_ERR_NUMERIC, "step %d: the gradient of %s is not finite (NaN or Inf); stopped, "
                           "the last checkpoint is kept", step + 1, t ? t : "the model");
            goto done;
        }
        float lr = lr_at(&p, step);
        PROF_RUN(PROF_ADAMW, model_adamw_range(m, g, am, av, lr, &p, step + 1, clip_scale(gn, p.grad_clip),
                                               shard_off, shard_off + shard_len));
        if (R > 1 && (st = dist_allgather_shards(m->params, m->n_params, GRAD_NORM_UNIT))) {
            moe_error_prefix(st, "step %d", step + 1);
            goto done;
        }
        model_update_bias(m); /* aux-loss-free balancing, from this step's loads */
        m->train_step = step + 1;
        done_here++;
        const double dt = moe_now() - t0;
        if (R > 1) { /* measured before the gather that collects them */
            rank_mine[RK_A2A_SENT] = (double)dw->a2a_sent; rank_mine[RK_A2A_RECV] = (double)dw->a2a_recv;
            rank_mine[RK_RED_SENT] = (double)dw->reduce_sent; rank_mine[RK_RED_RECV] = (double)dw->reduce_recv;
            rank_mine[RK_T_A2A] = dw->t_a2a; rank_mine[RK_T_RED] = dw->t_reduce; rank_mine[RK_T_STEP] = dt;
            rank_mine[RK_ROWS_OUT] = ep ? (double)expert_parallel_rows_out(ep) : 0;
            if ((st = dist_gather_f64(rank_all, rank_mine, RK_N + MOE_MAX(c->n_experts, 1)))) goto done;
        }
        float balance = 0;
        for (int k = 0; k < n_moe; k++) {
            float mx = 0;
            for (int e = 0; e < c->n_experts; e++) mx = MOE_MAX(mx, load[k * c->n_experts + e]);
            balance = MOE_MAX(balance, mx * c->n_experts);
        }
        float maxvio = 0, drop_rate = 0;
        for (int k = 0; k < n_moe; k++) {
            maxvio = MOE_MAX(maxvio, (float)met[(size_t)k * M_N + M_MAXVIO]);
            drop_rate = MOE_MAX(drop_rate, (float)met[(size_t)k * M_N + M_DROP]);
        }
        int evaluated = 0;
        if ((p.eval_every > 0 && (step + 1) % p.eval_every == 0) || step + 1 == p.steps) {
            double vl;
            model_stats_reset(m);
            int prof = moe_prof_on; /* the profile covers training steps only */
            moe_prof_on = 0;
            eval_progress quiet = {0}; /* not stoppable: the loop honours a request after the step */
            st = evaluate(m, d, p.seq, p.eval_batches, 0, &vl, NULL, &quiet);
            moe_prof_on = prof;
            if (st) goto done;
            for (int k = 0; k < n_moe; k++) {
                double vm[M_N];
                route_metrics(m, k, vm);
                met[(size_t)k * M_N + M_VAL_MAXVIO] = vm[M_MAXVIO];
            }
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
            json_float(log, "seq_aux", sum.seq_aux);
            if (n_moe) {
                json_layers(log, "maxvio", met, n_moe, M_MAXVIO);
                json_layers(log, "entropy", met, n_moe, M_ENTROPY);
                json_layers(log, "router_entropy", met, n_moe, M_ROUTER_ENTROPY);
                json_layers(log, "dead", met, n_moe, M_DEAD);
                json_layers(log, "drop", met, n_moe, M_DROP);
                json_layers(log, "layer_aux", met, n_moe, M_AUX);
                json_layers(log, "layer_z", met, n_moe, M_Z);
                json_layers(log, "layer_seq_aux", met, n_moe, M_SEQ);
            }
            if (R > 1) json_ranks(log, rank_all, R, c->n_experts);
            fprintf(log, ",\"load\":[");
            for (int k = 0; k < n_moe; k++) {
                fprintf(log, "%s[", k ? "," : "");
                for (int e = 0; e < c->n_experts; e++) fprintf(log, "%s%.4f", e ? "," : "", load[k * c->n_experts + e]);
                fprintf(log, "]");
            }
            fprintf(log, "]}\n");
            if (evaluated) {
                fprintf(log, "{\"step\":%d", step + 1);
                json_float(log, "val_loss", val_loss);
                if (n_moe) json_layers(log, "val_maxvio", met, n_moe, M_VAL_MAXVIO);
                fprintf(log, "}\n");
            }
            fflush(log);
        }
        if (fn && me == 0) {
            double elapsed = moe_now() - t_begin;
            moe_train_progress pr = {
                .step = step + 1, .steps = p.steps, .loss = (float)sum.loss, .val_loss = val_loss,
                .lr = lr, .tokens_per_s = (float)(BT * p.grad_accum / dt), .balance = balance,
                .elapsed_s = elapsed, .eta_s = elapsed / done_here * (p.steps - step - 1),
                .evaluated = evaluated, .maxvio = maxvio, .drop_rate = drop_rate, .ranks = R};
            if (R > 1) {
                pr.a2a_bytes = rank_all[RK_A2A_SENT] + rank_all[RK_A2A_RECV];
                pr.a2a_s = rank_all[RK_T_A2A];
                pr.reduce_s = rank_all[RK_T_RED];
                pr.compute_s = dt - pr.a2a_s - pr.reduce_s;
            }
            fn(&pr, user);
        }
        const int last = step + 1 == p.steps; /* saved and finished anyway */
        int req = step_requests(&p, moe_now() - t_saved);
        /* a stop or save one rank asks for happens on all, after this same step */
        if (R > 1 && (st = dist_or_bits(&req))) goto done;
        const int stop = (req & REQ_STOP) && !last;
        const int pause = p.stop_after > 0 && done_here >= p.stop_after && !last;
        const int periodic = p.save_every > 0 && (step + 1) % p.save_every == 0;
        if (pause || stop || periodic || (req & REQ_SAVE) || last) {
            /* rank 0 writes the state, the optimizer's moments gathered from the shards */
            if (R > 1 && ((st = dist_allgather_shards(am, m->n_params, GRAD_NORM_UNIT)) ||
                          (st = dist_allgather_shards(av, m->n_params, GRAD_NORM_UNIT)))) goto done;
            if (me == 0 && (st = save_checkpoint(m, &p, &rng, d->fingerprint, am, av))) goto done;
            t_saved = moe_now();
        }
        if (stop) {
            stop_honoured();
            st = moe_error(MOE_ERR_INTERRUPTED, "stopped on request after step %d of %d; saved %s",
                           step + 1, p.steps, p.out_path);
            break;
        }
        if (pause) break;
    }
    if (start >= p.steps) st = moe_error(MOE_ERR_INVALID_ARG, "the run is already complete (step %d of %d)", start, p.steps);
done:
    m->training = 0;
    if (m->ep == ep) m->ep = NULL;
    expert_parallel_free(ep);
    moe_free(acc); moe_free(gnorm_parts); moe_free(tok_other); moe_free(tgt_other);
    moe_free(rank_all); moe_free(rank_mine); moe_free(loss_all);
    if (log) fclose(log);
    moe_free(am); moe_free(av); moe_free(tok); moe_free(tgt); moe_free(load); moe_free(met);
    return st;
}
