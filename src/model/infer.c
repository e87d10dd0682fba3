/* model/infer: inference over a KV cache, for every layer plan and weight
 * type: our own models (fp32 views) and published ones (views into the file
 * mapping in its own types). model_infer runs n tokens at positions
 * pos0 .. pos0+n-1: decoding is n = 1, a prompt is one or more chunks.
 *
 * Per layer:
 *   GQA: h = norm(x); q, k, v = h W (+ biases) (q/k norms, whole or per
 *        head); RoPE on q and k; k and v go to the cache; attention over the
 *        cached prefix; x += att W_o
 *   MLA: q = h W_q, or norm(h W_qa) W_qb; [latent | k_pe] = h W_kv_a goes to
 *        the cache, the latent normalised, k_pe rotated; each head's q_nope
 *        is absorbed into latent space (W_kb^T), so a head attends with
 *        [q_lat | q_pe] over [latent | k_pe] and reads the latent as its
 *        value, mapped back by W_vb: the cache holds the latent and the
 *        rotary key only, as the model is built to.
 *   then h = norm(x); x += dense SwiGLU or the MoE layer (routed + shared).
 * Each output row depends on its own input row only, so a token gets the
 * same bits in a chunk as alone. */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/qmatmul.h"
#include "model/model.h"
#include "dist/expert_parallel.h"
#include "moe/expert_store.h"

enum { PREFETCH_TOKENS = 4 }; /* longest chunk whose next-layer experts are prefetched */

struct infer_state {
    int n_max;               /* tokens per chunk the scratch holds          */
    int ctx;                 /* positions the cache holds                   */
    int kdim, vdim;          /* floats per position per layer in the caches */
    float *kcache, *vcache;  /* [L][ctx][kdim], [L][ctx][vdim] (MLA: no vcache) */
    float *x, *h, *o, *q, *qa, *att_o, *g1, *g2, *g3, *gin, *gout, *sc;
    int32_t *pos;            /* [n_max] positions of the chunk              */
    char *qws;               /* activation rows converted for quantised weights */
    int ggml;                /* a published model: llama.cpp's arithmetic (kernels.h) */
    moe_cache moe;
    double *seq;             /* [L][E] sequence routing: prefix score sums */
    float *pf_scores;        /* [PREFETCH_TOKENS][E] next layer's router on this one's input */
    int32_t *pf_ids;         /* [PREFETCH_TOKENS][k] the experts it predicts */
    void *block;
};

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* Workspace bytes the quantised matmuls of this model need for n rows
 * (expert matmuls: per dispatched row, *row). */
static size_t plan_qws(const moe_model *m, int n, size_t *row) {
    size_t all = 0, per = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_tensor *t = model_tensor_slot((model_weights *)&m->w, &m->tensors[i]);
        if (!t->data || t->type == DT_F32 || t->n_dims < 2) continue;
        all = max_sz(all, qmatmul_workspace(t->type, n, (int)t->ne[0]));
        if (t->n_dims == 3) per = max_sz(per, qmatmul_workspace(t->type, 1, (int)t->ne[0]));
    }
    *row = per;
    return max_sz(all, per * (size_t)n * (size_t)MOE_MAX(model_route_k(m), 1));
}

void model_infer_free(moe_model *m) {
    infer_state *s = m->inf;
    if (!s) return;
    moe_cache_free(&s->moe);
    moe_free(s->kcache);
    moe_free(s->vcache);
    moe_free(s->block);
    moe_free(s->qws);
    moe_free(s->seq);
    moe_free(s->pf_scores);
    moe_free(s->pf_ids);
    moe_free(s);
    m->inf = NULL;
}

size_t model_kv_bytes(const moe_config *c, int ctx) {
    const size_t H = c->n_kv_heads, hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
    size_t per = c->attn == MOE_ATTN_MLA ? (size_t)c->kv_lora_rank + moe_config_rope_dim(c) : H * (hd + vd);
    return (size_t)c->n_layers * (size_t)ctx * per * sizeof(float);
}

