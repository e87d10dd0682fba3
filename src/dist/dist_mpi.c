/* dist_mpi: the collectives over MPI (built with make MPI=1).
 * Every call is non-blocking underneath and waited for with a deadline
 * (wait_all), so a peer that died or hangs becomes an error after
 * timeout_s instead of a hang; errors return (MPI_ERRORS_RETURN) rather
 * than abort inside MPI. Sums never use MPI_SUM: the pieces are moved, then
 * added here in rank order, so the bits do not depend on MPI's algorithm. */
#include <limits.h>
#include <mpi.h>
#include <sched.h>
#include <string.h>
#include <time.h>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_internal.h"

static MPI_Comm ep_comm = MPI_COMM_NULL; /* this rank's expert-parallel group */
static int started;

int dist_is_mpi(void) { return 1; }

static moe_status mpi_fail(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error %d", rc);
    return moe_error(MOE_ERR_IO, "rank %d: %s failed: %s (a peer rank may have died)", dist_world()->rank, what, msg);
}

/* Waits for n requests, polling so that a deadline can end the wait; yields
 * the core between polls (ranks often share cores with their threads). */
static moe_status wait_all(MPI_Request *req, int n, const char *what, double *t_acc) {
    moe_dist *w = dist_world();
    const double t0 = MPI_Wtime(), deadline = t0 + w->timeout_s;
    long polls = 0;
    for (;;) {
        int done = 0, rc = MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) return mpi_fail(rc, what);
        if (done) break;
        if (MPI_Wtime() > deadline)
            return moe_error(MOE_ERR_IO, "rank %d: %s did not complete within %.0f s (MOE_DIST_TIMEOUT): "
                             "another rank died or hangs; stopping", w->rank, what, w->timeout_s);
        if (++polls > 200) {
            struct timespec ts = {0, 20000}; /* 20 us */
            nanosleep(&ts, NULL);
        } else {
            sched_yield();
        }
    }
    if (t_acc) *t_acc += MPI_Wtime() - t0;
    return MOE_OK;
}

moe_status dist_init(int *argc, char ***argv) {
    moe_dist *w = dist_world();
    int provided = 0, rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) return moe_error(MOE_ERR_IO, "MPI_Init_thread failed (error %d)", rc);
    started = 1;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &w->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &w->size);
    w->timeout_s = dist_timeout_from_env();
    w->ep = 1;
    w->ep_rank = 0;
    return MOE_OK;
}

void dist_finalize(int failed) {
    if (!started) return;
    started = 0;
    if (failed && dist_world()->size > 1) MPI_Abort(MPI_COMM_WORLD, 1); /* peers may wait on us */
    if (ep_comm != MPI_COMM_NULL) MPI_Comm_free(&ep_comm);
    MPI_Finalize();
}

moe_status dist_set_expert_parallel(int ep, int n_experts) {
    moe_dist *w = dist_world();
    moe_status st = dist_check_expert_parallel(ep, w->size, n_experts);
    if (st) return st;
    if (ep_comm != MPI_COMM_NULL) MPI_Comm_free(&ep_comm);
    int rc = MPI_Comm_split(MPI_COMM_WORLD, w->rank / ep, w->rank, &ep_comm);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Comm_split (expert-parallel groups)");
    MPI_Comm_set_errhandler(ep_comm, MPI_ERRORS_RETURN);
    w->ep = ep;
    w->ep_rank = w->rank % ep;
    return MOE_OK;
}

/* scratch for the pieces each rank receives; grows, freed at exit by the OS
 * (one buffer for the life of the process) */
static float *scratch;
static size_t scratch_n;
static float *scratch_floats(size_t n) {
    if (n <= scratch_n) return scratch;
    float *p = moe_malloc(n * sizeof(float));
    if (!p) return NULL;
    moe_free(scratch);
    scratch = p;
    scratch_n = n;
    return p;
}

/* The sharded reduction moves pieces rather than calling MPI's reductions:
 * rank c gets everyone's shard c and adds them itself in rank order, so the
 * order of additions is fixed whatever the library's algorithm. With the
 * all-gather after it, the traffic of a ring all-reduce. */
static moe_status shard_counts(size_t n, size_t unit, int *cnt, int *dis) {
    moe_dist *w = dist_world();
    for (int j = 0; j < w->size; j++) {
        size_t o, l;
        dist_shard(n, unit, j, &o, &l);
        if (o + l > (size_t)INT_MAX)
            return moe_error(MOE_ERR_INVALID_ARG, "rank %d: %zu floats to reduce is too many for one call", w->rank, n);
        cnt[j] = (int)l; dis[j] = (int)o;
    }
    return MOE_OK;
}

