/* dist: the ranks of a distributed run and the few collectives moe needs.
 * dist_mpi.c implements them over MPI (make MPI=1); dist_local.c is the
 * single-rank stand-in of the default build, so nothing else sees MPI.
 *
 * Layout of the world: N ranks in N/EP expert-parallel groups of EP
 * consecutive ranks. Rank j of a group owns experts [j*E/EP, (j+1)*E/EP) of
 * every MoE layer; every rank holds a shard of the data (N-way data
 * parallelism of everything outside the experts).
 *
 * Determinism: dist_reduce_add sums the ranks' contributions in rank order,
 * whatever the network or the MPI library's own algorithms, so N ranks give
 * the bits of one process that adds the same pieces in the same order.
 *
 * Failures: every call waits at most dist->timeout_s for its peers; a rank
 * that died or hangs turns into MOE_ERR_IO with a message naming the call,
 * never a hang. The caller then stops the job (dist_abort). */
#ifndef MOE_DIST_H
#define MOE_DIST_H
#include <stddef.h>
#include <stdint.h>
#include "moe.h"

typedef struct {
    int rank, size;        /* in the world                                       */
    int ep;                /* ranks per expert-parallel group (1: experts local) */
    int ep_rank;           /* rank within its group: rank % ep                   */
    double timeout_s;      /* bound on any wait for peers (MOE_DIST_TIMEOUT)     */
    /* traffic and time since dist_counters_reset, this rank */
    int64_t a2a_sent, a2a_recv;      /* bytes of all-to-all to / from other ranks */
    int64_t reduce_sent, reduce_recv;/* bytes of gradient and statistic reductions */
    double t_a2a, t_reduce;          /* seconds inside those calls                */
} moe_dist;

/* The world (size 1 until dist_init, and always in the default build). */
moe_dist *dist_world(void);
int dist_is_mpi(void); /* 1 when built with MPI */

/* Starts MPI (threads funnelled: only the main thread communicates). */
moe_status dist_init(int *argc, char ***argv);
/* Ends MPI; failed != 0 aborts the whole job (a peer may be waiting on us). */
void dist_finalize(int failed);

/* Whether ep ranks per group can split size ranks and n_experts experts
 * (the message says why not). */
moe_status dist_check_expert_parallel(int ep, int size, int n_experts);
/* Sets the expert-parallel group size, refusing a launch it cannot split:
 * ep must divide the rank count and n_experts. */
moe_status dist_set_expert_parallel(int ep, int n_experts);

/* acc[n] += g[0][n] + g[1][n] + ... over the ranks in rank order (g is this
 * rank's piece); acc is the same on every rank before and after. */
moe_status dist_reduce_add(float *acc, const float *g, size_t n);
/* Sharded reductions, for an optimizer that updates only its own part:
 * rank r owns the floats [*off, *off + *len) of n, whole units of `unit`
 * floats split as evenly as the units allow (unit 1: an even split). */
void dist_shard(size_t n, size_t unit, int rank, size_t *off, size_t *len);
/* acc's shard of this rank += the ranks' g over that shard, in rank order;
 * the rest of acc is left as it is. Half the traffic of dist_reduce_add. */
moe_status dist_reduce_scatter_add(float *acc, const float *g, size_t n, size_t unit);
/* In place: every rank's shard of x[n] reaches every rank. */
moe_status dist_allgather_shards(float *x, size_t n, size_t unit);
/* x[n] = the sum over ranks (in rank order) of each rank's x. */
moe_status dist_sum_f64(double *x, int n);
moe_status dist_sum_i64(int64_t *x, int n);
/* out[size][n]: every rank's x[n], in rank order. */
moe_status dist_gather_f64(double *out, const double *x, int n);
/* *flag = 1 on every rank when any rank had *flag != 0 (to agree on a stop:
 * a signal seen by one rank stops all of them at the same step). */
moe_status dist_any(int *flag);
/* *bits = the bitwise OR of every rank's bits (one collective for several flags) */
moe_status dist_or_bits(int *bits);
moe_status dist_barrier(void);

/* Within this rank's expert-parallel group (ranks g*ep .. g*ep+ep-1):
 * recv[ep][n] = each peer's send block for us, send[ep][n] our blocks. */
moe_status dist_alltoall_i32(int32_t *recv, const int32_t *send, int n);
/* Rows of row_floats floats, without waiting: send_rows[j] rows to peer j,
 * starting at row send_off[j] of send; recv_rows[j] rows from peer j land at
 * recv_off[j]. This rank's own block (j = ep_rank) is not moved: the caller
 * copies it, and can compute on it while the others travel. *op is the
 * exchange in flight (NULL when nothing moves); until dist_wait returns, send
 * must not change and recv's blocks must not be read. */
typedef struct dist_op dist_op;
moe_status dist_alltoallv_rows_start(dist_op **op, float *recv, const int *recv_rows, const int *recv_off,
                                     const float *send, const int *send_rows, const int *send_off,
                                     int row_floats);
/* Moves op along (MPI progresses a transfer only inside its calls: call this
 * between pieces of work); 1 when it has completed (or failed: dist_wait says). */
int dist_test(dist_op *op);
/* Waits for op with the deadline of every call, counts its bytes, frees it
 * (also on failure); op NULL is done. */
moe_status dist_wait(dist_op *op);
/* In place, within the group: peer j's rows [first_row[j], first_row[j] +
 * n_rows[j]) of rows (row_floats floats each) reach every peer; this
 * rank's own block is read, the others' are written. */
moe_status dist_allgather_rows(float *rows, const int *n_rows, const int *first_row, int row_floats);

void dist_counters_reset(moe_dist *d);
#endif
