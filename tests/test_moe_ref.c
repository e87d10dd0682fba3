/* Checks the MoE layer against an independent PyTorch implementation
 * (tests/ref/moe_ref.py) for every router and balance loss: chosen experts,
 * what capacity kept, combine weights, outputs, each loss term and every
 * gradient, and that the selection bias gets no gradient. One dump holds all
 * the variants; the checker runs once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "moe/moe_layer.h"

enum { N = 16, D = 8, E = 8, K = 2, F = 6, FS = 10, SEQ = 4 };

typedef struct {
    const char *label;
    moe_route_opts o;
    int k, use_bias, Fs, use_gate;
    moe_loss_scales ls;
} variant;

static void fill(float *p, size_t n, float scale, unsigned *seed) {
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = scale * (((*seed >> 8) & 0xffff) / 32768.0f - 1.0f);
    }
}

static void put(FILE *f, const void *p, size_t sz, size_t n) { fwrite(p, sz, n, f); }

static int write_record(FILE *f, const variant *v, unsigned seed) {
    const int k = v->k, Fs = v->Fs, mode = v->o.mode, S = mode == MOE_ROUTING_EXPERT ? E : k;
    static float x[N * D], router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F], R[N * D];
    static float bias[E], shg[FS * D], shu[FS * D], shd[D * FS], shi[D], out[N * D];
    static float dx[N * D], drouter[E * D], dgate[E * F * D], dup[E * F * D], ddown[E * D * F];
    static float dshg[FS * D], dshu[FS * D], dshd[D * FS], dshi[D];
    fill(x, N * D, 1.0f, &seed);
    fill(router, E * D, 1.5f, &seed); /* well separated scores: no near-ties */
    fill(gate, E * F * D, 0.5f, &seed);
    fill(up, E * F * D, 0.5f, &seed);
    fill(down, E * D * F, 0.5f, &seed);
    fill(R, N * D, 1.0f, &seed);
    fill(bias, E, 0.3f, &seed);
    fill(shg, FS * D, 0.5f, &seed);
    fill(shu, FS * D, 0.5f, &seed);
    fill(shd, D * FS, 0.5f, &seed);
    fill(shi, D, 0.5f, &seed);
    memset(dx, 0, sizeof dx); memset(drouter, 0, sizeof drouter); memset(dgate, 0, sizeof dgate);
    memset(dup, 0, sizeof dup); memset(ddown, 0, sizeof ddown); memset(dshg, 0, sizeof dshg);
    memset(dshu, 0, sizeof dshu); memset(dshd, 0, sizeof dshd); memset(dshi, 0, sizeof dshi);
    moe_cache c;
    if (moe_cache_init(&c, N, D, E, k, F, Fs, mode, moe_rows_needed(N, E, k, mode, v->o.capacity))) return -1;
    moe_weights w = {.router = router, .gate = gate, .up = up, .down = down, .bias = v->use_bias ? bias : NULL};
    if (Fs) { w.sh_gate = shg; w.sh_up = shu; w.sh_down = shd; w.sh_inp = v->use_gate ? shi : NULL; }
    moe_grads g = {.router = drouter, .gate = dgate, .up = dup, .down = ddown,
                   .sh_gate = dshg, .sh_up = dshu, .sh_down = dshd, .sh_inp = dshi};
    moe_forward(out, &c, x, &w, N, &v->o);
    moe_backward(dx, &g, R, &c, x, &w, &v->o, v->ls);
    char label[64] = {0};
    snprintf(label, sizeof label, "%s", v->label);
    put(f, label, 1, 64);
    const moe_route_opts *o = &v->o;
    int32_t ints[16] = {N, D, E, k, F, Fs, o->score, mode, o->renorm, o->n_group, o->topk_group,
                        o->overflow, o->seq_len, v->use_bias, v->use_gate, o->jitter > 0};
    float fl[5] = {o->scale, o->capacity, v->ls.aux, v->ls.z, v->ls.seq};
    put(f, ints, 4, 16); put(f, fl, 4, 5);
    put(f, x, 4, N * D); put(f, router, 4, E * D); put(f, gate, 4, E * F * D);
    put(f, up, 4, E * F * D); put(f, down, 4, E * D * F); put(f, bias, 4, E);
    put(f, shg, 4, (size_t)Fs * D); put(f, shu, 4, (size_t)Fs * D); put(f, shd, 4, (size_t)D * Fs);
    put(f, shi, 4, D);
    if (o->jitter > 0) put(f, c.r.noise, 4, N * D);
    put(f, R, 4, N * D);
    int32_t *kept = malloc(sizeof(int32_t) * N * S);
    for (int s = 0; s < N * S; s++) kept[s] = c.r.slot_row[s] >= 0;
    put(f, c.r.ids, 4, (size_t)N * S); put(f, kept, 4, (size_t)N * S); put(f, c.r.w, 4, (size_t)N * S);
    free(kept);
    put(f, out, 4, N * D);
    double losses[3] = {c.r.aux, c.r.z, c.r.seq_aux};
    put(f, losses, 8, 3);
    put(f, dx, 4, N * D); put(f, drouter, 4, E * D); put(f, dgate, 4, E * F * D);
    put(f, dup, 4, E * F * D); put(f, ddown, 4, E * D * F);
    put(f, dshg, 4, (size_t)Fs * D); put(f, dshu, 4, (size_t)Fs * D); put(f, dshd, 4, (size_t)D * Fs);
    put(f, dshi, 4, D);
    moe_cache_free(&c);
    return 0;
}

