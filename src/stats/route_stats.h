/* stats/route_stats: a routing trace (the experts every token chose in
 * every MoE layer, with the token's domain) and the metrics the routing
 * report shows, each a plain function of the trace so that tests can check
 * it against a hand-computed case. km is a MoE layer's index among the MoE
 * layers (0 .. n_moe-1); shares are fractions in [0, 1]. */
#ifndef MOE_STATS_ROUTE_STATS_H
#define MOE_STATS_ROUTE_STATS_H
#include <stddef.h>
#include <stdint.h>

#include "moe.h"

typedef struct {
    size_t n, cap;       /* tokens held, room                               */
    int n_moe, k, E;
    int *layers;         /* [n_moe] model layer of each MoE layer            */
    int32_t *tokens;     /* [cap]                                           */
    uint8_t *domain;     /* [cap] domain of each token (0 without a dataset) */
    int32_t *ids;        /* [cap][n_moe][k] chosen experts, -1: empty slot  */
    float *w;            /* [cap][n_moe][k] their weights                   */
    int cur_domain;      /* domain given to the tokens route_trace_add appends */
} route_trace;

moe_status route_trace_init(route_trace *t, const moe_config *c, size_t cap);
void route_trace_free(route_trace *t);
/* A moe_route_fn (user: the trace) appending one token; stops when full. */
int route_trace_add(const moe_token_route *r, void *user);
/* Traces up to max_tokens tokens of d (both splits), in windows of up to
 * the model's context (at most 256) spread evenly over the whole data so
 * that every domain is sampled; fn(done, total, user) after each window. */
moe_status route_trace_dataset(route_trace *t, moe_model *m, const moe_dataset *d, size_t max_tokens,
                               moe_eval_progress_fn fn, void *user);

/* share[E]: each expert's part of the layer's assignments (empty slots not counted). */
void route_load(const route_trace *t, int km, double *share);
/* share[n_dom][E]: of a domain's tokens, the part routed to each expert
 * (sums to k over experts when no slot is empty; uniform is k/E);
 * tokens[n_dom] (may be NULL): tokens per domain. */
void route_domain_share(const route_trace *t, int km, int n_dom, double *share, size_t *tokens);
/* p[E][E]: p[i][j] = P(j chosen | i chosen) over the tokens (row i 0 when i
 * is never chosen; p[i][i] = 1 otherwise). */
void route_coactivation(const route_trace *t, int km, double *p);
/* Mean over the tokens of |top-k of a ∩ top-k of b| / k: two traces of the
 * same tokens (a model and an older checkpoint). */
double route_overlap(const route_trace *a, const route_trace *b, int km);

/* Vocabulary specialisation of one layer. */
typedef struct { int32_t token; int64_t count, occurrences; } route_vocab_entry;
/* top[E][n_top]: the tokens each expert takes most (count: occurrences
 * routed to it, occurrences: of the token in all; ties to the lower id;
 * token -1 pads). Returns the mean over tokens seen at least min_occ times
 * of the share of their occurrences routed to their favourite expert (0 if
 * none), in *n_counted how many tokens that is (may be NULL). */
moe_status route_vocab(const route_trace *t, int km, int n_top, int64_t min_occ, route_vocab_entry *top,
                       double *favourite_share, size_t *n_counted);
/* counts[n_moe][E]: how often each expert of each MoE layer was chosen in a
 * routing trace as moe route --json writes it (one token a line, its
 * "layers":[{"layer":L,"experts":[...],...},...]) of a model of config c;
 * MOE_ERR_FORMAT, naming the line, for what is not such a trace of such a
 * model (a layer that is not an MoE layer, an expert out of range). */
moe_status route_counts_read(const char *path, const moe_config *c, int64_t *counts);
#endif