moe_status model_infer_alloc(moe_model *m, int n_max) {
    const moe_config *c = &m->cfg;
    const int ctx = m->ctx > 0 ? m->ctx : c->max_seq;
    if (m->inf && m->inf->n_max >= n_max && m->inf->ctx == ctx) return MOE_OK;
    model_infer_free(m);
    infer_state *s = moe_calloc(1, sizeof *s);
    if (!s) return moe_error_prefix(MOE_ERR_NOMEM, "inference state");
    m->inf = s;
    s->n_max = n_max;
    s->ctx = ctx;
    const int mla = c->attn == MOE_ATTN_MLA;
    const size_t d = c->d_model, H = c->n_heads, KVH = c->n_kv_heads;
    const size_t hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
    const size_t kvr = (size_t)c->kv_lora_rank, rope = moe_config_rope_dim(c);
    s->kdim = mla ? (int)(kvr + rope) : (int)(KVH * hd);
    s->vdim = mla ? 0 : (int)(KVH * vd);
    const size_t per = (size_t)c->n_layers * ctx;
    s->kcache = moe_malloc(per * s->kdim * sizeof(float));
    s->vcache = mla ? NULL : moe_malloc(per * s->vdim * sizeof(float));
    if (!s->kcache || (!mla && !s->vcache)) {
        model_infer_free(m);
        return moe_error(MOE_ERR_NOMEM, "KV cache for a context of %d: %.1f MiB", ctx,
                         model_kv_bytes(c, ctx) / 1048576.0);
    }
    const size_t n = (size_t)n_max;
    /* q, or MLA's [q_lat | q_pe]; MLA's qa also takes the heads' values */
    const size_t qw = mla ? H * max_sz(max_sz(hd, vd), kvr + rope) : H * hd;
    const size_t ow = mla ? H * max_sz(vd, kvr) : H * vd;
    const size_t ff = moe_config_n_moe_layers(c) < c->n_layers ? (size_t)MOE_MAX(c->d_ff, 1) : 1;
    const size_t g = mla ? max_sz(max_sz(hd, kvr), max_sz(vd, (size_t)c->q_lora_rank)) : 1;
    size_t sizes[] = {n * d, n * d, n * d, n * qw, n * max_sz(qw, mla ? (size_t)c->q_lora_rank : 1),
                      n * ow, n, n * ff, n * ff, n * ff, n * g, n * g,
                      attention_cached_scratch(ctx, n_max, (int)H)};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += (sizes[i] + 15) & ~(size_t)15;
    float *b = moe_malloc(total * sizeof(float));
    if (!b) { model_infer_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "inference scratch"); }
    s->block = b;
    float **slots[] = {&s->x, &s->h, &s->o, &s->q, &s->qa, &s->att_o, (float **)&s->pos, &s->g1,
                       &s->g2, &s->g3, &s->gin, &s->gout, &s->sc};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++) {
        *slots[i] = b;
        b += (sizes[i] + 15) & ~(size_t)15;
    }
    size_t row = 0, qb = plan_qws(m, n_max, &row);
    if (qb && !(s->qws = moe_malloc(qb))) { model_infer_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "quantised activations"); }
    if (c->n_experts > 0) {
        /* expert choice has no batch to choose from here and falls back to
         * token choice over the same scores */
        const int k = model_route_k(m);
        moe_status st = moe_cache_init(&s->moe, n_max, (int)d, c->n_experts, k, c->d_expert,
                                       c->n_shared_experts * c->d_shared, MOE_ROUTING_TOKEN,
                                       (int64_t)n_max * k);
        if (st) { model_infer_free(m); return st; }
        s->moe.qws = s->qws;
        s->moe.qws_row = row;
        s->seq = moe_calloc((size_t)c->n_layers * c->n_experts, sizeof(double));
        s->pf_scores = moe_malloc(sizeof(float) * PREFETCH_TOKENS * c->n_experts);
        s->pf_ids = moe_malloc(sizeof(int32_t) * PREFETCH_TOKENS * k);
        if (!s->seq || !s->pf_scores || !s->pf_ids) { model_infer_free(m); return moe_error_prefix(MOE_ERR_NOMEM, "decoding state"); }
    }
    return MOE_OK;
}

