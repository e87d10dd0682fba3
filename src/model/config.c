/* model/config: presets, text overrides, validation and parameter counts. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

static const moe_config base_config = {
    .vocab_size = 4096, .d_model = 192, .n_layers = 4, .n_heads = 6, .n_kv_heads = 2,
    .d_ff = 768, .n_experts = 8, .top_k = 2, .d_expert = 384, .moe_every = 1,
    .moe_first_dense = 0, .tied_embeddings = 0, .renorm_topk = 1, .max_seq = 256,
    .rope_base = 10000.0f, .norm_eps = 1e-5f, .aux_loss_coef = 0.01f, .z_loss_coef = 0.001f,
    .init_std = 0.02f,
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
    c->n_experts = 8; c->top_k = 2;
}

static const preset presets[] = {
    {"default", "4 layers, d_model 192, 8 experts top-2 (Mixtral-style), vocab 4096", p_default},
    {"tiny", "2 layers, d_model 64, 4 experts top-2: for tests", p_tiny},
    {"dense", "the default with one dense SwiGLU FFN of the same active size", p_dense},
    {"mixtral", "Mixtral recipe (8 experts, top-2, softmax, renormalised) at default scale",
     p_mixtral},
    {"mixtral-8x7b", "Mixtral 8x7B's published shape (too large to train here)",
     p_mixtral_8x7b},
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

/* One table drives --set, describe and (in io) the GGUF metadata. */
typedef struct { const char *key; int is_float; size_t off; } field;
#define FI(k) {#k, 0, offsetof(moe_config, k)}
#define FF(k) {#k, 1, offsetof(moe_config, k)}
static const field fields[] = {
    FI(vocab_size), FI(d_model), FI(n_layers), FI(n_heads), FI(n_kv_heads), FI(d_ff),
    FI(n_experts), FI(top_k), FI(d_expert), FI(moe_every), FI(moe_first_dense),
    FI(tied_embeddings), FI(renorm_topk), FI(max_seq), FF(rope_base), FF(norm_eps),
    FF(aux_loss_coef), FF(z_loss_coef), FF(init_std),
};
#define N_FIELDS (int)(sizeof fields / sizeof fields[0])

int moe_config_n_fields(void) { return N_FIELDS; }
const char *moe_config_field(int i, int *is_float) {
    if (i < 0 || i >= N_FIELDS) return NULL;
    if (is_float) *is_float = fields[i].is_float;
    return fields[i].key;
}
/* reads/writes field i as double */
double moe_config_get_field(const moe_config *c, int i) {
    const char *p = (const char *)c + fields[i].off;
    return fields[i].is_float ? (double)*(const float *)p : (double)*(const int *)p;
}
void moe_config_put_field(moe_config *c, int i, double v) {
    char *p = (char *)c + fields[i].off;
    if (fields[i].is_float) *(float *)p = (float)v;
    else *(int *)p = (int)v;
}

moe_status moe_config_set(moe_config *cfg, const char *key, const char *value) {
    for (int i = 0; i < N_FIELDS; i++) {
        if (strcmp(fields[i].key, key) != 0) continue;
        char *end;
        errno = 0;
        if (fields[i].is_float) {
            double v = strtod(value, &end);
            if (end == value || *end || errno)
                return moe_error(MOE_ERR_INVALID_ARG, "config key %s: '%s' is not a number", key, value);
            moe_config_put_field(cfg, i, v);
        } else {
            long v = strtol(value, &end, 10);
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
    REQ(c->n_heads >= 1, "n_heads %d must be at least 1", c->n_heads);
    REQ(c->d_model % c->n_heads == 0, "n_heads %d does not divide d_model %d", c->n_heads, c->d_model);
    REQ((c->d_model / c->n_heads) % 2 == 0, "head dimension d_model/n_heads = %d must be even for RoPE", c->d_model / c->n_heads);
    REQ(c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0, "n_kv_heads %d must divide n_heads %d", c->n_kv_heads, c->n_heads);
    REQ(c->n_experts >= 0 && c->n_experts <= 65536, "n_experts %d must be in 0..65536", c->n_experts);
    REQ(c->moe_every >= 1, "moe_every %d must be at least 1", c->moe_every);
    REQ(c->moe_first_dense >= 0, "moe_first_dense %d must be >= 0", c->moe_first_dense);
    int any_dense = 0, any_moe = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (moe_config_layer_is_moe(c, l)) any_moe = 1; else any_dense = 1;
    }
    if (c->n_experts > 0) {
        REQ(c->top_k >= 1 && c->top_k <= c->n_experts, "top_k %d must be in 1..n_experts (%d)", c->top_k, c->n_experts);
        REQ(c->d_expert >= 1, "d_expert %d must be at least 1", c->d_expert);
    }
    if (any_dense) REQ(c->d_ff >= 1, "d_ff %d must be at least 1 (the model has dense layers)", c->d_ff);
    (void)any_moe;
    REQ(c->tied_embeddings == 0 || c->tied_embeddings == 1, "tied_embeddings must be 0 or 1");
    REQ(c->renorm_topk == 0 || c->renorm_topk == 1, "renorm_topk must be 0 or 1");
    REQ(c->max_seq >= 2 && c->max_seq <= (1 << 20), "max_seq %d must be in 2..1048576", c->max_seq);
    REQ(c->rope_base > 1.0f, "rope_base must be > 1");
    REQ(c->norm_eps > 0 && c->norm_eps < 1, "norm_eps must be in (0, 1)");
    REQ(c->aux_loss_coef >= 0 && c->z_loss_coef >= 0, "loss coefficients must be >= 0");
    REQ(c->init_std > 0 && c->init_std < 10, "init_std must be in (0, 10)");
#undef REQ
    return MOE_OK;
}

int moe_config_layer_is_moe(const moe_config *c, int l) {
    return c->n_experts > 0 && l >= c->moe_first_dense && (l - c->moe_first_dense) % c->moe_every == 0;
}

void moe_config_describe(const moe_config *c, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < N_FIELDS && n < cap; i++) {
        int w = fields[i].is_float
            ? snprintf(buf + n, cap - n, "%-16s = %g\n", fields[i].key, moe_config_get_field(c, i))
            : snprintf(buf + n, cap - n, "%-16s = %d\n", fields[i].key, (int)moe_config_get_field(c, i));
        if (w < 0) break;
        n += (size_t)w;
    }
}

moe_param_counts moe_config_param_counts(const moe_config *c) {
    moe_param_counts r = {0};
    int64_t d = c->d_model, hd = c->d_model / (c->n_heads ? c->n_heads : 1);
    int64_t attn = d * hd * c->n_heads * 2 + d * hd * c->n_kv_heads * 2 + 2 * d;
    r.embedding = (int64_t)c->vocab_size * d * (c->tied_embeddings ? 1 : 2);
    r.total = r.embedding + d;
    r.active = r.total;
    for (int l = 0; l < c->n_layers; l++) {
        r.total += attn; r.active += attn;
        if (moe_config_layer_is_moe(c, l)) {
            int64_t expert = 3 * d * c->d_expert;
            r.experts += expert * c->n_experts;
            r.total += expert * c->n_experts + d * c->n_experts;
            r.active += expert * c->top_k + d * c->n_experts;
        } else {
            r.total += 3 * d * c->d_ff; r.active += 3 * d * c->d_ff;
        }
    }
    return r;
}
