/* moe/moe_layer: router scores and selection variants, capacity, dispatch,
 * experts, shared experts, combine; the backward pass of all of it, with the
 * Switch balance loss, the z-loss and the sequence-wise balance loss; and the
 * auxiliary-loss-free bias update. docs/routing.md has the formulas.
 * Deterministic: every sum runs in a fixed order whatever the thread count. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "core/dtype.h"
#include "kernels/kernels.h"
#include "kernels/qmatmul.h"
#include "moe/expert_store.h"
#include "moe/moe_layer.h"

/* ---- memory: one block, carved in 64-byte aligned pieces. A first pass
 * with base == NULL only counts. ---- */
typedef struct { char *base; size_t off; } carver;
static void *take(carver *cv, size_t n_floats) {
    void *p = cv->base ? cv->base + cv->off * sizeof(float) : NULL;
    cv->off += (n_floats + 15) & ~(size_t)15;
    return p;
}

int moe_capacity(float cf, int k, int N, int E) {
    double c = ceil((double)cf * k * N / E);
    if (c < 1) c = 1;
    if (c > N) c = N;
    return (int)c;
}

int64_t moe_rows_needed(int N, int E, int k, int mode, float max_capacity) {
    if (mode != MOE_ROUTING_EXPERT) return (int64_t)N * k;
    return (int64_t)E * moe_capacity(max_capacity > 0 ? max_capacity : 1.0f, k, N, E);
}

static void layout(moe_cache *c, carver *cv) {
    const size_t N = c->N, d = c->d, E = c->E, F = c->F, Fs = c->Fs, S = c->S, R = c->max_rows;
    const size_t ne = N * E, ns = N * S;
    moe_routing *r = &c->r;
    r->xj = take(cv, N * d);
    r->noise = take(cv, N * d);
    r->logits = take(cv, ne);
    r->probs = take(cv, ne);
    r->ssum = take(cv, N);
    r->lse = take(cv, N);
    r->sel = take(cv, ne);
    r->ids = take(cv, ns);
    r->topv = take(cv, ns);
    r->w = take(cv, ns);
    r->sel_counts = take(cv, E);
    r->counts = take(cv, E);
    r->offsets = take(cv, E + 1);
    r->row_slot = take(cv, R);
    r->slot_row = take(cv, ns);
    r->order = take(cv, E);
    r->iscratch = take(cv, 2 * ns + 2 * N);
    r->seqf = take(cv, ne);
    r->psum = take(cv, 2 * (ne + E)); /* doubles: B <= N sequences, plus the total */
    r->hrow = take(cv, 2 * N);
    c->xe = take(cv, R * d);
    c->hg = take(cv, R * F);
    c->hu = take(cv, R * F);
    c->act = take(cv, R * F);
    c->ye = take(cv, R * d);
    c->sh_hg = take(cv, N * Fs);
    c->sh_hu = take(cv, N * Fs);
    c->sh_act = take(cv, N * Fs);
    c->sh_y = take(cv, Fs ? N * d : 0);
    c->sh_g = take(cv, N);
    c->dye = take(cv, R * d);
    c->dact = take(cv, R * F);
    c->dhg = take(cv, R * F);
    c->dhu = take(cv, R * F);
    c->dxe = take(cv, R * d);
    c->dlogits = take(cv, ne);
    c->dprobs = take(cv, ne);
    c->dw = take(cv, ns);
    c->dxj = take(cv, N * d);
    c->sh_dy = take(cv, Fs ? N * d : 0);
    c->sh_dact = take(cv, N * Fs);
    c->sh_dhg = take(cv, N * Fs);
    c->sh_dhu = take(cv, N * Fs);
    c->sh_dg = take(cv, N);
}

moe_status moe_cache_init(moe_cache *c, int N, int d, int E, int k, int F, int Fs, int mode,
                          int64_t max_rows) {
    memset(c, 0, sizeof *c);
    if (max_rows < (int64_t)N * k && mode != MOE_ROUTING_EXPERT) max_rows = (int64_t)N * k;
    if (max_rows > INT32_MAX) return moe_error(MOE_ERR_INVALID_ARG, "MoE layer: %lld dispatched rows is too many", (long long)max_rows);
    c->N = N; c->d = d; c->E = E; c->k = k; c->F = F; c->Fs = Fs;
    c->S = mode == MOE_ROUTING_EXPERT ? E : k;
    c->max_rows = (int)max_rows;
    carver cv = {NULL, 0};
    layout(c, &cv);
    float *b = moe_malloc(cv.off * sizeof(float));
    if (!b) return moe_error_prefix(MOE_ERR_NOMEM, "MoE layer cache");
    c->block = b;
    cv.base = (char *)b;
    cv.off = 0;
    layout(c, &cv);
    c->r.N = N; c->r.E = E; c->r.k = k; c->r.S = c->S;
    return MOE_OK;
}

void moe_cache_free(moe_cache *c) {
    if (!c) return;
    moe_free(c->block);
    memset(c, 0, sizeof *c);
}

/* ---- selection helpers ---- */

/* Indices of the k largest values of p[E], largest first; ties go to the
 * lower index (k is small, so repeated scans beat sorting). */
