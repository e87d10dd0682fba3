/* gemm_amx_bf16: the bf16 GEMM backend on AMX tiles (Sapphire Rapids and
 * later): inputs rounded to bfloat16 (round to nearest even, VCVTNEPS2BF16
 * as in gemm_avx512_bf16.c), products summed in fp32 by TDPBF16PS.
 *
 * One TDPBF16PS adds A[16][32 bf16] . B[32][16] into a 16 x 16 fp32 tile. The
 * kernel keeps a 32 x 32 block of C in four accumulator tiles (tmm0-3: rows
 * 0-15 / 16-31 x columns 0-15 / 16-31), and for each block of 16 k pairs
 * loads two A tiles (tmm4, tmm5) and two B tiles (tmm6, tmm7) and issues four
 * products. C is read into the accumulators once (from C when accumulating,
 * from the bias or zero when init) and written once, after the whole K.
 *
 * Arithmetic (measured on Sapphire Rapids; tests/test_gemm.c checks it bit
 * for bit against a scalar model): each tile product, i.e. each block of 32 k
 * starting at a multiple of 32, sums its even-k and its odd-k products in two
 * fp32 chains in increasing k and adds (even + odd) to C. So a sum is its init
 * followed by its k blocks in increasing order, fixed by K alone: any thread
 * count, task split or batch size gives the same bits (threads are
 * partitioned by output). K is padded with zero pairs to a multiple of 32;
 * an exact 0 product leaves a chain unchanged. VDPBF16PS (gemm_avx512_bf16)
 * adds each pair into one chain instead, so the two backends differ in the
 * last bits of most elements (57% of them on the test's shapes), both within
 * the rounding bound of a K-term fp32 sum. Both flush denormal inputs and
 * results to zero whatever MXCSR says.
 *
 * Layouts (uint16_t elements):
 *   B: the panels of gemm_pack_b_bf16 (NR = 32 columns, Kpp pairs each); the
 *      B tile of pairs kb*16.. and columns h*16.. of panel p starts at word
 *      (kb*16)*NR + h*16 of the panel, row stride NR words = 128 bytes.
 *   A: strips of 16 rows; tile kb of strip s (rows 16s.., k 32kb..) is 16 rows
 *      of 32 bf16, contiguous (1 KB), at Ap[(s*nkb + kb)*512].
 * Ragged edges: A rows and B columns past the matrix are packed as zero;
 * partial C tiles go through a 1 KB staging buffer per tile, full ones are
 * loaded and stored in place (row stride ldc).
 *
 * The unit needs the kernel's permission to use the tile data state
 * (arch_prctl ARCH_REQ_XCOMP_PERM, once per process); without it (an old
 * kernel, or valgrind, which does not know AMX either) the backend is
 * unsupported and the bf16 matmuls use gemm_avx512_bf16. Each thread loads
 * the tile configuration at the start of its work and releases it at the end. */
#include "kernels/gemm_avx512.h"
#include "kernels/kernels.h"

#include <omp.h>
#include <string.h>

#define AMX_TARGET \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))


enum {
    TK = 16,            /* k pairs per tile product */
    TILE_U16 = 16 * 32, /* uint16 per A tile */
    A_BYTES = 256 << 10 /* bound of a thread's packed A rows */
};

/* ---- tile configuration: all eight tiles 16 rows x 64 bytes ---- */
static void tiles_configure(void) {
    moe_amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    moe_amx_load_config(&cfg);
}

/* ---- packing A ---- */

/* Strip of rows [m0, m0+nr) (nr <= 16, rows past nr zero) over nkb k blocks. */
AMX_TARGET static void pack_a_strip(uint16_t *dst, const gemm_desc *g, int m0, int nr, int nkb) {
    int K = g->K;
    if (g->as_m != 1) { /* row-major: each row's k values are adjacent */
        for (int r = 0; r < 16; r++) {
            const float *src = r < nr ? g->A + (ptrdiff_t)(m0 + r) * g->as_m : NULL;
            for (int kb = 0; kb < nkb; kb++) {
                int k0 = kb * 2 * TK;
                __m512i v = _mm512_setzero_si512();
                if (r < nr && k0 < K)
                    v = _mm512_inserti64x4(
                        _mm512_castsi256_si512(cvt16(_mm512_maskz_loadu_ps(lanes(K - k0), src + k0))),
                        cvt16(_mm512_maskz_loadu_ps(lanes(K - k0 - 16), src + k0 + 16)), 1);
                _mm512_storeu_si512(dst + (size_t)kb * TILE_U16 + r * 32, v);
            }
        }
        return;
    }
    /* column-major: memory rows k and k+1 give one pair of every row; 16 such
     * pair vectors transposed are the tile's 16 rows */
    __mmask16 mk = lanes(nr);
    for (int kb = 0; kb < nkb; kb++) {
        __m512 v[16];
        for (int kp = 0; kp < TK; kp++) {
            int k = kb * 2 * TK + 2 * kp;
            const float *r0 = g->A + (ptrdiff_t)k * g->as_k + m0;
            __m512 x = k < K ? _mm512_maskz_loadu_ps(mk, r0) : _mm512_setzero_ps();
            __m512 y = k + 1 < K ? _mm512_maskz_loadu_ps(mk, r0 + g->as_k) : _mm512_setzero_ps();
            v[kp] = _mm512_castsi512_ps(pairs_interleave(x, y));
        }
        transpose16(v);
        for (int r = 0; r < 16; r++) _mm512_storeu_ps(dst + (size_t)kb * TILE_U16 + r * 32, v[r]);
    }
}

