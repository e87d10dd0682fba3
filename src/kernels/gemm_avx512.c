/* gemm_avx512: the fp32 GEMM backend, AVX-512 FMA.
 *
 * A register-blocked GEMM: MR x NR = 8 x 32 tile held in 16 zmm accumulators,
 * A broadcast, B read as NR-wide panels, B repacked per call into contiguous
 * panels when that pays off (always when B is column-major, as the forward
 * pass's w). Outer loops: tasks of up to 128 rows (row blocks split evenly) x
 * panel groups run on OpenMP threads; inside, chunks of 512 columns, k blocks
 * of 256 (the B slice stays in L1). A column-major A (dw) is packed into MR-row
 * strips: all of it once per call when tasks split a row block's panels, else
 * per task. All scratch comes from one workspace (f32_plan sizes it); without
 * one, a row-major B and a column-major A are read in place, same arithmetic.
 *
 * Determinism. Every output element is computed as
 *     c = init;  for k = 0 .. K-1 in order:  c = fma(a[k], b[k], c)
 * where init is the bias (or 0) or the current value of C (accumulating).
 * Blocking over k only stores and reloads c between blocks, which is exact,
 * and the tile an element lands in does not change its arithmetic (partial
 * tiles are zero-padded, not handled by a different kernel). So results are
 * identical for any thread count, any task split, and any M: a token's output
 * row does not depend on which or how many other rows are in the batch; and
 * they equal gemm_backend_ref's bit for bit. */
#include "kernels/gemm_avx512.h"

#include <omp.h>
#include <string.h>

#define KC 256  /* k block: a B panel slice of KC*NR floats = 32 KB stays in L1
                    (128 and 192 measured no better in the training step) */
#define APF_FLOATS (4u << 20)  /* bound for packing all of a column-major A: 16 MB */

/* Micro-kernel: C[mr][nr] tile = (load_c ? C : bias row or 0) + A rows (mr of MR
 * valid) . B panel (nr of NR valid).
 * a points at A(m0,k0); b at the panel's first k row, rows ldb apart; rows of the
 * tile past mr re-read row 0 of A and are discarded, so no special edge kernel. */
__attribute__((target("avx512f,fma"))) static void
ukernel(int kc, const float *a, ptrdiff_t as_m, ptrdiff_t as_k, int mr, const float *b,
        ptrdiff_t ldb, float *c, ptrdiff_t ldc, int nr, int load_c, const float *bias) {
    TILE_PROLOGUE
    UK_ROWS(TILE_DECL)
#define UK_AROW(r) const float *a##r = a + (r < mr ? r : 0) * as_m;
    UK_ROWS(UK_AROW)
#undef UK_AROW
    if (!load_c) /* the tile is only stored at the end: fetch its lines for writing now */
        for (int r = 0; r < mr; r++) {
            __builtin_prefetch(c + (ptrdiff_t)r * ldc, 1);
            __builtin_prefetch(c + (ptrdiff_t)r * ldc + 16, 1);
        }
#define UK_FMA(r)                                                                  \
    {                                                                              \
        __m512 av = _mm512_set1_ps(a##r[ko]);                                      \
        c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                                \
        c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);                                \
    }
    ptrdiff_t ko = 0;
    if (nr == NR) {
        for (int k = 0; k < kc; k++, ko += as_k, b += ldb) {
            __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
            UK_ROWS(UK_FMA)
        }
    } else {
        for (int k = 0; k < kc; k++, ko += as_k, b += ldb) {
            __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
            UK_ROWS(UK_FMA)
        }
    }
#undef UK_FMA
    UK_ROWS(TILE_STORE)
}


/* Packs panel p (columns p*NR .. +NR, zero-padded) of B over all K into
 * dst[k*NR + j]. */