static void select_topk(int32_t *ids, const float *p, int E, int k) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= (ids[i] == e);
            if (taken) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        ids[j] = best;
    }
}

/* Group-limited selection: experts in n_group consecutive groups, a group's
 * score is the sum of its two best selection scores (its best when groups
 * hold one expert); experts outside the best topk_group groups get -inf. */
enum { MAX_GROUPS = 1024 };
static void group_limit(float *sel, int E, int n_group, int topk_group) {
    if (n_group <= 1 || topk_group >= n_group) return;
    const int gs = E / n_group;
    float score[MAX_GROUPS];
    unsigned char keep[MAX_GROUPS];
    for (int g = 0; g < n_group; g++) {
        float m1 = -INFINITY, m2 = -INFINITY;
        for (int e = g * gs; e < (g + 1) * gs; e++) {
            float v = sel[e];
            if (v > m1) { m2 = m1; m1 = v; }
            else if (v > m2) m2 = v;
        }
        score[g] = gs >= 2 ? m1 + m2 : m1;
        keep[g] = 0;
    }
    for (int j = 0; j < topk_group; j++) {
        int best = -1;
        for (int g = 0; g < n_group; g++)
            if (!keep[g] && (best < 0 || score[g] > score[best])) best = g;
        keep[best] = 1;
    }
    for (int g = 0; g < n_group; g++)
        if (!keep[g])
            for (int e = g * gs; e < (g + 1) * gs; e++) sel[e] = -INFINITY;
}

/* Stable merge sort of idx[n] by key[idx] descending: equal keys keep their
 * order, so ties go to the earlier index. tmp holds n. */
static void sort_desc(int32_t *idx, int n, const float *key, int stride, int32_t *tmp) {
    for (int width = 1; width < n; width *= 2) {
        for (int lo = 0; lo < n; lo += 2 * width) {
            int mid = MOE_MIN(lo + width, n), hi = MOE_MIN(lo + 2 * width, n);
            int a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                tmp[o++] = key[(size_t)idx[b] * stride] > key[(size_t)idx[a] * stride] ? idx[b++] : idx[a++];
            while (a < mid) tmp[o++] = idx[a++];
            while (b < hi) tmp[o++] = idx[b++];
        }
        memcpy(idx, tmp, sizeof(int32_t) * n);
    }
}

/* The threshold rule on one token's k chosen slots: keeps the
 * max(min_keep, #{v >= f * best}) largest weights v (ties: the earlier
 * slot), which is every one passing the threshold plus the best of the rest
 * up to min_keep; the others become empty (-1, weight 0). */
static void threshold_keep(int32_t *ids, float *v, int k, float f, int min_keep) {
    float best = 0.0f;
    for (int j = 0; j < k; j++) best = ids[j] >= 0 && v[j] > best ? v[j] : best;
    const float cut = f * best;
    int keep = 0;
    for (int j = 0; j < k; j++) keep += ids[j] >= 0 && v[j] >= cut;
    keep = MOE_MAX(keep, min_keep);
    for (int j = 0; j < k; j++) {
        if (ids[j] < 0) continue;
        int rank = 0; /* chosen slots ahead of j by weight */
        for (int i = 0; i < k; i++) rank += ids[i] >= 0 && (v[i] > v[j] || (v[i] == v[j] && i < j));
        if (rank >= keep) { ids[j] = -1; v[j] = 0.0f; }
    }
}

static int seq_len_of(const moe_route_opts *o, int N) {
    int T = o->seq_len > 0 ? o->seq_len : N;
    return (T <= N && N % T == 0) ? T : N;
}

