/* io/model_io: a model as a GGUF file in the llama layout (llama.cpp tensor
 * names and metadata keys), plus "moe.*" keys holding our full config so a
 * file round-trips exactly. Weights are copied out of the mapping on load
 * because training updates them in place; a load for inference with a memory
 * budget or expert parallelism maps them instead (load_own_mapped). */
#include <stdio.h>
#include <string.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "io/tokenizer_gguf.h"
#include "io/gguf.h"
#include "model/model.h"

void model_close_file(moe_model *m) {
    gguf_close(m->file);
    m->file = NULL;
}

static moe_status put_metadata(gguf_writer *w, const moe_model *m) {
    const moe_config *c = &m->cfg;
    const int all_moe = moe_config_n_moe_layers(c) == c->n_layers;
    moe_status st = MOE_OK;
#define S(x) if (!st) st = (x)
    S(gguf_set_str(w, "general.architecture", "llama", 5));
    S(gguf_set_str(w, "general.name", "moe", 3));
    S(gguf_set_u32(w, "general.file_type", 0));
    S(gguf_set_u32(w, "llama.context_length", (uint32_t)c->max_seq));
    S(gguf_set_u32(w, "llama.embedding_length", (uint32_t)c->d_model));
    S(gguf_set_u32(w, "llama.block_count", (uint32_t)c->n_layers));
    S(gguf_set_u32(w, "llama.feed_forward_length", (uint32_t)(all_moe ? c->d_expert : c->d_ff)));
    S(gguf_set_u32(w, "llama.attention.head_count", (uint32_t)c->n_heads));
    S(gguf_set_u32(w, "llama.attention.head_count_kv", (uint32_t)c->n_kv_heads));
    S(gguf_set_u32(w, "llama.rope.dimension_count", (uint32_t)(c->d_model / c->n_heads)));
    S(gguf_set_f32(w, "llama.rope.freq_base", c->rope_base));
    S(gguf_set_f32(w, "llama.attention.layer_norm_rms_epsilon", c->norm_eps));
    S(gguf_set_u32(w, "llama.vocab_size", (uint32_t)c->vocab_size));
    if (c->n_experts > 0) {
        S(gguf_set_u32(w, "llama.expert_count", (uint32_t)c->n_experts));
        S(gguf_set_u32(w, "llama.expert_used_count", (uint32_t)c->top_k));
    }
    char key[96];
    for (int i = 0; i < moe_config_n_fields(); i++) {
        int is_float;
        const char *name = moe_config_field(i, &is_float);
        snprintf(key, sizeof key, "moe.%s", name);
        double v = moe_config_get_field(c, i);
        S(is_float ? gguf_set_f32(w, key, (float)v) : gguf_set_i32(w, key, (int32_t)v));
    }
    S(gguf_set_u32(w, "moe.train_step", (uint32_t)m->train_step));
#undef S
    return st;
}

moe_status moe_model_save(const moe_model *m, const char *path) {
    if (!m->params)
        return moe_error(MOE_ERR_UNSUPPORTED, "this model's weights are views of its file (a published model, or "
                         "expert parallelism), not parameters to save");
    gguf_writer *w = gguf_writer_create();
    if (!w) return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_status st = put_metadata(w, m);
    if (!st && m->tok) st = tokenizer_write_gguf(m->tok, w);
    for (int i = 0; !st && i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        st = gguf_add_tensor(w, t->name, GGML_TYPE_F32, t->n_dims, t->ne, m->params + t->offset);
    }
    if (!st) st = gguf_write_file(w, path);
    gguf_writer_free(w);
    return st;
}

static moe_status read_config(const gguf_ctx *g, moe_config *c, const char *path) {
    /* fields added after the first release may be missing: they keep the defaults */
    moe_config_preset(c, "default");
    char key[96];
    for (int i = 0; i < moe_config_n_fields(); i++) {
        int is_float;
        const char *name = moe_config_field(i, &is_float);
        snprintf(key, sizeof key, "moe.%s", name);
        if (!moe_config_field_required(i) && !gguf_has_key(g, key)) continue;
        moe_status st;
        if (is_float) {
            float v;
            st = gguf_get_f32(g, key, &v);
            if (!st) moe_config_put_field(c, i, v);
        } else {
            int32_t v;
            st = gguf_get_i32(g, key, &v);
            if (!st) moe_config_put_field(c, i, v);
        }
        if (st) return moe_error_prefix(st, "%s", path);
    }
    moe_status st = moe_config_validate(c);
    if (st) return moe_error_prefix(MOE_ERR_FORMAT, "%s: impossible config", path);
    return MOE_OK;
}