/* ---- C tiles in and out ---- */

/* The 16 x 16 sub-block of C at (m, n) with vr x vc valid elements into
 * stage (row stride 16 floats): its current values or the bias rows; zero
 * outside. */
AMX_TARGET static void stage_in(float *stage, const gemm_desc *g, int m, int n, int vr, int vc) {
    __mmask16 mk = lanes(vc);
    __m512 b = g->init && g->bias ? _mm512_maskz_loadu_ps(mk, g->bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < 16; r++) {
        __m512 v = _mm512_setzero_ps();
        if (r < vr) v = g->init ? b : _mm512_maskz_loadu_ps(mk, g->Cm + (ptrdiff_t)(m + r) * g->ldc + n);
        _mm512_storeu_ps(stage + r * 16, v);
    }
}

AMX_TARGET static void stage_out(const float *stage, const gemm_desc *g, int m, int n, int vr,
                                 int vc) {
    __mmask16 mk = lanes(vc);
    for (int r = 0; r < vr; r++)
        _mm512_mask_storeu_ps(g->Cm + (ptrdiff_t)(m + r) * g->ldc + n, mk,
                              _mm512_loadu_ps(stage + r * 16));
}

/* tile T <- C sub-block (m, n): in place when whole and accumulating, zero for
 * a bias-free init, else through stage */
#define C_IN(T, m, n, vr, vc, stage)                                                    \
    do {                                                                                \
        if ((vr) == 16 && (vc) == 16 && !g->init)                                       \
            _tile_loadd(T, g->Cm + (ptrdiff_t)(m) * g->ldc + (n), g->ldc * 4);          \
        else if (g->init && !g->bias)                                                   \
            _tile_zero(T);                                                              \
        else {                                                                          \
            stage_in(stage, g, m, n, vr, vc);                                           \
            _tile_loadd(T, stage, 64);                                                  \
        }                                                                               \
    } while (0)
#define C_OUT(T, m, n, vr, vc, stage)                                                   \
    do {                                                                                \
        if ((vr) == 16 && (vc) == 16)                                                   \
            _tile_stored(T, g->Cm + (ptrdiff_t)(m) * g->ldc + (n), g->ldc * 4);         \
        else {                                                                          \
            _tile_stored(T, stage, 64);                                                 \
            stage_out(stage, g, m, n, vr, vc);                                          \
        }                                                                               \
    } while (0)

/* C rows [m, m+32) x columns [n, n+32) (clipped to the matrix) += the A strip
 * pair at a (second strip at a + nkb tiles) . panel b, over nkb k blocks;
 * stage: 4 x 256 floats. */
