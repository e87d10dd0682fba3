/* dist_local: the single-rank world of the default build. Every collective
 * is what it means for one rank: a sum over one piece, a copy to oneself. */
#include <string.h>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_internal.h"

int dist_is_mpi(void) { return 0; }

moe_status dist_init(int *argc, char ***argv) {
    dist_world()->timeout_s = dist_timeout_from_env();
    return MOE_OK;
}

void dist_finalize(int failed) {}

moe_status dist_set_expert_parallel(int ep, int n_experts) {
    moe_status st = dist_check_expert_parallel(ep, 1, n_experts);
    if (!st) { dist_world()->ep = ep; dist_world()->ep_rank = 0; }
    return st;
}

moe_status dist_reduce_add(float *acc, const float *g, size_t n) {
    for (size_t i = 0; i < n; i++) acc[i] += g[i];
    return MOE_OK;
}
moe_status dist_reduce_scatter_add(float *acc, const float *g, size_t n, size_t unit) {
    return dist_reduce_add(acc, g, n); /* one rank owns all of it */
}
moe_status dist_allgather_shards(float *x, size_t n, size_t unit) { return MOE_OK; }

moe_status dist_sum_f64(double *x, int n) { return MOE_OK; }
moe_status dist_sum_i64(int64_t *x, int n) { return MOE_OK; }
moe_status dist_gather_f64(double *out, const double *x, int n) {
    memcpy(out, x, sizeof(double) * n);
    return MOE_OK;
}
moe_status dist_or_bits(int *bits) { return MOE_OK; } /* one rank: its own bits */
moe_status dist_barrier(void) { return MOE_OK; }

moe_status dist_alltoall_i32(int32_t *recv, const int32_t *send, int n) {
    memcpy(recv, send, sizeof(int32_t) * n);
    return MOE_OK;
}

/* one rank: its block is its own, which the caller copies; nothing moves */
moe_status dist_alltoallv_rows_start(dist_op **op, float *recv, const int *recv_rows, const int *recv_off,
                                     const float *send, const int *send_rows, const int *send_off,
                                     int row_floats) {
    *op = NULL;
    return MOE_OK;
}
int dist_test(dist_op *op) { return 1; }
moe_status dist_wait(dist_op *op) { return MOE_OK; }

moe_status dist_allgather_rows(float *rows, const int *n_rows, const int *first_row, int row_floats) {
    return MOE_OK; /* one rank: its block is all of them */
}
