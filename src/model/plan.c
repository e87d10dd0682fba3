/* model/plan: the layer plan and the one tensor list of a model.
 *
 * Both come from the config alone (ours, or one read from a published GGUF
 * file), so the same list sizes our flat fp32 parameter buffer, binds the
 * typed views of model_weights, names the tensors of our GGUF files, checks
 * a published file tensor by tensor, and counts parameters. The order is the
 * canonical one: the PyTorch reference and our files use it, and attn_q,
 * attn_k, attn_v stay adjacent so training runs them as one matmul. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "model/model.h"

void model_plan_layers(const moe_config *c, layer_plan *plan) {
    for (int l = 0; l < c->n_layers; l++) {
        layer_plan *p = &plan[l];
        memset(p, 0, sizeof *p);
        p->attn = c->attn == MOE_ATTN_MLA ? ATTN_MLA : ATTN_GQA;
        p->qk_norm = c->qk_norm;
        p->qkv_bias = c->qkv_bias;
        p->q_lora = p->attn == ATTN_MLA && c->q_lora_rank > 0;
        if (moe_config_layer_is_moe(c, l)) {
            p->ffn = FFN_MOE;
            p->n_shared = c->n_shared_experts;
            p->shared_gate = c->n_shared_experts > 0 && c->shared_gate;
            p->expert_bias = c->expert_bias;
        }
    }
}

#define LW(f) offsetof(layer_weights, f)
#define MW(f) offsetof(model_weights, f)
#define MW_OUTPUT_NORM MW(output_norm)
#define LW_GATE_EXPS LW(gate_exps)
#define LW_UP_EXPS LW(up_exps)
#define LW_DOWN_EXPS LW(down_exps)
#define LW_EXP_BIAS LW(exp_bias)
#define LW_SH_INP LW(sh_inp)
#define LW_SH_GATE LW(sh_gate)
#define LW_SH_UP LW(sh_up)
#define LW_SH_DOWN LW(sh_down)

typedef struct {
    tensor_desc *t;   /* NULL: count only */
    int n, cap;
    size_t off;       /* floats so far */
    moe_param_counts *pc; /* non-NULL: sum the parameter counts */
    const moe_config *c;
} list;

static void count(list *ls, int layer, size_t slot, int64_t size) {
    moe_param_counts *r = ls->pc;
    r->total += size;
    if (layer < 0) {
        if (slot != MW_OUTPUT_NORM) r->embedding += size;
        r->active += size;
    } else if (slot == LW_GATE_EXPS || slot == LW_UP_EXPS || slot == LW_DOWN_EXPS) {
        r->experts += size;
        r->active += size / ls->c->n_experts * ls->c->top_k;
    } else if (slot == LW_SH_INP || slot == LW_SH_GATE || slot == LW_SH_UP || slot == LW_SH_DOWN) {
        r->shared += size;
        r->active += size;
    } else if (slot != LW_EXP_BIAS) {
        r->active += size;
    }
}

static void put(list *ls, int layer, size_t slot, const char *suffix, int init, int n_dims,
                int64_t a, int64_t b, int64_t cc) {
    if (ls->pc) count(ls, layer, slot, a * (n_dims > 1 ? b : 1) * (n_dims > 2 ? cc : 1));
    if (ls->t && ls->n < ls->cap) {
        tensor_desc *d = &ls->t[ls->n];
        memset(d, 0, sizeof *d);
        if (layer >= 0) snprintf(d->name, sizeof d->name, "blk.%d.%s", layer, suffix);
        else snprintf(d->name, sizeof d->name, "%s", suffix);
        d->layer = layer;
        d->slot = slot;
        d->n_dims = n_dims;
        d->ne[0] = a; d->ne[1] = n_dims > 1 ? b : 1; d->ne[2] = n_dims > 2 ? cc : 1;
        d->size = (size_t)(d->ne[0] * d->ne[1] * d->ne[2]);
        d->offset = ls->off;
        d->init = init;
        d->decay = init == TENSOR_INIT_NORMAL || init == TENSOR_INIT_RESID;
        ls->off += d->size;
    } else {
        ls->off += (size_t)(a * (n_dims > 1 ? b : 1) * (n_dims > 2 ? cc : 1));
    }
    ls->n++;
}

enum { N = TENSOR_INIT_NORMAL, ONE = TENSOR_INIT_ONES, ZERO = TENSOR_INIT_ZERO, RES = TENSOR_INIT_RESID };