moe_status dist_reduce_scatter_add(float *acc, const float *g, size_t n, size_t unit) {
    moe_dist *w = dist_world();
    const int P = w->size, me = w->rank;
    if (P == 1) {
        for (size_t i = 0; i < n; i++) acc[i] += g[i];
        return MOE_OK;
    }
    int scnt[P], sdis[P], rcnt[P], rdis[P];
    moe_status st = shard_counts(n, unit, scnt, sdis);
    if (st) return st;
    const size_t my_off = (size_t)sdis[me], my_len = (size_t)scnt[me];
    float *recv = scratch_floats(my_len * (size_t)P + 1);
    if (!recv) return moe_error(MOE_ERR_NOMEM, "rank %d: out of memory for the gradient reduction", me);
    for (int j = 0; j < P; j++) { rcnt[j] = (int)my_len; rdis[j] = (int)(my_len * (size_t)j); }
    MPI_Request rq;
    int rc = MPI_Ialltoallv(g, scnt, sdis, MPI_FLOAT, recv, rcnt, rdis, MPI_FLOAT, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "the gradient reduce-scatter");
    if ((st = wait_all(&rq, 1, "the gradient reduce-scatter", &w->t_reduce))) return st;
    float *a = acc + my_off;
    for (int s = 0; s < P; s++) {
        const float *p = recv + my_len * (size_t)s;
        for (size_t i = 0; i < my_len; i++) a[i] += p[i];
    }
    w->reduce_sent += (int64_t)(n - my_len) * (int64_t)sizeof(float);        /* the others' shards out */
    w->reduce_recv += (int64_t)my_len * (P - 1) * (int64_t)sizeof(float);    /* ours, from each of them */
    return MOE_OK;
}

moe_status dist_allgather_shards(float *x, size_t n, size_t unit) {
    moe_dist *w = dist_world();
    const int P = w->size, me = w->rank;
    if (P == 1) return MOE_OK;
    int cnt[P], dis[P];
    moe_status st = shard_counts(n, unit, cnt, dis);
    if (st) return st;
    MPI_Request rq;
    int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, x, cnt, dis, MPI_FLOAT, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "the all-gather of the shards");
    if ((st = wait_all(&rq, 1, "the all-gather of the shards", &w->t_reduce))) return st;
    w->reduce_sent += (int64_t)cnt[me] * (P - 1) * (int64_t)sizeof(float);   /* ours, to each of them */
    w->reduce_recv += (int64_t)(n - (size_t)cnt[me]) * (int64_t)sizeof(float);
    return MOE_OK;
}

moe_status dist_reduce_add(float *acc, const float *g, size_t n) {
    moe_status st = dist_reduce_scatter_add(acc, g, n, 1);
    return st ? st : dist_allgather_shards(acc, n, 1);
}

static moe_status gather_bytes(void *out, const void *x, int bytes, const char *what) {
    moe_dist *w = dist_world();
    MPI_Request rq;
    int rc = MPI_Iallgather(x, bytes, MPI_BYTE, out, bytes, MPI_BYTE, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, what);
    moe_status st = wait_all(&rq, 1, what, &w->t_reduce);
    if (!st) { w->reduce_sent += (int64_t)bytes * (w->size - 1); w->reduce_recv += (int64_t)bytes * (w->size - 1); }
    return st;
}

moe_status dist_gather_f64(double *out, const double *x, int n) {
    return gather_bytes(out, x, n * (int)sizeof(double), "gathering statistics");
}

/* x[n] (doubles or int64) = the sum over ranks, added in rank order */
static moe_status sum_in_rank_order(void *x, int n, int is_f64) {
    const int P = dist_world()->size;
    if (P == 1 || n == 0) return MOE_OK;
    const int width = 8; /* sizeof(double) == sizeof(int64_t) */
    char *all = moe_malloc((size_t)width * n * P);
    if (!all) return moe_error(MOE_ERR_NOMEM, "out of memory for a reduction");
    moe_status st = gather_bytes(all, x, n * width, is_f64 ? "summing statistics" : "summing counts");
    for (int i = 0; !st && i < n; i++) {
        if (is_f64) {
            double s = 0;
            for (int r = 0; r < P; r++) s += ((const double *)all)[(size_t)r * n + i];
            ((double *)x)[i] = s;
        } else {
            int64_t s = 0;
            for (int r = 0; r < P; r++) s += ((const int64_t *)all)[(size_t)r * n + i];
            ((int64_t *)x)[i] = s;
        }
    }
    moe_free(all);
    return st;
}

moe_status dist_sum_f64(double *x, int n) { return sum_in_rank_order(x, n, 1); }
moe_status dist_sum_i64(int64_t *x, int n) { return sum_in_rank_order(x, n, 0); }

moe_status dist_or_bits(int *bits) {
    int mine = *bits, all = 0;
    MPI_Request rq;
    int rc = MPI_Iallreduce(&mine, &all, 1, MPI_INT, MPI_BOR, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "agreeing on a stop");
    moe_status st = wait_all(&rq, 1, "agreeing on a stop", NULL);
    if (!st) *bits = all;
    return st;
}

moe_status dist_barrier(void) {
    MPI_Request rq;
    int rc = MPI_Ibarrier(MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "a barrier");
    return wait_all(&rq, 1, "a barrier", NULL);
}