/* ---- routing ---- */
void moe_route(moe_routing *r, const float *x, const moe_weights *wt, int N, int d,
               const moe_route_opts *o) {
    const int E = r->E, k = r->k, S = r->S;
    const int sigmoid = o->score == MOE_ROUTER_SIGMOID;
    const float scale = o->scale > 0 ? o->scale : 1.0f;
    const float *bias = wt->bias;
    const int mode = o->mode;
    r->N = N;

    /* router input: x, or x times multiplicative jitter drawn in a fixed order */
    const float *xr = x;
    if (o->jitter > 0) {
        moe_rng rng;
        moe_rng_seed(&rng, o->jitter_seed);
        const float lo = 1.0f - o->jitter, span = 2.0f * o->jitter;
        for (size_t i = 0; i < (size_t)N * d; i++) {
            r->noise[i] = lo + span * moe_rng_uniform(&rng);
            r->xj[i] = x[i] * r->noise[i];
        }
        xr = r->xj;
    }
    /* a published model's router may be quantised: then as llama.cpp computes it */
    if (wt->router_t != DT_F32) qmatmul_forward(r->logits, xr, wt->router, wt->router_t, N, d, E, r->qws);
    else if (wt->ggml_order) matmul_ggml_f32(r->logits, xr, wt->router, N, d, E);
    else matmul_forward(r->logits, xr, wt->router, NULL, N, d, E, MATMUL_FP32);

    /* scores, logsumexp, selection scores (a separate copy only when a bias or
     * group limit changes them: at 2,048 experts a copy is 16 MB per layer) */
    const int need_sel = mode == MOE_ROUTING_TOKEN && (bias || o->n_group > 1);
    #pragma omp parallel for schedule(static) if (N * E > 4096)
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        float *p = r->probs + (size_t)t * E, *sel = r->sel + (size_t)t * E;
        float mx = l[0];
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        double sum;
        if (!sigmoid && wt->ggml_order) {
            softmax_row_ggml(p, l, E, 0);
            sum = exp_shift_sum(sel, l, mx, E); /* for lse only; sel: scratch until set below */
            r->ssum[t] = 1.0f;
        } else if (!sigmoid) {
            sum = exp_shift_sum(p, l, mx, E);
            float inv = (float)(1.0 / sum);
            for (int e = 0; e < E; e++) p[e] *= inv;
            r->ssum[t] = 1.0f;
        } else {
            sum = exp_shift_sum(sel, l, mx, E); /* sel: scratch until set below */
            sigmoid_row(p, l, E);
            double ss = 0;
            for (int e = 0; e < E; e++) ss += p[e];
            r->ssum[t] = (float)ss;
        }
        r->lse[t] = mx + (float)log(sum);
        if (need_sel)
            for (int e = 0; e < E; e++) sel[e] = bias ? p[e] + bias[e] : p[e];
    }

    /* selection: ids[N][S] and their scores topv */
    if (mode == MOE_ROUTING_TOKEN) {
        #pragma omp parallel for schedule(static) if (N * E > 4096)
        for (int t = 0; t < N; t++) {
            float *sel = r->sel + (size_t)t * E;
            int32_t *ids = r->ids + (size_t)t * S;
            if (need_sel) group_limit(sel, E, o->n_group, o->topk_group);
            select_topk(ids, need_sel ? sel : r->probs + (size_t)t * E, E, k);
            for (int j = 0; j < k; j++) r->topv[(size_t)t * S + j] = r->probs[(size_t)t * E + ids[j]];
        }
    } else if (mode == MOE_ROUTING_SEQUENCE) {
        /* one expert set per sequence from its mean scores (+ bias); the mean is
         * kept in the sel row of the sequence's first token */
        const int T = seq_len_of(o, N), B = N / T;
        for (int b = 0; b < B; b++) {
            float *mean = r->sel + (size_t)b * T * E;
            for (int e = 0; e < E; e++) {
                double s = 0;
                for (int t = 0; t < T; t++) s += r->probs[((size_t)b * T + t) * E + e];
                double n = T;
                if (o->seq_prefix) { o->seq_prefix[e] += s; s = o->seq_prefix[e]; n = o->seq_prefix_n + T; }
                mean[e] = (float)(s / n) + (bias ? bias[e] : 0.0f);
            }
            group_limit(mean, E, o->n_group, o->topk_group);
            int32_t set[k];
            select_topk(set, mean, E, k);
            for (int t = 0; t < T; t++) {
                size_t tt = (size_t)b * T + t;
                for (int j = 0; j < k; j++) {
                    r->ids[tt * S + j] = set[j];
                    r->topv[tt * S + j] = r->probs[tt * E + set[j]];
                }
            }
        }
    } else { /* expert choice: expert e takes its c best tokens by score */
        const int c = moe_capacity(o->capacity > 0 ? o->capacity : 1.0f, k, N, E);
        r->capacity = c;
        for (size_t s = 0; s < (size_t)N * S; s++) r->ids[s] = -1;
        #pragma omp parallel for schedule(dynamic, 1)
        for (int e = 0; e < E; e++) {
            int32_t *idx = r->iscratch + (size_t)e * N, *tmp = r->iscratch + (size_t)N * S + (size_t)e * N;
            for (int t = 0; t < N; t++) idx[t] = t;
            sort_desc(idx, N, r->probs + e, E, tmp);
            for (int i = 0; i < c; i++) {
                size_t s = (size_t)idx[i] * S + e;
                r->ids[s] = e;
                r->topv[s] = r->probs[(size_t)idx[i] * E + e];
            }
        }
    }

    /* switched-off experts leave their slots empty (selection stays as it was) */
    if (o->disabled)
        for (size_t s = 0; s < (size_t)N * S; s++)
            if (r->ids[s] >= 0 && o->disabled[r->ids[s]]) r->ids[s] = -1;

    if (o->threshold > 0 && mode != MOE_ROUTING_EXPERT) {
        #pragma omp parallel for schedule(static) if (N * k > 4096)
        for (int t = 0; t < N; t++)
            threshold_keep(r->ids + (size_t)t * S, r->topv + (size_t)t * S, k, o->threshold, o->min_keep);
    }

    /* combine weights (over the kept slots: the threshold may empty some) */
    #pragma omp parallel for schedule(static) if (N * S > 4096)
    for (int t = 0; t < N; t++) {
        const int32_t *ids = r->ids + (size_t)t * S;
        const float *v = r->topv + (size_t)t * S;
        float *w = r->w + (size_t)t * S;
        if (mode == MOE_ROUTING_EXPERT) {
            for (int j = 0; j < S; j++) w[j] = ids[j] >= 0 ? scale * v[j] : 0.0f;
            continue;
        }
        double s = 0;
        for (int j = 0; j < k; j++) s += ids[j] >= 0 ? v[j] : 0.0f;
        /* published models: llama.cpp's division, by the float sum clamped below at 2^-14 */
        const float sf = MOE_MAX((float)s, 6.103515625e-5f);
        for (int j = 0; j < k; j++) {
            float u = ids[j] < 0 ? 0.0f
                    : !o->renorm ? v[j]
                    : wt->ggml_order ? v[j] / sf
                    : s > 0 ? (float)(v[j] / s) : 0.0f;
            w[j] = scale == 1.0f ? u : scale * u;
        }
    }

    /* chosen assignments per expert; capacity decides which are kept
     * (slot_row 0 = kept so far, -1 = empty or dropped) */
    memset(r->sel_counts, 0, sizeof(int32_t) * E);
    const size_t ns = (size_t)N * S;
    int64_t assigned = 0;
    for (size_t s = 0; s < ns; s++) {
        if (r->ids[s] >= 0) { r->sel_counts[r->ids[s]]++; assigned++; r->slot_row[s] = 0; }
        else r->slot_row[s] = -1;
    }
    r->assigned = assigned;
    r->dropped = 0;
    if (mode != MOE_ROUTING_EXPERT) r->capacity = 0;
    if (mode != MOE_ROUTING_EXPERT && o->capacity > 0) {
        const int cap = moe_capacity(o->capacity, k, N, E);
        r->capacity = cap;
        if (o->overflow == MOE_OVERFLOW_SCORE) {
            /* bucket the slots by expert (slot order), keep each expert's cap best scores */
            int32_t *start = r->counts; /* scratch [E] here, recomputed below */
            int32_t *bucket = r->iscratch, *tmp = r->iscratch + ns;
            int off = 0;
            for (int e = 0; e < E; e++) { start[e] = off; off += r->sel_counts[e]; }
            for (size_t s = 0; s < ns; s++)
                if (r->ids[s] >= 0) bucket[start[r->ids[s]]++] = (int32_t)s;
            off = 0;
            for (int e = 0; e < E; e++) { start[e] = off; off += r->sel_counts[e]; }
            #pragma omp parallel for schedule(dynamic, 1)
            for (int e = 0; e < E; e++) {
                const int n = r->sel_counts[e];
                if (n <= cap) continue;
                int32_t *b = bucket + start[e];
                sort_desc(b, n, r->topv, 1, tmp + start[e]);
                for (int i = cap; i < n; i++) r->slot_row[b[i]] = -1;
            }
        } else { /* by position: the earliest tokens keep their place */
            int32_t *used = r->counts;
            memset(used, 0, sizeof(int32_t) * E);
            for (size_t s = 0; s < ns; s++) {
                if (r->ids[s] < 0) continue;
                if (used[r->ids[s]] < cap) used[r->ids[s]]++;
                else r->slot_row[s] = -1;
            }
        }
        for (size_t s = 0; s < ns; s++) r->dropped += r->ids[s] >= 0 && r->slot_row[s] < 0;
    }

    /* dispatch: kept rows grouped by expert, in token order within each expert */
    memset(r->counts, 0, sizeof(int32_t) * E);
    for (size_t s = 0; s < ns; s++)
        if (r->slot_row[s] >= 0) r->counts[r->ids[s]]++;
    r->offsets[0] = 0;
    for (int e = 0; e < E; e++) r->offsets[e + 1] = r->offsets[e] + r->counts[e];
    r->rows = r->offsets[E];
    /* counts doubles as the running write position of each expert, then is restored */
    int32_t *next = r->counts;
    for (int e = 0; e < E; e++) next[e] = r->offsets[e];
    for (size_t s = 0; s < ns; s++) {
        if (r->slot_row[s] < 0) continue;
        int32_t row = next[r->ids[s]]++;
        r->row_slot[row] = (int32_t)s;
        r->slot_row[s] = row;
    }
    for (int e = 0; e < E; e++) r->counts[e] = r->offsets[e + 1] - r->offsets[e];

    /* balance terms, summed in fixed order; P uses scores normalised to sum 1 */
    double z = 0;
    for (int t = 0; t < N; t++) z += (double)r->lse[t] * r->lse[t];
    r->z = z / N;
    /* Sums of the normalised scores over each sequence's tokens (rows b < B)
     * and over all tokens (row B), every sum in increasing t. Parallel over
     * experts, reading the score rows left to right (a column walk over
     * [N][E] misses the cache at every step once E is large). */
    const int T = seq_len_of(o, N), B = N / T;
    double *ps = r->psum, *pall = r->psum + (size_t)B * E;
    #pragma omp parallel for schedule(static) if ((double)N * E >= 65536)
    for (int e0 = 0; e0 < E; e0 += 64) {
        const int e1 = MOE_MIN(E, e0 + 64);
        for (int e = e0; e < e1; e++) pall[e] = 0;
        for (int b = 0; b < B; b++) {
            double *pb = ps + (size_t)b * E;
            for (int e = e0; e < e1; e++) pb[e] = 0;
            for (int t = b * T; t < (b + 1) * T; t++) {
                const float *p = r->probs + (size_t)t * E;
                for (int e = e0; e < e1; e++) {
                    const double q = sigmoid ? p[e] / r->ssum[t] : p[e];
                    pb[e] += q;
                    pall[e] += q;
                }
            }
        }
    }
    double aux = 0;
    for (int e = 0; e < E; e++)
        aux += (assigned ? (double)r->sel_counts[e] / (double)assigned : 0.0) * (pall[e] / N);
    r->aux = aux * E;
    /* sequence-wise: per sequence f_i = E/(k T) * chosen_i, P_i = mean normalised score */
    {
        double total = 0;
        for (int b = 0; b < B; b++) {
            float *f = r->seqf + (size_t)b * E;
            for (int e = 0; e < E; e++) f[e] = 0;
            for (size_t s = (size_t)b * T * S; s < (size_t)(b + 1) * T * S; s++)
                if (r->ids[s] >= 0) f[r->ids[s]] += 1.0f;
            double Lb = 0;
            for (int e = 0; e < E; e++) {
                f[e] = (float)((double)E * f[e] / ((double)k * T));
                Lb += (double)f[e] * (ps[(size_t)b * E + e] / T);
            }
            total += Lb;
        }
        r->seq_aux = total / B;
    }
    /* routing entropy of the normalised scores, as a fraction of log E:
     * per token in parallel, then summed in token order */
    double ent = 0;
    if (E > 1) {
        #pragma omp parallel for schedule(static) if ((double)N * E >= 65536)
        for (int t = 0; t < N; t++) {
            const float *p = r->probs + (size_t)t * E;
            double h = 0;
            if (!sigmoid) { /* -log q = lse - logit: no log per expert (E can be 2048) */
                const float *l = r->logits + (size_t)t * E;
                const double lse = r->lse[t];
                for (int e = 0; e < E; e++) h += (double)p[e] * (lse - l[e]);
            } else {
                for (int e = 0; e < E; e++) {
                    double q = p[e] / r->ssum[t];
                    if (q > 0) h -= q * log(q);
                }
            }
            r->hrow[t] = h;
        }
        for (int t = 0; t < N; t++) ent += r->hrow[t];
        ent /= (double)N * log((double)E);
    }
    r->entropy = ent;
}

