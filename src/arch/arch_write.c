/* arch_write: random-weight GGUF files in a published layout, written with
 * our own GGUF writer: tensor names and shapes from the model's tensor list,
 * "{arch}.*" metadata as llama.cpp reads it. Tests compare our engine on
 * them with an independent PyTorch implementation and with llama.cpp; the
 * benchmark writes its synthetic models this way. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "io/tokenizer_gguf.h"
#include "model/model.h"

moe_status arch_put_metadata(gguf_writer *w, const char *arch, const moe_config *c, const char *name) {
    char k[128];
    moe_status st = MOE_OK;
#define U(suffix, v) do { snprintf(k, sizeof k, "%s.%s", arch, suffix); if (!st) st = gguf_set_u32(w, k, (uint32_t)(v)); } while (0)
#define F(suffix, v) do { snprintf(k, sizeof k, "%s.%s", arch, suffix); if (!st) st = gguf_set_f32(w, k, (float)(v)); } while (0)
    if (!st) st = gguf_set_str(w, "general.architecture", arch, strlen(arch));
    if (!st) st = gguf_set_str(w, "general.name", name, strlen(name));
    U("context_length", c->max_seq);
    U("embedding_length", c->d_model);
    U("block_count", c->n_layers);
    /* llama and olmoe size their experts by feed_forward_length (no dense layers there) */
    const int experts_ff = c->n_experts > 0 && (!strcmp(arch, "llama") || !strcmp(arch, "olmoe"));
    U("feed_forward_length", experts_ff || c->d_ff <= 0 ? c->d_expert : c->d_ff);
    U("attention.head_count", c->n_heads);
    U("attention.head_count_kv", c->n_kv_heads);
    F("attention.layer_norm_rms_epsilon", c->norm_eps);
    F("rope.freq_base", c->rope_base);
    U("rope.dimension_count", moe_config_rope_dim(c));
    U("vocab_size", c->vocab_size);
    if (c->attn != MOE_ATTN_MLA && c->head_dim) {
        U("attention.key_length", moe_config_head_dim(c));
        U("attention.value_length", moe_config_v_head_dim(c));
    }
    if (c->n_experts > 0) {
        U("expert_count", c->n_experts);
        U("expert_used_count", c->top_k);
        if (strcmp(arch, "llama") && strcmp(arch, "olmoe")) U("expert_feed_forward_length", c->d_expert);
    }
    if (!strcmp(arch, "qwen2moe") && c->n_shared_experts > 0)
        U("expert_shared_feed_forward_length", (int64_t)c->n_shared_experts * c->d_shared);
    if (!strcmp(arch, "deepseek2")) {
        U("attention.q_lora_rank", c->q_lora_rank);
        U("attention.kv_lora_rank", c->kv_lora_rank);
        U("attention.key_length_mla", moe_config_head_dim(c));
        U("attention.value_length_mla", moe_config_v_head_dim(c));
        U("attention.key_length", c->kv_lora_rank + moe_config_rope_dim(c));
        U("attention.value_length", c->kv_lora_rank);
        U("leading_dense_block_count", c->moe_first_dense);
        U("expert_shared_count", c->n_shared_experts);
        F("expert_weights_scale", c->routed_scale);
        snprintf(k, sizeof k, "%s.expert_weights_norm", arch);
        if (!st) st = gguf_set_bool(w, k, c->renorm_topk);
        U("expert_gating_func", c->router == MOE_ROUTER_SIGMOID ? 2 : 1);
        if (c->n_group > 1) {
            U("expert_group_count", c->n_group);
            U("expert_group_used_count", c->topk_group);
        }
    }
    if (c->yarn_factor > 1) {
        snprintf(k, sizeof k, "%s.rope.scaling.type", arch);
        if (!st) st = gguf_set_str(w, k, "yarn", 4);
        F("rope.scaling.factor", c->yarn_factor);
        U("rope.scaling.original_context_length", c->yarn_orig_ctx);
        F("rope.scaling.yarn_log_multiplier", c->yarn_log_mul);
    }
#undef U
#undef F
    return st;
}

/* The type a matrix is written in: wtype when its rows are whole blocks of
 * it, else (as llama.cpp's quantiser falls back) q8_0, else f32; routers
 * stay f32 as llama.cpp's quantiser leaves them. */
