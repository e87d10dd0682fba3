/* model/config: presets, text overrides, validation and parameter counts. */
#include <errno.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

static const moe_config base_config = {
    .vocab_size = 4096, .d_model = 192, .n_layers = 4, .n_heads = 6, .n_kv_heads = 2,
    .d_ff = 768, .n_experts = 8, .top_k = 2, .d_expert = 384, .moe_every = 1,
    .moe_first_dense = 0, .tied_embeddings = 0, .renorm_topk = 1, .max_seq = 256,
    .rope_base = 10000.0f, .norm_eps = 1e-5f, .aux_loss_coef = 0.01f, .z_loss_coef = 0.001f,
    .init_std = 0.02f,
    .router = MOE_ROUTER_SOFTMAX, .routing = MOE_ROUTING_TOKEN, .routed_scale = 1.0f,
    .n_group = 1, .topk_group = 1, .router_jitter = 0.0f, .n_shared_experts = 0, .d_shared = 0,
    .shared_gate = 0, .seq_aux_coef = 0.0f, .expert_bias = 0, .bias_rate = 0.001f,
    .capacity_factor = 0.0f, .eval_capacity_factor = 0.0f, .overflow = MOE_OVERFLOW_POSITION,
    .rope_freq_scale = 1.0f, .yarn_beta_fast = 32.0f, .yarn_beta_slow = 1.0f,
};

typedef struct { const char *name, *about; void (*apply)(moe_config *); } preset;

static void p_default(moe_config *c) { (void)c; }
static void p_tiny(moe_config *c) {
    c->vocab_size = 512; c->d_model = 64; c->n_layers = 2; c->n_heads = 4; c->n_kv_heads = 2;
    c->d_ff = 128; c->n_experts = 4; c->top_k = 2; c->d_expert = 64; c->max_seq = 128;
}
static void p_dense(moe_config *c) {   /* the default's active parameters, no experts */
    c->d_ff = c->top_k * c->d_expert;
    c->n_experts = 0; c->top_k = 0;
}
static void p_mixtral_8x7b(moe_config *c) { /* published shape, for `moe info` */
    c->vocab_size = 32000; c->d_model = 4096; c->n_layers = 32; c->n_heads = 32;
    c->n_kv_heads = 8; c->d_ff = 14336; c->n_experts = 8; c->top_k = 2; c->d_expert = 14336;
    c->max_seq = 32768; c->rope_base = 1e6f;
}
static void p_mixtral(moe_config *c) { /* Mixtral's recipe scaled to train here */
    c->n_experts = 8; c->top_k = 2; c->renorm_topk = 1; c->router = MOE_ROUTER_SOFTMAX;
}
/* Switch Transformer: top-1, each expert a full-size FFN, the gate probability
 * scales the output (no renormalisation), capacity factor 1.25 in training and
 * 2.0 in evaluation, aux loss 0.01, multiplicative router jitter 1e-2. */
static void p_switch(moe_config *c) {
    c->n_experts = 16; c->top_k = 1; c->d_expert = c->d_ff; c->renorm_topk = 0;
    c->capacity_factor = 1.25f; c->eval_capacity_factor = 2.0f; c->aux_loss_coef = 0.01f;
    c->z_loss_coef = 0.0f; c->router_jitter = 0.01f;
}
/* Multi-head latent attention as DeepSeek-V2/V3 build it (kv latent 512,
 * q/k heads of 128 + 64 rotated dims, v heads 128, V3's query rank 1536),
 * scaled to d_model 192: a latent of 64, heads of 32 + 16 rotated, v 32. */
static void mla_scaled(moe_config *c, int q_lora) {
    c->attn = MOE_ATTN_MLA; c->kv_lora_rank = 64; c->rope_dim = 16; c->head_dim = 48; c->v_head_dim = 32;
    c->q_lora_rank = q_lora;
}
/* DeepSeek-V2 (236B): 2 shared + 160 routed experts of 1536 (d_model 5120: 0.3 d),
 * top-6, 8 groups of which 3 eligible, softmax without renormalisation, routed
 * scale 16, first layer dense, expert-level balance loss 0.003. Scaled: 32
 * routed experts of 64 (0.33 d), the routed scale 16 * 32/160 = 3.2 so the
 * expected routed weight stays the same with 5x fewer experts. */