/* Experts run side by side, one thread each, the busiest first so the
 * threads finish together; each expert's matmuls are whole and unchanged, so
 * results do not depend on which thread ran them. */
static int expert_order(const moe_routing *r, int E, int32_t *order) {
    int n = 0;
    for (int e = 0; e < E; e++)
        if (r->counts[e]) order[n++] = e;
    for (int i = 1; i < n; i++) { /* insertion sort by count, descending */
        int32_t v = order[i], j = i;
        while (j > 0 && r->counts[order[j - 1]] < r->counts[v]) { order[j] = order[j - 1]; j--; }
        order[j] = v;
    }
    return n;
}

static float sigmoidf_(float v) { return 1.0f / (1.0f + expf(-v)); }
/* published models (qwen2moe): llama.cpp's shared-expert gate, sigmoid(a) as
 * silu(a) / a with libm's expf, its one-token dot order at every batch size
 * (the gate is one value per token); at a = 0, where that is 0/0, the limit 1/2 */
float shared_gate_ggml(float a) {
    return a == 0.0f ? 0.5f : (a / (1.0f + expf(-a))) / a;
}

/* Matrix e ([rows][cols]) of stacked experts of element type t. */
static const void *expert_matrix(const void *base, int t, int e, int rows, int cols) {
    size_t rb = (size_t)cols * sizeof(float);
    if (t != DT_F32 && dtype_row_bytes(t, cols, &rb)) return NULL;
    return (const char *)base + (size_t)e * rows * rb;
}

