/* dist/expert_parallel: rows to the experts' owners and back (the header
 * has the protocol). The owner keeps a second moe_cache, "remote", holding
 * the rows of every peer for its own experts, grouped by expert and, within
 * an expert, by source rank: it runs moe_experts_forward / _backward there
 * unchanged. Rows arrive grouped by source first, so a permutation (perm)
 * maps each arrived row to its place in the remote cache and back. */
#include <string.h>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"

typedef struct {
    moe_exchange ex;        /* first: the layer's cache points here */
    expert_parallel *owner;
    moe_cache remote;       /* everyone's rows for our experts       */
    int remote_N, remote_rows;
    int32_t *cnt_in;        /* [ep][E/ep] rows each peer sends to each of our experts */
    int *send_rows, *send_off, *recv_rows, *recv_off; /* [ep] each */
    float *stage;           /* [rows in][d] as they arrive            */
    int32_t *perm;          /* [rows in] remote-cache row of each     */
    int stage_cap;
    int rows_in;
    int32_t *src_counts, *src_offsets; /* [E], [E+1]: one source's rows in the remote cache */
} ep_layer;

struct expert_parallel {
    int n_moe, E;
    float *g_shard;   /* [3][E][F][d] one source's expert gradients (gate, up, down) */
    size_t g_floats;  /* E*F*d                                                    */
    ep_layer *layers;
    moe_status st;
    char msg[256];
    int64_t rows_out;
};

static void fail(expert_parallel *x, moe_status st) {
    if (x->st) return;
    x->st = st;
    snprintf(x->msg, sizeof x->msg, "%s", moe_last_error());
}

/* Sizes the remote cache for ep peers' worth of c's tokens and rows. */
static moe_status ensure_remote(ep_layer *L, const moe_cache *c, int ep) {
    const int N = c->N * ep, rows = c->max_rows * ep;
    if (L->remote.block && L->remote_N >= N && L->remote_rows >= rows && L->remote.d == c->d &&
        L->remote.F == c->F && L->remote.S == c->S)
        return MOE_OK;
    moe_cache_free(&L->remote);
    const int mode = c->S == c->E && c->S != c->k ? MOE_ROUTING_EXPERT : MOE_ROUTING_TOKEN;
    moe_status st = moe_cache_init(&L->remote, N, c->d, c->E, c->k, c->F, 0, mode, rows);
    if (st) return st;
    L->remote_N = N;
    L->remote_rows = rows;
    return MOE_OK;
}

static moe_status ensure_stage(ep_layer *L, int rows, int d) {
    if (rows <= L->stage_cap) return MOE_OK;
    moe_free(L->stage);
    moe_free(L->perm);
    L->stage = moe_malloc(sizeof(float) * (size_t)rows * d + 1);
    L->perm = moe_malloc(sizeof(int32_t) * (size_t)rows + 1);
    L->stage_cap = L->stage && L->perm ? rows : 0;
    return L->stage_cap ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory for %d expert rows", rows);
}

static void copy_rows(float *dst, const int32_t *dst_row, const float *src, const int32_t *src_row, int n, int d) {
    #pragma omp parallel for schedule(static) if (n >= 64)
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)(dst_row ? dst_row[i] : i) * d, src + (size_t)(src_row ? src_row[i] : i) * d,
               sizeof(float) * d);
}

/* The exchange plan of the routing in c: counts out and in, the remote
 * cache's routing (only our experts have rows), the permutation. */
static moe_status plan(ep_layer *L, moe_cache *c) {
    const moe_dist *w = dist_world();
    const int P = w->ep, me = w->ep_rank, E = c->E, Ep = E / P, e0 = me * Ep;
    const moe_routing *r = &c->r;
    moe_status st = dist_alltoall_i32(L->cnt_in, r->counts, Ep);
    if (st) return st;
    int in = 0;
    for (int j = 0; j < P; j++) {
        L->send_off[j] = r->offsets[j * Ep];
        L->send_rows[j] = r->offsets[(j + 1) * Ep] - r->offsets[j * Ep];
        int n = 0;
        for (int el = 0; el < Ep; el++) n += L->cnt_in[j * Ep + el];
        L->recv_off[j] = in;
        L->recv_rows[j] = n;
        in += n;
        if (j != me) L->owner->rows_out += L->send_rows[j];
    }
    if ((st = ensure_remote(L, c, P)) || (st = ensure_stage(L, in, c->d))) return st;
    if (in > L->remote.max_rows)
        return moe_error(MOE_ERR_INVALID_ARG, "rank %d: %d expert rows arrived, more than the %d planned", w->rank, in, L->remote.max_rows);
    moe_routing *q = &L->remote.r;
    int off = 0;
    for (int e = 0; e < E; e++) {
        int n = 0;
        if (e >= e0 && e < e0 + Ep)
            for (int s = 0; s < P; s++) n += L->cnt_in[s * Ep + (e - e0)];
        q->counts[e] = n;
        q->offsets[e] = off;
        off += n;
    }
    q->offsets[E] = off;
    q->rows = in;
    /* arrived order: source s, expert el, row; remote order: expert, source, row */
    int i = 0;
    for (int s = 0; s < P; s++)
        for (int el = 0; el < Ep; el++) {
            int at = q->offsets[e0 + el];
            for (int s2 = 0; s2 < s; s2++) at += L->cnt_in[s2 * Ep + el];
            for (int j = 0; j < L->cnt_in[s * Ep + el]; j++) L->perm[i++] = at + j;
        }
    L->rows_in = in;
    return MOE_OK;
}