/* out[N][OC] = in[N][C] @ w^T (+ bias) for a weight of any usable type
 * (f32 weights of a published model in llama.cpp's order). */
static void wmm(float *out, const float *in, const moe_tensor *w, const moe_tensor *bias, int N,
                int C, int OC, matmul_precision mm, const infer_state *s) {
    if (w->type == DT_F32 && s->ggml) matmul_ggml_f32(out, in, w->data, N, C, OC);
    else if (w->type == DT_F32) matmul_forward(out, in, w->data, NULL, N, C, OC, mm);
    else qmatmul_forward(out, in, w->data, w->type, N, C, OC, s->qws);
    if (bias && bias->data) {
        const float *b = bias->data;
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] += b[o];
    }
}

/* RMSNorm of n rows of C floats (rows istride / ostride floats apart): our
 * own models as they were trained, a published model in llama.cpp's order */
static void norm_rows_to(const moe_model *m, float *out, size_t ostride, const float *in, size_t istride,
                         int n, int C, const float *w, float eps) {
    float rstd;
    for (int i = 0; i < n; i++) {
        float *o = out + (size_t)i * ostride;
        const float *x = in + (size_t)i * istride;
        if (m->arch[0]) rmsnorm_forward_ggml(o, x, w, 1, C, eps);
        else rmsnorm_forward(o, &rstd, x, w, 1, C, eps);
    }
}

/* the same in place, rows stride floats apart */
static void norm_rows(const moe_model *m, float *x, int n, int C, size_t stride, const moe_tensor *w, float eps) {
    norm_rows_to(m, x, stride, x, stride, n, C, w->data, eps);
}

/* RoPE as the model asks for it: our own models as they were trained
 * (angles in double, rope_forward where it applies); a published model as
 * llama.cpp computes it (ggml's float angles, NeoX or adjacent pairs, partial rotation, YaRN
 * with llama.cpp's attention factor, whose magnitude goes into the
 * attention scale instead: yarn_mscale). */
static rope_params model_rope(const moe_config *c) {
    rope_params p = rope_params_plain(moe_config_rope_dim(c), c->rope_base);
    p.neox = c->rope_neox;
    p.freq_scale = c->rope_freq_scale;
    p.ggml_angles = 1;
    if (c->yarn_factor > 1) {
        p.ext_factor = 1.0f;
        p.attn_factor = 1.0f / (1.0f + 0.1f * logf(1.0f / c->rope_freq_scale));
        p.beta_fast = c->yarn_beta_fast;
        p.beta_slow = c->yarn_beta_slow;
        p.n_ctx_orig = c->yarn_orig_ctx;
    }
    return p;
}

/* RoPE on n rows of H heads of D floats each (the rotated part is the first
 * rope_dim of a head), heads hstride floats apart, rows stride apart. */
static void rope_rows(const moe_model *m, float *x, const int32_t *pos, int n, int H, int D,
                      size_t hstride, size_t stride) {
    const moe_config *c = &m->cfg;
    const int R = moe_config_rope_dim(c);
    const int contiguous = hstride == (size_t)D && stride == (size_t)H * D;
    if (!m->arch[0] && !c->rope_neox && R == D && contiguous && c->rope_freq_scale == 1.0f && c->yarn_factor == 0) {
        rope_forward(x, pos, n, H, D, c->rope_base, m->rope_tab, m->rope_n);
        return;
    }
    rope_params p = model_rope(c);
    p.ggml_angles = p.fused = m->arch[0] != 0; /* our own models rotate as they were trained */
    if (contiguous) {
        rope_apply_forward(x, pos, n, H, D, &p, NULL, 0);
        return;
    }
    for (int i = 0; i < n; i++) /* the rotated part of each head on its own */
        for (int h = 0; h < H; h++)
            rope_apply_forward(x + (size_t)i * stride + (size_t)h * hstride, pos + i, 1, 1, R, &p, NULL, 0);
}