/* out[N][OC] = in[N][C] @ w^T for fp32 weights (at the model's precision) or
 * any other usable type (converting the input rows into ws first). */
static void weight_matmul(float *out, const float *in, const void *w, int t, int N, int C, int OC,
                          matmul_precision mm, char *ws) {
    if (t == DT_F32) matmul_forward(out, in, w, NULL, N, C, OC, mm);
    else qmatmul_forward(out, in, w, t, N, C, OC, ws);
}

/* an expert's N of the layer's `batch` tokens: the quantised kernel is
 * chosen by the batch (qmatmul_forward_batch) */
static void expert_matmul(float *out, const float *in, const void *w, int t, int N, int C, int OC,
                          matmul_precision mm, char *ws, int batch) {
    if (t == DT_F32) matmul_forward(out, in, w, NULL, N, C, OC, mm);
    else qmatmul_forward_batch(out, in, w, t, N, C, OC, ws, batch);
}

/* ---- the forward stages (moe_layer.h); moe_forward composes them ---- */
void moe_dispatch(moe_cache *c, const float *x) {
    const moe_routing *r = &c->r;
    const int d = c->d, S = c->S, rows = r->rows;
    #pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++)
        memcpy(c->xe + (size_t)row * d, x + (size_t)(r->row_slot[row] / S) * d, sizeof(float) * d);
}

/* The experts' work as (expert, row block) tasks shared by all threads,
 * busiest expert first, blocks in row order: one task per expert while
 * there are experts enough to keep every thread busy, smaller blocks when
 * few experts hold the rows (a prompt's tokens on few experts, one token's
 * k experts on many threads). Every output row of a matmul depends on its
 * own input row only, so the bits do not depend on the blocks. tasks holds
 * (expert, first row) pairs; returns their count. */