static void p_deepseek_v2(moe_config *c) {
    c->n_experts = 32; c->top_k = 6; c->d_expert = 64; c->n_shared_experts = 2; c->d_shared = 64;
    c->n_group = 8; c->topk_group = 3; c->renorm_topk = 0; c->routed_scale = 3.2f;
    c->moe_first_dense = 1; c->d_ff = 8 * 64; c->aux_loss_coef = 0.003f; c->z_loss_coef = 0.0f;
    mla_scaled(c, 0);
}
/* DeepSeek-V3 (671B): 1 shared + 256 routed experts of 2048 (d_model 7168: 0.29 d),
 * top-8, sigmoid scores, selection bias updated by gamma = 0.001 (auxiliary-loss
 * free), sequence-wise balance loss 1e-4, 8 groups of which 4 eligible, weights
 * renormalised over the 8 and scaled by 2.5, first 3 of 61 layers dense.
 * Scaled: 64 routed experts of 64, first layer dense. */
static void p_deepseek_v3(moe_config *c) {
    c->n_experts = 64; c->top_k = 8; c->d_expert = 64; c->n_shared_experts = 1; c->d_shared = 64;
    c->router = MOE_ROUTER_SIGMOID; c->renorm_topk = 1; c->routed_scale = 2.5f;
    c->n_group = 8; c->topk_group = 4; c->expert_bias = 1; c->bias_rate = 0.001f;
    c->seq_aux_coef = 1e-4f; c->aux_loss_coef = 0.0f; c->z_loss_coef = 0.0f;
    c->moe_first_dense = 1; c->d_ff = 9 * 64;
    mla_scaled(c, 96);
}
static void p_gpt4(moe_config *c) { /* rumoured: 16 experts, top-2 */
    c->n_experts = 16; c->top_k = 2; c->renorm_topk = 1;
}
/* OLMoE-1B-7B: 64 experts of 1024 (d_model 2048: d/2), top-8, softmax without
 * renormalisation, aux loss 0.01, z-loss 0.001. Scaled: 64 experts of 96. */
static void p_olmoe(moe_config *c) {
    c->n_experts = 64; c->top_k = 8; c->d_expert = 96; c->renorm_topk = 0;
    c->aux_loss_coef = 0.01f; c->z_loss_coef = 0.001f;
}
static void p_deepseek_v3_671b(moe_config *c) { /* published shape, for `moe info` */
    c->vocab_size = 129280; c->d_model = 7168; c->n_layers = 61; c->n_heads = 128;
    c->n_kv_heads = 128; c->d_ff = 18432; c->n_experts = 256; c->top_k = 8; c->d_expert = 2048;
    c->moe_first_dense = 3; c->max_seq = 4096; c->n_shared_experts = 1; c->d_shared = 2048;
    c->router = MOE_ROUTER_SIGMOID; c->renorm_topk = 1; c->routed_scale = 2.5f;
    c->n_group = 8; c->topk_group = 4; c->expert_bias = 1; c->seq_aux_coef = 1e-4f;
    c->aux_loss_coef = 0.0f; c->z_loss_coef = 0.0f;
    c->attn = MOE_ATTN_MLA; c->q_lora_rank = 1536; c->kv_lora_rank = 512; c->head_dim = 192;
    c->rope_dim = 64; c->v_head_dim = 128;
}
static void p_olmoe_1b_7b(moe_config *c) { /* published shape, for `moe info` */
    c->vocab_size = 50304; c->d_model = 2048; c->n_layers = 16; c->n_heads = 16;
    c->n_kv_heads = 16; c->n_experts = 64; c->top_k = 8; c->d_expert = 1024; c->max_seq = 4096;
    c->renorm_topk = 0; c->aux_loss_coef = 0.01f; c->z_loss_coef = 0.001f;
}