__attribute__((target("avx512f"))) static void pack_panel(float *dst, const gemm_desc *g, int p) {
    int n0 = p * NR, nr = MOE_MIN(NR, g->Nc - n0), K = g->K;
    if (g->bs_n == 1) { /* rows of B are contiguous: copy NR-wide strips */
        __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
        const float *src = g->B + n0;
        for (int k = 0; k < K; k++, src += g->bs_k, dst += NR) {
            _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m0, src));
            _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + 16));
        }
        return;
    }
    /* B(k,n) = B[n*bs_n + k]: columns of B are contiguous rows in memory
     * (the forward pass's w): transpose 16x16 blocks. */
    for (int h = 0; h < 2; h++) {
        int j0 = h * 16, nj = nr - j0;
        if (nj <= 0) {
            for (int k = 0; k < K; k++) memset(dst + (size_t)k * NR + j0, 0, 16 * sizeof(float));
            continue;
        }
        const float *src = g->B + (size_t)(n0 + j0) * g->bs_n;
        int k = 0;
        if (nj == 16) {
            for (; k + 16 <= K; k += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (size_t)i * g->bs_n + k);
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)(k + i) * NR + j0, r[i]);
            }
        }
        for (; k < K; k++) {
            float *d = dst + (size_t)k * NR + j0;
            for (int j = 0; j < 16; j++) d[j] = j < nj ? src[(size_t)j * g->bs_n + k] : 0.0f;
        }
    }
}

/* Packs k rows [k0,k1) of panels [ps,pe) of a row-major B (bs_n == 1) into
 * the slab layout of pack_panel (dst holds panel ps first). Reads whole rows of
 * B in order, which streams better than one NR-wide strip at a time. */
__attribute__((target("avx512f"))) static void pack_rows(float *dst, const gemm_desc *g, int ps,
                                                         int pe, int k0, int k1) {
    int nfull = MOE_MIN(pe, g->Nc / NR); /* panels without padding */
    size_t pstride = (size_t)g->K * NR;
    for (int k = k0; k < k1; k++) {
        const float *src = g->B + (ptrdiff_t)k * g->bs_k;
        float *d = dst + (size_t)k * NR;
        int p = ps;
        for (; p < nfull; p++) {
            float *dp = d + (size_t)(p - ps) * pstride;
            _mm512_storeu_ps(dp, _mm512_loadu_ps(src + p * NR));
            _mm512_storeu_ps(dp + 16, _mm512_loadu_ps(src + p * NR + 16));
        }
        for (; p < pe; p++) {
            int nr = g->Nc - p * NR;
            __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
            float *dp = d + (size_t)(p - ps) * pstride;
            _mm512_storeu_ps(dp, _mm512_maskz_loadu_ps(m0, src + p * NR));
            _mm512_storeu_ps(dp + 16, _mm512_maskz_loadu_ps(m1, src + p * NR + 16));
        }
    }
}

/* Packs rows [m0,m0+mr) x k [k0,k0+kc) of a column-major A (as_m == 1) into
 * ap[k*MR + r], rows past mr zero. */
__attribute__((target("avx512f"))) static void pack_a_cols(float *ap, const gemm_desc *g, int m0,
                                                           int mr, int k0, int kc) {
    const float *src = g->A + (ptrdiff_t)k0 * g->as_k + m0;
    __mmask16 mk = lanes(mr);
    for (int k = 0; k < kc; k++, src += g->as_k, ap += MR) {
        _mm256_storeu_ps(ap, _mm512_castps512_ps256(_mm512_maskz_loadu_ps(mk, src)));
    }
}

/* Packs strips [s0,s1) (MR rows each) of a column-major A (as_m == 1) over
 * all K: k block k0 (kc long) of strip s goes to dst[k0*Mp + s*kc*MR + k*MR + r]
 * with Mp = MR * (number of strips), rows past M zero. So within a k block the
 * strips are contiguous (no cache-set aliasing between them). Two strips at a
 * time read whole 64-byte rows of A. */
__attribute__((target("avx512f"))) static void pack_a_strips(float *dst, const gemm_desc *g,
                                                             int s0, int s1) {
    int K = g->K;
    size_t Mp = (size_t)((g->M + MR - 1) / MR) * MR;
    for (int s = s0; s < s1; s += 2) {
        int m0 = s * MR, rows = MOE_MIN(2 * MR, g->M - m0);
        if (s + 1 >= s1) rows = MOE_MIN(rows, MR);
        __mmask16 mk = lanes(rows);
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = MOE_MIN(KC, K - k0);
            float *d0 = dst + (size_t)k0 * Mp + (size_t)s * kc * MR;
            float *d1 = d0 + (size_t)kc * MR;
            const float *src = g->A + (ptrdiff_t)k0 * g->as_k + m0;
            if (rows > MR) {
                for (int k = 0; k < kc; k++, src += g->as_k) {
                    __m512 v = _mm512_maskz_loadu_ps(mk, src);
                    _mm256_storeu_ps(d0 + (size_t)k * MR, _mm512_castps512_ps256(v));
                    _mm256_storeu_ps(d1 + (size_t)k * MR, _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                                              _mm512_castps_pd(v), 1)));
                }
            } else {
                for (int k = 0; k < kc; k++, src += g->as_k)
                    _mm256_storeu_ps(d0 + (size_t)k * MR,
                                     _mm512_castps512_ps256(_mm512_maskz_loadu_ps(mk, src)));
            }
        }
    }
}