static int expert_tasks(moe_routing *r, int E, int32_t *tasks, int *block) {
    int32_t *order = r->order;
    const int active = expert_order(r, E, order), nthr = omp_get_max_threads();
    const int B = active >= 2 * nthr ? INT32_MAX : MOE_MAX(32, (r->rows + 2 * nthr - 1) / (2 * nthr));
    int n = 0;
    for (int i = 0; i < active; i++)
        for (int r0 = 0; r0 < r->counts[order[i]]; r0 += B) {
            tasks[2 * n] = order[i];
            tasks[2 * n + 1] = r0;
            n++;
            if (B == INT32_MAX) break;
        }
    *block = B;
    return n;
}

void moe_experts_forward(moe_cache *c, const moe_weights *wt, matmul_precision mm) {
    moe_routing *r = &c->r;
    const int d = c->d, F = c->F;
    /* the routing's selection scratch is free once routing is done: at most
     * one task per dispatched row, two ints each */
    int32_t *tasks = r->iscratch;
    int B;
    const int n_tasks = expert_tasks(r, c->E, tasks, &B);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n_tasks; i++) {
        const int e = tasks[2 * i], r0 = tasks[2 * i + 1];
        const int n = MOE_MIN(B, r->counts[e] - r0), off = r->offsets[e] + r0;
        float *hg = c->hg + (size_t)off * F, *hu = c->hu + (size_t)off * F, *act = c->act + (size_t)off * F;
        char *ws = c->qws ? c->qws + (size_t)off * c->qws_row : NULL; /* this expert's rows only */
        const float *xe = c->xe + (size_t)off * d;
        const void *gate, *up, *down;
        if (wt->store) { /* offloaded: pinned in the cache (read now on a miss) until released */
            if (expert_store_acquire(wt->store, wt->store_layer, e, r0 == 0, &gate, &up, &down)) continue;
        } else {
            gate = expert_matrix(wt->gate, wt->gate_t, e, F, d);
            up = expert_matrix(wt->up, wt->up_t, e, F, d);
            down = expert_matrix(wt->down, wt->down_t, e, d, F);
        }
        expert_matmul(hg, xe, gate, wt->gate_t, n, d, F, mm, ws, r->N);
        expert_matmul(hu, xe, up, wt->up_t, n, d, F, mm, ws, r->N);
        if (wt->ggml_order) swiglu_forward_ggml(act, hg, hu, n, F);
        else swiglu_forward(act, hg, hu, n, F);
        expert_matmul(c->ye + (size_t)off * d, act, down, wt->down_t, n, F, d, mm, ws, r->N);
        if (wt->store) expert_store_release(wt->store, wt->store_layer, e);
    }
}

void moe_shared_forward(moe_cache *c, const float *x, const moe_weights *wt, int N, matmul_precision mm) {
    const int d = c->d, Fs = c->Fs;
    if (!Fs) return;
    /* one SwiGLU of hidden Fs over every token */
    weight_matmul(c->sh_hg, x, wt->sh_gate, wt->sh_gate_t, N, d, Fs, mm, c->qws);
    weight_matmul(c->sh_hu, x, wt->sh_up, wt->sh_up_t, N, d, Fs, mm, c->qws);
    if (wt->ggml_order) swiglu_forward_ggml(c->sh_act, c->sh_hg, c->sh_hu, N, Fs);
    else swiglu_forward(c->sh_act, c->sh_hg, c->sh_hu, N, Fs);
    weight_matmul(c->sh_y, c->sh_act, wt->sh_down, wt->sh_down_t, N, Fs, d, mm, c->qws);
}

void moe_combine(float *out, moe_cache *c, const float *x, const moe_weights *wt, int N) {
    const moe_routing *r = &c->r;
    const int d = c->d, S = c->S, Fs = c->Fs;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *o_ = out + (size_t)t * d;
        for (int i = 0; i < d; i++) o_[i] = 0;
        for (int j = 0; j < S; j++) {
            const int32_t row = r->slot_row[(size_t)t * S + j];
            if (row < 0) continue;
            const float w = r->w[(size_t)t * S + j];
            const float *y = c->ye + (size_t)row * d;
            for (int i = 0; i < d; i++) o_[i] += w * y[i];
        }
        if (Fs) {
            const float *xt = x + (size_t)t * d, *y = c->sh_y + (size_t)t * d;
            float g = 1.0f;
            if (wt->sh_inp && wt->ggml_order) g = shared_gate_ggml(vec_dot_ggml(xt, wt->sh_inp, d, 0));
            else if (wt->sh_inp) {
                double a = 0;
                for (int i = 0; i < d; i++) a += (double)xt[i] * wt->sh_inp[i];
                g = sigmoidf_((float)a);
            }
            c->sh_g[t] = g;
            for (int i = 0; i < d; i++) o_[i] += g * y[i];
        }
    }
}

