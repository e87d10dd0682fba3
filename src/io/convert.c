/* io/convert: a model moe trained or created, written in a published GGUF
 * layout that other engines (llama.cpp) run with the same results.
 *
 * Our own files are already named and shaped as llama.cpp's llama
 * architecture; what makes them ours is the "moe.*" config. The converted
 * file has only "{arch}.*" metadata, so it must say everything the model
 * does in the keys llama.cpp reads: the llama architecture (Mixtral:
 * softmax over all experts, top-k renormalised over the k, an expert FFN in
 * every layer of a MoE model, RoPE on adjacent pairs) for GQA models, and
 * deepseek2 for MLA models (sigmoid or softmax, selection bias, groups,
 * routed scale, leading dense layers, shared experts). What it
 * cannot say is refused, naming the feature, before anything is written;
 * after writing, the file's metadata is read back through our published
 * reader and must give the model's config again. */
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "arch/arch.h"
#include "io/gguf.h"
#include "io/tokenizer_gguf.h"
#include "model/model.h"

/* llama.cpp's hparams hold at most this many experts (LLAMA_MAX_EXPERTS) */
enum { LLAMA_CPP_MAX_EXPERTS = 512 };

/* What the deepseek2 layout would express but needs MLA attention for. */
#define NEEDS_DEEPSEEK2 "; deepseek2 expresses it, but only with MLA attention (train with --set attn=mla, as the deepseek presets do)"

/* What no layout we write expresses, whichever it is: a vocabulary
 * llama.cpp would not load, RoPE scaling, and routing other than each token
 * on its own without drops. MOE_OK, or an error naming the feature. */
static moe_status any_layout_expresses(const moe_config *c, const moe_tokenizer *tok) {
#define REFUSE(...) return moe_error(MOE_ERR_UNSUPPORTED, __VA_ARGS__)
    if (tok && moe_tokenizer_vocab_size(tok) != c->vocab_size)
        REFUSE("the tokenizer has %d tokens but vocab_size is %d: llama.cpp sizes the embedding by the token "
               "list and would not load the file", moe_tokenizer_vocab_size(tok), c->vocab_size);
    if (c->rope_freq_scale != 1.0f || c->yarn_factor != 0.0f)
        REFUSE("RoPE scaling (rope_freq_scale %g, yarn_factor %g): moe convert does not write it yet",
               c->rope_freq_scale, c->yarn_factor);
    if (c->n_experts == 0) return MOE_OK;
    if (c->routing == MOE_ROUTING_EXPERT)
        REFUSE("expert-choice routing: no published layout has it (llama.cpp routes each token on its own)");
    if (c->routing == MOE_ROUTING_SEQUENCE)
        REFUSE("sequence routing: no published layout has it (llama.cpp routes each token on its own)");
    if (c->eval_capacity_factor > 0)
        REFUSE("eval_capacity_factor %g drops tokens over capacity at inference: no published layout does "
               "(llama.cpp is dropless; set eval_capacity_factor=0 and check the model still works)",
               c->eval_capacity_factor);
    if (c->n_experts > LLAMA_CPP_MAX_EXPERTS)
        REFUSE("%d experts: llama.cpp holds at most %d", c->n_experts, LLAMA_CPP_MAX_EXPERTS);
#undef REFUSE
    return MOE_OK;
}

/* MOE_OK when the llama layout expresses c (past any_layout_expresses), else an
 * error naming the first feature it cannot. */
