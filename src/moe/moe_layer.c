/* moe/moe_layer: router, top-k selection, dispatch, experts, combine; and the
 * backward pass of all of it, including the Switch balance loss and z-loss.
 * Deterministic: every sum runs in a fixed order whatever the thread count. */
#include <math.h>
#include <string.h>

#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/moe_layer.h"

/* carve 64-byte aligned sub-arrays out of one block */
static float *carve(float **cur, size_t n) {
    float *p = *cur;
    *cur += (n + 15) & ~(size_t)15;
    return p;
}

moe_status moe_cache_init(moe_cache *c, int N, int d, int E, int k, int F) {
    memset(c, 0, sizeof *c);
    c->N = N; c->d = d; c->E = E; c->k = k; c->F = F;
    size_t nk = (size_t)N * k, ne = (size_t)N * E;
    size_t total = 0;
    size_t sizes[] = {ne, ne, N, nk, nk, nk, E, E + 1, nk, nk, E,        /* routing   */
                      nk * d, nk * F, nk * F, nk * F, nk * d,              /* forward   */
                      nk * d + 3 * nk * F + nk * d + 2 * ne + nk};         /* backward  */
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += (sizes[i] + 15) & ~(size_t)15;
    float *b = moe_malloc(total * sizeof(float));
    if (!b) return moe_error_prefix(MOE_ERR_NOMEM, "MoE layer cache");
    c->block = b;
    float *cur = b;
    moe_routing *r = &c->r;
    r->logits = carve(&cur, ne);
    r->probs = carve(&cur, ne);
    r->lse = carve(&cur, N);
    r->ids = (int32_t *)carve(&cur, nk);
    r->topv = carve(&cur, nk);
    r->w = carve(&cur, nk);
    r->counts = (int32_t *)carve(&cur, E);
    r->offsets = (int32_t *)carve(&cur, E + 1);
    r->row_slot = (int32_t *)carve(&cur, nk);
    r->slot_row = (int32_t *)carve(&cur, nk);
    r->order = (int32_t *)carve(&cur, E);
    c->xe = carve(&cur, nk * d);
    c->hg = carve(&cur, nk * F);
    c->hu = carve(&cur, nk * F);
    c->act = carve(&cur, nk * F);
    c->ye = carve(&cur, nk * d);
    c->scratch = carve(&cur, nk * d + 3 * nk * F + nk * d + 2 * ne + nk);
    return MOE_OK;
}

void moe_cache_free(moe_cache *c) {
    if (!c) return;
    moe_free(c->block);
    memset(c, 0, sizeof *c);
}

/* Indices of the k largest values of p[E], largest first; ties go to the
 * lower index (k is small, so repeated scans beat sorting). */
static void select_topk(int32_t *ids, float *vals, const float *p, int E, int k) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= (ids[i] == e);
            if (taken) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        ids[j] = best;
        vals[j] = p[best];
    }
}

void moe_route(moe_routing *r, const float *x, const float *router, int N, int d, int E, int k,
               const moe_route_opts *o) {
    matmul_forward(r->logits, x, router, NULL, N, d, E);
    #pragma omp parallel for schedule(static) if (N * E > 4096)
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        float *p = r->probs + (size_t)t * E;
        float mx = l[0];
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        double sum = 0;
        for (int e = 0; e < E; e++) { p[e] = expf(l[e] - mx); sum += p[e]; }
        float inv = (float)(1.0 / sum);
        for (int e = 0; e < E; e++) p[e] *= inv;
        r->lse[t] = mx + (float)log(sum);
        int32_t *ids = r->ids + (size_t)t * k;
        float *v = r->topv + (size_t)t * k, *w = r->w + (size_t)t * k;
        select_topk(ids, v, p, E, k);
        double s = 0;
        for (int j = 0; j < k; j++) s += v[j];
        for (int j = 0; j < k; j++) w[j] = o->renorm ? (float)(v[j] / s) : v[j];
    }
    /* dispatch: rows grouped by expert, in token order within each expert */
    memset(r->counts, 0, sizeof(int32_t) * E);
    for (size_t s = 0; s < (size_t)N * k; s++) r->counts[r->ids[s]]++;
    r->offsets[0] = 0;
    for (int e = 0; e < E; e++) r->offsets[e + 1] = r->offsets[e] + r->counts[e];
    /* counts doubles as the running write position of each expert, then is restored */
    int32_t *next = r->counts;
    for (int e = 0; e < E; e++) next[e] = r->offsets[e];
    for (size_t s = 0; s < (size_t)N * k; s++) {
        int32_t row = next[r->ids[s]]++;
        r->row_slot[row] = (int32_t)s;
        r->slot_row[s] = row;
    }
    for (int e = 0; e < E; e++) r->counts[e] = r->offsets[e + 1] - r->offsets[e];
    /* balance terms, summed in fixed order */
    double z = 0;
    for (int t = 0; t < N; t++) z += (double)r->lse[t] * r->lse[t];
    r->z = z / N;
    double aux = 0;
    for (int e = 0; e < E; e++) {
        double P = 0;
        for (int t = 0; t < N; t++) P += r->probs[(size_t)t * E + e];
        aux += ((double)r->counts[e] / ((double)N * k)) * (P / N);
    }
    r->aux = aux * E;
}

