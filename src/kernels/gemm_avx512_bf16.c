/* gemm_avx512_bf16: the bf16 GEMM backend: inputs rounded to bfloat16,
 * products summed in fp32 (AVX512_BF16).
 *
 * The tile and task grid of gemm_avx512.c, but both operands are packed as bf16
 * pairs along k and multiplied with VDPBF16PS: each 32-bit lane holds
 * (x[k], x[k+1]) for an even k, and one instruction adds a[k]*b[k] +
 * a[k+1]*b[k+1] into an fp32 accumulator, twice the multiplies of an fp32 FMA.
 * Products of two bf16 are exact in fp32; the sum is rounded in fp32, in
 * increasing k (pairs) order, blocked over k only by storing and reloading C,
 * so the determinism argument of the fp32 backend holds unchanged: any thread
 * count, task split or batch size gives the same bits. An odd K is padded with
 * a zero pair element.
 *
 * Layouts (uint16_t elements, 32-bit words = pairs):
 *   B panel p: word (kp, j) at Bp[(p*Kp + kp)*NR + j]    (NR = 32 columns)
 *   A strip:   word (kp, r) at Ap[kp*MR + r]             (MR = 8 rows)     */
#include "kernels/gemm_avx512.h"
#include "kernels/kernels.h"
#include "core/core.h"

#include <omp.h>
#include <string.h>

#define KCP 256 /* k pairs per block: a B panel slice of KCP*NR words = 32 KB */

uint16_t BF16_TARGET kernels_bf16_hw(float f) {
    __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_set1_ps(f));
    return (uint16_t)_mm256_extract_epi16(v, 0);
}

/* 16 rows of a row-major fp32 block (row i at src + i*ld; rows >= nrows read
 * as zero), their first min(left, 32) values (zero past left) as 16 bf16
 * pairs each, transposed: lane i of r[kp] is pair kp of row i. */
BF16_TARGET static void pairs_transposed(__m512 r[16], const float *src, ptrdiff_t ld, int nrows,
                                         int left) {
    __mmask16 l0 = lanes(left), l1 = lanes(left - 16);
    for (int i = 0; i < 16; i++) {
        if (i >= nrows) {
            r[i] = _mm512_setzero_ps();
            continue;
        }
        const float *sp = src + (ptrdiff_t)i * ld;
        r[i] = _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(cvt16(_mm512_maskz_loadu_ps(l0, sp))),
            cvt16(_mm512_maskz_loadu_ps(l1, sp + 16)), 1));
    }
    transpose16(r);
}

/* Packs panel p of B (gemm_avx512.h); the pad pairs Kp..kp_pad-1 are zero. */
BF16_TARGET void gemm_pack_b_bf16(uint16_t *dst, const gemm_desc *g, int p, int kp_pad) {
    int n0 = p * NR, nr = MOE_MIN(NR, g->Nc - n0), K = g->K, Kp = (K + 1) / 2;
    if (kp_pad > Kp) memset(dst + (size_t)Kp * NR * 2, 0, (size_t)(kp_pad - Kp) * NR * 2 * sizeof(uint16_t));
    if (g->bs_n == 1) { /* row-major B: interleave rows k and k+1 column by column */
        for (int h = 0; h < 2; h++) {
            __mmask16 mk = lanes(nr - h * 16);
            const float *src = g->B + n0 + h * 16;
            for (int kp = 0; kp < Kp; kp++) {
                const float *r0 = src + (ptrdiff_t)(2 * kp) * g->bs_k;
                __m512 x = _mm512_maskz_loadu_ps(mk, r0);
                __m512 y = 2 * kp + 1 < K ? _mm512_maskz_loadu_ps(mk, r0 + g->bs_k)
                                          : _mm512_setzero_ps();
                _mm512_storeu_si512(dst + ((size_t)kp * NR + h * 16) * 2, pairs_interleave(x, y));
            }
        }
        return;
    }
    /* B(k,n) = B[n*bs_n + k]: pairs are adjacent in memory. Convert 16 columns
     * x 16 pairs at a time (masked past K and past the panel's columns, so an
     * odd K gets its zero pad element) and transpose the 32-bit words. */
    uint32_t *d32 = (uint32_t *)dst;
    for (int h = 0; h < 2; h++) {
        int j0 = h * 16, nj = MOE_MAX(0, nr - j0);
        const float *src = g->B + (size_t)(n0 + j0) * g->bs_n;
        for (int kp = 0; kp < Kp; kp += 16) {
            __m512 r[16];
            pairs_transposed(r, src + 2 * kp, g->bs_n, nj, K - 2 * kp);
            int np_ = MOE_MIN(16, Kp - kp);
            for (int i = 0; i < np_; i++)
                _mm512_storeu_ps((float *)(d32 + (size_t)(kp + i) * NR + j0), r[i]);
        }
    }
}