static MPI_Comm group_comm(void) { return ep_comm != MPI_COMM_NULL ? ep_comm : MPI_COMM_SELF; }

moe_status dist_alltoall_i32(int32_t *recv, const int32_t *send, int n) {
    moe_dist *w = dist_world();
    MPI_Request rq;
    int rc = MPI_Ialltoall(send, n, MPI_INT32_T, recv, n, MPI_INT32_T, group_comm(), &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "the expert row-count exchange");
    moe_status st = wait_all(&rq, 1, "the expert row-count exchange", &w->t_a2a);
    if (!st) {
        w->a2a_sent += (int64_t)n * (w->ep - 1) * 4;
        w->a2a_recv += (int64_t)n * (w->ep - 1) * 4;
    }
    return st;
}

struct dist_op {
    MPI_Request rq;
    int err;                /* an MPI error seen by dist_test */
    int64_t sent, recv;     /* bytes to / from other ranks, counted when done */
    const char *what;
};

moe_status dist_alltoallv_rows_start(dist_op **op, float *recv, const int *recv_rows, const int *recv_off,
                                     const float *send, const int *send_rows, const int *send_off,
                                     int row_floats) {
    moe_dist *w = dist_world();
    const int P = w->ep;
    const double t0 = MPI_Wtime();
    int sc[P], sd[P], rc_[P], rd[P];
    int64_t out = 0, in = 0;
    *op = NULL;
    for (int j = 0; j < P; j++) {
        const int self = j == w->ep_rank; /* the caller's own block stays put */
        int64_t v[4] = {self ? 0 : (int64_t)send_rows[j] * row_floats, (int64_t)send_off[j] * row_floats,
                        self ? 0 : (int64_t)recv_rows[j] * row_floats, (int64_t)recv_off[j] * row_floats};
        for (int i = 0; i < 4; i++)
            if (v[i] > INT_MAX) return moe_error(MOE_ERR_INVALID_ARG, "rank %d: expert rows exceed one MPI call", w->rank);
        sc[j] = (int)v[0]; sd[j] = (int)v[1]; rc_[j] = (int)v[2]; rd[j] = (int)v[3];
        out += v[0]; in += v[2];
    }
    if (P == 1) return MOE_OK;
    dist_op *o = moe_calloc(1, sizeof *o);
    if (!o) return moe_error(MOE_ERR_NOMEM, "rank %d: out of memory for an exchange", w->rank);
    o->what = "the expert all-to-all";
    o->sent = out * (int64_t)sizeof(float);
    o->recv = in * (int64_t)sizeof(float);
    int rc = MPI_Ialltoallv(send, sc, sd, MPI_FLOAT, recv, rc_, rd, MPI_FLOAT, group_comm(), &o->rq);
    w->t_a2a += MPI_Wtime() - t0;
    if (rc != MPI_SUCCESS) {
        moe_free(o);
        return mpi_fail(rc, "the expert all-to-all");
    }
    *op = o;
    return MOE_OK;
}

int dist_test(dist_op *op) {
    if (!op || op->err) return 1;
    const double t0 = MPI_Wtime();
    int done = 0, rc = MPI_Test(&op->rq, &done, MPI_STATUS_IGNORE);
    dist_world()->t_a2a += MPI_Wtime() - t0;
    if (rc != MPI_SUCCESS) op->err = rc;
    return done || op->err;
}

moe_status dist_wait(dist_op *op) {
    if (!op) return MOE_OK;
    moe_dist *w = dist_world();
    moe_status st = op->err ? mpi_fail(op->err, op->what) : wait_all(&op->rq, 1, op->what, &w->t_a2a);
    if (!st) {
        w->a2a_sent += op->sent;
        w->a2a_recv += op->recv;
    }
    moe_free(op);
    return st;
}

moe_status dist_allgather_rows(float *rows, const int *n_rows, const int *first_row, int row_floats) {
    moe_dist *w = dist_world();
    const int P = w->ep;
    int cnt[P], dis[P];
    int64_t mine = 0, others = 0;
    for (int j = 0; j < P; j++) {
        const int64_t n = (int64_t)n_rows[j] * row_floats, at = (int64_t)first_row[j] * row_floats;
        if (n > INT_MAX || at > INT_MAX) return moe_error(MOE_ERR_INVALID_ARG, "rank %d: expert rows exceed one MPI call", w->rank);
        cnt[j] = (int)n; dis[j] = (int)at;
        if (j == w->ep_rank) mine = n; else others += n;
    }
    MPI_Request rq;
    int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, rows, cnt, dis, MPI_FLOAT, group_comm(), &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "the expert output all-gather");
    moe_status st = wait_all(&rq, 1, "the expert output all-gather", &w->t_a2a);
    if (!st) {
        w->a2a_sent += mine * (P - 1) * (int64_t)sizeof(float);
        w->a2a_recv += others * (int64_t)sizeof(float);
    }
    return st;
}