/* mscale of YaRN's attention temperature (1 without YaRN) */
static float yarn_mscale(const moe_config *c) {
    if (c->yarn_factor <= 1.0f) return 1.0f;
    return 1.0f + c->yarn_log_mul * logf(c->yarn_factor);
}

/* Attention over the cache: our own models in our order, a published model
 * in llama.cpp's (attention_cached_ggml, its batch order for every chunk, so
 * a token's bits do not depend on the chunk: llama.cpp's 1-token batches sum
 * the values in another order once a row has more than 16 positions). */
static void cached_attention(const moe_model *m, float *out, const float *q, const float *kc, const float *vc,
                             int pos0, int n, int H, int KVH, int Dk, int Dv, size_t ks, size_t vs, float scale) {
    if (m->arch[0]) attention_cached_ggml(out, q, kc, vc, pos0, n, H, KVH, Dk, Dv, ks, vs, scale, m->inf->sc, 1);
    else attention_cached(out, q, kc, vc, pos0, n, H, KVH, Dk, Dv, ks, vs, scale, m->inf->sc);
}

static void attention_gqa(moe_model *m, int l, const int32_t *pos, int n, int pos0, matmul_precision mm) {
    infer_state *s = m->inf;
    const moe_config *c = &m->cfg;
    const layer_weights *W = &model_kernel_weights(m)->layers[l];
    const layer_plan *P = &m->plan[l];
    const int d = c->d_model, H = c->n_heads, KVH = c->n_kv_heads;
    const int hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
    float *kc = s->kcache + (size_t)l * s->ctx * s->kdim, *vc = s->vcache + (size_t)l * s->ctx * s->vdim;
    float *k = kc + (size_t)pos0 * s->kdim, *v = vc + (size_t)pos0 * s->vdim; /* this chunk's rows */
    wmm(s->q, s->h, &W->wq, &W->bq, n, d, H * hd, mm, s);
    wmm(k, s->h, &W->wk, &W->bk, n, d, KVH * hd, mm, s);
    wmm(v, s->h, &W->wv, &W->bv, n, d, KVH * vd, mm, s);
    if (P->qk_norm == MOE_QK_NORM_FULL) {
        norm_rows(m, s->q, n, H * hd, (size_t)H * hd, &W->q_norm, c->norm_eps);
        norm_rows(m, k, n, KVH * hd, (size_t)KVH * hd, &W->k_norm, c->norm_eps);
    } else if (P->qk_norm == MOE_QK_NORM_HEAD) {
        norm_rows(m, s->q, n * H, hd, (size_t)hd, &W->q_norm, c->norm_eps);
        norm_rows(m, k, n * KVH, hd, (size_t)hd, &W->k_norm, c->norm_eps);
    }
    rope_rows(m, s->q, pos, n, H, hd, hd, (size_t)H * hd);
    rope_rows(m, k, pos, n, KVH, hd, hd, (size_t)KVH * hd);
    cached_attention(m, s->att_o, s->q, kc, vc, pos0, n, H, KVH, hd, vd, s->kdim, s->vdim,
                     1.0f / sqrtf((float)hd));
    wmm(s->o, s->att_o, &W->wo, NULL, n, H * vd, d, mm, s);
}

/* x[n] rows of a 3-D tensor's matrix h: out[n][rows] = in[n][cols] @ M_h^T,
 * reading in and writing out with strides (gathered into gin, gout). */
static void head_matmul(infer_state *s, float *out, size_t os, const float *in, size_t is,
                        const moe_tensor *t, int h, int n, matmul_precision mm) {
    const int cols = (int)t->ne[0], rows = (int)t->ne[1];
    for (int i = 0; i < n; i++) memcpy(s->gin + (size_t)i * cols, in + (size_t)i * is, sizeof(float) * cols);
    moe_tensor one = *t;
    one.data = (void *)tensor_matrix(t, h);
    one.n_dims = 2;
    wmm(s->gout, s->gin, &one, NULL, n, cols, rows, mm, s);
    for (int i = 0; i < n; i++) memcpy(out + (size_t)i * os, s->gout + (size_t)i * rows, sizeof(float) * rows);
}

