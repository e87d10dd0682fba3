/* Fuzz target: loading a model GGUF (moe_model_load: metadata -> config ->
 * validation -> tensor table -> tokenizer), then decoding a few tokens with
 * whatever loaded, so weights of any value (NaN, Inf, huge) go through the
 * forward pass and the sampler. */
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "arch/arch.h"
#include "core/dtype.h"
#include "model/model.h"

static int on_token(int32_t id, const char *bytes, size_t len, void *user) {
    const moe_config *c = user;
    if (id < 0 || id >= c->vocab_size) { fprintf(stderr, "sampled id %d out of range\n", (int)id); abort(); }
    (void)bytes; (void)len;
    return 0;
}

static void fuzz_one(const uint8_t *data, size_t size) {
    moe_model *m = NULL;
    if (moe_model_load(&m, fuzz_file(data, size)) != MOE_OK) return;
    const moe_config *c = moe_model_config(m);
    /* the KV cache is n_layers x max_seq x kv width: skip shapes too big to
     * decode quickly (they are legal, just not interesting here) */
    double cache = (double)c->n_layers * c->max_seq * c->d_model;
    if (cache < (1 << 22) && m->n_params < (1 << 22)) {
        int32_t prompt[2] = {1, c->vocab_size - 1};
        moe_sample_params greedy = {.max_tokens = 3, .temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
        moe_sample_params hot = {.max_tokens = 3, .temperature = 0.8f, .top_k = 5, .top_p = 0.9f, .seed = 2};
        moe_generate(m, prompt, 2, &greedy, on_token, (void *)c);
        moe_generate(m, prompt, 1, &hot, on_token, (void *)c);
    }
    moe_model_free(m);
}

static int save_model(const char *dir, const char *name, const moe_config *cfg, int with_tok) {
    moe_model *m = NULL;
    if (moe_model_create(&m, cfg, 7) != MOE_OK) return 1;
    if (with_tok) {
        const char *text = "ab ab abc the the them";
        size_t len = strlen(text);
        moe_tokenizer *tok = NULL;
        if (moe_tokenizer_train(&tok, &text, &len, 1, cfg->vocab_size) != MOE_OK) { moe_model_free(m); return 1; }
        moe_model_set_tokenizer(m, tok);
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int bad = moe_model_save(m, path) != MOE_OK;
    moe_model_free(m);
    return bad;
}

static const char *path_in(const char *dir, const char *name) {
    static char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

static int fuzz_write_seeds(const char *dir) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 257; c.d_model = 8; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1;
    c.d_ff = 8; c.n_experts = 2; c.top_k = 1; c.d_expert = 4; c.max_seq = 16;
    c.moe_first_dense = 1;
    int bad = save_model(dir, "moe_dense_first.gguf", &c, 1);
    c.n_layers = 1; c.moe_first_dense = 0; c.tied_embeddings = 1; c.renorm_topk = 0;
    bad |= save_model(dir, "moe_tied_notok.gguf", &c, 0);
    c.n_experts = 0; c.top_k = 0; c.tied_embeddings = 0;
    bad |= save_model(dir, "dense.gguf", &c, 1);
    /* published layouts, written as other tools write them (no moe.* keys) */
    moe_config p;
    moe_config_preset(&p, "tiny");
    p.vocab_size = 257; p.d_model = 8; p.n_layers = 2; p.n_heads = 2; p.n_kv_heads = 1;
    p.d_ff = 8; p.n_experts = 4; p.top_k = 2; p.d_expert = 8; p.max_seq = 16;
    bad |= arch_write_random(path_in(dir, "arch_llama.gguf"), "llama", &p, DT_F32, NULL, 1) != MOE_OK;
    moe_config o = p;
    o.qk_norm = MOE_QK_NORM_FULL; o.rope_neox = 1; o.renorm_topk = 0; o.n_kv_heads = 2;
    bad |= arch_write_random(path_in(dir, "arch_olmoe.gguf"), "olmoe", &o, DT_F32, NULL, 2) != MOE_OK;
    moe_config q2 = p;
    q2.qkv_bias = 1; q2.rope_neox = 1; q2.renorm_topk = 0; q2.n_shared_experts = 1; q2.d_shared = 8; q2.shared_gate = 1;
    bad |= arch_write_random(path_in(dir, "arch_qwen2moe.gguf"), "qwen2moe", &q2, DT_F32, NULL, 3) != MOE_OK;
    moe_config q3 = p;
    q3.qk_norm = MOE_QK_NORM_HEAD; q3.rope_neox = 1; q3.head_dim = 6;
    bad |= arch_write_random(path_in(dir, "arch_qwen3moe.gguf"), "qwen3moe", &q3, DT_F32, NULL, 4) != MOE_OK;
    moe_config ds = p;
    ds.attn = MOE_ATTN_MLA; ds.n_kv_heads = 1; ds.head_dim = 6; ds.v_head_dim = 4; ds.rope_dim = 2;
    ds.kv_lora_rank = 4; ds.q_lora_rank = 4; ds.moe_first_dense = 1; ds.n_shared_experts = 1; ds.d_shared = 8;
    ds.router = MOE_ROUTER_SIGMOID; ds.expert_bias = 1; ds.n_group = 2; ds.topk_group = 1; ds.bias_rate = 0;
    ds.routed_scale = 2.5f; ds.yarn_factor = 4; ds.yarn_orig_ctx = 8; ds.yarn_log_mul = 0.1f; ds.rope_freq_scale = 0.25f;
    bad |= arch_write_random(path_in(dir, "arch_deepseek2.gguf"), "deepseek2", &ds, DT_F32, NULL, 5) != MOE_OK;
    moe_config q8 = p;
    q8.d_model = 32; q8.d_ff = 32; q8.d_expert = 32;
    bad |= arch_write_random(path_in(dir, "arch_llama_q8_0.gguf"), "llama", &q8, DT_Q8_0, NULL, 6) != MOE_OK;
    bad |= arch_write_random(path_in(dir, "arch_llama_q4_0.gguf"), "llama", &q8, DT_Q4_0, NULL, 7) != MOE_OK;
    q8.n_layers = 1; q8.d_ff = q8.d_expert = 16; /* f16 and bf16 seeds under the fuzzer's 64 KB input bound */
    bad |= arch_write_random(path_in(dir, "arch_llama_f16.gguf"), "llama", &q8, DT_F16, NULL, 8) != MOE_OK;
    bad |= arch_write_random(path_in(dir, "arch_llama_bf16.gguf"), "llama", &q8, DT_BF16, NULL, 9) != MOE_OK;
    return bad;
}