/* Experts run side by side, one thread each, the busiest first so the
 * threads finish together; each expert's matmuls are whole and unchanged, so
 * results do not depend on which thread ran them. */
static int expert_order(const moe_routing *r, int E, int32_t *order) {
    int n = 0;
    for (int e = 0; e < E; e++)
        if (r->counts[e]) order[n++] = e;
    for (int i = 1; i < n; i++) { /* insertion sort by count, descending; E is small */
        int32_t v = order[i], j = i;
        while (j > 0 && r->counts[order[j - 1]] < r->counts[v]) { order[j] = order[j - 1]; j--; }
        order[j] = v;
    }
    return n;
}

void moe_forward(float *out, moe_cache *c, const float *x, const float *router,
                 const float *gate, const float *up, const float *down, int N,
                 const moe_route_opts *o) {
    const int d = c->d, E = c->E, k = c->k, F = c->F;
    moe_routing *r = &c->r;
    moe_route(r, x, router, N, d, E, k, o);
    const size_t nk = (size_t)N * k;
    #pragma omp parallel for schedule(static)
    for (size_t row = 0; row < nk; row++)
        memcpy(c->xe + row * d, x + (size_t)(r->row_slot[row] / k) * d, sizeof(float) * d);
    int32_t *order = r->order;
    const int active = expert_order(r, E, order);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < active; i++) {
        const int e = order[i], n = r->counts[e], off = r->offsets[e];
        float *hg = c->hg + (size_t)off * F, *hu = c->hu + (size_t)off * F, *act = c->act + (size_t)off * F;
        matmul_forward(hg, c->xe + (size_t)off * d, gate + (size_t)e * F * d, NULL, n, d, F);
        matmul_forward(hu, c->xe + (size_t)off * d, up + (size_t)e * F * d, NULL, n, d, F);
        swiglu_forward(act, hg, hu, n, F);
        matmul_forward(c->ye + (size_t)off * d, act, down + (size_t)e * d * F, NULL, n, F, d);
    }
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *o_ = out + (size_t)t * d;
        for (int i = 0; i < d; i++) o_[i] = 0;
        for (int j = 0; j < k; j++) {
            float w = r->w[(size_t)t * k + j];
            const float *y = c->ye + (size_t)r->slot_row[(size_t)t * k + j] * d;
            for (int i = 0; i < d; i++) o_[i] += w * y[i];
        }
    }
}