void moe_forward(float *out, moe_cache *c, const float *x, const moe_weights *wt, int N,
                 const moe_route_opts *o) {
    double pt = moe_prof_start();
    c->r.qws = c->qws;
    moe_route(&c->r, x, wt, N, c->d, o);
    moe_prof_lap(PROF_ROUTE, &pt);
    moe_dispatch(c, x);
    moe_prof_lap(PROF_DISPATCH, &pt);
    if (c->ex) c->ex->experts_forward(c->ex, c, wt, o->matmul);
    else moe_experts_forward(c, wt, o->matmul);
    moe_prof_lap(PROF_EXPERTS, &pt);
    if (c->Fs) {
        moe_shared_forward(c, x, wt, N, o->matmul);
        moe_prof_lap(PROF_SHARED, &pt);
    }
    moe_combine(out, c, x, wt, N);
    moe_prof_lap(PROF_COMBINE, &pt);
}

void moe_experts_backward(moe_cache *c, const moe_weights *wt, const moe_grads *gr, matmul_precision mm) {
    moe_routing *r = &c->r;
    const int d = c->d, F = c->F;
    int32_t *order = r->order;
    const int active = expert_order(r, c->E, order);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < active; i++) {
        const int e = order[i], n = r->counts[e], off = r->offsets[e];
        const size_t rf = (size_t)off * F, rd = (size_t)off * d;
        matmul_backward_set_din(c->dact + rf, gr->down + (size_t)e * d * F, NULL, c->dye + rd, c->act + rf,
                        (const float *)wt->down + (size_t)e * d * F, n, F, d, mm);
        swiglu_backward(c->dhg + rf, c->dhu + rf, c->dact + rf, c->hg + rf, c->hu + rf, n, F);
        matmul_backward_set_din(c->dxe + rd, gr->gate + (size_t)e * F * d, NULL, c->dhg + rf, c->xe + rd,
                        (const float *)wt->gate + (size_t)e * F * d, n, d, F, mm);
        matmul_backward(c->dxe + rd, gr->up + (size_t)e * F * d, NULL, c->dhu + rf, c->xe + rd,
                        (const float *)wt->up + (size_t)e * F * d, n, d, F, mm);
    }
}