static void attention_mla(moe_model *m, int l, const int32_t *pos, int n, int pos0, matmul_precision mm) {
    infer_state *s = m->inf;
    const moe_config *c = &m->cfg;
    const layer_weights *W = &model_kernel_weights(m)->layers[l];
    const int d = c->d_model, H = c->n_heads, hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
    const int rope = moe_config_rope_dim(c), nope = hd - rope, kvr = c->kv_lora_rank;
    const int kdim = s->kdim, qs = kvr + rope; /* absorbed query head: [q_lat | q_pe] */
    float *kc = s->kcache + (size_t)l * s->ctx * kdim, *k = kc + (size_t)pos0 * kdim;
    /* the query, [n][H][hd] in s->qa, each head [q_nope | q_pe] */
    if (m->plan[l].q_lora) {
        wmm(s->gin, s->h, &W->wq_a, NULL, n, d, c->q_lora_rank, mm, s);
        norm_rows(m, s->gin, n, c->q_lora_rank, (size_t)c->q_lora_rank, &W->q_a_norm, c->norm_eps);
        wmm(s->qa, s->gin, &W->wq_b, NULL, n, c->q_lora_rank, H * hd, mm, s);
    } else {
        wmm(s->qa, s->h, &W->wq, NULL, n, d, H * hd, mm, s);
    }
    /* [latent | k_pe] straight into the cache */
    wmm(k, s->h, &W->wkv_a, NULL, n, d, kdim, mm, s);
    norm_rows(m, k, n, kvr, (size_t)kdim, &W->kv_a_norm, c->norm_eps);
    rope_rows(m, k + kvr, pos, n, 1, rope, rope, (size_t)kdim);
    rope_rows(m, s->qa + nope, pos, n, H, rope, hd, (size_t)H * hd);
    for (int h = 0; h < H; h++) {
        /* q_lat = W_kb[h] q_nope: kv_lora outputs from nope inputs */
        head_matmul(s, s->q + (size_t)h * qs, (size_t)H * qs, s->qa + (size_t)h * hd, (size_t)H * hd,
                    &W->wk_b, h, n, mm);
        for (int i = 0; i < n; i++)
            memcpy(s->q + ((size_t)i * H + h) * qs + kvr, s->qa + ((size_t)i * H + h) * hd + nope, sizeof(float) * rope);
    }
    const float ms = yarn_mscale(c);
    /* one kv "head": keys [latent | k_pe], values the latent (the first kvr of each key row) */
    cached_attention(m, s->att_o, s->q, kc, kc, pos0, n, H, 1, qs, kvr, kdim, kdim, ms * ms / sqrtf((float)hd));
    /* each head's latent read-out mapped to its value: W_vb[h] o_lat, into q's room */
    for (int h = 0; h < H; h++)
        head_matmul(s, s->qa + (size_t)h * vd, (size_t)H * vd, s->att_o + (size_t)h * kvr, (size_t)H * kvr,
                    &W->wv_b, h, n, mm);
    wmm(s->o, s->qa, &W->wo, NULL, n, H * vd, d, mm, s);
}

/* Telemetry: the routing of chunk tokens i0 .. i0+n-1, just computed into
 * the MoE cache, copied to the tap (model.h) at MoE layer index of l. */
static void tap_routing(moe_model *m, int l, int i0, int n) {
    const moe_config *c = &m->cfg;
    const moe_routing *r = &m->inf->moe.r;
    const int n_moe = moe_config_n_moe_layers(c), k = model_route_k(m); /* as moe_model_route sized the tap */
    int km = 0;
    for (int j = 0; j < l; j++) km += m->plan[j].ffn == FFN_MOE;
    for (int i = 0; i < n; i++) {
        const size_t at = ((size_t)(i0 + i) * n_moe + km) * k;
        memcpy(m->tap_ids + at, r->ids + (size_t)i * r->S, sizeof(int32_t) * k);
        memcpy(m->tap_w + at, r->w + (size_t)i * r->S, sizeof(float) * k);
    }
}