/* Default context of a published model: its own, at most 4096 positions. */
static int default_ctx(const moe_config *c) { return MOE_MIN(c->max_seq, 4096); }

static moe_status check_memory(const moe_model *m, int ctx) {
    double weights = m->file ? (double)gguf_data_size(m->file) : (double)m->n_params * sizeof(float);
    if (m->store) weights += (double)m->store_budget - (double)model_expert_bytes(m); /* offloaded experts */
    const double kv = (double)model_kv_bytes(&m->cfg, ctx), have = (double)moe_physical_memory();
    if (weights + kv > 0.9 * have)
        return moe_error(MOE_ERR_NOMEM, "the weights need %.2f GiB and the KV cache for a context of %d needs "
                         "%.2f GiB: more than this machine's %.1f GiB of memory allows (try a smaller --ctx)",
                         weights / (1 << 30), ctx, kv / (1 << 30), have / (1 << 30));
    return MOE_OK;
}

moe_status moe_model_set_context(moe_model *m, int n_ctx) {
    const int ctx = n_ctx > 0 ? n_ctx : m->file ? default_ctx(&m->cfg) : m->cfg.max_seq;
    if (ctx < 2 || ctx > m->cfg.max_seq)
        return moe_error(MOE_ERR_INVALID_ARG, "context %d must be in 2..%d (the model's context length)", ctx, m->cfg.max_seq);
    moe_status st = check_memory(m, ctx);
    if (st) return st;
    if (ctx != m->ctx) model_infer_free(m);
    m->ctx = ctx;
    return MOE_OK;
}

int moe_model_context(const moe_model *m) { return m->ctx > 0 ? m->ctx : m->cfg.max_seq; }

/* Binds the views of a published model to the mapping, tensor by tensor
 * from the model's list: present, of the shape the config implies, of a
 * type we compute with (1-D tensors: f32). A router in another type is
 * dequantised into m->owned (routing runs in fp32). */
static moe_status bind_published(moe_model *m, gguf_ctx *g, const char *path) {
    size_t owned = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t used = 0;
        for (int i = 0; i < m->n_tensors; i++) {
            const tensor_desc *t = &m->tensors[i];
            const gguf_tensor *gt = gguf_find_tensor(g, t->name);
            if (!gt)
                return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is missing (the %s layout needs it)", path, t->name, m->arch);
            int same = 1;
            for (int k = 0; k < 4; k++) {
                int64_t want = k < 3 ? t->ne[k] : 1, have = k < gt->n_dims ? gt->ne[k] : 1;
                same &= want == have;
            }
            if (!same)
                return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld], the config implies [%lld, %lld, %lld]",
                                 path, t->name, (long long)gt->ne[0], (long long)(gt->n_dims > 1 ? gt->ne[1] : 1),
                                 (long long)(gt->n_dims > 2 ? gt->ne[2] : 1), (long long)t->ne[0], (long long)t->ne[1],
                                 (long long)t->ne[2]);
            if (!dtype_usable(gt->type))
                return moe_error(MOE_ERR_UNSUPPORTED, "%s: tensor '%s' is %s, a type moe does not compute with "
                                 "(f32, f16, bf16, q8_0, q4_0, q4_K, q5_K, q6_K)", path, t->name, dtype_name(gt->type));
            if (t->n_dims == 1 && gt->type != DT_F32)
                return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is %s; norms, biases and gates must be f32", path, t->name,
                                 dtype_name(gt->type));
            size_t rb;
            if (dtype_row_bytes(gt->type, t->ne[0], &rb))
                return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': rows of %lld are not whole %s blocks", path, t->name,
                                 (long long)t->ne[0], dtype_name(gt->type));
            const int router = 0; /* routers run in their own type, as llama.cpp runs them */
            if (pass == 0) { if (router && gt->type != DT_F32) owned += t->size; continue; }
            moe_tensor *v = model_tensor_slot(&m->w, t);
            v->data = (void *)gt->data;
            v->type = gt->type;
            v->n_dims = t->n_dims;
            for (int k = 0; k < 4; k++) v->ne[k] = k < 3 ? t->ne[k] : 1;
            v->row_bytes = rb;
            if (router && gt->type != DT_F32) {
                float *dst = m->owned + used;
                const dtype_traits *tr = dtype_traits_of(gt->type);
                for (int64_t r = 0; r < t->ne[1]; r++)
                    tr->to_float(dst + r * t->ne[0], (const char *)gt->data + r * rb, t->ne[0]);
                v->data = dst;
                v->type = DT_F32;
                v->row_bytes = (size_t)t->ne[0] * sizeof(float);
                used += t->size;
            }
        }
        if (pass == 0 && owned && !(m->owned = moe_malloc(owned * sizeof(float))))
            return moe_error_prefix(MOE_ERR_NOMEM, "routers");
    }
    if (m->cfg.tied_embeddings) m->w.output = m->w.token_embd;
    return MOE_OK;
}