static moe_status llama_expresses(const moe_config *c) {
#define REFUSE(...) return moe_error(MOE_ERR_UNSUPPORTED, __VA_ARGS__)
    if (c->attn == MOE_ATTN_MLA)
        REFUSE("MLA attention: its layout is deepseek2 (internal: llama_expresses called for MLA)");
    if (c->qk_norm != MOE_QK_NORM_NONE)
        REFUSE("q/k norms: the llama layout has none (olmoe and qwen3moe have them, with NeoX RoPE)");
    if (c->qkv_bias) REFUSE("q/k/v biases: the llama layout has none (qwen2moe has them, with NeoX RoPE)");
    if (c->rope_neox) REFUSE("NeoX RoPE (rope_neox = 1): llama.cpp's llama architecture rotates adjacent pairs");
    if (moe_config_rope_dim(c) != moe_config_head_dim(c))
        REFUSE("partial RoPE (rope_dim %d of head %d): llama.cpp's llama architecture rotates the whole head",
               moe_config_rope_dim(c), moe_config_head_dim(c));
    if (moe_config_v_head_dim(c) != moe_config_head_dim(c))
        REFUSE("v_head_dim %d differs from head_dim %d: llama.cpp's llama architecture needs them equal",
               moe_config_v_head_dim(c), moe_config_head_dim(c));
    if (c->n_experts == 0) return MOE_OK; /* a dense llama */
    /* the scores and weights: llama's are softmax, top-k, renormalised */
    if (c->router == MOE_ROUTER_SIGMOID) REFUSE("sigmoid routing: the llama layout has only softmax" NEEDS_DEEPSEEK2);
    if (c->n_shared_experts > 0) REFUSE("shared experts: the llama layout has none" NEEDS_DEEPSEEK2);
    if (c->expert_bias) REFUSE("the expert selection bias: the llama layout has none" NEEDS_DEEPSEEK2);
    if (c->n_group > 1) REFUSE("group-limited routing (n_group %d): the llama layout has none" NEEDS_DEEPSEEK2, c->n_group);
    if (c->routed_scale != 1.0f)
        REFUSE("routed_scale %g: the llama layout does not scale the expert weights" NEEDS_DEEPSEEK2, c->routed_scale);
    if (!c->renorm_topk)
        REFUSE("renorm_topk = 0: llama.cpp's llama architecture always renormalises the top-k weights "
               "(olmoe and qwen2moe do not, but they need q/k norms or q/k/v biases and NeoX RoPE)");
    /* llama.cpp's llama architecture requires a router in every layer once
     * expert_count is set, so dense and MoE layers cannot mix */
    if (moe_config_n_moe_layers(c) != c->n_layers)
        REFUSE("dense layers among MoE ones (moe_every %d, moe_first_dense %d): llama.cpp's llama architecture "
               "needs experts in every layer when the model has any", c->moe_every, c->moe_first_dense);
#undef REFUSE
    return MOE_OK;
}

/* MOE_OK when the deepseek2 layout expresses c (an MLA model): softmax or
 * sigmoid scores, selection bias, groups, renormalisation flag, routed
 * scale, leading dense layers and unweighted shared experts as wide as the
 * routed ones; else an error naming the first feature it cannot. */
static moe_status deepseek2_expresses(const moe_config *c) {
#define REFUSE(...) return moe_error(MOE_ERR_UNSUPPORTED, __VA_ARGS__)
    if (c->rope_neox) REFUSE("NeoX RoPE (rope_neox = 1): llama.cpp's deepseek2 rotates adjacent pairs");
    if (c->n_experts == 0) REFUSE("a dense MLA model: llama.cpp's deepseek2 needs experts");
    if (c->moe_every != 1)
        REFUSE("moe_every %d: deepseek2 has leading dense layers only (moe_first_dense), then experts in every layer",
               c->moe_every);
    if (c->n_shared_experts > 0 && c->shared_gate)
        REFUSE("a gated shared expert: deepseek2 adds its shared experts unweighted (qwen2moe gates, but has no MLA)");
    if (c->n_shared_experts > 0 && c->d_shared != c->d_expert)
        REFUSE("shared experts of %d against routed ones of %d: deepseek2's are as wide as the routed experts",
               c->d_shared, c->d_expert);
#undef REFUSE
    return MOE_OK;
}

/* The part of a config inference depends on, with defaults resolved and
 * fields that do nothing cleared, so that two configs that run alike
 * compare equal field by field. */
static moe_config inference_view(const moe_config *in) {
    moe_config c = *in, d;
    moe_config_preset(&d, "default");
    /* training only */
    c.aux_loss_coef = c.z_loss_coef = c.seq_aux_coef = c.router_jitter = 0.0f;
    c.init_std = d.init_std;
    c.bias_rate = c.capacity_factor = 0.0f;
    c.overflow = MOE_OVERFLOW_POSITION; /* only with a capacity, which is refused */
    c.matmul = MOE_MATMUL_FP32;         /* the converted file's matmuls are fp32 (llama.cpp's with f32 weights) */
    c.head_dim = moe_config_head_dim(in);
    c.v_head_dim = moe_config_v_head_dim(in);
    c.rope_dim = moe_config_rope_dim(in);
    if (moe_config_n_moe_layers(in) == c.n_layers) c.d_ff = 0;
    if (c.n_experts == 0) {
        c.top_k = c.d_expert = c.renorm_topk = c.router = c.routing = 0;
        c.moe_every = 1;
        c.moe_first_dense = 0;
        c.routed_scale = 1.0f;
        c.n_shared_experts = c.expert_bias = 0;
        c.eval_capacity_factor = 0.0f;
    }
    if (c.n_group <= 1) c.n_group = c.topk_group = 1;
    if (c.n_shared_experts == 0) c.d_shared = c.shared_gate = 0;
    if (c.attn != MOE_ATTN_MLA) c.q_lora_rank = c.kv_lora_rank = 0;
    else c.n_kv_heads = 1; /* MLA's one latent: deepseek2 files say 1 */
    if (c.yarn_factor == 0.0f) {
        c.yarn_orig_ctx = d.yarn_orig_ctx;
        c.yarn_log_mul = d.yarn_log_mul;
        c.yarn_beta_fast = d.yarn_beta_fast;
        c.yarn_beta_slow = d.yarn_beta_slow;
    }
    return c;
}