static int tensor_type(int wtype, const tensor_desc *t) {
    size_t rb;
    if (strstr(t->name, "ffn_gate_inp")) return DT_F32; /* llama.cpp's quantiser keeps routers f32 */
    if (!dtype_row_bytes(wtype, t->ne[0], &rb)) return wtype;
    if (!dtype_row_bytes(DT_Q8_0, t->ne[0], &rb)) return DT_Q8_0;
    return DT_F32;
}

size_t arch_tensor_bytes(const moe_model *m, int wtype) {
    size_t total = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        const int ty = t->n_dims == 1 ? DT_F32 : tensor_type(wtype, t);
        size_t rb = 0;
        dtype_row_bytes(ty, t->ne[0], &rb);
        total += rb * (size_t)(t->size / (size_t)t->ne[0]);
    }
    return total;
}

moe_status arch_add_tensors(gguf_writer *w, const moe_model *m, int wtype, char **qbuf) {
    *qbuf = NULL;
    const dtype_traits *tr = dtype_traits_of(wtype);
    if (wtype != DT_F32 && (!tr || !tr->from_float))
        return moe_error(MOE_ERR_UNSUPPORTED, "cannot write tensors of type %s", dtype_name(wtype));
    /* the quantised matrices, in one buffer the writer reads when it writes */
    size_t qbytes = 0;
    for (int i = 0; i < m->n_tensors && wtype != DT_F32; i++) {
        size_t rb;
        const tensor_desc *t = &m->tensors[i];
        const int ty = t->n_dims > 1 ? tensor_type(wtype, t) : DT_F32;
        if (ty != DT_F32 && !dtype_row_bytes(ty, t->ne[0], &rb)) qbytes += rb * (size_t)(t->size / (size_t)t->ne[0]);
    }
    char *q = qbytes ? moe_malloc(qbytes) : NULL;
    if (qbytes && !q) return moe_error_prefix(MOE_ERR_NOMEM, "quantised weights (%.1f MiB)", qbytes / 1048576.0);
    *qbuf = q;
    moe_status st = MOE_OK;
    size_t used = 0;
    for (int i = 0; !st && i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        const float *src = m->params + t->offset;
        const int ty = t->n_dims > 1 && wtype != DT_F32 ? tensor_type(wtype, t) : DT_F32;
        if (ty == DT_F32) {
            st = gguf_add_tensor(w, t->name, DT_F32, t->n_dims, t->ne, src);
            continue;
        }
        size_t rb;
        dtype_row_bytes(ty, t->ne[0], &rb);
        const dtype_traits *tt = dtype_traits_of(ty);
        const int64_t rows = (int64_t)(t->size / (size_t)t->ne[0]);
        char *dst = q + used;
        #pragma omp parallel for schedule(static) if (rows >= 64)
        for (int64_t r = 0; r < rows; r++) tt->from_float(dst + (size_t)r * rb, src + r * t->ne[0], t->ne[0]);
        st = gguf_add_tensor(w, t->name, ty, t->n_dims, t->ne, dst);
        used += rb * (size_t)rows;
    }
    return st;
}

moe_status arch_write_random(const char *path, const char *arch, const moe_config *cfg, int wtype,
                             const moe_tokenizer *tok, uint64_t seed) {
    moe_model *m = NULL;
    moe_status st = model_alloc(&m, cfg);
    if (st) return st;
    /* weights of unit-scale activations: matrices N(0, 1/fan_in), norms near
     * 1, biases and the selection bias small, embeddings N(0, 1) */
    moe_rng rng;
    moe_rng_seed(&rng, seed);
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *t = &m->tensors[i];
        float *p = m->params + t->offset;
        const int embd = !strcmp(t->name, "token_embd.weight");
        const float sd = t->n_dims == 1 ? 0.1f : embd ? 1.0f : 1.0f / sqrtf((float)t->ne[0]);
        const float base = t->init == TENSOR_INIT_ONES ? 1.0f : 0.0f;
        for (size_t j = 0; j < t->size; j++) p[j] = base + sd * moe_rng_normal(&rng);
    }
    char *q = NULL;
    gguf_writer *w = gguf_writer_create();
    if (!w) st = MOE_ERR_NOMEM;
    if (!st) st = arch_put_metadata(w, arch, cfg, "moe-random");
    if (!st && tok) st = tokenizer_write_gguf(tok, w);
    if (!st) st = arch_add_tensors(w, m, wtype, &q);
    if (!st) st = gguf_write_file(w, path);
    gguf_writer_free(w);
    moe_free(q);
    moe_model_free(m);
    return st;
}
