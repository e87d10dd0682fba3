/* model: the decoder-only transformer with dense and MoE FFN layers.
 * Training forward/backward over B x T tokens and single-token decoding. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "dist/expert_parallel.h"
#include "moe/expert_store.h"
#include "kernels/kernels.h"
#include "model/model.h"

static int head_dim(const moe_config *c) { return moe_config_head_dim(c); }

/* Points the views of w into buf (fp32) following the tensor list. */
static void bind(model_weights *w, float *buf, const moe_model *m) {
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        moe_tensor *v = model_tensor_slot(w, t);
        v->data = buf + t->offset;
        v->type = DT_F32;
        v->n_dims = t->n_dims;
        for (int k = 0; k < 4; k++) v->ne[k] = k < 3 ? t->ne[k] : 1;
        v->row_bytes = (size_t)t->ne[0] * sizeof(float);
    }
    if (m->cfg.tied_embeddings) w->output = w->token_embd;
}

moe_status model_alloc_shell(moe_model **out, const moe_config *cfg) {
    *out = NULL;
    moe_status st = moe_config_validate(cfg);
    if (st) return st;
    moe_model *m = moe_calloc(1, sizeof *m);
    if (!m) return MOE_ERR_NOMEM;
    m->cfg = *cfg;
    m->plan = moe_calloc((size_t)cfg->n_layers, sizeof(layer_plan));
    m->w.layers = moe_calloc((size_t)cfg->n_layers, sizeof(layer_weights));
    m->g.layers = moe_calloc((size_t)cfg->n_layers, sizeof(layer_weights));
    if (!m->plan || !m->w.layers || !m->g.layers) { moe_model_free(m); return MOE_ERR_NOMEM; }
    model_plan_layers(cfg, m->plan);
    const int n = model_tensor_list(cfg, m->plan, NULL, 0, &m->n_params);
    m->tensors = moe_calloc((size_t)n, sizeof(tensor_desc));
    if (!m->tensors) { moe_model_free(m); return MOE_ERR_NOMEM; }
    m->n_tensors = model_tensor_list(cfg, m->plan, m->tensors, n, NULL);
    if (m->n_tensors != n || (int64_t)m->n_params != moe_config_param_counts(cfg).total) {
        moe_model_free(m);
        return moe_error(MOE_ERR_INVALID_ARG, "internal: parameter count mismatch");
    }
    /* RoPE angles for the first positions (past them rope computes its own) */
    /* sized for the rotated part (all of a head but in MLA) */
    const int rd = moe_config_rope_dim(cfg);
    m->rope_n = MOE_MIN(cfg->max_seq, ROPE_TABLE_FLOATS / rd);
    m->rope_tab = moe_malloc((size_t)m->rope_n * rd * sizeof(float));
    if (!m->rope_tab) { moe_model_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "RoPE table"); }
    rope_table_fill(m->rope_tab, m->rope_n, rd, cfg->rope_base);
    route_stats *rs = &m->stats;
    rs->n_moe = moe_config_n_moe_layers(cfg);
    if (rs->n_moe) {
        rs->E = cfg->n_experts;
        const size_t nl = (size_t)rs->n_moe;
        rs->counts = moe_calloc(nl * rs->E, sizeof(int64_t));
        rs->assigned = moe_calloc(nl, sizeof(int64_t));
        rs->dropped = moe_calloc(nl, sizeof(int64_t));
        rs->aux = moe_calloc(4 * nl, sizeof(double));
        if (!rs->counts || !rs->assigned || !rs->dropped || !rs->aux) { moe_model_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "routing statistics"); }
        rs->z = rs->aux + nl; rs->seq_aux = rs->z + nl; rs->entropy = rs->seq_aux + nl;
    }
    *out = m;
    return MOE_OK;
}

moe_status model_alloc(moe_model **out, const moe_config *cfg) {
    *out = NULL;
    moe_status st = moe_config_validate(cfg);
    if (st) return st;
    moe_param_counts pc = moe_config_param_counts(cfg);
    if ((double)pc.total * 4.0 > 0.75 * (double)moe_physical_memory())
        return moe_error(MOE_ERR_NOMEM, "model has %lld parameters (%.1f GiB in fp32): more than this machine's memory allows",
                         (long long)pc.total, pc.total * 4.0 / (1 << 30));
    moe_model *m;
    if ((st = model_alloc_shell(&m, cfg))) return st;
    m->params = moe_malloc(m->n_params * sizeof(float));
    if (!m->params) { moe_model_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "model parameters"); }
    bind(&m->w, m->params, m);
    *out = m;
    return MOE_OK;
}

void model_stats_reset(moe_model *m) {
    route_stats *rs = &m->stats;
    if (!rs->n_moe) return;
    const size_t nl = (size_t)rs->n_moe;
    memset(rs->counts, 0, nl * rs->E * sizeof(int64_t));
    memset(rs->assigned, 0, nl * sizeof(int64_t));
    memset(rs->dropped, 0, nl * sizeof(int64_t));
    memset(rs->aux, 0, 4 * nl * sizeof(double));
    rs->calls = 0;
}

