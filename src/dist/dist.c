/* dist: the parts of the world that do not depend on the transport. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_internal.h"

static moe_dist world = {.rank = 0, .size = 1, .ep = 1, .ep_rank = 0, .timeout_s = 60};

moe_dist *dist_world(void) { return &world; }

void dist_counters_reset(moe_dist *d) {
    d->a2a_sent = d->a2a_recv = d->reduce_sent = d->reduce_recv = 0;
    d->t_a2a = d->t_reduce = 0;
}

/* MOE_DIST_TIMEOUT seconds (default 60): long enough for a slow step's
 * compute between two collectives, short enough that a lost rank is news */
double dist_timeout_from_env(void) {
    const char *s = getenv("MOE_DIST_TIMEOUT");
    char *end = NULL;
    double v = s ? strtod(s, &end) : 0;
    return s && end != s && v > 0 ? v : 60.0;
}

moe_status dist_check_expert_parallel(int ep, int size, int n_experts) {
    if (ep < 1) return moe_error(MOE_ERR_INVALID_ARG, "--expert-parallel %d must be at least 1", ep);
    if (size % ep)
        return moe_error(MOE_ERR_INVALID_ARG, "--expert-parallel %d does not divide the %d ranks of the job "
                         "(the ranks form groups of %d)", ep, size, ep);
    if (ep > 1 && n_experts <= 0)
        return moe_error(MOE_ERR_INVALID_ARG, "--expert-parallel %d needs a model with experts (this one is dense)", ep);
    if (ep > 1 && n_experts % ep)
        return moe_error(MOE_ERR_INVALID_ARG, "--expert-parallel %d does not divide the model's %d experts "
                         "(each rank of a group owns the same number)", ep, n_experts);
    return MOE_OK;
}

moe_status dist_any(int *flag) {
    int bit = *flag != 0;
    moe_status st = dist_or_bits(&bit);
    if (!st) *flag = bit;
    return st;
}

void dist_shard(size_t n, size_t unit, int rank, size_t *off, size_t *len) {
    const int P = dist_world()->size;
    if (unit < 1) unit = 1;
    const size_t units = (n + unit - 1) / unit;
    const size_t a = units * (size_t)rank / (size_t)P * unit, b = units * (size_t)(rank + 1) / (size_t)P * unit;
    *off = MOE_MIN(a, n);
    *len = MOE_MIN(b, n) - *off;
}