/* Offloading with prefetch: before layer l's experts run, the next MoE
 * layer's router applied to layer l's FFN input predicts that layer's
 * experts (the residual stream changes little from one layer to the next),
 * and the store's thread reads the missing ones while layers l and l+1
 * compute. Only for chunks of up to PREFETCH_TOKENS tokens (decode): a
 * longer chunk uses most experts anyway. The prediction only fills the
 * cache; routing itself is untouched. */
static void prefetch_next_layer(moe_model *m, int l, int n, matmul_precision mm) {
    infer_state *s = m->inf;
    const moe_config *c = &m->cfg;
    if (!m->store || n > PREFETCH_TOKENS) return;
    int next = l + 1;
    while (next < c->n_layers && m->plan[next].ffn != FFN_MOE) next++;
    if (next >= c->n_layers) return;
    const layer_weights *W = &model_kernel_weights(m)->layers[next];
    const int E = c->n_experts, k = model_route_k(m);
    wmm(s->pf_scores, s->h, &W->router, NULL, n, c->d_model, E, mm, s);
    const float *bias = W->exp_bias.data; /* the selection bias picks, as in routing */
    for (int i = 0; i < n; i++) {
        float *sc = s->pf_scores + (size_t)i * E;
        int32_t *ids = s->pf_ids + (size_t)i * k;
        if (bias) for (int e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + expf(-sc[e])) + bias[e]; /* sigmoid gating's */
        for (int j = 0; j < k; j++) { /* k small: selection by repeated maximum */
            int b = -1;
            for (int e = 0; e < E; e++)
                if (sc[e] > -INFINITY && (b < 0 || sc[e] > sc[b])) b = e;
            ids[j] = b;
            if (b >= 0) sc[b] = -INFINITY;
        }
    }
    expert_store_prefetch(m->store, next, s->pf_ids, n * k, l);
}

static void ffn(moe_model *m, int l, int n, int pos0, matmul_precision mm) {
    infer_state *s = m->inf;
    const moe_config *c = &m->cfg;
    const layer_weights *W = &model_kernel_weights(m)->layers[l];
    const int d = c->d_model;
    if (m->plan[l].ffn == FFN_DENSE) {
        wmm(s->g1, s->h, &W->ffn_gate, NULL, n, d, c->d_ff, mm, s);
        wmm(s->g2, s->h, &W->ffn_up, NULL, n, d, c->d_ff, mm, s);
        if (m->arch[0]) swiglu_forward_ggml(s->g3, s->g1, s->g2, n, c->d_ff);
        else swiglu_forward(s->g3, s->g1, s->g2, n, c->d_ff);
        wmm(s->o, s->g3, &W->ffn_down, NULL, n, c->d_ff, d, mm, s);
        return;
    }
    moe_route_opts ro = model_route_opts(m, l, n);
    if (ro.mode == MOE_ROUTING_EXPERT) ro.mode = MOE_ROUTING_TOKEN;
    ro.capacity = 0; /* dropless: a token's result must not depend on its chunk */
    prefetch_next_layer(m, l, n, mm);
    moe_weights mw = model_layer_moe_weights(W);
    mw.store = m->store;
    mw.store_layer = l;
    mw.ggml_order = m->arch[0] != 0;
    int km = 0; /* index among the MoE layers: the exchange of expert-parallel inference */
    for (int j = 0; j < l; j++) km += m->plan[j].ffn == FFN_MOE;
    s->moe.ex = m->ep_infer ? expert_parallel_layer(m->ep, km) : NULL;
    if (ro.mode == MOE_ROUTING_SEQUENCE) {
        /* causal: each token routes on the mean over the prefix up to it, so
         * the chunk goes one token at a time */
        ro.seq_len = 1;
        for (int i = 0; i < n; i++) {
            ro.seq_prefix = s->seq + (size_t)l * c->n_experts;
            ro.seq_prefix_n = pos0 + i;
            moe_forward(s->o + (size_t)i * d, &s->moe, s->h + (size_t)i * d, &mw, 1, &ro);
            if (m->tap_ids) tap_routing(m, l, i, 1);
            model_count_routing(m, &s->moe.r);
        }
        return;
    }
    moe_forward(s->o, &s->moe, s->h, &mw, n, &ro);
    if (m->tap_ids) tap_routing(m, l, 0, n);
    model_count_routing(m, &s->moe.r);
}