static const preset presets[] = {
    {"default", "4 layers, d_model 192, 8 experts top-2 (Mixtral-style), vocab 4096", p_default},
    {"tiny", "2 layers, d_model 64, 4 experts top-2: for tests", p_tiny},
    {"dense", "the default with one dense SwiGLU FFN of the same active size (as mixtral)", p_dense},
    {"mixtral", "Mixtral recipe (8 experts, top-2, softmax, renormalised) at default scale",
     p_mixtral},
    {"switch", "Switch recipe: 16 FFN-size experts, top-1, capacity 1.25 (eval 2.0), aux 0.01, jitter",
     p_switch},
    {"deepseek-v2", "DeepSeek-V2 recipe: MLA, 2 shared + 32 fine-grained routed, top-6, 8 groups keep 3",
     p_deepseek_v2},
    {"deepseek-v3", "DeepSeek-V3 recipe: MLA with query compression, 1 shared + 64 fine-grained, top-8, sigmoid, bias balancing, groups",
     p_deepseek_v3},
    {"gpt4-rumoured", "rumoured GPT-4 recipe: 16 experts, top-2, at default scale", p_gpt4},
    {"olmoe", "OLMoE recipe: 64 experts of d/2, top-8, no renorm, aux 0.01, z 0.001", p_olmoe},
    {"mixtral-8x7b", "Mixtral 8x7B's published shape (too large to train here)",
     p_mixtral_8x7b},
    {"deepseek-v3-671b", "DeepSeek-V3's published shape, with multi-head latent attention (too large to train here)",
     p_deepseek_v3_671b},
    {"olmoe-1b-7b", "OLMoE-1B-7B's published shape (too large to train here)", p_olmoe_1b_7b},
};
#define N_PRESETS (int)(sizeof presets / sizeof presets[0])

const char *const *moe_preset_names(void) {
    static const char *names[N_PRESETS + 1];
    for (int i = 0; i < N_PRESETS; i++) names[i] = presets[i].name;
    return names;
}

const char *moe_preset_about(const char *name) {
    for (int i = 0; i < N_PRESETS; i++)
        if (!strcmp(presets[i].name, name)) return presets[i].about;
    return NULL;
}

moe_status moe_config_preset(moe_config *cfg, const char *name) {
    for (int i = 0; i < N_PRESETS; i++) {
        if (strcmp(presets[i].name, name) == 0) {
            *cfg = base_config;
            presets[i].apply(cfg);
            return MOE_OK;
        }
    }
    char list[512] = "";
    for (int i = 0; i < N_PRESETS; i++) {
        strncat(list, presets[i].name, sizeof list - strlen(list) - 1);
        if (i + 1 < N_PRESETS) strncat(list, ", ", sizeof list - strlen(list) - 1);
    }
    return moe_error(MOE_ERR_INVALID_ARG, "unknown preset '%s' (known: %s)", name, list);
}

/* One table drives --set, describe and (in io) the GGUF metadata. Enum-like
 * fields are stored as ints and also accept their names. The first
 * N_REQUIRED fields are in every model file; later ones may be missing from
 * older files and then keep the default. */
