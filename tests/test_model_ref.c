/* Checks the whole model against an independent PyTorch implementation
 * (tests/ref/model_ref.py): logits, each loss term, every parameter gradient
 * and the losses of 10 AdamW steps, for a tiny config with one dense and one
 * MoE layer, 4 experts top-2 and grouped-query attention. Runs the comparison
 * once with the fast kernels and once with the scalar reference kernels. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/model.h"
#include "train/train.h"

static void put(FILE *f, const void *p, size_t sz, size_t n) { fwrite(p, sz, n, f); }

static int write_dump(const char *path, const moe_config *c, int renorm, int tied) {
    moe_config cfg = *c;
    cfg.renorm_topk = renorm;
    cfg.tied_embeddings = tied;
    moe_model *m;
    if (moe_model_create(&m, &cfg, 1234)) { printf("create: %s\n", moe_last_error()); return -1; }
    if (model_alloc_grads(m)) { moe_model_free(m); return -1; }
    const int B = 2, T = 8, N = B * T, steps = 10;
    moe_train_params tp;
    moe_train_params_default(&tp);
    tp.weight_decay = 0.1f; tp.beta1 = 0.9f; tp.beta2 = 0.95f; tp.adam_eps = 1e-8f; tp.grad_clip = 1.0f;
    int32_t tokens[16], targets[16];
    moe_rng rng;
    moe_rng_seed(&rng, 99);
    for (int i = 0; i < N; i++) { tokens[i] = (int32_t)moe_rng_below(&rng, cfg.vocab_size); targets[i] = (int32_t)moe_rng_below(&rng, cfg.vocab_size); }
    FILE *f = fopen(path, "wb");
    if (!f) { printf("cannot write %s\n", path); moe_model_free(m); return -1; }
    fwrite("MOEREF01", 1, 8, f);
    int32_t ints[16] = {cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
                        cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.moe_every, cfg.moe_first_dense,
                        cfg.tied_embeddings, cfg.renorm_topk, B, T, steps};
    int32_t ni = 16, nf = 9;
    put(f, &ni, 4, 1); put(f, ints, 4, 16);
    float floats[9] = {cfg.rope_base, cfg.norm_eps, cfg.aux_loss_coef, cfg.z_loss_coef, tp.weight_decay,
                       tp.beta1, tp.beta2, tp.adam_eps, tp.grad_clip};
    put(f, &nf, 4, 1); put(f, floats, 4, 9);
    put(f, tokens, 4, N); put(f, targets, 4, N);
    int64_t np = (int64_t)m->n_params;
    put(f, &np, 8, 1); put(f, m->params, 4, m->n_params);
    model_losses L;
    if (model_forward(m, tokens, targets, B, T, &L)) { printf("forward: %s\n", moe_last_error()); return -1; }
    put(f, m->acts.logits, 4, (size_t)N * cfg.vocab_size);
    float lv[4] = {(float)L.loss, (float)L.ce, (float)L.aux, (float)L.z};
    put(f, lv, 4, 4);
    memset(m->grads, 0, m->n_params * sizeof(float));
    model_backward(m, tokens, targets, 1.0f);
    put(f, m->grads, 4, m->n_params);
    float *am = calloc(m->n_params, 4), *av = calloc(m->n_params, 4);
    float lrs[10], losses[10];
    for (int s = 0; s < steps; s++) lrs[s] = 1e-2f * (s + 1) / steps;
    for (int s = 0; s < steps; s++) {
        model_forward(m, tokens, targets, B, T, &L);
        losses[s] = (float)L.loss;
        memset(m->grads, 0, m->n_params * sizeof(float));
        model_backward(m, tokens, targets, 1.0f);
        clip_grads(m->grads, m->n_params, grad_norm(m->grads, m->n_params), tp.grad_clip);
        model_adamw(m, am, av, lrs[s], &tp, s + 1, 1.0f);
    }
    put(f, lrs, 4, steps); put(f, losses, 4, steps);
    free(am); free(av);
    moe_model_free(m);
    return fclose(f) == 0 ? 0 : -1;
}

int main(void) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 300; c.d_model = 32; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.d_ff = 48; c.n_experts = 4; c.top_k = 2; c.d_expert = 24; c.moe_first_dense = 1; c.moe_every = 1;
    c.init_std = 0.2f; /* well-separated router scores: no near-ties in top-k */
    char dump_buf[512];
    const char *dump = th_tmp_path(dump_buf, sizeof dump_buf, "model_ref.bin");
    struct { int renorm, tied, reference; const char *label; } runs[] = {
        {1, 0, 0, "renorm, untied, fast kernels"},
        {1, 0, 1, "renorm, untied, reference kernels"},
        {0, 1, 0, "no renorm, tied, fast kernels"},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        moe_set_reference_kernels(runs[i].reference);
        TEST_CASE(runs[i].label);
        int rc = write_dump(dump, &c, runs[i].renorm, runs[i].tied);
        CHECK(rc == 0, "writing the dump failed");
        TEST_END();
        if (rc == 0) th_run_torch_checker("tests/ref/model_ref.py", dump, runs[i].label, 11);
    }
    moe_set_reference_kernels(0);
    remove(dump);
    TEST_MAIN_END();
}