/* rows of out_src (grouped by owner) to the owners, into remote rows dst */
static moe_status rows_out(ep_layer *L, float *dst, const float *src, int d) {
    moe_status st = dist_alltoallv_rows(L->stage, L->recv_rows, L->recv_off, src, L->send_rows, L->send_off, d);
    if (!st) copy_rows(dst, L->perm, L->stage, NULL, L->rows_in, d);
    return st;
}

/* remote rows src back to their sources, into dst (grouped by owner) */
static moe_status rows_back(ep_layer *L, float *dst, const float *src, int d) {
    copy_rows(L->stage, NULL, src, L->perm, L->rows_in, d);
    return dist_alltoallv_rows(dst, L->send_rows, L->send_off, L->stage, L->recv_rows, L->recv_off, d);
}

static void ep_forward(moe_exchange *xb, moe_cache *c, const moe_weights *wt, matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    moe_status st = L->owner->st;
    if (!st) st = plan(L, c);
    if (!st) st = rows_out(L, L->remote.xe, c->xe, c->d);
    if (!st) {
        moe_experts_forward(&L->remote, wt, mm);
        st = rows_back(L, c->ye, L->remote.ye, c->d);
    }
    if (st) {
        fail(L->owner, st);
        moe_zero(c->ye, (size_t)c->r.rows * c->d);
    }
}

/* EP_SAME_TOKENS: our experts over their rows (a view of the cache whose
 * routing shows only ours), then everyone's outputs to everyone. */
static void ep_forward_same(moe_exchange *xb, moe_cache *c, const moe_weights *wt, matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    const moe_dist *w = dist_world();
    const int P = w->ep, E = c->E, Ep = E / P, e0 = w->ep_rank * Ep;
    moe_status st = L->owner->st;
    if (!st) {
        moe_cache v = *c;
        v.r.counts = L->src_counts;
        for (int e = 0; e < E; e++) L->src_counts[e] = e >= e0 && e < e0 + Ep ? c->r.counts[e] : 0;
        moe_experts_forward(&v, wt, mm);
        for (int j = 0; j < P; j++) {
            L->recv_off[j] = c->r.offsets[j * Ep];
            L->recv_rows[j] = c->r.offsets[(j + 1) * Ep] - c->r.offsets[j * Ep];
        }
        L->owner->rows_out += L->recv_rows[w->ep_rank];
        st = dist_allgather_rows(c->ye, L->recv_rows, L->recv_off, c->d);
    }
    if (st) {
        fail(L->owner, st);
        moe_zero(c->ye, (size_t)c->r.rows * c->d);
    }
}

static void ep_backward_none(moe_exchange *xb, moe_cache *c, const moe_weights *wt, const moe_grads *g,
                             matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    fail(L->owner, moe_error(MOE_ERR_UNSUPPORTED, "expert parallelism over the same tokens is for inference only"));
    moe_zero(c->dxe, (size_t)c->r.rows * c->d);
}

/* The experts' backward one source rank at a time, each source's weight
 * gradient from zero and then added in source order: the sum one process
 * makes when those sources are its micro-batches (dist.h: determinism). */