/* Reads path's metadata back as a published file: its config must run as
 * want does. */
static moe_status check_read_back(const char *path, const moe_config *want) {
    gguf_ctx *g = NULL;
    moe_status st = gguf_open(&g, path);
    if (st) return st;
    moe_config got;
    char arch[32];
    st = arch_read_config(g, &got, arch, sizeof arch);
    gguf_close(g);
    if (st) return moe_error_prefix(st, "reading back %s", path);
    const moe_config a = inference_view(want), b = inference_view(&got);
    for (int i = 0; i < moe_config_n_fields(); i++) {
        double va = moe_config_get_field(&a, i), vb = moe_config_get_field(&b, i);
        if (va != vb)
            return moe_error(MOE_ERR_UNSUPPORTED, "%s reads back with %s = %g, the model has %g: the %s layout "
                             "does not express it", path, moe_config_field(i, NULL), vb, va, arch);
    }
    return MOE_OK;
}

/* The forms moe convert writes: element type of the matrices and
 * general.file_type, llama.cpp's llama_ftype (q4_k: all q4_K, its "Q4_K_S"). */
static const struct { const char *name; int type, file_type; } QUANTS[] = {
    {"f32", DT_F32, 0}, {"q8_0", DT_Q8_0, 7}, {"q4_0", DT_Q4_0, 2}, {"q4_k", DT_Q4_K, 14},
};
enum { N_QUANTS = sizeof QUANTS / sizeof QUANTS[0] };

static moe_status find_quant(const char *name, int *i_out) {
    for (int i = 0; name && i < N_QUANTS; i++)
        if (!strcasecmp(name, QUANTS[i].name)) { *i_out = i; return MOE_OK; }
    return moe_error(MOE_ERR_INVALID_ARG, "unknown weight type '%s' (known: f32, q8_0, q4_0, q4_k)", name ? name : "(null)");
}

moe_status moe_model_quant_bytes(const moe_model *m, const char *quant, uint64_t *bytes) {
    int q;
    moe_status st = find_quant(quant, &q);
    if (st) return st;
    *bytes = m ? arch_tensor_bytes(m, QUANTS[q].type) : 0;
    return MOE_OK;
}

moe_status moe_model_convert(const moe_model *m, const char *path) {
    return moe_model_convert_quant(m, path, "f32");
}

moe_status moe_model_convert_quant(const moe_model *m, const char *path, const char *quant) {
    if (!m) return moe_error(MOE_ERR_INVALID_ARG, "moe_model_convert: model is NULL");
    int q;
    moe_status st = find_quant(quant, &q);
    if (st) return st;
    if (m->file || !m->params)
        return moe_error(MOE_ERR_UNSUPPORTED, "the model is already a published %s file: moe convert writes "
                         "models moe trained or created", m->arch[0] ? m->arch : "GGUF");
    const moe_config *c = &m->cfg;
    const int mla = c->attn == MOE_ATTN_MLA;
    st = any_layout_expresses(c, m->tok);
    if (!st) st = mla ? deepseek2_expresses(c) : llama_expresses(c);
    if (st || !path) return st;
    gguf_writer *w = gguf_writer_create();
    if (!w) return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_config out = *c;
    if (mla) out.n_kv_heads = 1; /* as llama.cpp's converter writes MLA (one latent "head") */
    st = arch_put_metadata(w, mla ? "deepseek2" : "llama", &out, "moe");
    if (!st) st = gguf_set_u32(w, "general.file_type", (uint32_t)QUANTS[q].file_type);
    if (!st && m->tok && (st = tokenizer_write_gguf(m->tok, w))) moe_error_prefix(st, "tokenizer");
    char *qbuf = NULL;
    if (!st) st = arch_add_tensors(w, m, QUANTS[q].type, &qbuf);
    if (!st) st = gguf_write_file(w, path);
    gguf_writer_free(w);
    moe_free(qbuf);
    if (st) return st;
    if ((st = check_read_back(path, c))) unlink(path); /* a file that runs differently must not stay */
    return st;
}