/* A as bf16 pairs in MR-row strips for the micro-kernel: pair kp of row r of
 * a strip at ap[kp*MR + r]; rows past the matrix and an odd kc's pad element
 * are zero.
 * Row-major A: rows [m0,m0+mr) x k [k0,k0+kc), mr <= 2*MR (one or two strips,
 * the second at ap + kcp*MR); each row's pairs are adjacent in memory. */
BF16_TARGET static void pack_a_rows_bf16(uint32_t *ap, const gemm_desc *g, int m0, int mr, int k0,
                                         int kc) {
    /* up to two strips per transpose: rows m0.. (mr <= 2*MR), lanes 0..7 of each
     * result go to the first strip, lanes 8..15 to the second */
    int kcp = (kc + 1) / 2;
    uint32_t *ap2 = ap + (size_t)kcp * MR;
    for (int kp = 0; kp < kcp; kp += 16) {
        __m512 v[16];
        pairs_transposed(v, g->A + (ptrdiff_t)m0 * g->as_m + (ptrdiff_t)(k0 + 2 * kp) * g->as_k,
                         g->as_m, mr, kc - 2 * kp);
        int n = MOE_MIN(16, kcp - kp);
        for (int i = 0; i < n; i++)
            _mm256_storeu_ps((float *)(ap + (size_t)(kp + i) * MR), _mm512_castps512_ps256(v[i]));
        if (mr > MR)
            for (int i = 0; i < n; i++)
                _mm256_storeu_ps((float *)(ap2 + (size_t)(kp + i) * MR),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
    }
}

/* Column-major A (as_m == 1): rows [m0,m1) x k [k0,k0+kc) as MR-row strips,
 * strip s at ap[s*kcp*MR]. Memory rows k and k+1 hold a pair for every A row, so
 * each is read once, left to right, for all the strips. */
BF16_TARGET static void pack_a_cols_bf16(uint32_t *ap, const gemm_desc *g, int m0, int m1, int k0,
                                         int kc) {
    int kcp = (kc + 1) / 2, nstr = (m1 - m0 + MR - 1) / MR;
    for (int kp = 0; kp < kcp; kp++) {
        const float *r0 = g->A + (ptrdiff_t)(k0 + 2 * kp) * g->as_k + m0;
        int has1 = 2 * kp + 1 < kc;
        for (int st = 0; st < nstr; st += 2) { /* two strips: 16 values of each row */
            __mmask16 mk = lanes(m1 - m0 - st * MR);
            __m512 x = _mm512_maskz_loadu_ps(mk, r0 + st * MR);
            __m512 y = has1 ? _mm512_maskz_loadu_ps(mk, r0 + g->as_k + st * MR) : _mm512_setzero_ps();
            __m512i o = pairs_interleave(x, y); /* strip st, then strip st+1 */
            _mm256_storeu_si256((__m256i *)(ap + ((size_t)st * kcp + kp) * MR),
                                _mm512_castsi512_si256(o));
            if (st + 1 < nstr)
                _mm256_storeu_si256((__m256i *)(ap + ((size_t)(st + 1) * kcp + kp) * MR),
                                    _mm512_extracti64x4_epi64(o, 1));
        }
    }
}

/* Micro-kernel: C tile (mr x nr) = (load_c ? C : bias or 0) + A strip . B
 * panel slice, over kcp pairs. */
BF16_TARGET static void ukernel_bf16(int kcp, const uint32_t *ap, const uint16_t *b, float *c,
                                     ptrdiff_t ldc, int mr, int nr, int load_c,
                                     const float *bias) {
    TILE_PROLOGUE
    UK_ROWS(TILE_DECL)
#define UKB_DOT(r)                                                                 \
    {                                                                              \
        __m512bh av = (__m512bh)_mm512_set1_epi32((int)ap[r]);                     \
        c##r##0 = _mm512_dpbf16_ps(c##r##0, av, b0);                               \
        c##r##1 = _mm512_dpbf16_ps(c##r##1, av, b1);                               \
    }
    for (int kp = 0; kp < kcp; kp++, ap += MR, b += 2 * NR) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + NR);
        UK_ROWS(UKB_DOT)
    }
