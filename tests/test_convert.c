/* moe_model_convert: a model of ours written in the published llama layout.
 *  - the converted file has no moe.* keys and loads through the published
 *    path (arch_read_config) as the llama architecture;
 *  - its config has the fields that matter for inference of the original;
 *  - model_infer gives the same greedy tokens on both, and bit-identical
 *    logits once the original computes RoPE's angles as a published file
 *    does (float, as ggml; our own models use double), for MoE (untied and
 *    tied head, top-1, top-2), dense and bf16-training models; the
 *    tokenizer encodes alike;
 *  - what the llama layout cannot express is refused, naming the feature,
 *    and nothing is written. */
#include <stdint.h>
#include <stdlib.h>

#include "harness.h"
#include "io/gguf.h"
#include "model/model.h"

static char dir[128];
static moe_tokenizer *shared_tok; /* trained once; copies made by reloading */

static const char text[] =
    "the quick brown fox jumps over the lazy dog. a river runs under the old stone bridge, "
    "and the north wind brings rain to the dark tree by the water. the sun and the moon "
    "light the road where the fox and the dog run. over and under, quick and lazy, brown "
    "and dark: every word comes back again and again in this little text for the tokenizer.";

static moe_config tiny(int vocab) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = vocab;
    c.max_seq = 64;
    c.init_std = 0.3f; /* lively activations: routing and attention far from uniform */
    return c;
}

/* A model of cfg with a copy of the shared tokenizer (via a file: the model owns its own). */
static moe_status make_model(moe_model **m, const moe_config *cfg, uint64_t seed) {
    char tp[256];
    snprintf(tp, sizeof tp, "%s/tok.gguf", dir);
    moe_tokenizer *tok = NULL;
    moe_status st = moe_model_create(m, cfg, seed);
    if (!st) st = moe_tokenizer_load(&tok, tp);
    if (st) { moe_model_free(*m); *m = NULL; return st; }
    moe_model_set_tokenizer(*m, tok);
    return MOE_OK;
}

/* Logits of both models on tok[n]: bitwise equal (*first_diff -1), the
 * same argmax at every position, and the largest relative difference. */
static int compare_logits(moe_model *a, moe_model *b, const int32_t *tok, int n, int *first_diff,
                          int *same_argmax, double *rel) {
    const int V = a->cfg.vocab_size;
    float *la = malloc(sizeof(float) * (size_t)n * V), *lb = malloc(sizeof(float) * (size_t)n * V);
    int ok = la && lb && model_infer(a, tok, n, 0, la, 1) == MOE_OK && model_infer(b, tok, n, 0, lb, 1) == MOE_OK;
    *first_diff = -1;
    *same_argmax = ok;
    *rel = ok ? th_max_rel_err(la, lb, (size_t)n * V, 1e-3) : INFINITY;
    for (size_t i = 0; ok && i < (size_t)n * V; i++)
        if (memcmp(&la[i], &lb[i], sizeof(float))) { *first_diff = (int)i; break; }
    for (int i = 0; ok && i < n; i++) {
        int ia = 0, ib = 0;
        for (int v = 1; v < V; v++) {
            if (la[(size_t)i * V + v] > la[(size_t)i * V + ia]) ia = v;
            if (lb[(size_t)i * V + v] > lb[(size_t)i * V + ib]) ib = v;
        }
        *same_argmax &= ia == ib;
    }
    free(la);
    free(lb);
    return ok;
}

