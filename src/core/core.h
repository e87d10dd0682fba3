/* core: errors, allocation with accounting, RNG, timers, CPU features.
 * Everything else in libmoe builds on this header; it knows nothing of models. */
#ifndef MOE_CORE_H
#define MOE_CORE_H

#include <stddef.h>
#include <stdint.h>
#include "moe.h"

/* ---- errors ----------------------------------------------------------------
 * Library code never exits. A failing function records a one-line message
 * (per thread) and returns a moe_status. Callers that add context use
 * moe_error_prefix(). */
moe_status moe_error(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Prepends "prefix: " to the current message; returns code unchanged. */
moe_status moe_error_prefix(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Opens path read-only (retrying on EINTR) and fstat()s it into *sb;
 * "cannot open PATH: reason" on failure (io/file.c). */
struct stat;
moe_status file_open_read(const char *path, int *fd, struct stat *sb);

/* ---- allocation ------------------------------------------------------------
 * 64-byte aligned, counted. Failure injection, for tests (after SQLite's
 * faultsimConfig(nDelay, nRepeat)): moe_alloc_fail_config(after, repeat)
 * makes the after-th next allocation fail, and with it the repeat-1 that
 * follow it (repeat = -1: every later one too, until reconfigured); then
 * allocations succeed again. after = 0 or repeat = 0 switches injection off.
 * It returns the number of failures injected since the previous call. */
void *moe_malloc(size_t bytes);           /* NULL on failure, message set */
void *moe_calloc(size_t count, size_t size); /* zeroed; overflow-checked   */
void *moe_realloc(void *p, size_t bytes);
void moe_free(void *p);                   /* accepts NULL */
char *moe_strdup(const char *s);
/* a*b with overflow check: returns 0 and sets *out on success, -1 on overflow */
int moe_mul_size(size_t a, size_t b, size_t *out);
long moe_alloc_fail_config(long after, long repeat);
void moe_alloc_fail_after(long n);      /* = moe_alloc_fail_config(n, -1); 0 = never fail */
size_t moe_alloc_in_use(void);         /* bytes currently allocated */
size_t moe_alloc_peak(void);

/* ---- RNG: splitmix64-seeded xoshiro256** ---------------------------------- */
typedef struct { uint64_t s[4]; } moe_rng;
void moe_rng_seed(moe_rng *r, uint64_t seed);
uint64_t moe_rng_u64(moe_rng *r);
float moe_rng_uniform(moe_rng *r);        /* [0,1) */
float moe_rng_normal(moe_rng *r);         /* N(0,1), Box-Muller */
uint64_t moe_rng_below(moe_rng *r, uint64_t n); /* [0,n) */

/* ---- time and CPU ----------------------------------------------------------- */
double moe_now(void);                     /* monotonic seconds */
size_t moe_physical_memory(void);         /* bytes of RAM (1 TiB if unknown) */
typedef struct {
    int avx2, fma, avx512f, avx512bw, avx512vl, avx512_bf16, avx512_vnni;
    int amx_tile, amx_bf16, amx_int8;
    int amd; /* vendor AuthenticAMD: its AVX512_BF16 (Zen 4, Zen 5) runs VDPBF16PS at the FMA's rate */
} moe_cpu_features;
const moe_cpu_features *moe_cpu(void);    /* detected once, cached */
/* core/amx.c: 1 when this process may use the AMX tiles (the CPU has them
 * and the kernel granted the tile state; asked once per process), else 0. */
int moe_amx_enable(void);
/* LDTILECFG's 64-byte operand, palette 1: tile t is rows[t] x colsb[t] bytes */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} moe_amx_tilecfg;
/* Loads c into this thread's tile configuration (each thread that uses tiles
 * must). Not the compiler's _tile_loadconfig: GCC 12 tells the optimiser that
 * it reads 8 bytes, so stores to the rest can be dropped (seen: SIGILL).
 * Skipped when c is the configuration this thread loaded last and has not
 * released (LDTILECFG was 2% of a prefill when every tile call loaded it).
 * moe_amx_release ends this thread's tile use (TILERELEASE) and forgets it;
 * code that ends its tile use releases through it, never with _tile_release
 * (the quantised tiles keep theirs loaded between calls). */
void moe_amx_load_config(const moe_amx_tilecfg *c);
void moe_amx_release(void);
/* Kernels use the fast path only when this is nonzero (default: detected;
 * MOE_REFERENCE=1 in the environment or moe_set_reference_kernels(1) forces
 * the scalar reference path). */
int moe_use_fast_kernels(void);
void moe_set_reference_kernels(int on);

/* ---- phase timers (moe train --profile) ------------------------------------
 * Off by default; when on, PROF_RUN(id, statement) adds the statement's wall
 * time to phase id. Called from the main thread only (outside parallel
 * regions), so the table needs no locking. */
typedef enum {
    PROF_EMBED, PROF_NORM, PROF_QKVO, PROF_ROPE, PROF_ATTENTION, PROF_RESIDUAL,
    PROF_ROUTE, PROF_DISPATCH, PROF_EXPERTS, PROF_SHARED, PROF_COMBINE, PROF_DENSE_FFN,
    PROF_LM_HEAD, PROF_LOSS, PROF_ZERO_ACTS, PROF_N_MODEL, /* per pass, fwd and bwd */
    PROF_GRAD_NORM = PROF_N_MODEL, PROF_ADAMW, PROF_DATA, PROF_N
} moe_prof_id;
extern int moe_prof_on;
extern int moe_prof_pass; /* 0 = forward, 1 = backward (model phases) */
void moe_prof_add(int id, double seconds);
#define PROF_RUN(id, stmt)                                                   \
    do {                                                                     \
        double prof_t0_ = moe_prof_on ? moe_now() : 0.0;                     \
        stmt;                                                                \
        if (moe_prof_on) moe_prof_add((id), moe_now() - prof_t0_);           \
    } while (0)

/* For sections that cannot be wrapped: t = moe_prof_start(); ...;
 * moe_prof_lap(id, &t) adds the time since t to id and restarts t. */
static inline double moe_prof_start(void) { return moe_prof_on ? moe_now() : 0.0; }
static inline void moe_prof_lap(int id, double *t) {
    if (moe_prof_on) {
        double now = moe_now();
        moe_prof_add(id, now - *t);
        *t = now;
    }
}

/* zeroes n floats, in parallel when large */
void moe_zero(float *p, size_t n);

#define MOE_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MOE_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
