/* stats/route_stats: routing traces and the metrics of the routing report. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/dataset.h"
#include "stats/route_stats.h"

moe_status route_trace_init(route_trace *t, const moe_config *c, size_t cap) {
    memset(t, 0, sizeof *t);
    t->n_moe = moe_config_n_moe_layers(c);
    t->k = c->top_k;
    t->E = c->n_experts;
    if (!t->n_moe) return moe_error(MOE_ERR_INVALID_ARG, "a dense model has no routing to trace");
    size_t per;
    if (moe_mul_size(cap, (size_t)t->n_moe * t->k, &per)) return moe_error(MOE_ERR_NOMEM, "routing trace of %zu tokens", cap);
    t->cap = cap;
    t->layers = moe_calloc((size_t)t->n_moe, sizeof(int));
    t->tokens = moe_calloc(MOE_MAX(cap, 1), sizeof(int32_t));
    t->domain = moe_calloc(MOE_MAX(cap, 1), 1);
    t->ids = moe_calloc(MOE_MAX(per, 1), sizeof(int32_t));
    t->w = moe_calloc(MOE_MAX(per, 1), sizeof(float));
    if (!t->layers || !t->tokens || !t->domain || !t->ids || !t->w) {
        route_trace_free(t);
        return moe_error(MOE_ERR_NOMEM, "routing trace of %zu tokens", cap);
    }
    for (int l = 0, j = 0; l < c->n_layers; l++)
        if (moe_config_layer_is_moe(c, l)) t->layers[j++] = l;
    return MOE_OK;
}

void route_trace_free(route_trace *t) {
    moe_free(t->layers);
    moe_free(t->tokens);
    moe_free(t->domain);
    moe_free(t->ids);
    moe_free(t->w);
    memset(t, 0, sizeof *t);
}

int route_trace_add(const moe_token_route *r, void *user) {
    route_trace *t = user;
    if (t->n >= t->cap || r->n_moe != t->n_moe || r->k != t->k) return 1;
    const size_t per = (size_t)t->n_moe * t->k;
    t->tokens[t->n] = r->token;
    t->domain[t->n] = (uint8_t)t->cur_domain;
    memcpy(t->ids + t->n * per, r->experts, per * sizeof(int32_t));
    memcpy(t->w + t->n * per, r->weights, per * sizeof(float));
    t->n++;
    return t->n >= t->cap;
}

moe_status route_trace_dataset(route_trace *t, moe_model *m, const moe_dataset *d, size_t max_tokens,
                               moe_eval_progress_fn fn, void *user) {
    const size_t all = d->n[0] + d->n[1];
    const size_t W = (size_t)MOE_MIN(moe_model_context(m), 256);
    size_t want = max_tokens && max_tokens < all ? max_tokens : all;
    want = MOE_MIN(want, t->cap - t->n);
    if (!want) return MOE_OK;
    /* whole windows, at least W apart so none overlaps */
    const size_t windows = (want + W - 1) / W, stride = MOE_MAX(W, all / windows);
    int32_t *buf = moe_malloc(W * sizeof(int32_t));
    uint8_t *dom = moe_malloc(W);
    if (!buf || !dom) { moe_free(buf); moe_free(dom); return moe_error(MOE_ERR_NOMEM, "routing trace window"); }
    moe_status st = MOE_OK;
    size_t done = 0;
    for (size_t w = 0; !st && w < windows && done < want && w * stride < all; w++) {
        const size_t start = w * stride, len = MOE_MIN(MOE_MIN(W, want - done), all - start);
        for (size_t i = 0; i < len; i++) { /* the two splits as one stream */
            const size_t at = start + i;
            const int s = at >= d->n[0];
            const size_t j = s ? at - d->n[0] : at;
            buf[i] = d->tokens[s][j];
            dom[i] = d->domain[s][j];
        }
        const size_t first = t->n;
        st = moe_model_route(m, buf, len, route_trace_add, t);
        for (size_t i = first; i < t->n; i++) t->domain[i] = dom[i - first];
        done += len;
        if (fn) fn(done, want, user);
    }
    moe_free(buf);
    moe_free(dom);
    return st;
}

/* the k slots of token i in MoE layer km */
static const int32_t *slots(const route_trace *t, size_t i, int km) {
    return t->ids + (i * t->n_moe + km) * t->k;
}

void route_load(const route_trace *t, int km, double *share) {
    int64_t total = 0;
    int64_t *cnt = moe_calloc((size_t)t->E, sizeof(int64_t));
    for (int e = 0; e < t->E; e++) share[e] = 0;
    if (!cnt) return;
    for (size_t i = 0; i < t->n; i++)
        for (int j = 0; j < t->k; j++) {
            const int32_t e = slots(t, i, km)[j];
            if (e >= 0) { cnt[e]++; total++; }
        }
    for (int e = 0; e < t->E; e++) share[e] = total ? (double)cnt[e] / (double)total : 0.0;
    moe_free(cnt);
}

