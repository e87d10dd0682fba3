/* gemm: the GEMM backends behind matmul_forward/backward (matmul.c).
 *
 *     C[M][Nc] (+)= A[M][K] . B[K][Nc]      over strided operands (gemm_desc)
 *
 * One file per backend: gemm_ref.c (portable scalar loops, the test oracle),
 * gemm_avx512.c (fp32 FMA), gemm_avx512_bf16.c (inputs rounded to bf16,
 * VDPBF16PS), gemm_amx_bf16.c (the same on AMX tiles, TDPBF16PS). A backend says whether this CPU can run a desc, how much scratch
 * it wants for it, and runs it in scratch the caller provides (gemm_execute
 * allocates it), so a new unit (AMX tiles, a library) is a new file and a row
 * in the table in matmul.c, not another branch in an existing kernel.
 *
 * Arithmetic every backend keeps: each output element is
 *     c = init ? (bias ? bias[n] : 0) : C(m,n);   c += A(m,k) * B(k,n), k = 0..K-1
 * summed in increasing k. The fp32 backends fuse each step (c = fma(a, b, c)),
 * so they agree bit for bit; the bf16 backends round A and B to bf16 first and
 * sum the exact products in fp32 in an order the unit fixes (VDPBF16PS: pairs
 * in increasing k; AMX: blocks of 32 k in increasing order, each summed as
 * two chains, see gemm_amx_bf16.c), the same for any thread count or batch. */
#ifndef MOE_GEMM_H
#define MOE_GEMM_H
#include <stddef.h>

typedef struct {
    int M, Nc, K;
    const float *A; ptrdiff_t as_m, as_k; /* A(m,k) = A[m*as_m + k*as_k]               */
    const float *B; ptrdiff_t bs_k, bs_n; /* B(k,n) = B[k*bs_k + n*bs_n]; one of them 1 */
    float *Cm; ptrdiff_t ldc;             /* C(m,n) = Cm[m*ldc + n]                     */
    int init;                             /* 1: start from bias (or 0); 0: accumulate  */
    const float *bias;                    /* per column n, used when init              */
    int bf16;                             /* 1: round A and B to bf16                   */
    int pack;                             /* hint: copy a row-major B into panels       */
} gemm_desc;

typedef struct {
    const char *name;
    /* 1 if this CPU has the unit and the backend computes g's precision */
    int (*supports)(const gemm_desc *g);
    /* bytes of scratch run wants for g on nthr threads (0: none) */
    size_t (*workspace)(const gemm_desc *g, int nthr);
    /* runs g on nthr threads in ws (workspace() bytes, 64-byte aligned). With
     * ws NULL it runs without scratch if it can (same bits), else returns -1. */
    int (*run)(const gemm_desc *g, void *ws, int nthr);
} gemm_backend;

extern const gemm_backend gemm_backend_ref, gemm_backend_avx512, gemm_backend_avx512_bf16,
    gemm_backend_amx_bf16;

/* The fastest backend of this CPU for the precision (bf16 0/1), chosen once
 * from the detected features; gemm_backend_ref when no fast one fits. */
const gemm_backend *gemm_pick(int bf16);
/* Every backend this CPU supports for the precision, fastest first; returns
 * the count (at most max). For tests: each is checked against the reference. */
int gemm_available(const gemm_backend **out, int max, int bf16);

/* VDPBF16PS instructions per second over VFMADD231PS instructions per second on
 * this CPU, timed once per call (about 1 at full rate, 0.5 at half rate); 0
 * without AVX512_BF16. */
double gemm_bf16_dot_rate(void);
/* 1 when bf16-input matmuls beat fp32 ones on this CPU: AMX tiles, or AMD's
 * AVX512_BF16 (VDPBF16PS at the FMA's instruction rate; Intel's without AMX
 * runs it at half). Decided from the CPUID, the same in every process. */
int gemm_bf16_pays(void);

/* Runs g with backend b: the trivial shapes (M or Nc empty; K = 0: only the
 * init) here, then b's scratch allocated, b run, the scratch freed. If the
 * allocation fails, b runs without scratch if it can. Returns 0, or -1 when
 * b needs scratch it could not get (the caller falls back to the reference). */
int gemm_execute(const gemm_backend *b, const gemm_desc *g);

/* Threads for one GEMM: all of them for enough work, one inside a parallel
 * region (experts run side by side) or for small work. */
int gemm_threads(const gemm_desc *g);

/* N*C*OC below which OpenMP costs more than it gives */
#define GEMM_SERIAL_WORK 32768.0

/* dbias[j] += sum_n dout[n][j] (dout[N][OC]), summed in double over n in order;
 * shared by the reference and the fast matmul backward. */
void gemm_dbias_accumulate(float *dbias, const float *dout, int N, int OC);
#endif