static void stats_add(moe_model *m, int k, const moe_routing *r) {
    route_stats *rs = &m->stats;
    for (int e = 0; e < rs->E; e++) rs->counts[(size_t)k * rs->E + e] += r->sel_counts[e];
    rs->assigned[k] += r->assigned;
    rs->dropped[k] += r->dropped;
    rs->aux[k] += r->aux;
    rs->z[k] += r->z;
    rs->seq_aux[k] += r->seq_aux;
    rs->entropy[k] += r->entropy;
}

void model_update_bias(moe_model *m) {
    const moe_config *c = &m->cfg;
    if (!c->expert_bias || c->bias_rate <= 0) return;
    for (int l = 0, k = 0; l < c->n_layers; l++) {
        if (!moe_config_layer_is_moe(c, l)) continue;
        moe_bias_update(F32(m->w.layers[l].exp_bias), m->stats.counts + (size_t)k * c->n_experts, c->n_experts, c->bias_rate);
        k++;
    }
}

matmul_precision model_matmul(const moe_config *c) {
    return c->matmul == MOE_MATMUL_BF16 ? MATMUL_BF16 : MATMUL_FP32;
}

static void free_acts(model_acts *a, int n_layers);

moe_route_opts model_route_opts(const moe_model *m, int layer, int T) {
    const moe_config *c = &m->cfg;
    moe_route_opts o = {
        .score = c->router, .mode = c->routing, .renorm = c->renorm_topk, .scale = c->routed_scale,
        .n_group = c->n_group, .topk_group = c->topk_group,
        .capacity = m->training ? c->capacity_factor : c->eval_capacity_factor,
        .overflow = c->overflow, .seq_len = T,
        .jitter = m->training ? c->router_jitter : 0.0f,
        /* one independent stream per layer and micro-batch */
        .jitter_seed = m->jitter_seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(layer + 1)),
        .matmul = model_matmul(c),
        /* an ablation applies to evaluation and inference, never to training */
        .disabled = m->disabled && !m->training ? m->disabled + (size_t)layer * c->n_experts : NULL,
        .threshold = m->training ? 0.0f : m->route_threshold,
        .min_keep = m->route_min > 0 ? m->route_min : 1,
    };
    return o;
}

int model_route_k(const moe_model *m) { return m->route_k > 0 ? m->route_k : m->cfg.top_k; }

void model_count_routing(moe_model *m, const moe_routing *r) {
    m->routed_tokens += r->N;
    for (int e = 0; e < r->E; e++) m->routed_experts += r->counts[e];
}

moe_status moe_model_set_routing(moe_model *m, int active_experts, float threshold, int min_experts) {
    const moe_config *c = &m->cfg;
    const int E = c->n_experts;
    if (E == 0 && (active_experts || threshold != 0.0f || min_experts))
        return moe_error(MOE_ERR_INVALID_ARG, "a dense model has no experts to choose");
    if (active_experts < 0 || active_experts > E)
        return moe_error(MOE_ERR_INVALID_ARG, "active experts %d must be in 1..%d (the model's experts; 0 = its top-k, %d)",
                         active_experts, E, c->top_k);
    const int k = active_experts ? active_experts : c->top_k;
    if (c->n_group > 1 && c->topk_group < c->n_group && k > c->topk_group * (E / c->n_group))
        return moe_error(MOE_ERR_INVALID_ARG, "active experts %d exceeds the %d experts of the %d groups each token may use "
                         "(group-limited routing: %d groups of %d)", k, c->topk_group * (E / c->n_group), c->topk_group,
                         c->n_group, E / c->n_group);
    if (!(threshold >= 0.0f && threshold <= 1.0f))
        return moe_error(MOE_ERR_INVALID_ARG, "expert threshold %g must be in [0, 1] (a fraction of the best expert's weight; 0 = off)",
                         threshold);
    if (min_experts < 0 || min_experts > k)
        return moe_error(MOE_ERR_INVALID_ARG, "minimum experts %d must be in 1..%d (the experts chosen per token)", min_experts, k);
    if (threshold > 0 && c->routing == MOE_ROUTING_EXPERT)
        return moe_error(MOE_ERR_UNSUPPORTED, "expert-choice routing: each expert picks its tokens, so a per-token "
                         "threshold does not apply (--active-experts sets the k of its capacity)");
    /* the MoE caches hold k slots per token: re-planned on next use */
    if (k != model_route_k(m)) { free_acts(&m->acts, c->n_layers); model_infer_free(m); }
    m->route_k = active_experts;
    m->route_threshold = threshold;
    m->route_min = min_experts;
    return MOE_OK;
}

double moe_model_experts_per_token(moe_model *m, int reset) {
    const double v = m->routed_tokens ? (double)m->routed_experts / (double)m->routed_tokens : 0.0;
    if (reset) m->routed_tokens = m->routed_experts = 0;
    return v;
}

moe_weights model_layer_moe_weights(const layer_weights *W) {
    moe_weights w = {.router = W->router.data, .router_t = W->router.type, .gate = W->gate_exps.data, .up = W->up_exps.data,
                     .down = W->down_exps.data, .bias = F32(W->exp_bias), .sh_gate = W->sh_gate.data,
                     .sh_up = W->sh_up.data, .sh_down = W->sh_down.data, .sh_inp = F32(W->sh_inp),
                     .gate_t = W->gate_exps.type, .up_t = W->up_exps.type, .down_t = W->down_exps.type,
                     .sh_gate_t = W->sh_gate.type, .sh_up_t = W->sh_up.type, .sh_down_t = W->sh_down.type};
    return w;
}