/* Converts cfg's model and checks the file, its config, tokenizer and logits. */
static void converts(const char *name, moe_config cfg, int bf16) {
    TEST_CASE(name);
    char path[256];
    snprintf(path, sizeof path, "%s/conv.gguf", dir);
    cfg.matmul = bf16 ? MOE_MATMUL_BF16 : MOE_MATMUL_FP32;
    moe_model *m = NULL, *p = NULL;
    moe_status st = make_model(&m, &cfg, 11);
    CHECK(!st, "create: %s", moe_last_error());
    if (st) { TEST_END(); return; }
    CHECK(moe_model_convert(m, NULL) == MOE_OK, "check only: %s", moe_last_error());
    st = moe_model_convert(m, path);
    CHECK(!st, "convert: %s", moe_last_error());
    gguf_ctx *g = NULL;
    if (!st && gguf_open(&g, path) == MOE_OK) {
        const char *s = NULL;
        size_t n = 0;
        CHECK(!gguf_has_key(g, "moe.d_model") && !gguf_has_key(g, "moe.train_step") && !gguf_has_key(g, "moe.router"),
              "the converted file has moe.* keys");
        CHECK(gguf_get_str(g, "general.architecture", &s, &n) == MOE_OK && n == 5 && !memcmp(s, "llama", 5),
              "general.architecture is not llama");
        CHECK(gguf_has_key(g, "tokenizer.ggml.tokens"), "no tokenizer in the converted file");
        CHECK((gguf_find_tensor(g, "output.weight") != NULL) == !cfg.tied_embeddings, "output.weight presence");
        gguf_close(g);
    }
    if (!st) st = moe_model_load(&p, path);
    CHECK(!st, "load: %s", moe_last_error());
    if (!st) {
        const moe_config *a = &m->cfg, *b = &p->cfg;
        CHECK(!strcmp(p->arch, "llama") && p->file != NULL, "not loaded as a published llama file (arch '%s')", p->arch);
        CHECK(b->vocab_size == a->vocab_size && b->d_model == a->d_model && b->n_layers == a->n_layers &&
              b->n_heads == a->n_heads && b->n_kv_heads == a->n_kv_heads && b->max_seq == a->max_seq &&
              b->tied_embeddings == a->tied_embeddings && b->rope_base == a->rope_base && b->norm_eps == a->norm_eps &&
              moe_config_head_dim(b) == moe_config_head_dim(a) && b->rope_neox == 0 && b->matmul == MOE_MATMUL_FP32,
              "attention or shape fields differ");
        CHECK(b->n_experts == a->n_experts, "n_experts %d, want %d", b->n_experts, a->n_experts);
        if (a->n_experts > 0)
            CHECK(b->top_k == a->top_k && b->d_expert == a->d_expert && b->renorm_topk == 1 &&
                  b->router == MOE_ROUTER_SOFTMAX && b->routed_scale == 1.0f && b->n_shared_experts == 0 &&
                  moe_config_n_moe_layers(b) == b->n_layers, "expert fields differ");
        else
            CHECK(b->d_ff == a->d_ff && moe_config_n_moe_layers(b) == 0, "dense fields differ");
        const moe_tokenizer *ta = moe_model_tokenizer(m), *tb = moe_model_tokenizer(p);
        CHECK(tb && moe_tokenizer_vocab_size(tb) == moe_tokenizer_vocab_size(ta), "tokenizer size differs");
        int32_t *ia = NULL, *ib = NULL;
        size_t na = 0, nb = 0;
        const char *prompt = "the lazy fox runs over the bridge";
        if (tb && moe_tokenizer_encode(ta, prompt, strlen(prompt), &ia, &na) == MOE_OK &&
            moe_tokenizer_encode(tb, prompt, strlen(prompt), &ib, &nb) == MOE_OK) {
            CHECK(na == nb && na > 0 && !memcmp(ia, ib, na * sizeof *ia), "the tokenizers encode differently");
            /* the converted file runs fp32 matmuls: compare with the original doing the same */
            m->cfg.matmul = MOE_MATMUL_FP32;
            int diff, argmax_same;
            double rel;
            /* As they are, the two differ in the float ops between the
             * matmuls: our own models run them as trained, a published one
             * in llama.cpp's order (RoPE's float angles and fused rotation,
             * RMSNorm, attention, SwiGLU, router: kernels.h); the greedy
             * tokens agree. */
            CHECK(compare_logits(m, p, ia, (int)na, &diff, &argmax_same, &rel), "infer: %s", moe_last_error());
            CHECK(argmax_same, "the greedy token differs at some position (max rel. difference %.3g)", rel);
            printf("     as loaded: logits %s (max rel. difference %.2g), same greedy tokens\n",
                   diff < 0 ? "bit-identical" : "differ", rel);
            /* with the original run as a published model, every step must
             * agree bit for bit */
            snprintf(m->arch, sizeof m->arch, "llama");
            CHECK(compare_logits(m, p, ia, (int)na, &diff, &argmax_same, &rel) && diff < 0,
                  "with published RoPE, logits differ (first at %d, max rel. %.3g): %s", diff, rel, moe_last_error());
            m->arch[0] = 0;
        } else {
            CHECK(0, "encode: %s", moe_last_error());
        }
        moe_free(ia);
        moe_free(ib);
        /* a published file is not converted again */
        CHECK(moe_model_convert(p, NULL) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), "already a published llama"),
              "converting a published file: %s", moe_last_error());
    }
    moe_model_free(p);
    moe_model_free(m);
    remove(path);
    TEST_END();
}

