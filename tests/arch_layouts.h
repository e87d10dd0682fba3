/* tests/arch_layouts.h: tiny configs of every published layout that
 * arch_write_random writes (shared by test_arch and test_offload). */
#ifndef MOE_TEST_ARCH_LAYOUTS_H
#define MOE_TEST_ARCH_LAYOUTS_H
#include "moe.h"

typedef struct { const char *label, *arch; moe_config c; } layout;

static moe_config tiny(void) {
    moe_config c;
    moe_config_preset(&c, "default");
    c.vocab_size = 300; c.d_model = 64; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.d_ff = 96; c.n_experts = 4; c.top_k = 2; c.d_expert = 96; c.max_seq = 64;
    c.norm_eps = 1e-5f; c.rope_base = 10000.0f;
    c.aux_loss_coef = c.z_loss_coef = 0.0f;
    return c;
}

static int layouts(layout *out) {
    int n = 0;
    layout *L;
    L = &out[n++]; L->label = "llama (Mixtral)"; L->arch = "llama"; L->c = tiny();
    L = &out[n++]; L->label = "olmoe"; L->arch = "olmoe"; L->c = tiny();
    L->c.qk_norm = MOE_QK_NORM_FULL; L->c.rope_neox = 1; L->c.renorm_topk = 0; L->c.n_kv_heads = 4;
    L = &out[n++]; L->label = "qwen2moe"; L->arch = "qwen2moe"; L->c = tiny();
    L->c.qkv_bias = 1; L->c.rope_neox = 1; L->c.renorm_topk = 0; L->c.d_expert = 32;
    L->c.n_shared_experts = 1; L->c.d_shared = 64; L->c.shared_gate = 1;
    L = &out[n++]; L->label = "qwen3moe"; L->arch = "qwen3moe"; L->c = tiny();
    L->c.qk_norm = MOE_QK_NORM_HEAD; L->c.rope_neox = 1; L->c.head_dim = 32; L->c.d_expert = 32;
    L = &out[n++]; L->label = "deepseek2 (V2-Lite: no q compression, softmax)"; L->arch = "deepseek2"; L->c = tiny();
    L->c.attn = MOE_ATTN_MLA; L->c.n_kv_heads = 1; L->c.head_dim = 24; L->c.v_head_dim = 16; L->c.rope_dim = 8;
    L->c.kv_lora_rank = 32; L->c.q_lora_rank = 0; L->c.moe_first_dense = 1; L->c.n_layers = 3;
    L->c.d_expert = 32; L->c.n_shared_experts = 2; L->c.d_shared = 32; L->c.renorm_topk = 0;
    L->c.routed_scale = 1.5f; L->c.n_experts = 8;
    L = &out[n++]; L->label = "deepseek2 (V3: q compression, sigmoid, bias, groups)"; L->arch = "deepseek2"; L->c = tiny();
    L->c.attn = MOE_ATTN_MLA; L->c.n_kv_heads = 1; L->c.head_dim = 24; L->c.v_head_dim = 16; L->c.rope_dim = 8;
    L->c.kv_lora_rank = 32; L->c.q_lora_rank = 48; L->c.moe_first_dense = 1; L->c.n_layers = 3;
    L->c.d_expert = 32; L->c.n_shared_experts = 1; L->c.d_shared = 32; L->c.n_experts = 8;
    L->c.router = MOE_ROUTER_SIGMOID; L->c.renorm_topk = 1; L->c.routed_scale = 2.5f; L->c.expert_bias = 1;
    L->c.n_group = 4; L->c.topk_group = 2; L->c.bias_rate = 0.0f;
    return n;
}
#endif