/* Norm weights start at 1; matrices at N(0, init_std), output projections
 * (attn_output, ffn_down) scaled by 1/sqrt(2 * n_layers) as in GPT-2. */
void model_init_weights(moe_model *m, uint64_t seed) {
    moe_rng rng;
    moe_rng_seed(&rng, seed);
    float resid = 1.0f / sqrtf(2.0f * (float)m->cfg.n_layers);
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        float *p = m->params + t->offset;
        if (t->init != TENSOR_INIT_NORMAL && t->init != TENSOR_INIT_RESID) {
            for (size_t j = 0; j < t->size; j++) p[j] = t->init == TENSOR_INIT_ONES ? 1.0f : 0.0f;
            continue;
        }
        float std = m->cfg.init_std;
        if (t->init == TENSOR_INIT_RESID) std *= resid;
        for (size_t j = 0; j < t->size; j++) p[j] = std * moe_rng_normal(&rng);
    }
}

moe_status model_alloc_grads(moe_model *m) {
    if (m->grads) return MOE_OK;
    m->grads = moe_calloc(m->n_params, sizeof(float));
    if (!m->grads) return moe_error_prefix(MOE_ERR_NOMEM, "gradients");
    bind(&m->g, m->grads, m);
    return MOE_OK;
}

static void free_acts(model_acts *a, int n_layers) {
    if (a->layers)
        for (int l = 0; l < n_layers; l++) moe_cache_free(&a->layers[l].moe);
    for (int i = 0; i < a->n_blocks; i++) moe_free(a->blocks[i]);
    moe_free(a->blocks);
    moe_free(a->layers);
    memset(a, 0, sizeof *a);
}

void moe_model_free(moe_model *m) {
    if (!m) return;
    free_acts(&m->acts, m->cfg.n_layers);
    model_infer_free(m);
    model_repack_free(m); /* reads the tensor list */
    moe_free(m->params);
    moe_free(m->grads);
    moe_free(m->tensors);
    moe_free(m->plan);
    moe_free(m->owned);
    if (m->file) model_close_file(m);
    moe_free(m->w.layers);
    moe_free(m->g.layers);
    moe_free(m->stats.counts);
    moe_free(m->stats.assigned);
    moe_free(m->stats.dropped);
    moe_free(m->stats.aux);
    moe_free(m->rope_tab);
    model_offload_free(m);
    moe_free(m->disabled);
    moe_tokenizer_free(m->tok);
    moe_free(m);
}

const moe_config *moe_model_config(const moe_model *m) { return &m->cfg; }
const moe_tokenizer *moe_model_tokenizer(const moe_model *m) { return m->tok; }
void moe_model_set_tokenizer(moe_model *m, moe_tokenizer *tok) {
    if (m->tok != tok) moe_tokenizer_free(m->tok);
    m->tok = tok;
}

moe_status moe_model_create(moe_model **out, const moe_config *cfg, uint64_t seed) {
    moe_status st = model_alloc(out, cfg);
    if (st) return st;
    model_init_weights(*out, seed);
    return MOE_OK;
}

/* ---- activations ---- */
static float *grab(model_acts *a, size_t n, int *ok) {
    if (!*ok) return NULL;
    float *p = moe_calloc(n ? n : 1, sizeof(float));
    if (!p) { *ok = 0; return NULL; }
    a->blocks[a->n_blocks++] = p;
    return p;
}

