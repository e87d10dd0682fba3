/* core: errors, counted allocation with failure injection, RNG, time, CPU features. */
#include "core/core.h"

#include <cpuid.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>

/* ---- errors ---- */
static _Thread_local char err_msg[512];

moe_status moe_error(moe_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return code;
}

moe_status moe_error_prefix(moe_status code, const char *fmt, ...) {
    char prefix[256], old[sizeof err_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_msg, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof err_msg - 3) n = sizeof err_msg - 3;
    memcpy(err_msg, prefix, n);
    memcpy(err_msg + n, ": ", 2);
    size_t rest = sizeof err_msg - n - 2;
    strncpy(err_msg + n + 2, old, rest - 1);
    err_msg[sizeof err_msg - 1] = 0;
    return code;
}

const char *moe_last_error(void) { return err_msg[0] ? err_msg : "no error"; }

const char *moe_status_str(moe_status s) {
    switch (s) {
    case MOE_OK: return "ok";
    case MOE_ERR_INVALID_ARG: return "invalid argument";
    case MOE_ERR_NOMEM: return "out of memory";
    case MOE_ERR_IO: return "input/output error";
    case MOE_ERR_FORMAT: return "bad file format";
    case MOE_ERR_UNSUPPORTED: return "unsupported";
    case MOE_ERR_NUMERIC: return "numerical error (NaN or Inf)";
    case MOE_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown status";
}

/* ---- allocation ----
 * Each block carries a 64-byte header holding its size, so frees are counted
 * and user memory stays 64-byte aligned (cache lines, AVX-512 loads). */
#define HDR 64
/* All four are read and written only inside the moe_alloc critical section:
 * allocations come from every OpenMP thread. */
static size_t alloc_in_use, alloc_peak;
static long alloc_countdown;  /* >0: the allocation that brings it to 0 fails */
static long alloc_fails_left; /* failures still to inject from there; -1 = no end */
static long alloc_fails_done; /* failures injected since the last configuration */

long moe_alloc_fail_config(long after, long repeat) {
    long done;
#pragma omp critical(moe_alloc)
    {
        done = alloc_fails_done;
        alloc_fails_done = 0;
        int on = after > 0 && repeat != 0;
        alloc_countdown = on ? after : 0;
        alloc_fails_left = on ? repeat : 0;
    }
    return done;
}
void moe_alloc_fail_after(long n) { moe_alloc_fail_config(n, -1); }

size_t moe_alloc_in_use(void) {
    size_t n;
#pragma omp critical(moe_alloc)
    { n = alloc_in_use; }
    return n;
}
size_t moe_alloc_peak(void) {
    size_t n;
#pragma omp critical(moe_alloc)
    { n = alloc_peak; }
    return n;
}

static int injected_failure(void) {
    int fail = 0;
#pragma omp critical(moe_alloc)
    {
        if (alloc_countdown > 0 && --alloc_countdown == 0) {
            fail = 1;
            alloc_fails_done++;
            /* a bounded run of failures ends by switching injection off;
             * otherwise the very next allocation fails too */
            if (alloc_fails_left > 0 && --alloc_fails_left == 0) alloc_countdown = 0;
            else alloc_countdown = 1;
        }
    }
    return fail;
}

static void account(long delta) {
#pragma omp critical(moe_alloc)
    {
        alloc_in_use += (size_t)delta;
        if (alloc_in_use > alloc_peak) alloc_peak = alloc_in_use;
    }
}

void *moe_malloc(size_t bytes) {
    if (bytes > SIZE_MAX - HDR) { moe_error(MOE_ERR_NOMEM, "allocation of %zu bytes overflows", bytes); return NULL; }
    if (injected_failure()) { moe_error(MOE_ERR_NOMEM, "out of memory (injected failure)"); return NULL; }
    void *p = NULL;
    if (posix_memalign(&p, HDR, bytes + HDR) != 0) {
        moe_error(MOE_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    *(size_t *)p = bytes;
    account((long)bytes);
    return (char *)p + HDR;
}

void *moe_calloc(size_t count, size_t size) {
    size_t n;
    if (moe_mul_size(count, size, &n)) { moe_error(MOE_ERR_NOMEM, "allocation size %zu x %zu overflows", count, size); return NULL; }
    void *p = moe_malloc(n);
    if (p) memset(p, 0, n);
    return p;
}

void *moe_realloc(void *p, size_t bytes) {
    if (!p) return moe_malloc(bytes);
    size_t old = *(size_t *)((char *)p - HDR);
    void *q = moe_malloc(bytes);
    if (!q) return NULL;
    memcpy(q, p, old < bytes ? old : bytes);
    moe_free(p);
    return q;
}

void moe_free(void *p) {
    if (!p) return;
    char *base = (char *)p - HDR;
    account(-(long)*(size_t *)base);
    free(base);
}

char *moe_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = moe_malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int moe_mul_size(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

/* ---- RNG: xoshiro256** seeded through splitmix64 ---- */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
void moe_rng_seed(moe_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
uint64_t moe_rng_u64(moe_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl(s[3], 45);
    return result;
}
float moe_rng_uniform(moe_rng *r) { return (float)(moe_rng_u64(r) >> 40) * (1.0f / 16777216.0f); }
float moe_rng_normal(moe_rng *r) {
    /* Box-Muller in double for accuracy; one draw per call keeps state simple */
    double u1 = ((moe_rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (moe_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
uint64_t moe_rng_below(moe_rng *r, uint64_t n) {
    if (n == 0) return 0;
    uint64_t limit = UINT64_MAX - UINT64_MAX % n, x; /* rejection avoids modulo bias */
    do x = moe_rng_u64(r); while (x >= limit);
    return x % n;
}

/* ---- time ---- */
double moe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- CPU features ----
 * Detected once, through pthread_once: the first caller may be any thread of
 * an OpenMP team (expert loop -> matmul -> fast path), so a plain "if (!done)"
 * would race. pthread_once rather than a constructor keeps the detection (and
 * the read of MOE_REFERENCE) at first use, after main() may have set the
 * environment, and works the same in a static library, where nothing would
 * pull in an object holding only a constructor. */
static moe_cpu_features cpu;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;
/* 1: scalar reference kernels only; set from MOE_REFERENCE at first use, then
 * by moe_set_reference_kernels (atomic: kernels read it from any thread) */
static atomic_int force_reference;

static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static void detect_cpu(void) {
    unsigned a, b, c, d;
    moe_cpu_features f = {0};
    if (__get_cpuid(0, &a, &b, &c, &d)) f.amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163; /* "AuthenticAMD" */
    if (__get_cpuid_max(0, NULL) >= 7 && __get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1;
        unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
        int ymm_ok = (xcr0 & 6) == 6, zmm_ok = (xcr0 & 0xe6) == 0xe6;
        int amx_ok = (xcr0 & (3ull << 17)) == (3ull << 17);
        f.fma = ((c >> 12) & 1) && ymm_ok;
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = ((b >> 5) & 1) && ymm_ok;
        f.avx512f = ((b >> 16) & 1) && zmm_ok;
        f.avx512bw = ((b >> 30) & 1) && zmm_ok;
        f.avx512vl = ((b >> 31) & 1) && zmm_ok;
        f.avx512_vnni = ((c >> 11) & 1) && zmm_ok;
        f.amx_bf16 = ((d >> 22) & 1) && amx_ok;
        f.amx_tile = ((d >> 24) & 1) && amx_ok;
        f.amx_int8 = ((d >> 25) & 1) && amx_ok;
        __cpuid_count(7, 1, a, b, c, d);
        f.avx512_bf16 = ((a >> 5) & 1) && zmm_ok;
    }
    cpu = f;
    const char *e = getenv("MOE_REFERENCE");
    atomic_store(&force_reference, e && *e && strcmp(e, "0") != 0);
}

const moe_cpu_features *moe_cpu(void) {
    pthread_once(&cpu_once, detect_cpu);
    return &cpu;
}

void moe_set_reference_kernels(int on) {
    pthread_once(&cpu_once, detect_cpu); /* so a later first use cannot undo this */
    atomic_store(&force_reference, on != 0);
}

int moe_use_fast_kernels(void) {
    const moe_cpu_features *c = moe_cpu();
    if (atomic_load_explicit(&force_reference, memory_order_relaxed)) return 0;
    return c->avx512f && c->fma;
}

/* Zeroing large buffers is memory-bound: split it over the threads. */
void moe_zero(float *p, size_t n) {
    enum { CHUNK = 1 << 15 };
    if (n < 4 * CHUNK) { memset(p, 0, n * sizeof(float)); return; }
    size_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * CHUNK, len = MOE_MIN((size_t)CHUNK, n - lo);
        memset(p + lo, 0, len * sizeof(float));
    }
}

size_t moe_physical_memory(void) {
    /* MOE_PHYSICAL_MEMORY=BYTES pretends the machine has that much (tests of
     * the load-time memory check, and users sharing a machine) */
    const char *env = getenv("MOE_PHYSICAL_MEMORY");
    if (env && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        if (!*end && v > 0) return (size_t)v;
    }
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return (pages > 0 && size > 0) ? (size_t)pages * (size_t)size : (size_t)1 << 40;
}

/* ---- phase timers ---- */
int moe_prof_on = 0;
int moe_prof_pass = 0;
static double prof_t[2][PROF_N];
static const char *const prof_names[PROF_N] = {
    [PROF_EMBED] = "embedding", [PROF_NORM] = "rmsnorm", [PROF_QKVO] = "q/k/v/o matmuls",
    [PROF_ROPE] = "rope", [PROF_ATTENTION] = "attention", [PROF_RESIDUAL] = "residual adds/copies",
    [PROF_ROUTE] = "moe routing", [PROF_DISPATCH] = "moe dispatch (gather)",
    [PROF_EXPERTS] = "moe experts", [PROF_SHARED] = "moe shared experts",
    [PROF_COMBINE] = "moe combine", [PROF_DENSE_FFN] = "dense ffn", [PROF_LM_HEAD] = "lm head",
    [PROF_LOSS] = "cross-entropy", [PROF_ZERO_ACTS] = "zeroing gradient buffers",
    [PROF_GRAD_NORM] = "gradient norm", [PROF_ADAMW] = "adamw (clip, update, zero grads)",
    [PROF_DATA] = "data sampling",
};

void moe_prof_add(int id, double seconds) {
    if (id >= 0 && id < PROF_N) prof_t[id < PROF_N_MODEL ? moe_prof_pass : 0][id] += seconds;
}

void moe_profile(int on) {
    memset(prof_t, 0, sizeof prof_t);
    moe_prof_pass = 0;
    moe_prof_on = on;
}

void moe_profile_report(char *buf, size_t cap) {
    if (!buf || !cap) return;
    buf[0] = 0;
    double total = 0;
    for (int p = 0; p < 2; p++)
        for (int i = 0; i < PROF_N; i++) total += prof_t[p][i];
    size_t len = 0;
#define OUT(...)                                                                   \
    do {                                                                           \
        if (len < cap) {                                                           \
            int n_ = snprintf(buf + len, cap - len, __VA_ARGS__);                  \
            if (n_ > 0) len += (size_t)n_;                                         \
        }                                                                          \
    } while (0)
    OUT("%-28s %10s %6s\n", "phase", "seconds", "share");
    /* forward phases, backward phases, then the optimizer's (kept in pass 0) */
    static const char *const pass[3] = {"fwd ", "bwd ", "opt "};
    for (int p = 0; p < 3; p++)
        for (int i = p < 2 ? 0 : PROF_N_MODEL; i < (p < 2 ? PROF_N_MODEL : PROF_N); i++) {
            double t = prof_t[p < 2 ? p : 0][i];
            if (t <= 0) continue;
            char name[48];
            snprintf(name, sizeof name, "%s%s", pass[p], prof_names[i]);
            OUT("%-28s %10.3f %5.1f%%\n", name, t, total > 0 ? 100 * t / total : 0);
        }
    OUT("%-28s %10.3f\n", "total timed", total);
#undef OUT
}