static void attention_tensors(list *ls, const moe_config *c, const layer_plan *p, int l) {
    const int64_t d = c->d_model, H = c->n_heads, KVH = c->n_kv_heads;
    const int64_t hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
    if (p->attn == ATTN_MLA) {
        const int64_t rope = moe_config_rope_dim(c), nope = hd - rope, kvr = c->kv_lora_rank;
        if (p->q_lora) {
            put(ls, l, LW(wq_a), "attn_q_a.weight", N, 2, d, c->q_lora_rank, 0);
            put(ls, l, LW(q_a_norm), "attn_q_a_norm.weight", ONE, 1, c->q_lora_rank, 0, 0);
            put(ls, l, LW(wq_b), "attn_q_b.weight", N, 2, c->q_lora_rank, H * hd, 0);
        } else {
            put(ls, l, LW(wq), "attn_q.weight", N, 2, d, H * hd, 0);
        }
        put(ls, l, LW(wkv_a), "attn_kv_a_mqa.weight", N, 2, d, kvr + rope, 0);
        put(ls, l, LW(kv_a_norm), "attn_kv_a_norm.weight", ONE, 1, kvr, 0, 0);
        /* per head: the latent's map to the head's key part without RoPE
         * (kv_lora rows of nope) and to its value (vd rows of kv_lora) */
        put(ls, l, LW(wk_b), "attn_k_b.weight", N, 3, nope, kvr, H);
        put(ls, l, LW(wv_b), "attn_v_b.weight", N, 3, kvr, vd, H);
    } else {
        put(ls, l, LW(wq), "attn_q.weight", N, 2, d, H * hd, 0);
        put(ls, l, LW(wk), "attn_k.weight", N, 2, d, KVH * hd, 0);
        put(ls, l, LW(wv), "attn_v.weight", N, 2, d, KVH * vd, 0);
        if (p->qkv_bias) {
            put(ls, l, LW(bq), "attn_q.bias", ZERO, 1, H * hd, 0, 0);
            put(ls, l, LW(bk), "attn_k.bias", ZERO, 1, KVH * hd, 0, 0);
            put(ls, l, LW(bv), "attn_v.bias", ZERO, 1, KVH * vd, 0, 0);
        }
        if (p->qk_norm) {
            const int full = p->qk_norm == MOE_QK_NORM_FULL;
            put(ls, l, LW(q_norm), "attn_q_norm.weight", ONE, 1, full ? H * hd : hd, 0, 0);
            put(ls, l, LW(k_norm), "attn_k_norm.weight", ONE, 1, full ? KVH * hd : hd, 0, 0);
        }
    }
    put(ls, l, LW(wo), "attn_output.weight", RES, 2, H * vd, d, 0);
}

static void ffn_tensors(list *ls, const moe_config *c, const layer_plan *p, int l) {
    const int64_t d = c->d_model, E = c->n_experts, F = c->d_expert;
    if (p->ffn == FFN_DENSE) {
        put(ls, l, LW(ffn_gate), "ffn_gate.weight", N, 2, d, c->d_ff, 0);
        put(ls, l, LW(ffn_up), "ffn_up.weight", N, 2, d, c->d_ff, 0);
        put(ls, l, LW(ffn_down), "ffn_down.weight", RES, 2, c->d_ff, d, 0);
        return;
    }
    put(ls, l, LW(router), "ffn_gate_inp.weight", N, 2, d, E, 0);
    put(ls, l, LW(gate_exps), "ffn_gate_exps.weight", N, 3, d, F, E);
    put(ls, l, LW(up_exps), "ffn_up_exps.weight", N, 3, d, F, E);
    put(ls, l, LW(down_exps), "ffn_down_exps.weight", RES, 3, F, d, E);
    if (p->expert_bias) { /* llama.cpp's name for DeepSeek-V3's selection bias */
        put(ls, l, LW(exp_bias), "exp_probs_b.bias", ZERO, 1, E, 0, 0);
        if (ls->t && ls->n <= ls->cap) ls->t[ls->n - 1].buffer = 1;
    }
    if (p->n_shared > 0) { /* the shared experts as one SwiGLU of n * d_shared */
        const int64_t fs = (int64_t)p->n_shared * c->d_shared;
        if (p->shared_gate) put(ls, l, LW(sh_inp), "ffn_gate_inp_shexp.weight", N, 1, d, 0, 0);
        put(ls, l, LW(sh_gate), "ffn_gate_shexp.weight", N, 2, d, fs, 0);
        put(ls, l, LW(sh_up), "ffn_up_shexp.weight", N, 2, d, fs, 0);
        put(ls, l, LW(sh_down), "ffn_down_shexp.weight", RES, 2, fs, d, 0);
    }
}

static void model_tensor_walk(list *ls_, const moe_config *c, const layer_plan *plan) {
    list ls = *ls_;
    const int64_t d = c->d_model, V = c->vocab_size;
    put(&ls, -1, MW(token_embd), "token_embd.weight", N, 2, d, V, 0);
    for (int l = 0; l < c->n_layers; l++) {
        put(&ls, l, LW(attn_norm), "attn_norm.weight", ONE, 1, d, 0, 0);
        attention_tensors(&ls, c, &plan[l], l);
        put(&ls, l, LW(ffn_norm), "ffn_norm.weight", ONE, 1, d, 0, 0);
        ffn_tensors(&ls, c, &plan[l], l);
    }
    put(&ls, -1, MW(output_norm), "output_norm.weight", ONE, 1, d, 0, 0);
    if (!c->tied_embeddings) put(&ls, -1, MW(output), "output.weight", N, 2, d, V, 0);
    *ls_ = ls;
}

int model_tensor_list(const moe_config *c, const layer_plan *plan, tensor_desc *t, int cap,
                      size_t *n_floats) {
    list ls = {t, 0, t ? cap : 0, 0, NULL, c};
    model_tensor_walk(&ls, c, plan);
    if (n_floats) *n_floats = ls.off;
    return t && ls.n > cap ? -1 : ls.n;
}

moe_tensor *model_tensor_slot(model_weights *w, const tensor_desc *t) {
    char *base = t->layer >= 0 ? (char *)&w->layers[t->layer] : (char *)w;
    return (moe_tensor *)(base + t->slot);
}

/* Parameter counts from the tensor list: a routed expert tensor counts k/E of
 * itself as active; the selection bias is a stored buffer, not active. */
moe_param_counts moe_config_param_counts(const moe_config *c) {
    moe_param_counts r = {0};
    if (c->n_layers < 1 || c->n_layers > 1024) return r;
    layer_plan plan[1024];
    model_plan_layers(c, plan);
    list ls = {NULL, 0, 0, 0, &r, c};
    model_tensor_walk(&ls, c, plan);
    return r;
}