int main(void) {
    const moe_route_opts tok = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1, .seq_len = SEQ};
    variant vs[16];
    int n = 0;
    moe_route_opts o;
    vs[n++] = (variant){"softmax top-2 renormalised (Mixtral)", tok, K, 0, 0, 0, {0, 0, 0}};
    o = tok; o.renorm = 0;
    vs[n++] = (variant){"softmax top-4 raw, Switch loss, z-loss (OLMoE)", o, 4, 0, 0, 0, {0.7f, 0.3f, 0}};
    o = tok; o.score = MOE_ROUTER_SIGMOID; o.scale = 2.5f; o.n_group = 4; o.topk_group = 2;
    vs[n++] = (variant){"sigmoid + bias, groups 4 keep 2, scale 2.5, sequence loss (DeepSeek-V3)", o, 3, 1, FS, 0, {0, 0, 2.0f}};
    o = tok; o.renorm = 0; o.scale = 3.2f; o.n_group = 4; o.topk_group = 2;
    vs[n++] = (variant){"softmax raw, groups 4 keep 2, 2 shared experts, Switch loss (DeepSeek-V2)", o, 3, 0, FS, 0, {0.5f, 0, 0}};
    o = tok; o.renorm = 0; o.capacity = 1.0f; o.jitter = 0.1f; o.jitter_seed = 77;
    vs[n++] = (variant){"top-1, capacity 1.0 by position, jitter, Switch loss (Switch)", o, 1, 0, 0, 0, {1.0f, 0.2f, 0}};
    o = tok; o.capacity = 0.75f; o.overflow = MOE_OVERFLOW_SCORE;
    vs[n++] = (variant){"top-2, capacity 0.75 by score", o, K, 0, 0, 0, {0.5f, 0, 0.5f}};
    o = tok; o.mode = MOE_ROUTING_EXPERT; o.renorm = 0; o.capacity = 1.25f;
    vs[n++] = (variant){"expert choice, capacity 1.25", o, K, 0, 0, 0, {0.3f, 0.3f, 0}};
    o = tok; o.mode = MOE_ROUTING_SEQUENCE; o.score = MOE_ROUTER_SIGMOID;
    vs[n++] = (variant){"sequence-level routing, sigmoid + bias, all losses", o, K, 1, 0, 0, {0.5f, 0.2f, 1.0f}};
    o = tok; o.renorm = 0;
    vs[n++] = (variant){"softmax raw, gated shared expert (Qwen2-MoE)", o, 4, 0, FS, 1, {0.5f, 0, 0}};
    o = tok; o.score = MOE_ROUTER_SIGMOID; o.capacity = 1.0f; o.jitter = 0.05f; o.jitter_seed = 5;
    vs[n++] = (variant){"sigmoid + bias, capacity 1.0, jitter, gated shared", o, K, 1, FS, 1, {0.4f, 0.1f, 0.7f}};

    char dump_buf[512];
    const char *dump = th_tmp_path(dump_buf, sizeof dump_buf, "moe_ref.bin");
    FILE *f = fopen(dump, "wb");
    TEST_CASE("writing the layer dump");
    CHECK(f != NULL, "cannot open %s", dump);
    if (f) {
        fwrite("MOELAY01", 1, 8, f);
        int32_t cnt = n;
        fwrite(&cnt, 4, 1, f);
        for (int i = 0; i < n; i++) CHECK(write_record(f, &vs[i], 1000u + 17u * i) == 0, "record %d", i);
        CHECK(fclose(f) == 0, "close failed");
    }
    TEST_END();

    th_run_torch_checker("tests/ref/moe_ref.py", dump, "torch", 10 * n);
    remove(dump);
    TEST_MAIN_END();
}
