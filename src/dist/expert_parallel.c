/* dist/expert_parallel: rows to the experts' owners and back (the header
 * has the protocol). The owner keeps a second moe_cache, "remote", holding
 * the rows of every peer for its own experts, grouped by expert and, within
 * an expert, by source rank: it runs moe_experts_forward / _backward there
 * unchanged. Rows arrive grouped by source first, so a permutation (perm)
 * maps each arrived row to its place in the remote cache and back.
 *
 * Overlap: this rank's own rows for its own experts never travel. The
 * peers' rows are posted (non-blocking), our experts run over our own rows
 * one expert at a time while they travel (polling the transfer between
 * experts, which is what moves it along), then over the arrived rows; their
 * outputs are posted back and the experts left over run meanwhile. The
 * backward computes our own rows' gradients while the peers' output
 * gradients arrive, and makes the last additions of the weight gradient
 * while the input gradients travel back. An expert's output row depends on
 * its input row only, and each source's weight gradient is still summed
 * from zero and added in source order: the bits do not change. */
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
    float *g_own;     /* [3][E][F][d] this rank's own rows' (computed first)        */
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

/* The arrived rows of the peers (not our own block, which never travels)
 * from the stage to their places in dst, a remote-cache buffer. */
static void stage_to_remote(ep_layer *L, float *dst, int d) {
    const int a = L->recv_off[dist_world()->ep_rank], b = a + L->recv_rows[dist_world()->ep_rank];
    copy_rows(dst, L->perm, L->stage, NULL, a, d);
    copy_rows(dst, L->perm + b, L->stage + (size_t)b * d, NULL, L->rows_in - b, d);
}

/* The peers' rows of src, a remote-cache buffer, into the stage to go back. */
static void remote_to_stage(ep_layer *L, const float *src, int d) {
    const int a = L->recv_off[dist_world()->ep_rank], b = a + L->recv_rows[dist_world()->ep_rank];
    copy_rows(L->stage, NULL, src, L->perm, a, d);
    copy_rows(L->stage + (size_t)b * d, NULL, src, L->perm + b, L->rows_in - b, d);
}

/* Our own block between the layer's cache (rows grouped by owner) and the
 * remote cache: to_remote 1 copies local rows in, 0 copies remote rows out. */
static void own_rows(ep_layer *L, float *local, float *remote, int to_remote, int d) {
    const int me = dist_world()->ep_rank;
    float *l = local + (size_t)L->send_off[me] * d;
    const int32_t *at = L->perm + L->recv_off[me];
    if (to_remote) copy_rows(remote, at, l, NULL, L->recv_rows[me], d);
    else copy_rows(l, NULL, remote, at, L->recv_rows[me], d);
}

/* v = the remote cache showing only the rows of sources [s0, s1), and of
 * expert e alone when e >= 0 (within an expert the rows are by source, so
 * a range of sources is one run of rows). */
static void source_view(ep_layer *L, moe_cache *v, int s0, int s1, int e) {
    const moe_dist *w = dist_world();
    const int P = w->ep, E = L->remote.E, Ep = E / P, e0 = w->ep_rank * Ep;
    const moe_routing *q = &L->remote.r;
    *v = L->remote;
    v->r.counts = L->src_counts;
    v->r.offsets = L->src_offsets;
    for (int x = 0; x < E; x++) {
        const int el = x - e0, mine = el >= 0 && el < Ep && (e < 0 || x == e);
        int at = q->offsets[x], n = 0;
        for (int s = 0; mine && s < s1; s++) {
            if (s < s0) at += L->cnt_in[s * Ep + el];
            else n += L->cnt_in[s * Ep + el];
        }
        L->src_counts[x] = n;
        L->src_offsets[x] = at;
    }
    L->src_offsets[E] = q->offsets[E];
}

static void forward_sources(ep_layer *L, int s0, int s1, int e, const moe_weights *wt, matmul_precision mm) {
    if (s0 >= s1) return;
    moe_cache v;
    source_view(L, &v, s0, s1, e);
    moe_experts_forward(&v, wt, mm);
}