enum { K_INT, K_FLOAT, K_ENUM };
typedef struct { const char *key; int kind; size_t off; const char *const *names; } field;
static const char *const router_names[] = {"softmax", "sigmoid", NULL};
static const char *const routing_names[] = {"token_choice", "expert_choice", "sequence", NULL};
static const char *const overflow_names[] = {"position", "score", NULL};
static const char *const matmul_names[] = {"fp32", "bf16", NULL};
static const char *const qk_norm_names[] = {"none", "full", "head", NULL};
static const char *const attn_names[] = {"gqa", "mla", NULL};
#define FI(k) {#k, K_INT, offsetof(moe_config, k), NULL}
#define FF(k) {#k, K_FLOAT, offsetof(moe_config, k), NULL}
#define FE(k, n) {#k, K_ENUM, offsetof(moe_config, k), n}
static const field fields[] = {
    FI(vocab_size), FI(d_model), FI(n_layers), FI(n_heads), FI(n_kv_heads), FI(d_ff),
    FI(n_experts), FI(top_k), FI(d_expert), FI(moe_every), FI(moe_first_dense),
    FI(tied_embeddings), FI(renorm_topk), FI(max_seq), FF(rope_base), FF(norm_eps),
    FF(aux_loss_coef), FF(z_loss_coef), FF(init_std),
    FE(router, router_names), FE(routing, routing_names), FF(routed_scale), FI(n_group),
    FI(topk_group), FF(router_jitter), FI(n_shared_experts), FI(d_shared), FI(shared_gate),
    FF(seq_aux_coef), FI(expert_bias), FF(bias_rate), FF(capacity_factor),
    FF(eval_capacity_factor), FE(overflow, overflow_names), FE(matmul, matmul_names),
    FI(head_dim), FI(v_head_dim), FE(qk_norm, qk_norm_names), FI(qkv_bias), FI(rope_neox),
    FI(rope_dim), FF(rope_freq_scale), FF(yarn_factor), FI(yarn_orig_ctx), FF(yarn_log_mul),
    FF(yarn_beta_fast), FF(yarn_beta_slow), FE(attn, attn_names), FI(q_lora_rank),
    FI(kv_lora_rank),
};
#define N_FIELDS (int)(sizeof fields / sizeof fields[0])
#define N_REQUIRED 19

int moe_config_n_fields(void) { return N_FIELDS; }
const char *moe_config_field(int i, int *is_float) {
    if (i < 0 || i >= N_FIELDS) return NULL;
    if (is_float) *is_float = fields[i].kind == K_FLOAT;
    return fields[i].key;
}
int moe_config_field_required(int i) { return i >= 0 && i < N_REQUIRED; }
/* reads/writes field i as double */
double moe_config_get_field(const moe_config *c, int i) {
    const char *p = (const char *)c + fields[i].off;
    return fields[i].kind == K_FLOAT ? (double)*(const float *)p : (double)*(const int *)p;
}
void moe_config_put_field(moe_config *c, int i, double v) {
    char *p = (char *)c + fields[i].off;
    if (fields[i].kind == K_FLOAT) *(float *)p = (float)v;
    else *(int *)p = (int)v;
}
/* name of value v of enum field i, or NULL */
static const char *enum_name(int i, int v) {
    if (fields[i].kind != K_ENUM || v < 0) return NULL;
    for (int j = 0; fields[i].names[j]; j++)
        if (j == v) return fields[i].names[j];
    return NULL;
}

moe_status moe_config_set(moe_config *cfg, const char *key, const char *value) {
    for (int i = 0; i < N_FIELDS; i++) {
        if (strcmp(fields[i].key, key) != 0) continue;
        char *end;
        errno = 0;
        if (fields[i].kind == K_ENUM) {
            for (int j = 0; fields[i].names[j]; j++)
                if (!strcmp(fields[i].names[j], value)) { moe_config_put_field(cfg, i, j); return MOE_OK; }
        }
        if (fields[i].kind == K_FLOAT) {
            double v = strtod(value, &end);
            if (end == value || *end || errno || !(v >= -FLT_MAX && v <= FLT_MAX)) /* NaN, Inf, beyond float */
                return moe_error(MOE_ERR_INVALID_ARG, "config key %s: '%s' is not a finite float", key, value);
            moe_config_put_field(cfg, i, v);
        } else {
            long v = strtol(value, &end, 10);
            if (fields[i].kind == K_ENUM && (end == value || *end || errno || !enum_name(i, (int)v))) {
                char list[256] = "";
                for (int j = 0; fields[i].names[j]; j++) {
                    if (j) strncat(list, ", ", sizeof list - strlen(list) - 1);
                    strncat(list, fields[i].names[j], sizeof list - strlen(list) - 1);
                }
                return moe_error(MOE_ERR_INVALID_ARG, "config key %s: '%s' is not one of %s", key, value, list);
            }
            if (end == value || *end || errno || v < -1000000000L || v > 1000000000L)
                return moe_error(MOE_ERR_INVALID_ARG, "config key %s: '%s' is not an integer", key, value);
            moe_config_put_field(cfg, i, (double)v);
        }
        return MOE_OK;
    }
    return moe_error(MOE_ERR_INVALID_ARG, "unknown config key '%s'", key);
}