static moe_status warm_needs_cache(const moe_load_options *o) {
    return moe_error(MOE_ERR_INVALID_ARG, "--offload-warm %s: warming needs an expert cache; give a --mem-budget "
                     "above 0 too", o->offload_warm);
}

/* The options of a load whose weights stay in the mapping: offloading and
 * this rank's experts first, so that the memory check of the context then
 * counts the cache, not every expert. */
static moe_status settle_mapped(moe_model *m, const moe_load_options *o, int n_ctx) {
    moe_status st = MOE_OK;
    if (o->offload_policy) st = moe_model_set_offload_policy(m, o->offload_policy, 0);
    if (!st && o->offload_prefetch) st = moe_model_set_offload_prefetch(m, o->offload_prefetch);
    if (!st) st = model_hold_experts(m, o->expert_parallel);
    if (!st && o->mem_budget) st = moe_model_set_mem_budget(m, o->mem_budget);
    if (!st && o->offload_warm && !m->store) st = warm_needs_cache(o);
    if (!st && o->offload_warm) st = moe_model_offload_warm_trace(m, o->offload_warm);
    if (!st) st = moe_model_set_context(m, n_ctx);
    return st;
}

static moe_status load_published(moe_model **out, gguf_ctx *g, const char *path, const moe_load_options *o) {
    moe_config cfg;
    char arch[32];
    moe_status st = arch_read_config(g, &cfg, arch, sizeof arch);
    if (st) return moe_error_prefix(st, "%s", path);
    if ((st = moe_config_validate(&cfg))) return moe_error_prefix(MOE_ERR_FORMAT, "%s: impossible %s hyperparameters", path, arch);
    moe_model *m = NULL;
    if ((st = model_alloc_shell(&m, &cfg))) return moe_error_prefix(st, "%s", path);
    snprintf(m->arch, sizeof m->arch, "%s", arch);
    m->file = g;
    m->n_params = 0; /* nothing in a flat buffer: the weights stay in the mapping */
    if (!st) st = bind_published(m, g, path);
    if (!st && !(m->path = moe_strdup(path))) st = moe_error(MOE_ERR_NOMEM, "out of memory");
    if (!st) st = settle_mapped(m, o, o->n_ctx);
    if (!st && gguf_has_key(g, "tokenizer.ggml.tokens")) {
        moe_tokenizer *tok = NULL;
        st = tokenizer_read_gguf(&tok, g);
        if (st) moe_error_prefix(st, "%s", path);
        else m->tok = tok;
    }
    if (!st) model_repack(m);
    if (st) { m->file = NULL; moe_model_free(m); return st; }
    *out = m;
    return MOE_OK;
}

/* Our own file's training step and tokenizer. */
static moe_status read_own_extras(moe_model *m, gguf_ctx *g, const char *path) {
    moe_status st = MOE_OK;
    if (gguf_has_key(g, "moe.train_step")) {
        uint32_t s;
        st = gguf_get_u32(g, "moe.train_step", &s);
        if (!st) m->train_step = (int)s;
    }
    if (!st && gguf_has_key(g, "tokenizer.ggml.tokens")) {
        moe_tokenizer *tok = NULL;
        st = tokenizer_read_gguf(&tok, g);
        if (st) moe_error_prefix(st, "%s", path);
        else if (moe_tokenizer_vocab_size(tok) > m->cfg.vocab_size) {
            moe_tokenizer_free(tok);
            st = moe_error(MOE_ERR_FORMAT, "%s: tokenizer has more tokens than the model's vocab_size", path);
        } else {
            m->tok = tok;
        }
    }
    return st;
}

/* Our own model for inference and evaluation only, with a memory budget or
 * expert parallelism: its fp32 tensors bound in the mapping as a published
 * model's are (same names, same list), not copied into a parameter block,
 * so that offloaded experts (and other ranks') are never paged in; the
 * experts come through the expert store (moe_model_set_mem_budget,
 * model_hold_experts), everything else is read from the mapping. */