void route_domain_share(const route_trace *t, int km, int n_dom, double *share, size_t *tokens) {
    const int E = t->E;
    size_t *ntok = moe_calloc((size_t)MOE_MAX(n_dom, 1), sizeof(size_t));
    for (size_t i = 0; i < (size_t)n_dom * E; i++) share[i] = 0;
    if (!ntok) return;
    for (size_t i = 0; i < t->n; i++) {
        const int dm = t->domain[i];
        if (dm >= n_dom) continue;
        ntok[dm]++;
        for (int j = 0; j < t->k; j++) {
            const int32_t e = slots(t, i, km)[j];
            if (e >= 0) share[(size_t)dm * E + e] += 1.0;
        }
    }
    for (int dm = 0; dm < n_dom; dm++) {
        for (int e = 0; e < E; e++) share[(size_t)dm * E + e] = ntok[dm] ? share[(size_t)dm * E + e] / (double)ntok[dm] : 0.0;
        if (tokens) tokens[dm] = ntok[dm];
    }
    moe_free(ntok);
}

void route_coactivation(const route_trace *t, int km, double *p) {
    const int E = t->E, k = t->k;
    int64_t *chosen = moe_calloc((size_t)E, sizeof(int64_t));
    for (size_t i = 0; i < (size_t)E * E; i++) p[i] = 0;
    if (!chosen) return;
    for (size_t i = 0; i < t->n; i++) {
        const int32_t *s = slots(t, i, km);
        for (int a = 0; a < k; a++) {
            if (s[a] < 0) continue;
            chosen[s[a]]++;
            for (int b = 0; b < k; b++)
                if (s[b] >= 0) p[(size_t)s[a] * E + s[b]] += 1.0; /* b == a: the diagonal */
        }
    }
    for (int i = 0; i < E; i++)
        for (int j = 0; j < E; j++) p[(size_t)i * E + j] = chosen[i] ? p[(size_t)i * E + j] / (double)chosen[i] : 0.0;
    moe_free(chosen);
}

double route_overlap(const route_trace *a, const route_trace *b, int km) {
    const size_t n = MOE_MIN(a->n, b->n);
    const int k = MOE_MIN(a->k, b->k);
    if (!n || !k) return 0.0;
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        const int32_t *sa = slots(a, i, km), *sb = slots(b, i, km);
        int common = 0;
        for (int x = 0; x < a->k; x++)
            for (int y = 0; y < b->k; y++) common += sa[x] >= 0 && sa[x] == sb[y];
        sum += (double)common / k;
    }
    return sum / (double)n;
}