moe_status model_infer(moe_model *m, const int32_t *tokens, int n, int pos0, float *logits,
                       int all_logits) {
    const moe_config *c = &m->cfg;
    const matmul_precision mm = model_matmul(c);
    const int ctx = m->ctx > 0 ? m->ctx : c->max_seq;
    if (n < 1) return moe_error(MOE_ERR_INVALID_ARG, "no tokens to run");
    if (pos0 < 0 || n > ctx || pos0 > ctx - n)
        return moe_error(MOE_ERR_INVALID_ARG, "position %d beyond the context length %d", pos0 + n - 1, ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return moe_error(MOE_ERR_INVALID_ARG, "token id %d out of range", tokens[i]);
    moe_status st = model_infer_alloc(m, MOE_MAX(n, m->inf ? m->inf->n_max : 1));
    if (st) return st;
    infer_state *s = m->inf;
    const int d = c->d_model;
    s->ggml = m->arch[0] != 0; /* read on every call, as the norms and RoPE read it */
    if (pos0 == 0 && s->seq) memset(s->seq, 0, sizeof(double) * c->n_layers * c->n_experts);
    int32_t *pos = s->pos;
    for (int i = 0; i < n; i++) pos[i] = pos0 + i;
    const moe_tensor *emb = &m->w.token_embd;
    const dtype_traits *et = dtype_traits_of(emb->type);
    for (int i = 0; i < n; i++) {
        const char *row = (const char *)emb->data + (size_t)tokens[i] * emb->row_bytes;
        if (emb->type == DT_F32) memcpy(s->x + (size_t)i * d, row, sizeof(float) * d);
        else et->to_float(s->x + (size_t)i * d, row, d);
    }
    for (int l = 0; l < c->n_layers; l++) {
        const layer_weights *W = &model_kernel_weights(m)->layers[l];
        norm_rows_to(m, s->h, (size_t)d, s->x, (size_t)d, n, d, W->attn_norm.data, c->norm_eps);
        if (m->plan[l].attn == ATTN_MLA) attention_mla(m, l, pos, n, pos0, mm);
        else attention_gqa(m, l, pos, n, pos0, mm);
        for (size_t i = 0; i < (size_t)n * d; i++) s->x[i] += s->o[i];
        norm_rows_to(m, s->h, (size_t)d, s->x, (size_t)d, n, d, W->ffn_norm.data, c->norm_eps);
        ffn(m, l, n, pos0, mm);
        if (m->store && (st = expert_store_check(m->store))) return st; /* a read failed */
        if (m->ep_infer && (st = expert_parallel_status(m->ep))) return st;   /* a peer failed */
        for (size_t i = 0; i < (size_t)n * d; i++) s->x[i] += s->o[i];
    }
    const int first = all_logits ? 0 : n - 1, rows = n - first;
    norm_rows_to(m, s->h, (size_t)d, s->x + (size_t)first * d, (size_t)d, n - first, d, m->w.output_norm.data,
                 c->norm_eps);
    wmm(logits, s->h, &model_kernel_weights(m)->output, NULL, rows, d, c->vocab_size, mm, s);
    m->store_tokens += n;
    return MOE_OK;
}

moe_status model_decode(moe_model *m, int32_t token, int pos, float *logits) {
    return model_infer(m, &token, 1, pos, logits, 0);
}