#undef UKB_DOT
    UK_ROWS(TILE_STORE)
}

/* One task of the bf16 GEMM: rows [m0,m1) x panels [p0,p1); Bp holds the
 * packed panels from pbase; ap is this thread's strip scratch (MCB*KCP words). */
BF16_TARGET static void gemm_task_bf16(const gemm_desc *g, const uint16_t *Bp, int pbase,
                                       uint32_t *ap, int m0, int m1, int p0, int p1) {
    enum { PCH = 16 };
    int Kp = (g->K + 1) / 2, cm = g->as_m == 1;
    /* with a single k block the A block is converted once for all the chunks */
    const int one_kb = g->K <= 2 * KCP;
    for (int pc0 = p0; pc0 < p1; pc0 += PCH) {
        int pc1 = MOE_MIN(p1, pc0 + PCH);
        for (int k0 = 0; k0 < g->K; k0 += 2 * KCP) {
            int kc = MOE_MIN(2 * KCP, g->K - k0), kcp = (kc + 1) / 2;
            if (!(one_kb && pc0 > p0)) { /* else packed for the first chunk */
                if (cm)
                    pack_a_cols_bf16(ap, g, m0, m1, k0, kc);
                else
                    for (int m = m0; m < m1; m += 2 * MR)
                        pack_a_rows_bf16(ap + (size_t)(m - m0) * kcp, g, m, MOE_MIN(2 * MR, m1 - m),
                                         k0, kc);
            }
            for (int p = pc0; p < pc1; p++) {
                int n = p * NR, nr = MOE_MIN(NR, g->Nc - n);
                const uint16_t *b = Bp + ((size_t)(p - pbase) * Kp + k0 / 2) * NR * 2;
                for (int m = m0; m < m1; m += MR)
                    ukernel_bf16(kcp, ap + (size_t)(m - m0) * kcp, b, g->Cm + (ptrdiff_t)m * g->ldc + n,
                                 g->ldc, MOE_MIN(MR, m1 - m), nr, !(g->init && k0 == 0),
                                 g->bias ? g->bias + n : NULL);
            }
        }
    }
}

/* The layout of one call: panels converted at a time, the row blocks, and the
 * scratch (uint16 of packed B, uint32 of each thread's A strips). */
typedef struct {
    int np, slab, nrb, mcb, want;
    size_t per, bp, ap;
} bf16_plan;

static void bf16_plan_make(bf16_plan *pl, const gemm_desc *g, int nthr) {
    int Kp = (g->K + 1) / 2;
    pl->np = (g->Nc + NR - 1) / NR;
    pl->per = (size_t)Kp * NR * 2; /* uint16 per packed panel */
    pl->slab = (int)MOE_MAX((size_t)1, 2 * (size_t)SLAB_FLOATS / pl->per);
    if (pl->slab > pl->np) pl->slab = pl->np;
    /* Every task converts its rows of A for each k block, so split rows
     * (blocks of at least 2*MR) before splitting panels: 4 tasks per thread. */
    pl->want = nthr > 1 ? 4 * nthr : 1;
    int nrb = MOE_MAX((g->M + MCB - 1) / MCB, MOE_MIN(pl->want, (g->M + 2 * MR - 1) / (2 * MR)));
    pl->mcb = ((g->M + nrb - 1) / nrb + MR - 1) / MR * MR;
    pl->nrb = (g->M + pl->mcb - 1) / pl->mcb;
    pl->bp = (size_t)pl->slab * pl->per;
    pl->ap = (size_t)nthr * pl->mcb * KCP;
}

static int bf16_supports(const gemm_desc *g) {
    const moe_cpu_features *c = moe_cpu();
    return g->bf16 && c->avx512f && c->avx512_bf16 && c->avx512bw && c->avx512vl;
}

static size_t bf16_workspace(const gemm_desc *g, int nthr) {
    bf16_plan pl;
    bf16_plan_make(&pl, g, nthr);
    return ws_round(pl.bp * sizeof(uint16_t)) + ws_round(pl.ap * sizeof(uint32_t));
}