static int cmp_i32(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

moe_status route_vocab(const route_trace *t, int km, int n_top, int64_t min_occ, route_vocab_entry *top,
                       double *favourite_share, size_t *n_counted) {
    const int E = t->E;
    *favourite_share = 0;
    if (n_counted) *n_counted = 0;
    for (size_t i = 0; i < (size_t)E * n_top; i++) top[i] = (route_vocab_entry){-1, 0, 0};
    if (!t->n) return MOE_OK;
    /* the distinct tokens, sorted; counts[u][E] and occurrences[u] */
    int32_t *uniq = moe_malloc(t->n * sizeof(int32_t));
    if (!uniq) return moe_error(MOE_ERR_NOMEM, "vocabulary statistics");
    memcpy(uniq, t->tokens, t->n * sizeof(int32_t));
    qsort(uniq, t->n, sizeof(int32_t), cmp_i32);
    size_t U = 0;
    for (size_t i = 0; i < t->n; i++)
        if (!U || uniq[U - 1] != uniq[i]) uniq[U++] = uniq[i];
    int64_t *cnt = moe_calloc(U * (size_t)E, sizeof(int64_t)), *occ = moe_calloc(U, sizeof(int64_t));
    if (!cnt || !occ) { moe_free(uniq); moe_free(cnt); moe_free(occ); return moe_error(MOE_ERR_NOMEM, "vocabulary statistics"); }
    for (size_t i = 0; i < t->n; i++) {
        const int32_t *u = bsearch(&t->tokens[i], uniq, U, sizeof(int32_t), cmp_i32);
        const size_t ui = (size_t)(u - uniq);
        occ[ui]++;
        for (int j = 0; j < t->k; j++) {
            const int32_t e = slots(t, i, km)[j];
            if (e >= 0) cnt[ui * E + e]++;
        }
    }
    double sum = 0;
    size_t counted = 0;
    for (size_t u = 0; u < U; u++) {
        int64_t best = 0;
        for (int e = 0; e < E; e++) best = MOE_MAX(best, cnt[u * E + e]);
        if (occ[u] >= min_occ) { sum += (double)best / (double)occ[u]; counted++; }
        /* insert into each expert's top list: more routed occurrences first, then the lower id */
        for (int e = 0; e < E; e++) {
            const int64_t c = cnt[u * E + e];
            if (!c) continue;
            route_vocab_entry *L = top + (size_t)e * n_top;
            int at = n_top;
            while (at > 0 && (L[at - 1].token < 0 || L[at - 1].count < c)) at--;
            if (at >= n_top) continue;
            memmove(L + at + 1, L + at, sizeof *L * (size_t)(n_top - at - 1));
            L[at] = (route_vocab_entry){uniq[u], c, occ[u]};
        }
    }
    *favourite_share = counted ? sum / (double)counted : 0.0;
    if (n_counted) *n_counted = counted;
    moe_free(uniq);
    moe_free(cnt);
    moe_free(occ);
    return MOE_OK;
}

/* One integer at *p (after spaces), p moved past it; 0 when there is none. */
static int read_int(const char **p, const char *end, long *v) {
    const char *s = *p;
    while (s < end && (*s == ' ' || *s == '\t')) s++;
    char buf[24];
    size_t n = 0;
    if (s < end && *s == '-') buf[n++] = *s++;
    while (s < end && *s >= '0' && *s <= '9' && n < sizeof buf - 1) buf[n++] = *s++;
    if (n == 0 || (n == 1 && buf[0] == '-') || (s < end && *s >= '0' && *s <= '9')) return 0;
    buf[n] = 0;
    *v = strtol(buf, NULL, 10);
    *p = s;
    return 1;
}

/* the first occurrence of key in [p, end), or NULL */
static const char *find_in(const char *p, const char *end, const char *key) {
    const size_t k = strlen(key);
    for (; p + k <= end; p++)
        if (!memcmp(p, key, k)) return p;
    return NULL;
}

moe_status route_counts_read(const char *path, const moe_config *c, int64_t *counts) {
    const int n_moe = moe_config_n_moe_layers(c), E = c->n_experts;
    if (!n_moe) return moe_error(MOE_ERR_INVALID_ARG, "a dense model has no experts to count");
    int *km_of = moe_calloc((size_t)c->n_layers, sizeof(int));
    if (!km_of) return moe_error(MOE_ERR_NOMEM, "routing statistics");
    for (int l = 0, j = 0; l < c->n_layers; l++) km_of[l] = moe_config_layer_is_moe(c, l) ? j++ : -1;
    char *text = NULL;
    size_t len = 0;
    moe_status st = moe_read_file(path, &text, &len);
    memset(counts, 0, sizeof(int64_t) * (size_t)n_moe * E);
    size_t line_no = 0, found = 0;
    for (const char *line = text; !st && line && line < text + len; line_no++) {
        const char *end = memchr(line, '\n', (size_t)(text + len - line));
        if (!end) end = text + len;
        const char *p = find_in(line, end, "\"layers\":[");
        for (p = p ? p + 10 : NULL; !st && p && (p = find_in(p, end, "{\"layer\":")); ) {
            long l = -1, e;
            p += 9;
            const char *ex = read_int(&p, end, &l) ? find_in(p, end, "\"experts\":[") : NULL;
            if (!ex || l < 0 || l >= c->n_layers || km_of[l] < 0) {
                st = moe_error(MOE_ERR_FORMAT, "%s:%zu: expected {\"layer\":L,\"experts\":[...]} of an MoE layer of this "
                               "model (moe route --json writes them)", path, line_no + 1);
                break;
            }
            p = ex + 11;
            while (!st && read_int(&p, end, &e)) {
                if (e < -1 || e >= E)
                    st = moe_error(MOE_ERR_FORMAT, "%s:%zu: expert %ld of layer %ld: this model has %d experts (a trace of "
                                   "another model?)", path, line_no + 1, e, l, E);
                else if (e >= 0) counts[(size_t)km_of[l] * E + e]++;
                while (p < end && (*p == ' ' || *p == ',')) p++;
            }
            if (!st && (p >= end || *p != ']'))
                st = moe_error(MOE_ERR_FORMAT, "%s:%zu: layer %ld: the experts are not a list of numbers", path, line_no + 1, l);
            found += !st;
        }
        line = end + 1;
    }
    if (!st && found == 0)
        st = moe_error(MOE_ERR_FORMAT, "%s: no routing found (expected moe route --json output: one token a line, "
                       "with \"layers\":[{\"layer\":L,\"experts\":[...]},...])", path);
    moe_free(text);
    moe_free(km_of);
    return st;
}