moe_status moe_config_validate(const moe_config *c) {
#define REQ(cond, ...) do { if (!(cond)) return moe_error(MOE_ERR_INVALID_ARG, __VA_ARGS__); } while (0)
    REQ(c->vocab_size >= 257 && c->vocab_size <= (1 << 24), "vocab_size %d must be in 257..16777216", c->vocab_size);
    REQ(c->d_model >= 2 && c->d_model <= 65536, "d_model %d must be in 2..65536", c->d_model);
    REQ(c->n_layers >= 1 && c->n_layers <= 1024, "n_layers %d must be in 1..1024", c->n_layers);
    REQ(c->n_heads >= 1 && c->n_heads <= 4096, "n_heads %d must be in 1..4096", c->n_heads);
    REQ(c->head_dim >= 0 && c->head_dim <= 4096 && c->v_head_dim >= 0 && c->v_head_dim <= 4096 &&
        c->rope_dim >= 0, "head_dim, v_head_dim must be in 0..4096 and rope_dim >= 0");
    if (c->head_dim == 0)
        REQ(c->d_model % c->n_heads == 0, "n_heads %d does not divide d_model %d (set head_dim)", c->n_heads, c->d_model);
    REQ(moe_config_head_dim(c) >= 1, "the head dimension must be at least 1");
    REQ(moe_config_rope_dim(c) <= moe_config_head_dim(c), "rope_dim %d exceeds the head dimension %d",
        moe_config_rope_dim(c), moe_config_head_dim(c));
    REQ(moe_config_rope_dim(c) % 2 == 0, "the rotated part of a head (%d) must be even for RoPE", moe_config_rope_dim(c));
    REQ(c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0, "n_kv_heads %d must divide n_heads %d", c->n_kv_heads, c->n_heads);
    REQ(c->qk_norm >= MOE_QK_NORM_NONE && c->qk_norm <= MOE_QK_NORM_HEAD, "qk_norm must be none, full or head");
    REQ(c->qkv_bias == 0 || c->qkv_bias == 1, "qkv_bias must be 0 or 1");
    REQ(c->rope_neox == 0 || c->rope_neox == 1, "rope_neox must be 0 or 1");
    REQ(c->rope_freq_scale > 0 && c->rope_freq_scale <= 1, "rope_freq_scale must be in (0, 1]");
    REQ(c->yarn_factor == 0 || (c->yarn_factor >= 1 && c->yarn_factor <= 1024 && c->yarn_orig_ctx >= 1),
        "yarn_factor must be 0 (off) or in [1, 1024] with yarn_orig_ctx >= 1");
    REQ(c->attn == MOE_ATTN_GQA || c->attn == MOE_ATTN_MLA, "attn must be gqa or mla");
    if (c->attn == MOE_ATTN_MLA) {
        REQ(c->kv_lora_rank >= 1 && c->kv_lora_rank <= 65536, "MLA needs kv_lora_rank in 1..65536");
        REQ(c->q_lora_rank >= 0 && c->q_lora_rank <= 65536, "q_lora_rank must be in 0..65536");
        REQ(moe_config_rope_dim(c) < moe_config_head_dim(c), "MLA needs a head_dim larger than rope_dim (the part without RoPE)");
        REQ(c->qk_norm == MOE_QK_NORM_NONE && !c->qkv_bias, "MLA has no q/k norms or q/k/v biases");
    }
    REQ(c->n_experts >= 0 && c->n_experts <= 65536, "n_experts %d must be in 0..65536", c->n_experts);
    REQ(c->moe_every >= 1, "moe_every %d must be at least 1", c->moe_every);
    REQ(c->moe_first_dense >= 0, "moe_first_dense %d must be >= 0", c->moe_first_dense);
    const int any_dense = moe_config_n_moe_layers(c) < c->n_layers;
    if (c->n_experts > 0) {
        REQ(c->top_k >= 1 && c->top_k <= c->n_experts, "top_k %d must be in 1..n_experts (%d)", c->top_k, c->n_experts);
        REQ(c->d_expert >= 1, "d_expert %d must be at least 1", c->d_expert);
    }
    if (any_dense) REQ(c->d_ff >= 1, "d_ff %d must be at least 1 (the model has dense layers)", c->d_ff);
    REQ(c->d_ff >= 0 && c->d_expert >= 0 && c->top_k >= 0, "d_ff, d_expert and top_k must be >= 0");
    REQ(c->tied_embeddings == 0 || c->tied_embeddings == 1, "tied_embeddings must be 0 or 1");
    REQ(c->renorm_topk == 0 || c->renorm_topk == 1, "renorm_topk must be 0 or 1");
    REQ(c->max_seq >= 2 && c->max_seq <= (1 << 20), "max_seq %d must be in 2..1048576", c->max_seq);
    REQ(c->rope_base > 1.0f, "rope_base must be > 1");
    REQ(c->norm_eps > 0 && c->norm_eps < 1, "norm_eps must be in (0, 1)");
    REQ(c->aux_loss_coef >= 0 && c->z_loss_coef >= 0, "loss coefficients must be >= 0");
    REQ(c->init_std > 0 && c->init_std < 10, "init_std must be in (0, 10)");
    REQ(c->router == MOE_ROUTER_SOFTMAX || c->router == MOE_ROUTER_SIGMOID, "router must be softmax or sigmoid");
    REQ(c->routing >= MOE_ROUTING_TOKEN && c->routing <= MOE_ROUTING_SEQUENCE, "routing must be token_choice, expert_choice or sequence");
    REQ(c->overflow == MOE_OVERFLOW_POSITION || c->overflow == MOE_OVERFLOW_SCORE, "overflow must be position or score");
    REQ(c->matmul == MOE_MATMUL_FP32 || c->matmul == MOE_MATMUL_BF16, "matmul must be fp32 or bf16");
    REQ(c->routed_scale > 0 && c->routed_scale < 1000, "routed_scale must be in (0, 1000)");
    REQ(c->router_jitter >= 0 && c->router_jitter < 1, "router_jitter must be in [0, 1)");
    REQ(c->seq_aux_coef >= 0, "seq_aux_coef must be >= 0");
    REQ(c->expert_bias == 0 || c->expert_bias == 1, "expert_bias must be 0 or 1");
    REQ(c->bias_rate >= 0 && c->bias_rate < 1, "bias_rate must be in [0, 1)");
    REQ(c->capacity_factor >= 0 && c->capacity_factor <= 1000, "capacity_factor must be in [0, 1000] (0 = dropless)");
    REQ(c->eval_capacity_factor >= 0 && c->eval_capacity_factor <= 1000, "eval_capacity_factor must be in [0, 1000] (0 = dropless)");
    REQ(c->n_shared_experts >= 0 && c->n_shared_experts <= 64, "n_shared_experts %d must be in 0..64", c->n_shared_experts);
    REQ(c->shared_gate == 0 || c->shared_gate == 1, "shared_gate must be 0 or 1");
    if (c->n_experts > 0 && c->n_shared_experts > 0)
        REQ(c->d_shared >= 1, "d_shared %d must be at least 1 (n_shared_experts is %d)", c->d_shared, c->n_shared_experts);
    REQ(c->d_shared >= 0, "d_shared must be >= 0");
    if (c->n_experts > 0 && c->n_group > 1) {
        REQ(c->n_experts % c->n_group == 0, "n_group %d must divide n_experts %d", c->n_group, c->n_experts);
        REQ(c->topk_group >= 1 && c->topk_group <= c->n_group, "topk_group %d must be in 1..n_group (%d)", c->topk_group, c->n_group);
        REQ(c->top_k <= c->topk_group * (c->n_experts / c->n_group),
            "top_k %d exceeds the experts of the %d eligible groups (%d)", c->top_k, c->topk_group,
            c->topk_group * (c->n_experts / c->n_group));
        REQ(c->routing != MOE_ROUTING_EXPERT, "group-limited routing (n_group > 1) applies to token-choice and sequence routing, not expert_choice");
    }
    REQ(c->n_group >= 0 && c->n_group <= 1024, "n_group %d must be in 0..1024", c->n_group);
    for (int i = 0; i < N_FIELDS; i++) { /* a model file may hold Inf or NaN in any float */
        double v = moe_config_get_field(c, i);
        REQ(fields[i].kind != K_FLOAT || v - v == 0, "%s must be finite", fields[i].key);
    }
    {   /* An upper bound on the parameter count, in double: below 1e15 no
         * int64/size_t product of the layout or of moe_config_param_counts can
         * overflow (fuzzing found d_expert 1e9 x 65536 experts wrapping). */
        double d = c->d_model, ffn = any_dense ? (double)c->d_ff : 0;
        if (c->n_experts > 0)
            ffn += (double)c->d_expert * c->n_experts + (double)c->d_shared * c->n_shared_experts + c->n_experts;
        const double H = c->n_heads, hd = moe_config_head_dim(c), vd = moe_config_v_head_dim(c);
        double attn = d * (H * hd + c->n_kv_heads * (hd + vd)) + H * vd * d + 3 * H * hd;
        if (c->attn == MOE_ATTN_MLA)
            attn += (d + H * hd) * c->q_lora_rank + (d + H * (hd + vd)) * c->kv_lora_rank + d * hd;
        double ub = 2.0 * c->vocab_size * d + d + c->n_layers * (attn + 3 * d + 3 * d * ffn + d * c->n_experts);
        REQ(ub < 1e15, "the configuration would have about %.3g parameters (at most 1e15 are supported)", ub);
    }
#undef REQ
    return MOE_OK;
}