static moe_status load_own_mapped(moe_model **out, gguf_ctx *g, const moe_config *cfg, const char *path,
                                  const moe_load_options *o) {
    moe_model *m = NULL;
    moe_status st = model_alloc_shell(&m, cfg);
    if (st) { gguf_close(g); return moe_error_prefix(st, "%s", path); }
    m->file = g;
    m->n_params = 0;
    st = bind_published(m, g, path);
    /* the batch forward reads our own tensors as fp32, as the copied load checks */
    for (int i = 0; !st && i < m->n_tensors; i++)
        if (gguf_find_tensor(g, m->tensors[i].name)->type != GGML_TYPE_F32)
            st = moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' has the wrong type or shape for the config", path, m->tensors[i].name);
    if (!st && !(m->path = moe_strdup(path))) st = moe_error(MOE_ERR_NOMEM, "out of memory");
    if (!st) st = read_own_extras(m, g, path);
    /* the context of the copied load (max_seq), not a published model's default */
    if (!st) st = settle_mapped(m, o, o->n_ctx ? o->n_ctx : cfg->max_seq);
    if (st) { moe_model_free(m); return st; }
    *out = m;
    return MOE_OK;
}

moe_status moe_model_load(moe_model **out, const char *path) {
    const moe_load_options none = {0};
    return moe_model_load_with(out, path, &none);
}

moe_status moe_model_load_with(moe_model **out, const char *path, const moe_load_options *opts) {
    *out = NULL;
    const moe_load_options none = {0};
    const moe_load_options *o = opts ? opts : &none;
    gguf_ctx *g = NULL;
    moe_status st = gguf_open(&g, path);
    if (st) return st;
    if (!gguf_has_key(g, "moe.d_model")) { /* a model from another tool */
        st = load_published(out, g, path, o);
        if (st) gguf_close(g);
        return st;
    }
    moe_config cfg;
    moe_model *m = NULL;
    st = read_config(g, &cfg, path);
    if (!st) { /* the file must hold every parameter: check before allocating for them */
        int64_t n = moe_config_param_counts(&cfg).total;
        size_t have = gguf_data_size(g);
        if ((double)n * sizeof(float) > (double)have)
            st = moe_error(MOE_ERR_FORMAT, "%s: its config has %lld parameters (%.0f bytes in fp32), but the "
                           "file holds only %zu bytes of tensor data (truncated, or the wrong config)", path,
                           (long long)n, (double)n * sizeof(float), have);
    }
    /* a budget (even "0": every expert in the mapping) or expert parallelism:
     * inference only, the weights stay in the file */
    if (!st && (o->expert_parallel > 1 || o->mem_budget)) return load_own_mapped(out, g, &cfg, path, o);
    if (!st && o->offload_warm) st = warm_needs_cache(o); /* every weight in memory: no cache to warm */
    if (!st) st = model_alloc(&m, &cfg);
    for (int i = 0; !st && i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        const gguf_tensor *gt = gguf_find_tensor(g, t->name);
        if (!gt) { st = moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is missing", path, t->name); break; }
        int same = gt->type == GGML_TYPE_F32 && gt->n_dims == t->n_dims;
        for (int dd = 0; same && dd < t->n_dims; dd++) same = gt->ne[dd] == t->ne[dd];
        if (!same || gt->nbytes != t->size * sizeof(float)) {
            st = moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' has the wrong type or shape for the config", path, t->name);
            break;
        }
        memcpy(m->params + t->offset, gt->data, gt->nbytes);
    }
    if (!st) st = read_own_extras(m, g, path);
    gguf_close(g);
    /* the policy and prefetch settings keep for a later moe_model_set_mem_budget,
     * which refuses a model whose weights are all in memory (the message says why) */
    if (!st && o->offload_policy) st = moe_model_set_offload_policy(m, o->offload_policy, 0);
    if (!st && o->offload_prefetch) st = moe_model_set_offload_prefetch(m, o->offload_prefetch);
    if (!st && o->n_ctx) st = moe_model_set_context(m, o->n_ctx);
    if (st) { moe_model_free(m); return st; }
    *out = m;
    return MOE_OK;
}

static void human_bytes(char *buf, size_t cap, double b) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", b / (1ull << 30));
    else snprintf(buf, cap, "%.1f MiB", b / (1 << 20));
}

