/* arch: reading published architectures' metadata into a moe_config.
 * Key names and meanings follow llama.cpp's definitions (src/llama-arch.cpp,
 * src/llama-model.cpp); ../shared/GGUF-NOTES.md records the semantics that
 * were checked by running it. */
#include <stdio.h>
#include <string.h>

#include "arch/arch.h"

typedef enum { A_LLAMA, A_OLMOE, A_QWEN2MOE, A_QWEN3MOE, A_DEEPSEEK2, A_N } arch_id;
static const char *const arch_names[A_N] = {"llama", "olmoe", "qwen2moe", "qwen3moe", "deepseek2"};

const char *arch_supported_list(void) { return "llama (Mixtral), olmoe, qwen2moe, qwen3moe, deepseek2"; }

typedef struct { const gguf_ctx *g; const char *arch; moe_status st; } reader;

static const char *key(const reader *r, const char *suffix, char *buf, size_t cap) {
    snprintf(buf, cap, "%s.%s", r->arch, suffix);
    return buf;
}

/* The full key of suffix in k, and whether to read it: not after an earlier
 * failure, not when absent (a required key then fails the read). */
static int want(reader *r, const char *suffix, char *k, size_t cap, int required) {
    key(r, suffix, k, cap);
    if (r->st) return 0;
    if (gguf_has_key(r->g, k)) return 1;
    if (required) r->st = moe_error(MOE_ERR_FORMAT, "metadata key '%s' is missing", k);
    return 0;
}

/* An integer hyperparameter in 0..2^30. */
static int get_int(reader *r, const char *suffix, int required, int dflt) {
    char k[128];
    int64_t v;
    if (!want(r, suffix, k, sizeof k, required) || (r->st = gguf_get_i64(r->g, k, &v))) return dflt;
    if (v < 0 || v > (1 << 30)) { r->st = moe_error(MOE_ERR_FORMAT, "metadata key '%s' = %lld is out of range", k, (long long)v); return dflt; }
    return (int)v;
}

static float get_float(reader *r, const char *suffix, float dflt) {
    char k[128];
    double v;
    if (!want(r, suffix, k, sizeof k, 0) || (r->st = gguf_get_f64(r->g, k, &v))) return dflt;
    return (float)v;
}

static int get_bool(reader *r, const char *suffix, int dflt) {
    char k[128];
    int v;
    if (!want(r, suffix, k, sizeof k, 0) || (r->st = gguf_get_bool(r->g, k, &v))) return dflt;
    return v;
}

/* rope.scaling.type: "none", "linear", "yarn" (absent: none) */
static moe_status read_rope_scaling(reader *r, moe_config *c) {
    char k[128], type[16] = "none";
    key(r, "rope.scaling.type", k, sizeof k);
    if (gguf_has_key(r->g, k)) {
        const char *s;
        size_t n;
        moe_status st = gguf_get_str(r->g, k, &s, &n);
        if (st) return st;
        if (n >= sizeof type) n = sizeof type - 1;
        memcpy(type, s, n);
        type[n] = 0;
    }
    float factor = get_float(r, "rope.scaling.factor", 0.0f);
    if (r->st) return r->st;
    if (!strcmp(type, "none") || factor <= 1.0f) return MOE_OK;
    if (!strcmp(type, "linear")) {
        c->rope_freq_scale = 1.0f / factor;
    } else if (!strcmp(type, "yarn")) {
        c->rope_freq_scale = 1.0f / factor;
        c->yarn_factor = factor;
        c->yarn_orig_ctx = get_int(r, "rope.scaling.original_context_length", 1, 0);
        c->yarn_log_mul = get_float(r, "rope.scaling.yarn_log_multiplier", 0.0f);
        c->yarn_beta_fast = get_float(r, "rope.scaling.yarn_beta_fast", 32.0f);
        c->yarn_beta_slow = get_float(r, "rope.scaling.yarn_beta_slow", 1.0f);
    } else {
        return moe_error(MOE_ERR_UNSUPPORTED, "RoPE scaling '%s' (key %s) is not supported", type, k);
    }
    return r->st;
}