void moe_backward(float *dx, const moe_grads *gr, const float *dout, moe_cache *c, const float *x,
                  const moe_weights *wt, const moe_route_opts *o, moe_loss_scales ls) {
    const int d = c->d, E = c->E, k = c->k, S = c->S, Fs = c->Fs;
    moe_routing *r = &c->r;
    const int N = r->N;
    const int sigmoid = o->score == MOE_ROUTER_SIGMOID, mode = o->mode;
    const float scale = o->scale > 0 ? o->scale : 1.0f;
    const size_t ns = (size_t)N * S, ne = (size_t)N * E;
    float *dye = c->dye, *dxe = c->dxe;
    float *dlogits = c->dlogits, *dprobs = c->dprobs, *dw = c->dw;
    double pt = moe_prof_start();

    /* combine: out[t] = sum_j w[t,j] * ye[row(t,j)] over kept slots */
    #pragma omp parallel for schedule(static)
    for (size_t s = 0; s < ns; s++) {
        const int32_t row = r->slot_row[s];
        if (row < 0) { dw[s] = 0.0f; continue; }
        const float *g = dout + (s / S) * d;
        const float *y = c->ye + (size_t)row * d;
        float *dy = dye + (size_t)row * d;
        double acc = 0;
        for (int i = 0; i < d; i++) { acc += (double)g[i] * y[i]; dy[i] = r->w[s] * g[i]; }
        dw[s] = (float)acc;
    }
    moe_prof_lap(PROF_COMBINE, &pt);
    if (c->ex) c->ex->experts_backward(c->ex, c, wt, gr, o->matmul);
    else moe_experts_backward(c, wt, gr, o->matmul);
    moe_prof_lap(PROF_EXPERTS, &pt);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *g = dx + (size_t)t * d;
        for (int j = 0; j < S; j++) {
            const int32_t row = r->slot_row[(size_t)t * S + j];
            if (row < 0) continue;
            const float *s = dxe + (size_t)row * d;
            for (int i = 0; i < d; i++) g[i] += s[i];
        }
    }

    moe_prof_lap(PROF_DISPATCH, &pt);
    /* shared experts: out += g_t * y_t, g_t = sigmoid(x_t . w) or 1 */
    if (Fs) {
        #pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            const float *go = dout + (size_t)t * d, *y = c->sh_y + (size_t)t * d;
            float *dy = c->sh_dy + (size_t)t * d;
            const float g = c->sh_g[t];
            double a = 0;
            for (int i = 0; i < d; i++) { dy[i] = g * go[i]; a += (double)go[i] * y[i]; }
            c->sh_dg[t] = wt->sh_inp ? (float)a * g * (1.0f - g) : 0.0f; /* d(gate logit) */
        }
        if (wt->sh_inp) {
            #pragma omp parallel for schedule(static)
            for (int i = 0; i < d; i++) {
                double a = 0;
                for (int t = 0; t < N; t++) a += (double)c->sh_dg[t] * x[(size_t)t * d + i];
                gr->sh_inp[i] += (float)a;
            }
            #pragma omp parallel for schedule(static)
            for (int t = 0; t < N; t++)
                for (int i = 0; i < d; i++) dx[(size_t)t * d + i] += c->sh_dg[t] * wt->sh_inp[i];
        }
        matmul_backward_set_din(c->sh_dact, gr->sh_down, NULL, c->sh_dy, c->sh_act, wt->sh_down, N, Fs, d, o->matmul);
        swiglu_backward(c->sh_dhg, c->sh_dhu, c->sh_dact, c->sh_hg, c->sh_hu, N, Fs);
        matmul_backward(dx, gr->sh_gate, NULL, c->sh_dhg, x, wt->sh_gate, N, d, Fs, o->matmul);
        matmul_backward(dx, gr->sh_up, NULL, c->sh_dhu, x, wt->sh_up, N, d, Fs, o->matmul);
        moe_prof_lap(PROF_SHARED, &pt);
    }

    /* router: weights -> chosen scores -> all scores (+ balance terms) -> logits.
     * The selection bias only picked the experts: no gradient reaches it. */
    moe_zero(dprobs, ne);
    moe_zero(dlogits, ne);
    const int T = seq_len_of(o, N);
    const float aux_c = r->assigned ? ls.aux * (float)E / (float)r->assigned / (float)N : 0.0f;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *w = r->w + (size_t)t * S, *v = r->topv + (size_t)t * S, *g = dw + (size_t)t * S;
        const int32_t *ids = r->ids + (size_t)t * S;
        float *dp = dprobs + (size_t)t * E;
        if (mode == MOE_ROUTING_EXPERT) {
            for (int j = 0; j < S; j++)
                if (ids[j] >= 0) dp[ids[j]] += scale * g[j];
        } else if (o->renorm) { /* u_j = v_j / S: dv_i = (g'_i - sum_j g'_j u_j) / S, g' = scale g */
            double Sv = 0, gw = 0;
            for (int j = 0; j < k; j++) Sv += v[j];
            if (Sv > 0) {
                for (int j = 0; j < k; j++) gw += (double)(scale * g[j]) * (scale == 1.0f ? w[j] : v[j] / Sv);
                for (int j = 0; j < k; j++) dp[ids[j]] += (float)((scale * g[j] - gw) / Sv);
            }
        } else {
            for (int j = 0; j < k; j++) dp[ids[j]] += scale * g[j];
        }
        /* balance terms act on the normalised scores q = p / sum(p) */
        float *dq = dlogits + (size_t)t * E; /* scratch until the logits step */
        int any = 0;
        if (ls.aux != 0.0f) { /* Switch: aux = E * sum_e f_e * mean_t q[t,e], f constant */
            for (int e = 0; e < E; e++) dq[e] += aux_c * (float)r->sel_counts[e];
            any = 1;
        }
        if (ls.seq != 0.0f) { /* mean over B sequences of sum_e f_e(b) * mean_t q[t,e] */
            const float *f = r->seqf + (size_t)(t / T) * E;
            const float cs = ls.seq / (float)N; /* 1/B * 1/T */
            for (int e = 0; e < E; e++) dq[e] += cs * f[e];
            any = 1;
        }
        if (any) {
            if (!sigmoid) {
                for (int e = 0; e < E; e++) dp[e] += dq[e];
            } else {
                const float *p = r->probs + (size_t)t * E;
                const double ssum = r->ssum[t];
                double a = 0;
                for (int e = 0; e < E; e++) a += (double)dq[e] * p[e];
                for (int e = 0; e < E; e++) dp[e] += (float)(dq[e] / ssum - a / (ssum * ssum));
            }
            for (int e = 0; e < E; e++) dq[e] = 0.0f;
        }
    }
    if (!sigmoid) {
        softmax_backward(dlogits, dprobs, r->probs, N, E);
    } else {
        #pragma omp parallel for schedule(static) if (N * E > 4096)
        for (size_t i = 0; i < ne; i++) dlogits[i] = dprobs[i] * r->probs[i] * (1.0f - r->probs[i]);
    }
    if (ls.z != 0.0f) {
        #pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            float coef = ls.z * 2.0f * r->lse[t] / (float)N;
            const float *l = r->logits + (size_t)t * E;
            for (int e = 0; e < E; e++) {
                const float sm = sigmoid ? expf(l[e] - r->lse[t]) : r->probs[(size_t)t * E + e];
                dlogits[(size_t)t * E + e] += coef * sm;
            }
        }
    }
    if (o->jitter > 0) { /* logits = (x * noise) W^T */
        moe_zero(c->dxj, (size_t)N * d);
        matmul_backward(c->dxj, gr->router, NULL, dlogits, r->xj, wt->router, N, d, E, MATMUL_FP32);
        #pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)N * d; i++) dx[i] += c->dxj[i] * r->noise[i];
    } else {
        matmul_backward(dx, gr->router, NULL, dlogits, x, wt->router, N, d, E, MATMUL_FP32);
    }
    moe_prof_lap(PROF_ROUTE, &pt);
}

void moe_load_fractions(const moe_routing *r, int E, float *frac) {
    for (int e = 0; e < E; e++) frac[e] = r->assigned ? (float)r->sel_counts[e] / (float)r->assigned : 0.0f;
}

void moe_bias_update(float *bias, const int64_t *counts, int E, float gamma) {
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += counts[e];
    for (int e = 0; e < E; e++) {
        /* mean - load_e has the sign of total - E * load_e */
        int64_t diff = total - (int64_t)E * counts[e];
        bias[e] += diff > 0 ? gamma : diff < 0 ? -gamma : 0.0f;
    }
}