AMX_TARGET static void block_32x32(const gemm_desc *g, const uint16_t *a, const uint16_t *b,
                                   int nkb, int m, int n, float *stage) {
    int vr0 = MOE_MIN(16, g->M - m), vr1 = MOE_MIN(16, g->M - m - 16);
    int vc0 = MOE_MIN(16, g->Nc - n), vc1 = MOE_MIN(16, g->Nc - n - 16);
    int r2 = vr1 > 0, c2 = vc1 > 0; /* the second row strip / column half exist */
    const uint16_t *a1 = a + (size_t)nkb * TILE_U16;
    C_IN(0, m, n, vr0, vc0, stage);
    if (c2) C_IN(1, m, n + 16, vr0, vc1, stage + 256);
    if (r2) C_IN(2, m + 16, n, vr1, vc0, stage + 512);
    if (r2 && c2) C_IN(3, m + 16, n + 16, vr1, vc1, stage + 768);
    for (int kb = 0; kb < nkb; kb++) {
        const uint16_t *bk = b + (size_t)kb * TK * NR * 2;
        _tile_loadd(4, a + (size_t)kb * TILE_U16, 64);
        _tile_loadd(6, bk, NR * 4);
        if (c2) _tile_loadd(7, bk + 32, NR * 4);
        if (r2) _tile_loadd(5, a1 + (size_t)kb * TILE_U16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (c2) _tile_dpbf16ps(1, 4, 7);
        if (r2) _tile_dpbf16ps(2, 5, 6);
        if (r2 && c2) _tile_dpbf16ps(3, 5, 7);
    }
    C_OUT(0, m, n, vr0, vc0, stage);
    if (c2) C_OUT(1, m, n + 16, vr0, vc1, stage + 256);
    if (r2) C_OUT(2, m + 16, n, vr1, vc0, stage + 512);
    if (r2 && c2) C_OUT(3, m + 16, n + 16, vr1, vc1, stage + 768);
}

/* ---- plan and run ---- */

/* The layout of one call: k blocks, panels packed at a time (slab), row
 * blocks of mcb rows (a multiple of 32), the scratch in uint16 (packed B, and
 * each thread's packed A rows followed by its C staging). */
typedef struct {
    int nkb, np, slab, nrb, mcb, want;
    size_t per, bp, thr;
} amx_plan;

static void amx_plan_make(amx_plan *pl, const gemm_desc *g, int nthr) {
    int kpp = ((g->K + 1) / 2 + TK - 1) / TK * TK;
    pl->nkb = kpp / TK;
    pl->np = (g->Nc + NR - 1) / NR;
    pl->per = (size_t)kpp * NR * 2;
    pl->slab = (int)MOE_MAX((size_t)1, 2 * (size_t)SLAB_FLOATS / pl->per);
    if (pl->slab > pl->np) pl->slab = pl->np;
    /* rows before panels, as in gemm_avx512_bf16.c: each task packs its rows */
    int mcb_max = (int)MOE_MAX(32, MOE_MIN(128, A_BYTES / ((size_t)kpp * 4) / 32 * 32));
    pl->want = nthr > 1 ? 4 * nthr : 1;
    int nrb = MOE_MAX((g->M + mcb_max - 1) / mcb_max, MOE_MIN(pl->want, (g->M + 31) / 32));
    pl->mcb = ((g->M + nrb - 1) / nrb + 31) / 32 * 32;
    pl->nrb = (g->M + pl->mcb - 1) / pl->mcb;
    pl->bp = (size_t)pl->slab * pl->per;
    pl->thr = (size_t)pl->mcb * kpp * 2 + 4 * 256 * 2; /* A rows + 4 KB of staging */
}

static int amx_supports(const gemm_desc *g) {
    const moe_cpu_features *c = moe_cpu();
    if (!(g->bf16 && c->amx_tile && c->amx_bf16 && c->avx512f && c->avx512bw && c->avx512vl &&
          c->avx512_bf16))
        return 0;
    return moe_amx_enable();
}

static size_t amx_workspace(const gemm_desc *g, int nthr) {
    amx_plan pl;
    amx_plan_make(&pl, g, nthr);
    return ws_round(pl.bp * sizeof(uint16_t)) + (size_t)nthr * ws_round(pl.thr * sizeof(uint16_t));
}

/* One task: rows [m0,m1) x panels [p0,p1) of the slab from pbase in Bp. */
AMX_TARGET static void amx_task(const gemm_desc *g, const amx_plan *pl, const uint16_t *Bp,
                                int pbase, uint16_t *ap, float *stage, int m0, int m1, int p0,
                                int p1) {
    int nkb = pl->nkb;
    for (int m = m0; m < m1; m += 16)
        pack_a_strip(ap + (size_t)(m - m0) / 16 * nkb * TILE_U16, g, m, MOE_MIN(16, m1 - m), nkb);
    for (int p = p0; p < p1; p++) {
        const uint16_t *b = Bp + (size_t)(p - pbase) * pl->per;
        for (int m = m0; m < m1; m += 32)
            block_32x32(g, ap + (size_t)(m - m0) / 16 * nkb * TILE_U16, b, nkb, m, p * NR, stage);
    }
}

AMX_TARGET static int amx_run(const gemm_desc *g, void *ws, int nthr) {
    if (!ws || !amx_supports(g)) return -1; /* the permission, if no one asked yet */
    amx_plan pl;
    amx_plan_make(&pl, g, nthr);
    uint16_t *Bp = ws;
    char *thr_base = (char *)ws + ws_round(pl.bp * sizeof(uint16_t));
    size_t thr_bytes = ws_round(pl.thr * sizeof(uint16_t));
    int kpp = pl.nkb * TK;
    for (int ps = 0; ps < pl.np; ps += pl.slab) {
        int pe = MOE_MIN(pl.np, ps + pl.slab);
        int ppg, groups = panel_groups(pl.want, pl.nrb, pe - ps, &ppg);
        int ntasks = pl.nrb * groups;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
        {
            uint16_t *ap = (uint16_t *)(thr_base + (size_t)omp_get_thread_num() * thr_bytes);
            float *stage = (float *)(ap + (size_t)pl.mcb * kpp * 2);
#pragma omp for schedule(static)
            for (int p = ps; p < pe; p++) gemm_pack_b_bf16(Bp + (size_t)(p - ps) * pl.per, g, p, kpp);
            tiles_configure();
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                int rb = t / groups, gi = t % groups;
                int m0 = rb * pl.mcb, m1 = MOE_MIN(g->M, m0 + pl.mcb);
                int p0 = ps + gi * ppg, p1 = MOE_MIN(pe, p0 + ppg);
                amx_task(g, &pl, Bp, ps, ap, stage, m0, m1, p0, p1);
            }
            moe_amx_release();
        }
    }
    return 0;
}

const gemm_backend gemm_backend_amx_bf16 = {"amx_bf16", amx_supports, amx_workspace, amx_run};