static void ep_forward(moe_exchange *xb, moe_cache *c, const moe_weights *wt, matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    const moe_dist *w = dist_world();
    const int P = w->ep, me = w->ep_rank, Ep = c->E / P, e0 = me * Ep, d = c->d;
    dist_op *op = NULL;
    int el = 0;
    moe_status st = L->owner->st;
    if (!st) st = plan(L, c);
    if (!st) {
        own_rows(L, c->xe, L->remote.xe, 1, d);
        st = dist_alltoallv_rows_start(&op, L->stage, L->recv_rows, L->recv_off, c->xe, L->send_rows, L->send_off, d);
    }
    if (!st) {
        /* while the peers' rows travel: our experts over our own rows */
        for (; el < Ep && !dist_test(op); el++) forward_sources(L, me, me + 1, e0 + el, wt, mm);
        st = dist_wait(op);
    }
    if (!st) {
        stage_to_remote(L, L->remote.xe, d);
        forward_sources(L, 0, me, -1, wt, mm);
        forward_sources(L, me + 1, P, -1, wt, mm);
        remote_to_stage(L, L->remote.ye, d);
        st = dist_alltoallv_rows_start(&op, c->ye, L->send_rows, L->send_off, L->stage, L->recv_rows, L->recv_off, d);
    }
    if (!st) {
        /* while their outputs travel back: the experts left over */
        for (; el < Ep; el++) {
            forward_sources(L, me, me + 1, e0 + el, wt, mm);
            dist_test(op);
        }
        own_rows(L, c->ye, L->remote.ye, 0, d);
        st = dist_wait(op);
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

/* g += one source's expert gradients, for our experts; the piece is zeroed */
static void add_shard(const moe_grads *g, float *shard, size_t n, size_t lo, size_t hi) {
    float *gg = shard, *gu = gg + n, *gd = gu + n;
    #pragma omp parallel for schedule(static)
    for (size_t i = lo; i < hi; i++) {
        g->gate[i] += gg[i]; g->up[i] += gu[i]; g->down[i] += gd[i];
        gg[i] = gu[i] = gd[i] = 0.0f;
    }
}

static moe_grads shard_grads(float *shard, size_t n) {
    return (moe_grads){.gate = shard, .up = shard + n, .down = shard + 2 * n};
}

/* The experts' backward one source rank at a time, each source's weight
 * gradient from zero and then added in source order: the sum one process
 * makes when those sources are its micro-batches (dist.h: determinism).
 * Source 0 goes straight into g, whose slice for these experts is zero here
 * (a distributed step computes each micro-batch's gradient from zero), so
 * 0 + x is x and one pass over the experts' gradients is saved.
 * Our own source's rows first, while op (the peers' output gradients)
 * travels; then the peers'; the input gradients go back while the last
 * additions are made. */
static moe_status experts_backward_by_source(ep_layer *L, moe_cache *c, dist_op *op, const moe_weights *wt,
                                             const moe_grads *g, matmul_precision mm) {
    expert_parallel *x = L->owner;
    const moe_dist *w = dist_world();
    const int P = w->ep, me = w->ep_rank, E = L->remote.E, Ep = E / P, e0 = me * Ep, d = c->d;
    const size_t per = (size_t)L->remote.F * L->remote.d, n = (size_t)E * per;
    const size_t lo = (size_t)e0 * per, hi = (size_t)(e0 + Ep) * per;
    if (x->g_floats < n) {
        moe_free(x->g_shard);
        moe_free(x->g_own);
        x->g_shard = moe_calloc(3 * n, sizeof(float));
        x->g_own = moe_calloc(3 * n, sizeof(float));
        x->g_floats = x->g_shard && x->g_own ? n : 0;
        if (!x->g_floats) {
            dist_wait(op);
            return moe_error(MOE_ERR_NOMEM, "out of memory for the experts' gradients");
        }
    }
    const moe_grads own = shard_grads(x->g_own, n), shard = shard_grads(x->g_shard, n);
    const moe_grads *own_to = me == 0 ? g : &own;
    moe_cache v;
    for (int el = 0; el < Ep; el++) {
        source_view(L, &v, me, me + 1, e0 + el);
        moe_experts_backward(&v, wt, own_to, mm);
        dist_test(op);
    }
    moe_status st = dist_wait(op);
    if (st) return st;
    stage_to_remote(L, L->remote.dye, d);
    const int last = me == P - 1 ? P - 2 : P - 1; /* the last peer: its addition waits */
    for (int s = 0; s < P; s++) {
        if (s == me) {
            if (me > 0 && me < last) add_shard(g, x->g_own, n, lo, hi);
            continue;
        }
        source_view(L, &v, s, s + 1, -1);
        moe_experts_backward(&v, wt, s == 0 ? g : &shard, mm);
        if (s != 0 && s != last) add_shard(g, x->g_shard, n, lo, hi);
    }
    remote_to_stage(L, L->remote.dxe, d);
    st = dist_alltoallv_rows_start(&op, c->dxe, L->send_rows, L->send_off, L->stage, L->recv_rows, L->recv_off, d);
    own_rows(L, c->dxe, L->remote.dxe, 0, d);
    if (last != 0) add_shard(g, x->g_shard, n, lo, hi);
    dist_test(op);
    if (me > last) add_shard(g, x->g_own, n, lo, hi);
    return st ? st : dist_wait(op);
}

static void ep_backward(moe_exchange *xb, moe_cache *c, const moe_weights *wt, const moe_grads *g,
                        matmul_precision mm) {
    ep_layer *L = (ep_layer *)xb;
    dist_op *op = NULL;
    moe_status st = L->owner->st;
    if (!st) {
        own_rows(L, c->dye, L->remote.dye, 1, c->d);
        st = dist_alltoallv_rows_start(&op, L->stage, L->recv_rows, L->recv_off, c->dye, L->send_rows, L->send_off, c->d);
    }
    if (!st) st = experts_backward_by_source(L, c, op, wt, g, mm);
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
    moe_free(x->g_own);
    moe_free(x);
}

moe_exchange *expert_parallel_layer(expert_parallel *x, int k) { return &x->layers[k].ex; }

moe_status expert_parallel_status(const expert_parallel *x) {
    if (x->st) return moe_error(x->st, "%s", x->msg);
    return MOE_OK;
}

int64_t expert_parallel_rows_out(const expert_parallel *x) { return x->rows_out; }
void expert_parallel_reset(expert_parallel *x) { x->rows_out = 0; }