void moe_model_describe(const moe_model *m, char *buf, size_t cap) {
    const moe_config *c = &m->cfg;
    size_t n = 0;
    buf[0] = 0;
#define P(...) do { if (n < cap) { int w_ = snprintf(buf + n, cap - n, __VA_ARGS__); if (w_ > 0) n += (size_t)w_; } } while (0)
    const int n_moe = moe_config_n_moe_layers(c);
    P("architecture: %s\n", m->arch[0] ? m->arch : "llama (moe's own)");
    P("layers: %d (%d MoE, %d dense)\n", c->n_layers, n_moe, c->n_layers - n_moe);
    P("d_model: %d, vocab: %d, context length: %d\n", c->d_model, c->vocab_size, c->max_seq);
    if (c->n_experts > 0) {
        P("experts: %d routed, top-%d, hidden %d; %s scores, %s", c->n_experts, c->top_k, c->d_expert,
          c->router == MOE_ROUTER_SIGMOID ? "sigmoid" : "softmax", c->renorm_topk ? "renormalised" : "not renormalised");
        if (c->routed_scale != 1.0f) P(", scaled by %g", c->routed_scale);
        if (c->expert_bias) P(", selection bias");
        if (c->n_group > 1) P(", %d groups of which %d eligible", c->n_group, c->topk_group);
        P("\n");
        if (c->n_shared_experts > 0)
            P("shared experts: %d of hidden %d%s\n", c->n_shared_experts, c->d_shared, c->shared_gate ? ", sigmoid-gated" : "");
    }
    const int hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c), rd = moe_config_rope_dim(c);
    if (c->attn == MOE_ATTN_MLA)
        P("attention: MLA, %d heads, q/k head %d (RoPE on %d), v head %d, latent %d, query rank %d\n", c->n_heads, hd,
          rd, vd, c->kv_lora_rank, c->q_lora_rank);
    else
        P("attention: %s, %d heads, %d KV heads, head %d%s%s\n", c->n_kv_heads < c->n_heads ? "GQA" : "MHA", c->n_heads,
          c->n_kv_heads, hd, c->qk_norm == MOE_QK_NORM_FULL ? ", q/k norms" : c->qk_norm == MOE_QK_NORM_HEAD ? ", per-head q/k norms" : "",
          c->qkv_bias ? ", q/k/v biases" : "");
    P("rope: %s, base %g, %d of %d dims%s\n", c->rope_neox ? "halves (neox)" : "adjacent pairs", c->rope_base, rd, hd,
      c->yarn_factor > 1 ? ", YaRN" : c->rope_freq_scale != 1.0f ? ", linear scaling" : "");
    /* tensor types: count and bytes per type */
    int counts[DT_COUNT] = {0};
    double bytes[DT_COUNT] = {0}, total_bytes = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_tensor *t = model_tensor_slot((model_weights *)&m->w, &m->tensors[i]);
        const gguf_tensor *gt = m->file ? gguf_find_tensor(m->file, m->tensors[i].name) : NULL;
        int ty = gt ? gt->type : t->type;
        double b = gt ? (double)gt->nbytes : (double)m->tensors[i].size * sizeof(float);
        if (ty >= 0 && ty < DT_COUNT) { counts[ty]++; bytes[ty] += b; }
        total_bytes += b;
    }
    P("tensor types:");
    for (int ty = 0; ty < DT_COUNT; ty++)
        if (counts[ty]) { char h[32]; human_bytes(h, sizeof h, bytes[ty]); P(" %s x%d (%s)", dtype_name(ty), counts[ty], h); }
    P("\n");
    moe_param_counts pc = moe_config_param_counts(c);
    P("parameters: %.3gB total, %.3gB active per token (%.1f%%)\n", pc.total / 1e9, pc.active / 1e9,
      pc.total ? 100.0 * pc.active / pc.total : 0.0);
    char hb[32], hk[32];
    human_bytes(hb, sizeof hb, m->file ? (double)gguf_data_size(m->file) : total_bytes);
    const int ctx = moe_model_context(m);
    human_bytes(hk, sizeof hk, (double)model_kv_bytes(c, ctx));
    P("weights: %s%s\n", hb, m->file ? " on disk, memory-mapped" : " (fp32, in memory)");
    P("memory at context %d: weights %s + KV cache %s (%s per position)\n", ctx, hb, hk,
      c->attn == MOE_ATTN_MLA ? "latent + rotary key" : "K and V");
#undef P
}