moe_status model_alloc_acts(moe_model *m, int B, int T) {
    model_acts *a = &m->acts;
    if (a->B == B && a->T == T) return MOE_OK;
    const moe_config *c = &m->cfg;
    free_acts(a, c->n_layers);
    const size_t N = (size_t)B * T, d = c->d_model, hd = head_dim(c);
    const size_t qd = hd * c->n_heads, kd = hd * c->n_kv_heads, V = c->vocab_size;
    const int mla = c->attn == MOE_ATTN_MLA;
    const size_t H = c->n_heads, vd = moe_config_v_head_dim(c), rope = moe_config_rope_dim(c);
    const size_t kvr = (size_t)c->kv_lora_rank, qr = (size_t)c->q_lora_rank;
    /* MLA's keys and values are per query head, [N][H][hd] and [N][H][vd] */
    const size_t kbuf = mla ? H * hd : kd, vbuf = mla ? H * vd : kd, obuf = mla ? H * vd : qd;
    a->blocks = moe_calloc((size_t)(24 * c->n_layers + 40), sizeof(void *));
    a->layers = moe_calloc((size_t)c->n_layers, sizeof(layer_acts));
    if (!a->blocks || !a->layers) { free_acts(a, c->n_layers); return moe_error_prefix(MOE_ERR_NOMEM, "activations"); }
    int ok = 1;
    size_t ff = 1;
    for (int l = 0; l < c->n_layers; l++) {
        layer_acts *L = &a->layers[l];
        L->x_in = grab(a, N * d, &ok); L->hn1 = grab(a, N * d, &ok); L->rstd1 = grab(a, N, &ok);
        L->q = grab(a, N * qd, &ok); L->k = grab(a, N * kbuf, &ok); L->v = grab(a, N * vbuf, &ok);
        L->att = grab(a, (size_t)B * c->n_heads * T * T, &ok); L->atto = grab(a, N * obuf, &ok);
        if (m->plan[l].attn == ATTN_MLA) {
            L->lat_raw = grab(a, N * kvr, &ok); L->lat = grab(a, N * kvr, &ok); L->rstd_kv = grab(a, N, &ok);
            if (m->plan[l].q_lora) {
                L->qa = grab(a, N * qr, &ok); L->qan = grab(a, N * qr, &ok); L->rstd_qa = grab(a, N, &ok);
            }
        }
        L->x_mid = grab(a, N * d, &ok); L->hn2 = grab(a, N * d, &ok); L->rstd2 = grab(a, N, &ok);
        if (moe_config_layer_is_moe(c, l)) {
            float cf = MOE_MAX(c->capacity_factor, c->eval_capacity_factor);
            const int k = model_route_k(m);
            int64_t rows = moe_rows_needed((int)N, c->n_experts, k, c->routing, cf);
            if (ok && moe_cache_init(&L->moe, (int)N, (int)d, c->n_experts, k, c->d_expert,
                                     c->n_shared_experts * c->d_shared, c->routing, rows)) ok = 0;
        } else {
            L->hg = grab(a, N * c->d_ff, &ok); L->hu = grab(a, N * c->d_ff, &ok); L->act = grab(a, N * c->d_ff, &ok);
            ff = (size_t)c->d_ff;
        }
    }
    a->x_final = grab(a, N * d, &ok); a->hnf = grab(a, N * d, &ok); a->rstdf = grab(a, N, &ok);
    a->logits = grab(a, N * V, &ok);
    a->pos = (int32_t *)grab(a, N, &ok);
    a->dx = grab(a, N * d, &ok); a->dx2 = grab(a, N * d, &ok); a->dh = grab(a, N * d, &ok);
    a->dq = grab(a, N * qd, &ok); a->dk = grab(a, N * kbuf, &ok); a->dv = grab(a, N * vbuf, &ok);
    a->datto = grab(a, N * obuf, &ok); a->qkv = grab(a, N * (qd + 2 * kd), &ok);
    if (mla) {
        a->kv = grab(a, N * (kvr + rope), &ok); a->dlat = grab(a, N * kvr, &ok);
        a->dlat_raw = grab(a, N * kvr, &ok); a->head = grab(a, N * MOE_MAX(hd, kvr), &ok);
        a->pe = grab(a, N * H * rope, &ok);
        if (qr) { a->dqa = grab(a, N * qr, &ok); a->dqan = grab(a, N * qr, &ok); }
    }
    a->dff1 = grab(a, N * ff, &ok); a->dff2 = grab(a, N * ff, &ok); a->dff3 = grab(a, N * ff, &ok);
    a->dlogits = grab(a, N * V, &ok);
    if (!ok) { free_acts(a, c->n_layers); return moe_error_prefix(MOE_ERR_NOMEM, "activations for batch %d x %d", B, T); }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) a->pos[b * T + t] = t;
    a->B = B; a->T = T;
    return MOE_OK;
}