static moe_status experts_backward_by_source(ep_layer *L, const moe_weights *wt, const moe_grads *g,
                                             matmul_precision mm) {
    expert_parallel *x = L->owner;
    const moe_dist *w = dist_world();
    const int P = w->ep, E = L->remote.E, Ep = E / P, e0 = w->ep_rank * Ep;
    const size_t per = (size_t)L->remote.F * L->remote.d, n = (size_t)E * per;
    if (x->g_floats < n) {
        moe_free(x->g_shard);
        x->g_shard = moe_calloc(3 * n, sizeof(float));
        x->g_floats = x->g_shard ? n : 0;
        if (!x->g_shard) return moe_error(MOE_ERR_NOMEM, "out of memory for the experts' gradients");
    }
    float *gg = x->g_shard, *gu = gg + n, *gd = gu + n;
    const moe_grads shard = {.gate = gg, .up = gu, .down = gd};
    moe_cache v = L->remote; /* the same rows and buffers, one source's routing */
    v.r.counts = L->src_counts;
    v.r.offsets = L->src_offsets;
    const moe_routing *q = &L->remote.r;
    for (int s = 0; s < P; s++) {
        for (int e = 0; e < E; e++) {
            const int el = e - e0, mine = el >= 0 && el < Ep;
            int at = q->offsets[e];
            for (int s2 = 0; mine && s2 < s; s2++) at += L->cnt_in[s2 * Ep + el];
            L->src_counts[e] = mine ? L->cnt_in[s * Ep + el] : 0;
            L->src_offsets[e] = at;
        }
        L->src_offsets[E] = q->offsets[E];
        moe_experts_backward(&v, wt, &shard, mm);
        const size_t lo = (size_t)e0 * per, hi = (size_t)(e0 + Ep) * per;
        #pragma omp parallel for schedule(static)
        for (size_t i = lo; i < hi; i++) {
            g->gate[i] += gg[i]; g->up[i] += gu[i]; g->down[i] += gd[i];
            gg[i] = gu[i] = gd[i] = 0.0f;
        }
    }
    return MOE_OK;
}

static void ep_backward(moe_exchange *xb, moe_cache *c, const moe_weights *wt, const moe_grads *g,
                        matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    moe_status st = L->owner->st;
    if (!st) st = rows_out(L, L->remote.dye, c->dye, c->d);
    if (!st) st = experts_backward_by_source(L, wt, g, mm);
    if (!st) st = rows_back(L, c->dxe, L->remote.dxe, c->d);
    if (st) {
        fail(L->owner, st);
        moe_zero(c->dxe, (size_t)c->r.rows * c->d);
    }
}

moe_status expert_parallel_create(expert_parallel **out, int n_moe, int E, expert_parallel_mode mode) {
    *out = NULL;
    const int P = dist_world()->ep;
    if (P < 1 || E % P) return moe_error(MOE_ERR_INVALID_ARG, "%d experts do not split over %d ranks", E, P);
    expert_parallel *x = moe_calloc(1, sizeof *x);
    if (!x) return moe_error(MOE_ERR_NOMEM, "out of memory for expert parallelism");
    x->n_moe = n_moe;
    x->E = E;
    x->layers = moe_calloc((size_t)MOE_MAX(n_moe, 1), sizeof(ep_layer));
    if (!x->layers) { moe_free(x); return moe_error(MOE_ERR_NOMEM, "out of memory for expert parallelism"); }
    for (int k = 0; k < n_moe; k++) {
        ep_layer *L = &x->layers[k];
        L->ex.experts_forward = mode == EP_SAME_TOKENS ? ep_forward_same : ep_forward;
        L->ex.experts_backward = mode == EP_SAME_TOKENS ? ep_backward_none : ep_backward;
        L->owner = x;
        L->cnt_in = moe_calloc((size_t)E, sizeof(int32_t));
        L->src_counts = moe_calloc((size_t)2 * E + 1, sizeof(int32_t));
        L->send_rows = moe_calloc((size_t)P * 4, sizeof(int));
        if (!L->cnt_in || !L->send_rows || !L->src_counts) { expert_parallel_free(x); return moe_error(MOE_ERR_NOMEM, "out of memory for expert parallelism"); }
        L->src_offsets = L->src_counts + E;
        L->send_off = L->send_rows + P;
        L->recv_rows = L->send_rows + 2 * P;
        L->recv_off = L->send_rows + 3 * P;
    }
    *out = x;
    return MOE_OK;
}

void expert_parallel_free(expert_parallel *x) {
    if (!x) return;
    for (int k = 0; k < x->n_moe; k++) {
        ep_layer *L = &x->layers[k];
        moe_cache_free(&L->remote);
        moe_free(L->cnt_in);
        moe_free(L->src_counts);
        moe_free(L->send_rows);
        moe_free(L->stage);
        moe_free(L->perm);
    }
    moe_free(x->layers);
    moe_free(x->g_shard);
    moe_free(x);
}

moe_exchange *expert_parallel_layer(expert_parallel *x, int k) { return &x->layers[k].ex; }

moe_status expert_parallel_status(const expert_parallel *x) {
    if (x->st) return moe_error(x->st, "%s", x->msg);
    return MOE_OK;
}

int64_t expert_parallel_rows_out(const expert_parallel *x) { return x->rows_out; }
void expert_parallel_reset(expert_parallel *x) { x->rows_out = 0; }