/* An MLA model goes out as deepseek2: loads back as a published deepseek2
 * file, the same greedy tokens, and the same logits bit for bit once the
 * original runs as a published model (llama.cpp's order). */
static void converts_mla(const char *name, moe_config cfg) {
    TEST_CASE(name);
    char path[256];
    snprintf(path, sizeof path, "%s/conv_mla.gguf", dir);
    moe_model *m = NULL, *p = NULL;
    moe_status st = make_model(&m, &cfg, 13);
    CHECK(!st, "create: %s", moe_last_error());
    if (!st) st = moe_model_convert(m, path);
    CHECK(!st, "convert: %s", moe_last_error());
    if (!st) st = moe_model_load(&p, path);
    CHECK(!st, "load: %s", moe_last_error());
    if (!st) {
        const moe_config *a = &m->cfg, *b = &p->cfg;
        CHECK(!strcmp(p->arch, "deepseek2") && p->file != NULL, "not loaded as published deepseek2 (arch '%s')", p->arch);
        CHECK(b->attn == MOE_ATTN_MLA && b->kv_lora_rank == a->kv_lora_rank && b->q_lora_rank == a->q_lora_rank &&
              moe_config_head_dim(b) == moe_config_head_dim(a) && moe_config_rope_dim(b) == moe_config_rope_dim(a) &&
              moe_config_v_head_dim(b) == moe_config_v_head_dim(a) && b->router == a->router &&
              b->expert_bias == a->expert_bias && b->n_group == a->n_group && b->routed_scale == a->routed_scale &&
              b->renorm_topk == a->renorm_topk && b->n_shared_experts == a->n_shared_experts &&
              b->moe_first_dense == a->moe_first_dense, "MLA or routing fields differ");
        int32_t tok[10];
        for (int i = 0; i < 10; i++) tok[i] = (i * 53 + 7) % cfg.vocab_size;
        int diff, argmax_same;
        double rel;
        CHECK(compare_logits(m, p, tok, 10, &diff, &argmax_same, &rel), "infer: %s", moe_last_error());
        CHECK(argmax_same, "the greedy token differs (max rel. difference %.3g)", rel);
        snprintf(m->arch, sizeof m->arch, "deepseek2");
        CHECK(compare_logits(m, p, tok, 10, &diff, &argmax_same, &rel) && diff < 0,
              "with published RoPE, logits differ (first at %d, max rel. %.3g)", diff, rel);
        m->arch[0] = 0;
    }
    moe_model_free(p);
    moe_model_free(m);
    remove(path);
    TEST_END();
}