static void add_into(float *out, const float *a, const float *b, size_t n) {
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* ---- training forward ---- */
/* q, k, v = hn1 @ [wq; wk; wv]^T as one matmul into qkv [N][qd+2kd], then
 * split. Each output element is the same sum as in three separate matmuls. */
static void qkv_forward(layer_acts *A, float *qkv, const layer_weights *W, int N, int d, int qd,
                        int kd, matmul_precision mm) {
    const int w = qd + 2 * kd;
    matmul_forward(qkv, A->hn1, F32(W->wq), NULL, N, d, w, mm);
    #pragma omp parallel for schedule(static) if (N >= 256)
    for (int n = 0; n < N; n++) {
        const float *r = qkv + (size_t)n * w;
        memcpy(A->q + (size_t)n * qd, r, sizeof(float) * qd);
        memcpy(A->k + (size_t)n * kd, r + qd, sizeof(float) * kd);
        memcpy(A->v + (size_t)n * kd, r + qd + kd, sizeof(float) * kd);
    }
}

/* Gradients of qkv_forward: dh = [dq dk dv] @ [wq; wk; wv] (set) and
 * d[wq; wk; wv] += [dq dk dv]^T @ hn1, each one matmul. The k-sum of dh runs
 * over q's columns, then k's, then v's: the order of three chained calls. */
static void qkv_backward(model_acts *a, const layer_acts *A, const layer_weights *W,
                         layer_weights *G, int N, int d, int qd, int kd, matmul_precision mm) {
    const int w = qd + 2 * kd;
    #pragma omp parallel for schedule(static) if (N >= 256)
    for (int n = 0; n < N; n++) {
        float *r = a->qkv + (size_t)n * w;
        memcpy(r, a->dq + (size_t)n * qd, sizeof(float) * qd);
        memcpy(r + qd, a->dk + (size_t)n * kd, sizeof(float) * kd);
        memcpy(r + qd + kd, a->dv + (size_t)n * kd, sizeof(float) * kd);
    }
    matmul_backward_set_din(a->dh, F32(G->wq), NULL, a->qkv, A->hn1, F32(W->wq), N, d, w, mm);
}

/* ---- multi-head latent attention (DeepSeek-V2/V3), training form ----
 * q = h Wq (or norm(h Wq_a) Wq_b), each head [q_nope | q_pe];
 * [latent | k_pe] = h Wkv_a, the latent normalised, k_pe one rotary key for
 * all heads; head h attends with key [latent Wkb_h | k_pe] (Wkb_h [kvr][nope])
 * and value latent Wvb_h^T (Wvb_h [vd][kvr]). Inference (infer.c) computes
 * the same in the absorbed form over a cache of the latent and k_pe. */
static void copy_rows(float *dst, size_t ds, const float *src, size_t ss, int n, int w) {
    for (int i = 0; i < n; i++) memcpy(dst + (size_t)i * ds, src + (size_t)i * ss, sizeof(float) * w);
}

/* RoPE (or its backward) on the last rope_dim floats of each of nh heads
 * hw floats wide in x[N][nh][hw]: gathered into acts.pe, turned, put back. */
static void rope_tail(moe_model *m, float *x, int N, int nh, int hw, int backward) {
    const moe_config *c = &m->cfg;
    const int R = moe_config_rope_dim(c);
    float *pe = m->acts.pe;
    const size_t rows = (size_t)N * nh;
    for (size_t r = 0; r < rows; r++) memcpy(pe + r * R, x + r * hw + hw - R, sizeof(float) * R);
    if (backward) rope_backward(pe, m->acts.pos, N, nh, R, c->rope_base, m->rope_tab, m->rope_n);
    else rope_forward(pe, m->acts.pos, N, nh, R, c->rope_base, m->rope_tab, m->rope_n);
    for (size_t r = 0; r < rows; r++) memcpy(x + r * hw + hw - R, pe + r * R, sizeof(float) * R);
}

static float mla_scale(const moe_config *c) { return 1.0f / sqrtf((float)head_dim(c)); }

/* A->atto[N][H][vd] from A->hn1; saves what mla_backward needs. */
static void mla_forward(moe_model *m, layer_acts *A, const layer_weights *W, const layer_plan *P,
                        int B, int T, matmul_precision mm) {
    const moe_config *c = &m->cfg;
    model_acts *a = &m->acts;
    const int N = B * T, d = c->d_model, H = c->n_heads, hd = head_dim(c), vd = moe_config_v_head_dim(c);
    const int R = moe_config_rope_dim(c), nope = hd - R, kvr = c->kv_lora_rank, qr = c->q_lora_rank;
    const int kw = kvr + R;
    if (P->q_lora) {
        matmul_forward(A->qa, A->hn1, F32(W->wq_a), NULL, N, d, qr, mm);
        rmsnorm_forward(A->qan, A->rstd_qa, A->qa, F32(W->q_a_norm), N, qr, c->norm_eps);
        matmul_forward(A->q, A->qan, F32(W->wq_b), NULL, N, qr, H * hd, mm);
    } else {
        matmul_forward(A->q, A->hn1, F32(W->wq), NULL, N, d, H * hd, mm);
    }
    rope_tail(m, A->q, N, H, hd, 0);
    matmul_forward(a->kv, A->hn1, F32(W->wkv_a), NULL, N, d, kw, mm);
    rope_tail(m, a->kv, N, 1, kw, 0);
    copy_rows(A->lat_raw, kvr, a->kv, kw, N, kvr);
    rmsnorm_forward(A->lat, A->rstd_kv, A->lat_raw, F32(W->kv_a_norm), N, kvr, c->norm_eps);
    for (int h = 0; h < H; h++) {
        /* k_nope_h = latent @ Wkb_h: din = dout @ w with the latent as dout */
        matmul_backward_set_din(a->head, NULL, NULL, A->lat, NULL, F32(W->wk_b) + (size_t)h * kvr * nope, N, nope, kvr, mm);
        copy_rows(A->k + (size_t)h * hd, (size_t)H * hd, a->head, nope, N, nope);
        copy_rows(A->k + (size_t)h * hd + nope, (size_t)H * hd, a->kv + kvr, kw, N, R);
    }
    /* the values of all heads at once: Wvb is [H * vd][kvr] */
    matmul_forward(A->v, A->lat, F32(W->wv_b), NULL, N, kvr, H * vd, mm);
    attention_forward_ex(A->atto, A->att, A->q, A->k, A->v, B, T, H, H, hd, vd, mla_scale(c));
}

/* From acts.datto = d(atto): sets acts.dh = d(hn1) and accumulates the
 * gradients of every MLA tensor. */
static void mla_backward(moe_model *m, const layer_acts *A, const layer_weights *W, layer_weights *G,
                         const layer_plan *P, matmul_precision mm) {
    const moe_config *c = &m->cfg;
    model_acts *a = &m->acts;
    const int B = a->B, T = a->T, N = B * T, d = c->d_model, H = c->n_heads, hd = head_dim(c);
    const int vd = moe_config_v_head_dim(c), R = moe_config_rope_dim(c), nope = hd - R;
    const int kvr = c->kv_lora_rank, qr = c->q_lora_rank, kw = kvr + R;
    moe_zero(a->dq, (size_t)N * H * hd);
    moe_zero(a->dk, (size_t)N * H * hd);
    moe_zero(a->dv, (size_t)N * H * vd);
    attention_backward_ex(a->dq, a->dk, a->dv, a->datto, A->att, A->q, A->k, A->v, B, T, H, H, hd, vd, mla_scale(c));
    matmul_backward_set_din(a->dlat, F32(G->wv_b), NULL, a->dv, A->lat, F32(W->wv_b), N, kvr, H * vd, mm);
    moe_zero(a->kv, (size_t)N * kw); /* becomes d[latent | k_pe] */
    for (int h = 0; h < H; h++) {
        const size_t off = (size_t)h * kvr * nope;
        copy_rows(a->head, nope, a->dk + (size_t)h * hd, (size_t)H * hd, N, nope);
        /* dWkb_h += latent^T dk_nope_h; dlatent += dk_nope_h Wkb_h^T */
        matmul_backward(NULL, F32(G->wk_b) + off, NULL, A->lat, a->head, F32(W->wk_b) + off, N, nope, kvr, mm);
        matmul_forward(a->dlat_raw, a->head, F32(W->wk_b) + off, NULL, N, nope, kvr, mm);
        for (size_t i = 0; i < (size_t)N * kvr; i++) a->dlat[i] += a->dlat_raw[i];
        for (int n = 0; n < N; n++) /* the shared rotary key sums its heads' gradients in head order */
            for (int j = 0; j < R; j++) a->kv[(size_t)n * kw + kvr + j] += a->dk[((size_t)n * H + h) * hd + nope + j];
    }
    rope_tail(m, a->kv, N, 1, kw, 1);
    moe_zero(a->dlat_raw, (size_t)N * kvr);
    rmsnorm_backward(a->dlat_raw, F32(G->kv_a_norm), a->dlat, A->lat_raw, F32(W->kv_a_norm), A->rstd_kv, N, kvr);
    copy_rows(a->kv, kw, a->dlat_raw, kvr, N, kvr);
    matmul_backward_set_din(a->dh, F32(G->wkv_a), NULL, a->kv, A->hn1, F32(W->wkv_a), N, d, kw, mm);
    rope_tail(m, a->dq, N, H, hd, 1);
    if (P->q_lora) {
        matmul_backward_set_din(a->dqan, F32(G->wq_b), NULL, a->dq, A->qan, F32(W->wq_b), N, qr, H * hd, mm);
        moe_zero(a->dqa, (size_t)N * qr);
        rmsnorm_backward(a->dqa, F32(G->q_a_norm), a->dqan, A->qa, F32(W->q_a_norm), A->rstd_qa, N, qr);
        matmul_backward(a->dh, F32(G->wq_a), NULL, a->dqa, A->hn1, F32(W->wq_a), N, d, qr, mm);
    } else {
        matmul_backward(a->dh, F32(G->wq), NULL, a->dq, A->hn1, F32(W->wq), N, d, H * hd, mm);
    }
}

moe_status model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B,
                         int T, model_losses *losses) {
    const moe_config *c = &m->cfg;
    const matmul_precision mm = model_matmul(c);
    if (m->arch[0]) /* our own models only: fp32 weights, in the flat buffer or mapped (expert parallelism) */
        return moe_error(MOE_ERR_UNSUPPORTED, "a published %s model runs for inference only (no training or batch forward yet)", m->arch);
    const int mla = c->attn == MOE_ATTN_MLA;
    if (c->qk_norm || c->qkv_bias || c->rope_neox || c->yarn_factor > 0 || c->rope_freq_scale != 1.0f ||
        (!mla && (moe_config_rope_dim(c) != head_dim(c) || moe_config_v_head_dim(c) != head_dim(c))))
        return moe_error(MOE_ERR_UNSUPPORTED, "training supports GQA attention with full adjacent-pair RoPE and MLA "
                         "(not yet: q/k norms, q/k/v biases, NeoX RoPE, partial RoPE or v_head_dim outside MLA, YaRN)");
    moe_status st = model_alloc_acts(m, B, T);
    if (st) return st;
    model_acts *a = &m->acts;
    const int N = B * T, d = c->d_model, hd = head_dim(c), H = c->n_heads, KVH = c->n_kv_heads;
    const int V = c->vocab_size, vd = moe_config_v_head_dim(c);
    for (int i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return moe_error(MOE_ERR_INVALID_ARG, "token id %d out of range (vocab %d)", tokens[i], V);
    float *x = a->layers[0].x_in;
    double t_embed = moe_prof_start();
    #pragma omp parallel for schedule(static) if (N >= 256)
    for (int i = 0; i < N; i++) memcpy(x + (size_t)i * d, F32(m->w.token_embd) + (size_t)tokens[i] * d, sizeof(float) * d);
    moe_prof_lap(PROF_EMBED, &t_embed);
    model_losses L = {0};
    for (int l = 0; l < c->n_layers; l++) {
        layer_acts *A = &a->layers[l];
        const layer_weights *W = &m->w.layers[l];
        float *x_out = (l + 1 < c->n_layers) ? a->layers[l + 1].x_in : a->x_final;
        PROF_RUN(PROF_NORM, rmsnorm_forward(A->hn1, A->rstd1, A->x_in, F32(W->attn_norm), N, d, c->norm_eps));
        if (m->plan[l].attn == ATTN_MLA) {
            PROF_RUN(PROF_ATTENTION, mla_forward(m, A, W, &m->plan[l], B, T, mm));
        } else {
            PROF_RUN(PROF_QKVO, qkv_forward(A, a->qkv, W, N, d, H * hd, KVH * hd, mm));
            PROF_RUN(PROF_ROPE, rope_forward(A->q, a->pos, N, H, hd, c->rope_base, m->rope_tab, m->rope_n));
            PROF_RUN(PROF_ROPE, rope_forward(A->k, a->pos, N, KVH, hd, c->rope_base, m->rope_tab, m->rope_n));
            PROF_RUN(PROF_ATTENTION, attention_forward(A->atto, A->att, A->q, A->k, A->v, B, T, H, KVH, hd));
        }
        PROF_RUN(PROF_QKVO, matmul_forward(a->dh, A->atto, F32(W->wo), NULL, N, H * vd, d, mm));
        PROF_RUN(PROF_RESIDUAL, add_into(A->x_mid, A->x_in, a->dh, (size_t)N * d));
        PROF_RUN(PROF_NORM, rmsnorm_forward(A->hn2, A->rstd2, A->x_mid, F32(W->ffn_norm), N, d, c->norm_eps));
        if (m->plan[l].ffn == FFN_MOE) {
            moe_route_opts ro = model_route_opts(m, l, T);
            moe_weights mw = model_layer_moe_weights(W);
            mw.store = m->store; /* inference only: expert parallelism over our own model */
            mw.store_layer = l;
            A->moe.ex = m->ep ? expert_parallel_layer(m->ep, L.n_moe) : NULL;
            moe_forward(a->dh, &A->moe, A->hn2, &mw, N, &ro);
            if (m->ep && (st = expert_parallel_status(m->ep))) return st;
            if (m->store && (st = expert_store_check(m->store))) return st;
            L.aux += A->moe.r.aux;
            L.z += A->moe.r.z;
            L.seq_aux += A->moe.r.seq_aux;
            stats_add(m, L.n_moe, &A->moe.r);
            model_count_routing(m, &A->moe.r);
            L.n_moe++;
        } else {
            PROF_RUN(PROF_DENSE_FFN, matmul_forward(A->hg, A->hn2, F32(W->ffn_gate), NULL, N, d, c->d_ff, mm));
            PROF_RUN(PROF_DENSE_FFN, matmul_forward(A->hu, A->hn2, F32(W->ffn_up), NULL, N, d, c->d_ff, mm));
            PROF_RUN(PROF_DENSE_FFN, swiglu_forward(A->act, A->hg, A->hu, N, c->d_ff));
            PROF_RUN(PROF_DENSE_FFN, matmul_forward(a->dh, A->act, F32(W->ffn_down), NULL, N, c->d_ff, d, mm));
        }
        PROF_RUN(PROF_RESIDUAL, add_into(x_out, A->x_mid, a->dh, (size_t)N * d));
    }
    if (L.n_moe) m->stats.calls++;
    if (m->store) m->store_tokens += N; /* the cache's per-token figures (moe_model_offload_stats) */
    PROF_RUN(PROF_NORM, rmsnorm_forward(a->hnf, a->rstdf, a->x_final, F32(m->w.output_norm), N, d, c->norm_eps));
    PROF_RUN(PROF_LM_HEAD, matmul_forward(a->logits, a->hnf, F32(m->w.output), NULL, N, d, V, mm));
    if (targets) {
        int counted = 0;
        for (int i = 0; i < N; i++) counted += targets[i] >= 0;
        /* softmax kept in dlogits: model_backward turns it into the gradient */
        double sum = 0;
        PROF_RUN(PROF_LOSS, sum = crossentropy_softmax(a->dlogits, a->logits, targets, N, V));
        L.ce = counted ? sum / counted : 0.0;
        L.loss = L.ce + c->aux_loss_coef * L.aux + c->z_loss_coef * L.z + c->seq_aux_coef * L.seq_aux;
        if (!isfinite(L.loss)) {
            if (losses) *losses = L;
            return moe_error(MOE_ERR_NUMERIC, "loss is %s", isnan(L.loss) ? "NaN" : "Inf");
        }
    }
    if (losses) *losses = L;
    return MOE_OK;
}

/* ---- training backward ---- */
void model_backward(moe_model *m, const int32_t *tokens, const int32_t *targets, float loss_scale) {
    const moe_config *c = &m->cfg;
    const matmul_precision mm = model_matmul(c);
    model_acts *a = &m->acts;
    const int B = a->B, T = a->T, N = B * T, d = c->d_model, hd = head_dim(c);
    const int H = c->n_heads, KVH = c->n_kv_heads, V = c->vocab_size, F = c->d_ff;
    const int vd = moe_config_v_head_dim(c);
    moe_prof_pass = 1;
    int counted = 0;
    for (int i = 0; i < N; i++) counted += targets[i] >= 0;
    PROF_RUN(PROF_LOSS, crossentropy_softmax_backward(a->dlogits, targets, N, V, counted ? loss_scale / counted : 0.0f));
    PROF_RUN(PROF_LM_HEAD, matmul_backward_set_din(a->dh, F32(m->g.output), NULL, a->dlogits, a->hnf, F32(m->w.output), N, d, V, mm));
    float *dx = a->dx, *dx2 = a->dx2;
    PROF_RUN(PROF_ZERO_ACTS, moe_zero(dx, (size_t)N * d));
    PROF_RUN(PROF_NORM, rmsnorm_backward(dx, F32(m->g.output_norm), a->dh, a->x_final, F32(m->w.output_norm), a->rstdf, N, d));
    for (int l = c->n_layers - 1; l >= 0; l--) {
        layer_acts *A = &a->layers[l];
        const layer_weights *W = &m->w.layers[l];
        layer_weights *G = &m->g.layers[l];
        /* x_out = x_mid + ffn(norm(x_mid)); dx holds d(x_out) */
        PROF_RUN(PROF_RESIDUAL, memcpy(dx2, dx, sizeof(float) * N * d));
        if (m->plan[l].ffn == FFN_MOE) {
            PROF_RUN(PROF_ZERO_ACTS, moe_zero(a->dh, (size_t)N * d)); /* moe_backward adds */
            moe_route_opts ro = model_route_opts(m, l, T);
            moe_weights mw = model_layer_moe_weights(W);
            moe_grads mg = {.router = F32(G->router), .gate = F32(G->gate_exps), .up = F32(G->up_exps), .down = F32(G->down_exps),
                            .sh_gate = F32(G->sh_gate), .sh_up = F32(G->sh_up), .sh_down = F32(G->sh_down), .sh_inp = F32(G->sh_inp)};
            moe_loss_scales ls = {loss_scale * c->aux_loss_coef, loss_scale * c->z_loss_coef,
                                  loss_scale * c->seq_aux_coef};
            moe_backward(a->dh, &mg, dx, &A->moe, A->hn2, &mw, &ro, ls);
        } else {
            PROF_RUN(PROF_DENSE_FFN, matmul_backward_set_din(a->dff1, F32(G->ffn_down), NULL, dx, A->act, F32(W->ffn_down), N, F, d, mm));
            PROF_RUN(PROF_DENSE_FFN, swiglu_backward(a->dff2, a->dff3, a->dff1, A->hg, A->hu, N, F));
            PROF_RUN(PROF_DENSE_FFN, matmul_backward_set_din(a->dh, F32(G->ffn_gate), NULL, a->dff2, A->hn2, F32(W->ffn_gate), N, d, F, mm));
            PROF_RUN(PROF_DENSE_FFN, matmul_backward(a->dh, F32(G->ffn_up), NULL, a->dff3, A->hn2, F32(W->ffn_up), N, d, F, mm));
        }
        PROF_RUN(PROF_NORM, rmsnorm_backward(dx2, F32(G->ffn_norm), a->dh, A->x_mid, F32(W->ffn_norm), A->rstd2, N, d));
        /* x_mid = x_in + wo(attention(norm(x_in))); dx2 holds d(x_mid) */
        PROF_RUN(PROF_RESIDUAL, memcpy(dx, dx2, sizeof(float) * N * d));
        PROF_RUN(PROF_QKVO, matmul_backward_set_din(a->datto, F32(G->wo), NULL, dx2, A->atto, F32(W->wo), N, H * vd, d, mm));
        if (m->plan[l].attn == ATTN_MLA) {
            PROF_RUN(PROF_ATTENTION, mla_backward(m, A, W, G, &m->plan[l], mm));
        } else {
            PROF_RUN(PROF_ZERO_ACTS, moe_zero(a->dq, (size_t)N * H * hd));
            PROF_RUN(PROF_ZERO_ACTS, moe_zero(a->dk, (size_t)N * KVH * hd));
            PROF_RUN(PROF_ZERO_ACTS, moe_zero(a->dv, (size_t)N * KVH * hd));
            PROF_RUN(PROF_ATTENTION, attention_backward(a->dq, a->dk, a->dv, a->datto, A->att, A->q, A->k, A->v, B, T, H, KVH, hd));
            PROF_RUN(PROF_ROPE, rope_backward(a->dq, a->pos, N, H, hd, c->rope_base, m->rope_tab, m->rope_n));
            PROF_RUN(PROF_ROPE, rope_backward(a->dk, a->pos, N, KVH, hd, c->rope_base, m->rope_tab, m->rope_n));
            PROF_RUN(PROF_QKVO, qkv_backward(a, A, W, G, N, d, H * hd, KVH * hd, mm));
        }
        PROF_RUN(PROF_NORM, rmsnorm_backward(dx, F32(G->attn_norm), a->dh, A->x_in, F32(W->attn_norm), A->rstd1, N, d));
    }
    /* embedding rows: parallel over columns so each element sums tokens in order */
    double t_embed = moe_prof_start();
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < d; j++)
        for (int i = 0; i < N; i++) F32(m->g.token_embd)[(size_t)tokens[i] * d + j] += dx[(size_t)i * d + j];
    moe_prof_lap(PROF_EMBED, &t_embed);
    moe_prof_pass = 0;
}
