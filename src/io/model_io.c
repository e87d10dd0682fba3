/* io/model_io: a model as a GGUF file in the llama layout (llama.cpp tensor
 * names and metadata keys), plus "moe.*" keys holding our full config so a
 * file round-trips exactly. Weights are copied out of the mapping on load
 * because training updates them in place. */
#include <stdio.h>
#include <string.h>

#include "io/tokenizer_gguf.h"
#include "io/gguf.h"
#include "model/model.h"

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
    if (!gguf_has_key(g, "moe.d_model"))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s is a GGUF file but not a moe model (no moe.* metadata)", path);
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

moe_status moe_model_load(moe_model **out, const char *path) {
    *out = NULL;
    gguf_ctx *g = NULL;
    moe_status st = gguf_open(&g, path);
    if (st) return st;
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
    if (!st && gguf_has_key(g, "moe.train_step")) {
        uint32_t s;
        st = gguf_get_u32(g, "moe.train_step", &s);
        if (!st) m->train_step = (int)s;
    }
    if (!st && gguf_has_key(g, "tokenizer.ggml.tokens")) {
        moe_tokenizer *tok = NULL;
        st = tokenizer_read_gguf(&tok, g);
        if (st) moe_error_prefix(st, "%s", path);
        else if (moe_tokenizer_vocab_size(tok) > cfg.vocab_size) {
            moe_tokenizer_free(tok);
            st = moe_error(MOE_ERR_FORMAT, "%s: tokenizer has more tokens than the model's vocab_size", path);
        } else {
            m->tok = tok;
        }
    }
    gguf_close(g);
    if (st) { moe_model_free(m); return st; }
    *out = m;
    return MOE_OK;
}