/* One task: rows [m0,m1) x panels [p0,p1) of C. Bp holds the packed panels
 * starting at panel pbase (NULL: read B directly, only when bs_n == 1).
 * A column-major A is read from Apf (all of A packed once per call, layout of
 * pack_a_strips) if non-NULL, else packed per k block into Ap (this thread's
 * MCB*KC floats), else (both NULL) read in place. */
static void gemm_task(const gemm_desc *g, const float *Bp, int pbase, const float *Apf, float *Ap,
                      int m0, int m1, int p0, int p1) {
    /* column chunks of PCH panels keep the C block (MCB x PCH*NR floats,
     * 256 KB) in L2 across the k blocks */
    enum { PCH = 16 };
    size_t Mp = (size_t)((g->M + MR - 1) / MR) * MR;
    for (int pc0 = p0; pc0 < p1; pc0 += PCH) {
        int pc1 = MOE_MIN(p1, pc0 + PCH);
        for (int k0 = 0; k0 < g->K; k0 += KC) {
            int kc = MOE_MIN(KC, g->K - k0);
            if (Ap) /* cheap (contiguous strips): redone per chunk */
                for (int m = m0; m < m1; m += MR)
                    pack_a_cols(Ap + (size_t)(m - m0) * kc, g, m, MOE_MIN(MR, m1 - m), k0, kc);
            for (int p = pc0; p < pc1; p++) {
                int n = p * NR, nr = MOE_MIN(NR, g->Nc - n);
                const float *b;
                ptrdiff_t ldb;
                if (Bp) {
                    b = Bp + ((size_t)(p - pbase) * g->K + k0) * NR;
                    ldb = NR;
                } else {
                    b = g->B + (ptrdiff_t)k0 * g->bs_k + n;
                    ldb = g->bs_k;
                }
                for (int m = m0; m < m1; m += MR) {
                    int mr = MOE_MIN(MR, m1 - m);
                    float *c = g->Cm + (ptrdiff_t)m * g->ldc + n;
                    int load_c = !(g->init && k0 == 0);
                    const float *bias = g->bias ? g->bias + n : NULL;
                    if (Apf)
                        ukernel(kc, Apf + (size_t)k0 * Mp + (size_t)m * kc, 1, MR, mr, b, ldb, c,
                                g->ldc, nr, load_c, bias);
                    else if (Ap)
                        ukernel(kc, Ap + (size_t)(m - m0) * kc, 1, MR, mr, b, ldb, c, g->ldc, nr,
                                load_c, bias);
                    else
                        ukernel(kc, g->A + (ptrdiff_t)m * g->as_m + (ptrdiff_t)k0 * g->as_k,
                                g->as_m, g->as_k, mr, b, ldb, c, g->ldc, nr, load_c, bias);
                }
            }
        }
    }
}

/* The layout of one call: panels packed at a time, the task grid, and the
 * scratch (floats) for packed B, all of a packed column-major A (Apf), or each
 * thread's per-task A strips (Ap). */
typedef struct {
    int np, slab, nrb, mcb, want;
    size_t bp, apf, ap;
} f32_plan;