void moe_backward(float *dx, float *drouter, float *dgate, float *dup, float *ddown,
                  const float *dout, moe_cache *c, const float *x, const float *router,
                  const float *gate, const float *up, const float *down,
                  const moe_route_opts *o, float aux_scale, float z_scale) {
    const int N = c->N, d = c->d, E = c->E, k = c->k, F = c->F;
    moe_routing *r = &c->r;
    const size_t nk = (size_t)N * k, ne = (size_t)N * E;
    float *cur = c->scratch;
    float *dye = carve(&cur, nk * d), *dact = carve(&cur, nk * F);
    float *dhg = carve(&cur, nk * F), *dhu = carve(&cur, nk * F);
    float *dxe = carve(&cur, nk * d), *dlogits = carve(&cur, ne), *dprobs = carve(&cur, ne);
    float *dw = carve(&cur, nk);

    /* combine: out[t] = sum_j w[t,j] * ye[row(t,j)] */
    #pragma omp parallel for schedule(static)
    for (size_t s = 0; s < nk; s++) {
        const float *g = dout + (s / k) * d;
        size_t row = r->slot_row[s];
        const float *y = c->ye + row * d;
        float *dy = dye + row * d;
        double acc = 0;
        for (int i = 0; i < d; i++) { acc += (double)g[i] * y[i]; dy[i] = r->w[s] * g[i]; }
        dw[s] = (float)acc;
    }
    int32_t *order = r->order;
    const int active = expert_order(r, E, order);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < active; i++) {
        const int e = order[i], n = r->counts[e], off = r->offsets[e];
        const size_t rf = (size_t)off * F, rd = (size_t)off * d, nf = (size_t)n * F;
        memset(dact + rf, 0, nf * sizeof(float));
        matmul_backward(dact + rf, ddown + (size_t)e * d * F, NULL, dye + rd, c->act + rf,
                        down + (size_t)e * d * F, n, F, d);
        memset(dhg + rf, 0, nf * sizeof(float));
        memset(dhu + rf, 0, nf * sizeof(float));
        swiglu_backward(dhg + rf, dhu + rf, dact + rf, c->hg + rf, c->hu + rf, n, F);
        memset(dxe + rd, 0, (size_t)n * d * sizeof(float));
        matmul_backward(dxe + rd, dgate + (size_t)e * F * d, NULL, dhg + rf, c->xe + rd,
                        gate + (size_t)e * F * d, n, d, F);
        matmul_backward(dxe + rd, dup + (size_t)e * F * d, NULL, dhu + rf, c->xe + rd,
                        up + (size_t)e * F * d, n, d, F);
    }
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *g = dx + (size_t)t * d;
        for (int j = 0; j < k; j++) {
            const float *s = dxe + (size_t)r->slot_row[(size_t)t * k + j] * d;
            for (int i = 0; i < d; i++) g[i] += s[i];
        }
    }

    /* router: weights -> selected probabilities -> all probabilities -> logits */
    moe_zero(dprobs, ne);
    moe_zero(dlogits, ne);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *w = r->w + (size_t)t * k, *v = r->topv + (size_t)t * k, *g = dw + (size_t)t * k;
        const int32_t *ids = r->ids + (size_t)t * k;
        float *dp = dprobs + (size_t)t * E;
        if (o->renorm) {   /* w_j = v_j / S: dv_i = (g_i - sum_j g_j w_j) / S */
            double S = 0, gw = 0;
            for (int j = 0; j < k; j++) { S += v[j]; gw += (double)g[j] * w[j]; }
            for (int j = 0; j < k; j++) dp[ids[j]] += (float)((g[j] - gw) / S);
        } else {
            for (int j = 0; j < k; j++) dp[ids[j]] += g[j];
        }
        /* Switch loss: aux = E * sum_e f_e * mean_t p[t,e], f constant */
        if (aux_scale != 0.0f)
            for (int e = 0; e < E; e++)
                dp[e] += aux_scale * (float)E * ((float)r->counts[e] / (float)(N * (size_t)k)) / (float)N;
    }
    softmax_backward(dlogits, dprobs, r->probs, N, E);
    if (z_scale != 0.0f) {
        #pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            float coef = z_scale * 2.0f * r->lse[t] / (float)N;
            for (int e = 0; e < E; e++) dlogits[(size_t)t * E + e] += coef * r->probs[(size_t)t * E + e];
        }
    }
    matmul_backward(dx, drouter, NULL, dlogits, x, router, N, d, E);
}

void moe_load_fractions(const moe_routing *r, int N, int E, int k, float *frac) {
    for (int e = 0; e < E; e++) frac[e] = (float)r->counts[e] / (float)((size_t)N * k);
}
