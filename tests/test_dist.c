/* dist in the default build (one rank, dist_local.c): the launch checks and
 * their messages, the rank-order reduction, and the expert exchange of
 * expert_parallel.c run through its whole path (plan, permutation, remote
 * cache, per-source backward) with every expert local: the layer's output,
 * input gradient and weight gradients must be the bits of the layer without
 * it; the inference exchange (EP_SAME_TOKENS) likewise, forward only.
 * Many ranks: tests/test_mpi.sh. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "moe/moe_layer.h"

enum { N = 24, D = 16, E = 4, K = 2, F = 8 };
static float x[N * D], router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F], dout[N * D];

static void fill(float *p, size_t n, float scale, unsigned *seed) {
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = scale * (((*seed >> 8) & 0xffff) / 32768.0f - 1.0f);
    }
}

typedef struct { float out[N * D], dx[N * D], g[3][E * F * D], grouter[E * D]; } layer_run;

/* forward and backward of the layer, through the exchange when ex != NULL */
static void run_layer(layer_run *res, moe_exchange *ex) {
    moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1.0f};
    moe_weights w = {.router = router, .gate = gate, .up = up, .down = down};
    moe_cache c;
    if (moe_cache_init(&c, N, D, E, K, F, 0, o.mode, (int64_t)N * K) != MOE_OK)
        TEST_FATAL("moe_cache_init: %s", moe_last_error());
    c.ex = ex;
    memset(res, 0, sizeof *res);
    moe_grads g = {.router = res->grouter, .gate = res->g[0], .up = res->g[1], .down = res->g[2]};
    moe_forward(res->out, &c, x, &w, N, &o);
    moe_backward(res->dx, &g, dout, &c, x, &w, &o, (moe_loss_scales){0.01f, 0.001f, 0});
    moe_cache_free(&c);
}