moe_status arch_read_config(const gguf_ctx *g, moe_config *c, char *arch, size_t cap) {
    const char *s;
    size_t n;
    if (!gguf_has_key(g, "general.architecture"))
        return moe_error(MOE_ERR_FORMAT, "metadata key 'general.architecture' is missing");
    moe_status st = gguf_get_str(g, "general.architecture", &s, &n);
    if (st) return st;
    snprintf(arch, cap, "%.*s", (int)(n < 31 ? n : 31), s);
    arch_id id = A_N;
    for (int i = 0; i < A_N; i++)
        if (strlen(arch_names[i]) == n && !memcmp(arch_names[i], s, n)) id = (arch_id)i;
    if (id == A_N)
        return moe_error(MOE_ERR_UNSUPPORTED, "architecture '%s' is not supported (supported: %s)", arch,
                         arch_supported_list());
    moe_config_preset(c, "default");
    /* training-only settings do not apply to a published model */
    c->aux_loss_coef = c->z_loss_coef = c->seq_aux_coef = 0.0f;
    c->capacity_factor = c->eval_capacity_factor = 0.0f;
    reader r = {g, arch, MOE_OK};
    c->max_seq = get_int(&r, "context_length", 1, 0);
    c->d_model = get_int(&r, "embedding_length", 1, 0);
    c->n_layers = get_int(&r, "block_count", 1, 0);
    c->d_ff = get_int(&r, "feed_forward_length", 0, 0);
    c->n_heads = get_int(&r, "attention.head_count", 1, 0);
    c->n_kv_heads = get_int(&r, "attention.head_count_kv", 0, c->n_heads);
    c->norm_eps = get_float(&r, "attention.layer_norm_rms_epsilon", 1e-5f);
    c->rope_base = get_float(&r, "rope.freq_base", 10000.0f);
    c->head_dim = get_int(&r, "attention.key_length", 0, 0);
    c->v_head_dim = get_int(&r, "attention.value_length", 0, 0);
    c->rope_dim = get_int(&r, "rope.dimension_count", 0, 0);
    c->n_experts = get_int(&r, "expert_count", 0, 0);
    c->top_k = get_int(&r, "expert_used_count", c->n_experts > 0, 0);
    c->d_expert = get_int(&r, "expert_feed_forward_length", 0, c->d_ff);
    c->router = MOE_ROUTER_SOFTMAX;
    c->moe_first_dense = 0;
    c->moe_every = 1;
    switch (id) {
    case A_LLAMA: /* Mixtral: experts as wide as the dense FFN, renormalised top-k */
        c->d_expert = c->d_ff;
        c->renorm_topk = 1;
        break;
    case A_OLMOE:
        c->qk_norm = MOE_QK_NORM_FULL;
        c->rope_neox = 1;
        c->d_expert = c->d_ff;
        c->renorm_topk = 0;
        break;
    case A_QWEN2MOE:
        c->qkv_bias = 1;
        c->rope_neox = 1;
        c->renorm_topk = 0;
        c->d_shared = get_int(&r, "expert_shared_feed_forward_length", 0, 0);
        c->n_shared_experts = c->d_shared > 0;
        c->shared_gate = 1;
        break;
    case A_QWEN3MOE:
        c->qk_norm = MOE_QK_NORM_HEAD;
        c->rope_neox = 1;
        c->renorm_topk = 1; /* llama.cpp fixes it: no key says so */
        break;
    case A_DEEPSEEK2: {
        c->attn = MOE_ATTN_MLA;
        c->q_lora_rank = get_int(&r, "attention.q_lora_rank", 0, 0);
        c->kv_lora_rank = get_int(&r, "attention.kv_lora_rank", 1, 0);
        int hk = get_int(&r, "attention.key_length_mla", 0, 0), hv = get_int(&r, "attention.value_length_mla", 0, 0);
        if (hk) c->head_dim = hk;
        if (hv) c->v_head_dim = hv;
        c->moe_first_dense = get_int(&r, "leading_dense_block_count", 0, 0);
        c->n_shared_experts = get_int(&r, "expert_shared_count", 0, 0);
        c->d_shared = c->d_expert;
        c->routed_scale = get_float(&r, "expert_weights_scale", 1.0f);
        if (c->routed_scale <= 0) c->routed_scale = 1.0f;
        c->renorm_topk = get_bool(&r, "expert_weights_norm", 0);
        int gating = get_int(&r, "expert_gating_func", 0, 1);
        if (gating != 1 && gating != 2 && !r.st)
            return moe_error(MOE_ERR_UNSUPPORTED, "%s.expert_gating_func = %d is not softmax (1) or sigmoid (2)", arch, gating);
        c->router = gating == 2 ? MOE_ROUTER_SIGMOID : MOE_ROUTER_SOFTMAX;
        c->n_group = get_int(&r, "expert_group_count", 0, 1);
        c->topk_group = get_int(&r, "expert_group_used_count", 0, 1);
        break;
    }
    default: break;
    }
    if (r.st) return r.st;
    if ((st = read_rope_scaling(&r, c))) return st;
    if (c->n_experts > 0 && id != A_DEEPSEEK2 && c->d_expert <= 0)
        return moe_error(MOE_ERR_FORMAT, "%s: the experts' hidden size (feed_forward_length) is missing", arch);
    /* from the tensors: vocabulary, tied head, selection bias */
    const gguf_tensor *emb = gguf_find_tensor(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2)
        return moe_error(MOE_ERR_FORMAT, "tensor 'token_embd.weight' is missing or not 2-D");
    if (emb->ne[1] > (1 << 24)) return moe_error(MOE_ERR_FORMAT, "token_embd.weight has %lld rows: too many", (long long)emb->ne[1]);
    c->vocab_size = (int)emb->ne[1];
    c->tied_embeddings = gguf_find_tensor(g, "output.weight") == NULL;
    c->expert_bias = 0;
    for (int l = 0; l < c->n_layers && c->n_experts > 0; l++) {
        char nm[64];
        snprintf(nm, sizeof nm, "blk.%d.exp_probs_b.bias", l);
        if (gguf_find_tensor(g, nm)) { c->expert_bias = 1; break; }
    }
    c->bias_rate = 0.0f; /* a published bias is frozen */
    return MOE_OK;
}
