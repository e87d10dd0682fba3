/* Multi-head latent attention in training: the gradient of every tensor
 * against central finite differences (with and without the query
 * bottleneck), the training forward against the inference path (absorbed
 * form, KV cache of the latent), and thread-count determinism. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/model.h"

enum { B = 2, T = 6 };

static moe_config mla_config(int q_lora, int moe) {
    moe_config c;
    moe_config_preset(&c, "tiny");
    c.vocab_size = 260; c.d_model = 24; c.n_layers = 2; c.n_heads = 3; c.n_kv_heads = 3;
    c.d_ff = 32; c.max_seq = 32; c.init_std = 0.15f;
    c.n_experts = moe ? 4 : 0; c.top_k = moe ? 2 : 0; c.d_expert = 16; c.moe_first_dense = 1;
    c.attn = MOE_ATTN_MLA; c.head_dim = 10; c.rope_dim = 4; c.v_head_dim = 6;
    c.kv_lora_rank = 8; c.q_lora_rank = q_lora ? 7 : 0;
    return c;
}

static void batch(int32_t *tok, int32_t *tgt, int V) {
    for (int i = 0; i < B * T; i++) {
        tok[i] = (int32_t)((i * 13 + 7) % V);
        tgt[i] = (int32_t)((i * 29 + 3) % V);
    }
}

static double loss_of(moe_model *m, const int32_t *tok, const int32_t *tgt) {
    model_losses L;
    if (model_forward(m, tok, tgt, B, T, &L)) return NAN;
    return L.loss;
}

/* Worst relative error of ~24 probes of tensor t, with test_kernels'
 * fd_check floor, 2e-2 * max|grad| + 1e-4, but max|grad| over the whole
 * model: the noise of a numerical derivative is the float rounding of the
 * one loss over 2 eps, the same absolute size for every tensor. */
static double fd_tensor(moe_model *m, const tensor_desc *t, const int32_t *tok, const int32_t *tgt,
                        float eps) {
    float *p = m->params + t->offset;
    const float *g = m->grads + t->offset;
    double gmax = 0, worst = 0;
    for (size_t i = 0; i < m->n_params; i++) gmax = fmax(gmax, fabs(m->grads[i]));
    size_t stride = t->size > 24 ? t->size / 24 : 1;
    for (size_t i = (t->size > 24 ? 1 : 0); i < t->size; i += stride) {
        float keep = p[i];
        p[i] = keep + eps;
        double lp = loss_of(m, tok, tgt);
        p[i] = keep - eps;
        double lm = loss_of(m, tok, tgt);
        p[i] = keep;
        double num = (lp - lm) / (2.0 * eps), ana = g[i];
        double e = fabs(num - ana) / (fmax(fabs(num), fabs(ana)) + 2e-2 * gmax + 1e-4);
        if (getenv("FD_DEBUG") && e > 5e-3) printf("    %s[%zu] num %g ana %g gmax %g\n", t->name, i, num, ana, gmax);
        if (e > worst || e != e) worst = e != e ? INFINITY : e;
    }
    return worst;
}

int main(void) {
    for (int q_lora = 0; q_lora < 2; q_lora++) {
        TEST_CASE(q_lora ? "MLA gradients of every tensor match finite differences (q_lora)"
                         : "MLA gradients of every tensor match finite differences");
        {
            moe_config c = mla_config(q_lora, 0);
            moe_model *m;
            if (moe_model_create(&m, &c, 3)) { CHECK(0, "%s", moe_last_error()); TEST_END(); TEST_MAIN_END(); }
            CHECK(model_alloc_grads(m) == 0, "%s", moe_last_error());
            int32_t tok[B * T], tgt[B * T];
            batch(tok, tgt, c.vocab_size);
            model_losses L;
            CHECK(model_forward(m, tok, tgt, B, T, &L) == 0, "%s", moe_last_error());
            model_backward(m, tok, tgt, 1.0f);
            int mla_seen = 0;
            for (int i = 0; i < m->n_tensors; i++) {
                const tensor_desc *t = &m->tensors[i];
                double e = fd_tensor(m, t, tok, tgt, 3e-3f);
                mla_seen += strstr(t->name, "attn_k_b") || strstr(t->name, "attn_v_b") || strstr(t->name, "kv_a") ||
                            strstr(t->name, "attn_q_a") || strstr(t->name, "attn_q_b");
                CHECK(e < 1e-2, "%s: finite differences differ by %g", t->name, e);
            }
            CHECK(mla_seen == (q_lora ? 2 * 7 : 2 * 4), "%d MLA tensors", mla_seen);
            moe_model_free(m);
        }
        TEST_END();

        TEST_CASE(q_lora ? "MLA: decoding (absorbed, latent cache) matches the training forward (q_lora)"
                         : "MLA: decoding (absorbed, latent cache) matches the training forward");
        {
            moe_config c = mla_config(q_lora, 1);
            c.init_std = 0.02f;
            moe_model *m;
            if (moe_model_create(&m, &c, 11)) { CHECK(0, "%s", moe_last_error()); TEST_END(); TEST_MAIN_END(); }
            enum { n = 16 };
            int32_t toks[n];
            for (int i = 0; i < n; i++) toks[i] = (int32_t)((i * 37 + 5) % c.vocab_size);
            CHECK(model_forward(m, toks, NULL, 1, n, NULL) == 0, "%s", moe_last_error());
            float *full = malloc(sizeof(float) * n * c.vocab_size), *one = malloc(sizeof(float) * c.vocab_size);
            memcpy(full, m->acts.logits, sizeof(float) * n * c.vocab_size);
            double worst = 0;
            for (int t = 0; t < n; t++) {
                CHECK(model_decode(m, toks[t], t, one) == 0, "%s", moe_last_error());
                worst = fmax(worst, th_max_rel_err(one, full + (size_t)t * c.vocab_size, c.vocab_size, 1e-2));
            }
            CHECK(worst < 1e-4, "decode differs from forward by %g", worst);
            free(full); free(one);
            moe_model_free(m);
        }
        TEST_END();
    }

    TEST_CASE("MLA: 1 and 2 threads give bit-identical losses and gradients");
    {
        moe_config c = mla_config(1, 1);
        double loss[2];
        float *g[2] = {NULL, NULL};
        int32_t tok[B * T], tgt[B * T];
        batch(tok, tgt, c.vocab_size);
        for (int r = 0; r < 2; r++) {
            omp_set_num_threads(r + 1);
            moe_model *m;
            if (moe_model_create(&m, &c, 5)) { CHECK(0, "%s", moe_last_error()); TEST_END(); TEST_MAIN_END(); }
            CHECK(model_alloc_grads(m) == 0, "%s", moe_last_error());
            m->training = 1;
            loss[r] = loss_of(m, tok, tgt);
            model_backward(m, tok, tgt, 1.0f);
            g[r] = malloc(m->n_params * sizeof(float));
            memcpy(g[r], m->grads, m->n_params * sizeof(float));
            if (r) CHECK(!memcmp(g[0], g[1], m->n_params * sizeof(float)), "gradients differ");
            moe_model_free(m);
        }
        CHECK(loss[0] == loss[1], "losses %.17g vs %.17g", loss[0], loss[1]);
        free(g[0]); free(g[1]);
    }
    TEST_END();
    TEST_MAIN_END();
}