int moe_config_head_dim(const moe_config *c) {
    return c->head_dim > 0 ? c->head_dim : c->d_model / (c->n_heads > 0 ? c->n_heads : 1);
}
int moe_config_v_head_dim(const moe_config *c) {
    return c->v_head_dim > 0 ? c->v_head_dim : moe_config_head_dim(c);
}
int moe_config_rope_dim(const moe_config *c) {
    return c->rope_dim > 0 ? c->rope_dim : moe_config_head_dim(c);
}

int moe_config_layer_is_moe(const moe_config *c, int l) {
    return c->n_experts > 0 && l >= c->moe_first_dense && (l - c->moe_first_dense) % c->moe_every == 0;
}

int moe_config_n_moe_layers(const moe_config *c) {
    int n = 0;
    for (int l = 0; l < c->n_layers; l++) n += moe_config_layer_is_moe(c, l);
    return n;
}

void moe_config_describe(const moe_config *c, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < N_FIELDS && n < cap; i++) {
        /* float fields never reach the int conversion (Inf would be UB: found by fuzzing) */
        const char *en = fields[i].kind == K_ENUM ? enum_name(i, (int)moe_config_get_field(c, i)) : NULL;
        int w = fields[i].kind == K_FLOAT
            ? snprintf(buf + n, cap - n, "%-20s = %g\n", fields[i].key, moe_config_get_field(c, i))
            : en ? snprintf(buf + n, cap - n, "%-20s = %s\n", fields[i].key, en)
                 : snprintf(buf + n, cap - n, "%-20s = %d\n", fields[i].key, (int)moe_config_get_field(c, i));
        if (w < 0) break;
        n += (size_t)w;
    }
}