static void f32_plan_make(f32_plan *pl, const gemm_desc *g, int nthr) {
    memset(pl, 0, sizeof *pl);
    pl->np = (g->Nc + NR - 1) / NR;
    pl->slab = pl->np;
    if (g->pack || g->bs_n != 1) {
        size_t per = (size_t)g->K * NR;
        pl->slab = (int)MOE_MAX((size_t)1, SLAB_FLOATS / per);
        if (pl->slab > pl->np) pl->slab = pl->np;
        pl->bp = (size_t)pl->slab * per;
    }
    /* task grid: row blocks x panel groups; enough tasks to balance the threads */
    int nrb = (g->M + MCB - 1) / MCB;
    int want = nthr > 1 ? 8 * nthr : 1;
    if (g->as_m == 1 && nthr > 1 && nrb < 2 * nthr && g->M >= 4 * MR * nthr) {
        /* column-major A: split rows (blocks of at least 4 strips) rather than
         * panels, so that no two tasks pack the same rows of A */
        nrb = MOE_MIN((g->M + 4 * MR - 1) / (4 * MR), 2 * nthr);
        want = nrb;
    }
    pl->mcb = ((g->M + nrb - 1) / nrb + MR - 1) / MR * MR; /* even split, <= MCB */
    pl->nrb = (g->M + pl->mcb - 1) / pl->mcb;
    pl->want = want;
    /* A column-major (dw = dout^T . in): pack MR-row strips so the kernel reads
     * A contiguously. When panel groups split a row block across tasks, pack all
     * of A once (else every task would repack it); otherwise each task packs its
     * rows per k block. */
    size_t nstrips = (size_t)(g->M + MR - 1) / MR;
    if (g->as_m == 1 && g->M > 1) {
        int groups0 = MOE_MIN((want + pl->nrb - 1) / pl->nrb, pl->slab);
        if ((groups0 > 1 || pl->slab < pl->np) && nstrips * MR * g->K <= APF_FLOATS)
            pl->apf = nstrips * MR * g->K;
        else
            pl->ap = (size_t)nthr * MCB * KC;
    }
}

static int f32_supports(const gemm_desc *g) {
    return !g->bf16 && moe_cpu()->avx512f && moe_cpu()->fma;
}

static size_t f32_workspace(const gemm_desc *g, int nthr) {
    f32_plan pl;
    f32_plan_make(&pl, g, nthr);
    return ws_round(pl.bp * sizeof(float)) + ws_round(pl.apf * sizeof(float)) +
           ws_round(pl.ap * sizeof(float));
}

static int f32_run(const gemm_desc *g, void *ws, int nthr) {
    f32_plan pl;
    f32_plan_make(&pl, g, nthr);
    float *Bp = NULL, *Ap = NULL, *Apf = NULL;
    if (ws) {
        char *p = ws;
        if (pl.bp) Bp = (float *)p, p += ws_round(pl.bp * sizeof(float));
        if (pl.apf) Apf = (float *)p, p += ws_round(pl.apf * sizeof(float));
        if (pl.ap) Ap = (float *)p;
    } else {
        if (g->bs_n != 1) return -1; /* a column-major B has to be packed */
        pl.slab = pl.np;             /* read B and A in place */
    }
    int np = pl.np, slab = pl.slab, nrb = pl.nrb, mcb = pl.mcb, want = pl.want;
    int nstrips = (g->M + MR - 1) / MR;
    if (Apf) {
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
        for (int s = 0; s < nstrips; s += 2) pack_a_strips(Apf, g, s, MOE_MIN(nstrips, s + 2));
    }
    for (int ps = 0; ps < np; ps += slab) {
        int pe = MOE_MIN(np, ps + slab), nps = pe - ps;
        int ppg, groups = panel_groups(want, nrb, nps, &ppg);
        int ntasks = nrb * groups;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
        {
            float *ap = Ap ? Ap + (size_t)omp_get_thread_num() * MCB * KC : NULL;
            if (Bp && g->bs_n == 1) {
                enum { KR = 64 };
#pragma omp for schedule(static)
                for (int k = 0; k < g->K; k += KR)
                    pack_rows(Bp, g, ps, pe, k, MOE_MIN(g->K, k + KR));
            } else if (Bp) {
#pragma omp for schedule(static)
                for (int p = ps; p < pe; p++) pack_panel(Bp + (size_t)(p - ps) * g->K * NR, g, p);
            }
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                int rb = t / groups, gi = t % groups;
                int m0 = rb * mcb, m1 = MOE_MIN(g->M, m0 + mcb);
                int p0 = ps + gi * ppg, p1 = MOE_MIN(pe, p0 + ppg);
                gemm_task(g, Bp, ps, Apf, ap, m0, m1, p0, p1);
            }
        }
    }
    return 0;
}

const gemm_backend gemm_backend_avx512 = {"avx512", f32_supports, f32_workspace, f32_run};