/* cfg is refused with an error containing want, and no file appears. */
static void refuses(const char *name, moe_config cfg, const char *want) {
    TEST_CASE(name);
    char path[256];
    snprintf(path, sizeof path, "%s/refused.gguf", dir);
    moe_model *m = NULL;
    moe_status st = make_model(&m, &cfg, 3);
    CHECK(!st, "create: %s", moe_last_error());
    if (!st) {
        CHECK(moe_model_convert(m, NULL) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), want),
              "check only: '%s', want '%s'", moe_last_error(), want);
        CHECK(moe_model_convert(m, path) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), want),
              "convert: '%s', want '%s'", moe_last_error(), want);
        CHECK(access(path, F_OK) != 0, "a file was written for a refused model");
    }
    moe_model_free(m);
    remove(path);
    TEST_END();
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/moe_test_convert_XXXXXX");
    if (!mkdtemp(dir)) { TEST_CASE("setup"); TEST_FATAL("mkdtemp failed"); }
    TEST_CASE("setup: a tokenizer");
    {
        const char *t = text;
        size_t len = strlen(text);
        char tp[256];
        snprintf(tp, sizeof tp, "%s/tok.gguf", dir);
        moe_status st = moe_tokenizer_train(&shared_tok, &t, &len, 1, 300);
        if (!st) st = moe_tokenizer_save(shared_tok, tp);
        if (st) TEST_FATAL("tokenizer: %s", moe_last_error());
    }
    TEST_END();
    const int V = moe_tokenizer_vocab_size(shared_tok);
    moe_config c = tiny(V);
    converts("MoE, untied head", c, 0);
    c.tied_embeddings = 1;
    converts("MoE, tied head (output falls back to token_embd)", c, 0);
    c = tiny(V);
    c.n_experts = 0; c.top_k = 0;
    converts("dense", c, 0);
    c = tiny(V);
    c.d_expert = c.d_ff; /* experts as wide as the dense FFN would be */
    converts("MoE with d_expert = d_ff", c, 0);
    converts("MoE trained with bf16 matmuls (the file runs fp32)", tiny(V), 1);
    c = tiny(V); c.top_k = 1;
    converts("MoE top-1", c, 0);

    c = tiny(V); c.router = MOE_ROUTER_SIGMOID;
    refuses("refuses sigmoid routing", c, "sigmoid routing: the llama layout has only softmax; deepseek2");
    c = tiny(V); c.routing = MOE_ROUTING_EXPERT;
    refuses("refuses expert choice", c, "expert-choice routing");
    c = tiny(V); c.routing = MOE_ROUTING_SEQUENCE;
    refuses("refuses sequence routing", c, "sequence routing");
    c = tiny(V); c.eval_capacity_factor = 2.0f; c.capacity_factor = 1.25f;
    refuses("refuses a capacity at evaluation", c, "eval_capacity_factor 2 drops tokens");
    c = tiny(V); c.n_shared_experts = 1; c.d_shared = 32;
    refuses("refuses shared experts", c, "shared experts: the llama layout has none; deepseek2");
    c = tiny(V); c.expert_bias = 1;
    refuses("refuses the selection bias", c, "selection bias");
    c = tiny(V); c.n_group = 2; c.topk_group = 1; c.top_k = 2;
    refuses("refuses group-limited routing", c, "group-limited routing");
    c = tiny(V); c.routed_scale = 2.0f;
    refuses("refuses a routed scale", c, "routed_scale 2");
    c = tiny(V); c.renorm_topk = 0;
    refuses("refuses top-k without renormalisation", c, "always renormalises");
    c = tiny(V); c.n_layers = 3; c.moe_every = 2;
    refuses("refuses dense layers between MoE ones", c, "dense layers among MoE ones");
    c = tiny(V); c.moe_first_dense = 1;
    refuses("refuses leading dense layers", c, "moe_first_dense 1");
    c = tiny(V); c.rope_neox = 1;
    refuses("refuses NeoX RoPE", c, "NeoX RoPE");
    c = tiny(V); c.qk_norm = MOE_QK_NORM_HEAD;
    refuses("refuses q/k norms", c, "q/k norms");
    c = tiny(V); c.attn = MOE_ATTN_MLA; c.n_kv_heads = 1; c.head_dim = 24; c.v_head_dim = 16; c.rope_dim = 8;
    c.kv_lora_rank = 32;
    converts_mla("MLA (DeepSeek-V2 style) goes out as deepseek2", c);
    c.q_lora_rank = 32; c.router = MOE_ROUTER_SIGMOID; c.expert_bias = 1; c.n_group = 2; c.topk_group = 1;
    c.routed_scale = 2.5f; c.n_shared_experts = 1; c.d_shared = c.d_expert; c.moe_first_dense = 1; c.n_layers = 3;
    converts_mla("MLA with query compression, sigmoid, bias, groups, shared expert (DeepSeek-V3 style)", c);
    c.shared_gate = 1;
    refuses("refuses a gated shared expert under deepseek2", c, "gated shared expert");
    c = tiny(V + 7);
    refuses("refuses a vocab_size the tokenizer does not fill", c, "sizes the embedding by the token list");

    moe_tokenizer_free(shared_tok);
    char tp[256];
    snprintf(tp, sizeof tp, "%s/tok.gguf", dir);
    remove(tp);
    rmdir(dir);
    TEST_MAIN_END();
}