static int bf16_run(const gemm_desc *g, void *ws, int nthr) {
    if (!ws) return -1;
    bf16_plan pl;
    bf16_plan_make(&pl, g, nthr);
    uint16_t *Bp = ws;
    uint32_t *Ap = (uint32_t *)((char *)ws + ws_round(pl.bp * sizeof(uint16_t)));
    int np = pl.np, slab = pl.slab, nrb = pl.nrb, mcb = pl.mcb, want = pl.want;
    size_t per = pl.per;
    for (int ps = 0; ps < np; ps += slab) {
        int pe = MOE_MIN(np, ps + slab), nps = pe - ps;
        int ppg, groups = panel_groups(want, nrb, nps, &ppg);
        int ntasks = nrb * groups;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
        {
            uint32_t *ap = Ap + (size_t)omp_get_thread_num() * mcb * KCP;
#pragma omp for schedule(static)
            for (int p = ps; p < pe; p++) gemm_pack_b_bf16(Bp + (size_t)(p - ps) * per, g, p, (g->K + 1) / 2);
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                int rb = t / groups, gi = t % groups;
                int m0 = rb * mcb, m1 = MOE_MIN(g->M, m0 + mcb);
                int p0 = ps + gi * ppg, p1 = MOE_MIN(pe, p0 + ppg);
                gemm_task_bf16(g, Bp, ps, ap, m0, m1, p0, p1);
            }
        }
    }
    return 0;
}

const gemm_backend gemm_backend_avx512_bf16 = {"avx512_bf16", bf16_supports, bf16_workspace,
                                               bf16_run};

/* ---- does bf16 pay on this CPU? --------------------------------------------
 * VDPBF16PS does twice the multiplies of an FMA, but only where it issues at
 * the FMA's rate (Zen 4 and Zen 5); Sapphire Rapids and its kin run it at half
 * that, where the bf16 GEMM gains nothing over fp32 (docs/performance.md). The
 * rate is not in CPUID, so it is timed once: the same number of independent
 * VDPBF16PS and VFMADD231PS instructions, the best of several short timings
 * each (about 0.2 ms in all), interleaved so that a slow moment hits
 * both. */
#define RATE_ITERS 4096
/* 16 independent accumulators as named locals, so that they stay in registers
 * (an array of them was kept in memory, which timed loads and stores) */
#define RATE_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define RATE_DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
#define RATE_SUM(i) s = _mm512_add_ps(s, a##i);
#define RATE_DOT(i) a##i = _mm512_dpbf16_ps(a##i, bx, by);
#define RATE_FMA(i) a##i = _mm512_fmadd_ps(a##i, y, x);

/* Seconds for RATE_ITERS x 16 instructions, VDPBF16PS (dot) or VFMADD231PS. */
BF16_TARGET __attribute__((noinline)) static double rate_loop_seconds(int dot) {
    __m512 x = _mm512_set1_ps(1e-3f), y = _mm512_set1_ps(0.999f), s = _mm512_setzero_ps();
    __m512bh bx = _mm512_cvtne2ps_pbh(x, x), by = _mm512_cvtne2ps_pbh(y, y);
    RATE_CHAINS(RATE_DECL)
    double t0 = moe_now();
    if (dot)
        for (int i = 0; i < RATE_ITERS; i++) {
            RATE_CHAINS(RATE_DOT)
        }
    else
        for (int i = 0; i < RATE_ITERS; i++) {
            RATE_CHAINS(RATE_FMA)
        }
    double t = moe_now() - t0;
    RATE_CHAINS(RATE_SUM)
    volatile float sink = _mm512_reduce_add_ps(s); /* keeps the loops */
    (void)sink;
    return t;
}

double gemm_bf16_dot_rate(void) {
    if (!bf16_supports(&(gemm_desc){.bf16 = 1})) return 0;
    double best_dot = 1e30, best_fma = 1e30;
    for (int r = 0; r < 9; r++) {
        double a = rate_loop_seconds(1), b = rate_loop_seconds(0);
        best_dot = a < best_dot ? a : best_dot;
        best_fma = b < best_fma ? b : best_fma;
    }
    return best_dot > 0 ? best_fma / best_dot : 0;
}