int main(void) {
    moe_dist *w = dist_world();
    {
        TEST_CASE("one rank by default; launch checks name what does not divide");
        CHECK(w->size == 1 && w->rank == 0 && w->ep == 1 && !dist_is_mpi(), "world %d/%d ep %d", w->rank, w->size, w->ep);
        CHECK(dist_check_expert_parallel(3, 2, 4) != MOE_OK && strstr(moe_last_error(), "does not divide the 2 ranks"),
              "EP 3 on 2 ranks: %s", moe_last_error());
        CHECK(dist_check_expert_parallel(3, 3, 4) != MOE_OK && strstr(moe_last_error(), "does not divide the model's 4 experts"),
              "EP 3 over 4 experts: %s", moe_last_error());
        CHECK(dist_check_expert_parallel(2, 4, 0) != MOE_OK && strstr(moe_last_error(), "dense"), "dense: %s", moe_last_error());
        CHECK(dist_check_expert_parallel(2, 4, 8) == MOE_OK, "EP 2 of 4 ranks, 8 experts refused: %s", moe_last_error());
        CHECK(dist_set_expert_parallel(2, 8) != MOE_OK, "EP 2 accepted on one rank");
        CHECK(dist_set_expert_parallel(1, 8) == MOE_OK && w->ep == 1, "EP 1 refused");
        TEST_END();
    }
    {
        TEST_CASE("reduce_add on one rank adds its piece; sums leave x alone; any is or");
        float acc[3] = {1.0f, -2.0f, 0.5f}, g[3] = {0.25f, 2.0f, -0.5f};
        CHECK(dist_reduce_add(acc, g, 3) == MOE_OK && acc[0] == 1.25f && acc[1] == 0.0f && acc[2] == 0.0f,
              "%g %g %g", acc[0], acc[1], acc[2]);
        double s[2] = {3.5, -1};
        int64_t n[1] = {7};
        CHECK(dist_sum_f64(s, 2) == MOE_OK && s[0] == 3.5 && s[1] == -1 && dist_sum_i64(n, 1) == MOE_OK && n[0] == 7, "sums");
        int f = 5;
        CHECK(dist_any(&f) == MOE_OK && f == 1, "any(5) = %d", f);
        f = 0;
        CHECK(dist_any(&f) == MOE_OK && f == 0, "any(0) = %d", f);
        TEST_END();
    }
    {
        TEST_CASE("the expert exchange with every expert local gives the layer's bits");
        unsigned seed = 11;
        fill(x, N * D, 1.0f, &seed);
        fill(router, E * D, 0.5f, &seed);
        fill(gate, E * F * D, 0.3f, &seed);
        fill(up, E * F * D, 0.3f, &seed);
        fill(down, E * D * F, 0.3f, &seed);
        fill(dout, N * D, 1.0f, &seed);
        static layer_run plain, through;
        run_layer(&plain, NULL);
        expert_parallel *ep = NULL;
        if (expert_parallel_create(&ep, 1, E, EP_SHARDED_TOKENS) != MOE_OK) TEST_FATAL("expert_parallel_create: %s", moe_last_error());
        run_layer(&through, expert_parallel_layer(ep, 0));
        CHECK(expert_parallel_status(ep) == MOE_OK, "exchange failed: %s", moe_last_error());
        CHECK(expert_parallel_rows_out(ep) == 0, "%lld rows left a one-rank world", (long long)expert_parallel_rows_out(ep));
        CHECK(memcmp(plain.out, through.out, sizeof plain.out) == 0, "outputs differ");
        CHECK(memcmp(plain.dx, through.dx, sizeof plain.dx) == 0, "input gradients differ");
        CHECK(memcmp(plain.g, through.g, sizeof plain.g) == 0, "expert weight gradients differ");
        CHECK(memcmp(plain.grouter, through.grouter, sizeof plain.grouter) == 0, "router gradients differ");
        double sum = 0;
        for (int i = 0; i < E * F * D; i++) sum += plain.g[0][i] * plain.g[0][i];
        CHECK(sum > 0, "no gradient reached the experts: the comparison proves nothing");
        expert_parallel_free(ep);
        TEST_END();
    }
    {
        TEST_CASE("the inference exchange (same tokens on every rank) with every expert local gives the layer's bits");
        moe_route_opts o = {.score = MOE_ROUTER_SOFTMAX, .mode = MOE_ROUTING_TOKEN, .renorm = 1, .scale = 1.0f};
        moe_weights wt = {.router = router, .gate = gate, .up = up, .down = down};
        static float plain[N * D], through[N * D];
        moe_cache c;
        expert_parallel *ep = NULL;
        if (moe_cache_init(&c, N, D, E, K, F, 0, o.mode, (int64_t)N * K) != MOE_OK ||
            expert_parallel_create(&ep, 1, E, EP_SAME_TOKENS) != MOE_OK)
            TEST_FATAL("setup: %s", moe_last_error());
        moe_forward(plain, &c, x, &wt, N, &o);
        c.ex = expert_parallel_layer(ep, 0);
        moe_forward(through, &c, x, &wt, N, &o);
        CHECK(expert_parallel_status(ep) == MOE_OK, "exchange failed: %s", moe_last_error());
        CHECK(memcmp(plain, through, sizeof plain) == 0, "outputs differ");
        CHECK(expert_parallel_rows_out(ep) == N * K, "%lld rows computed, want %d", (long long)expert_parallel_rows_out(ep), N * K);
        double sum = 0;
        for (int i = 0; i < N * D; i++) sum += plain[i] * plain[i];
        CHECK(sum > 0, "the layer's output is zero: the comparison proves nothing");
        /* it is forward only: a backward through it is an error, not wrong gradients */
        static float dx[N * D], g[3][E * F * D], grouter[E * D];
        moe_grads gr = {.router = grouter, .gate = g[0], .up = g[1], .down = g[2]};
        moe_backward(dx, &gr, dout, &c, x, &wt, &o, (moe_loss_scales){0, 0, 0});
        CHECK(expert_parallel_status(ep) == MOE_ERR_UNSUPPORTED && strstr(moe_last_error(), "inference only"),
              "backward: %s", moe_last_error());
        expert_parallel_free(ep);
        moe_cache_free(&c);
        TEST_END();
    }
    TEST_MAIN_END();
}
