/* test_qkern: the AVX-512 tiles and activation converters of qmatmul
 * (kernels/quant_avx512.c) against the portable code in core/dtype.c, bit for
 * bit: the portable vec_dot emulates llama.cpp's x86 lanes and the fast
 * kernels must do the same float operations in the same order. Every weight
 * type, rows of one to several blocks (and f16/bf16 tails), N in
 * {1,2,3,4,5,8,15,16,17}, ragged output counts, random and extreme values;
 * each output also equals its row computed alone (N = 1). Skipped where the
 * CPU lacks the units. Also: MOE_KERNELS=portable and MOE_REFERENCE select
 * the portable path; and, when MOE_GGML_CPU_LIB names a llama.cpp build's
 * libggml-cpu.so (built for this CPU), the portable converters and vec_dots
 * against its own, bit for bit: the independent oracle for the order. */
#include "harness.h"
#include "core/core.h"
#include "core/dtype.h"
#include "kernels/kernels.h"
#include "kernels/qmatmul.h"
#include "moe/moe_layer.h"
#include "moe.h"

#include <dlfcn.h>
#include <omp.h>
#include <stdint.h>
#include <sys/wait.h>

enum { MAXN = 17, MAXOC = 33, MAXC = 1088 };

static const int types[] = {DT_Q8_0, DT_Q4_0, DT_Q4_K, DT_Q5_K, DT_Q6_K, DT_F16, DT_BF16};
#define N_TYPES (int)(sizeof types / sizeof types[0])

static float f32_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* one activation row: kind 0 normal, 1 tiny, 2 huge, 3 mixed extremes
 * (zeros, +-max float, subnormals, exact ties of the Q8_0 rounding) */
static void fill_act(float *x, int n, int kind, moe_rng *r) {
    for (int i = 0; i < n; i++) {
        float v = moe_rng_normal(r);
        switch (kind) {
        case 1: v *= 1e-30f; break;
        case 2: v *= 1e30f; break;
        case 3: {
            int k = (int)moe_rng_below(r, 8);
            v = k == 0 ? 0.0f : k == 1 ? 3.0e38f : k == 2 ? -3.0e38f : k == 3 ? f32_of(0x00000123u)
              : k == 4 ? 127.0f : k == 5 ? -63.5f : k == 6 ? 0.5f : v;
            break;
        }
        default: break;
        }
        x[i] = v;
    }
}

/* weights: kind 0 from quantised normals, 1 random quants with sane
 * scales, 2 random bytes everywhere (any quants, -128 included; fp16 scales
 * from subnormal to about 2, kept finite: NaN payloads are not compared).
 * f16/bf16: kinds 1 and 2 are random bits below 2 in magnitude, subnormals
 * included. */
static void fill_weights(int type, uint8_t *w, int rows, int C, int kind, moe_rng *r) {
    const dtype_traits *t = dtype_traits_of(type);
    size_t rb;
    dtype_row_bytes(type, C, &rb);
    static float src[MAXC];
    for (int o = 0; o < rows; o++) {
        uint8_t *row = w + (size_t)o * rb;
        for (int i = 0; i < C; i++) src[i] = moe_rng_normal(r) * 0.5f;
        t->from_float(row, src, C);
        if (kind == 0) continue;
        for (size_t i = 0; i < rb; i++) {
            size_t in_blk = i % t->block_bytes;
            int scale = type == DT_Q6_K ? in_blk >= 208 : in_blk < 4;
            if (t->blck == 1) {
                row[i] = (uint8_t)moe_rng_u64(r);
                if (i % 2) row[i] &= 0xbf;
            } else if (!scale) {
                row[i] = (uint8_t)moe_rng_u64(r);
            } else if (kind == 2) {
                row[i] = (uint8_t)moe_rng_u64(r);
                if (in_blk % 2) row[i] &= 0xbf; /* high byte of an fp16: exponent < 16 */
            }
        }
    }
}

/* the fast path can run here: the CPU has it and MOE_KERNELS does not forbid it */
static int fast_ok(void) {
    const char *e = getenv("MOE_KERNELS");
    return qk_avx512_supported() && !(e && strcmp(e, "portable") == 0);
}
#define SKIP_REASON (qk_avx512_supported() ? "MOE_KERNELS=portable in the environment" \
                                           : "no AVX-512 (F/BW/VL/VNNI/BF16)")

/* qmatmul takes a blocked Q8_0 prefill path (MOE_Q8_0_PREFILL=vec_dot says no) */
static int blocked_ok(void) {
    const char *q = getenv("MOE_Q8_0_PREFILL");
    return fast_ok() && !(q && strcmp(q, "vec_dot") == 0);
}
/* the AMX-INT8 path can run here (the CPU has it, the tiles were granted) */
static int amx_ok(void) {
    const char *a = getenv("MOE_AMX");
    return blocked_ok() && qk_amx_q8_0_supported() && !(a && strcmp(a, "0") == 0);
}

static int same_bits(const float *a, const float *b, size_t n) { return !memcmp(a, b, n * sizeof(float)); }

/* qmatmul on 1 thread into got and on 2 into two; 1 when they agree bit for bit */
static int same_on_1_and_2_threads(float *got, float *two, const float *in, const void *w, int type, int N, int C,
                                   int OC, void *ws) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    qmatmul_forward(got, in, w, type, N, C, OC, ws);
    omp_set_num_threads(2);
    qmatmul_forward(two, in, w, type, N, C, OC, ws);
    omp_set_num_threads(saved);
    return same_bits(got, two, (size_t)N * OC);
}

static void test_tiles(void) {
    static float in[MAXN * MAXC], fast[MAXN * MAXOC], port[MAXN * MAXOC], alone[MAXOC];
    static uint8_t w[MAXOC * MAXC * 2 + 64];
    const int Ns[] = {1, 2, 3, 4, 5, 8, 15, 16, 17}, OCs[] = {1, 3, 17, 33};
    moe_rng r;
    moe_rng_seed(&r, 77);
    qmatmul_allow_blocked(0); /* the exact path at every N; the AMX path is tested on its own */
    for (int ti = 0; ti < N_TYPES; ti++) {
        int type = types[ti];
        const dtype_traits *t = dtype_traits_of(type), *at = dtype_traits_of(t->dot_type);
        char name[96];
        snprintf(name, sizeof name, "avx512 %s: = portable vec_dot bit for bit, any N, row alone", t->name);
        TEST_CASE(name);
        if (!fast_ok()) {
            TEST_SKIP("%s", SKIP_REASON);
            continue;
        }
        /* lengths: 1 .. several blocks; f16/bf16 with tails past 64 */
        int Cs[5];
        if (t->blck == 1) Cs[0] = 16, Cs[1] = 64, Cs[2] = 100, Cs[3] = 576, Cs[4] = 1087;
        else if (t->blck == 32) Cs[0] = 32, Cs[1] = 64, Cs[2] = 96, Cs[3] = 352, Cs[4] = 1056;
        else Cs[0] = 256, Cs[1] = 512, Cs[2] = 768, Cs[3] = 1024, Cs[4] = 256;
        int bad_port = 0, bad_dot = 0, bad_alone = 0, shapes = 0;
        for (int ci = 0; ci < 5; ci++)
            for (int ni = 0; ni < 9; ni++) {
                int C = Cs[ci], N = Ns[ni], OC = OCs[(ci + ni) % 4];
                int wkind = (ci + ni) % 3, akind = (ni + 2 * ci) % 4;
                size_t rb, arow;
                dtype_row_bytes(type, C, &rb);
                dtype_row_bytes(t->dot_type, C, &arow);
                fill_weights(type, w, OC, C, wkind, &r);
                for (int n = 0; n < N; n++) fill_act(in + (size_t)n * C, C, (akind + n) % 4, &r);
                size_t wsb = qmatmul_workspace(type, N, C);
                void *ws = moe_malloc(wsb);
                uint8_t *act = moe_malloc(arow);
                moe_set_reference_kernels(0);
                qmatmul_forward(fast, in, w, type, N, C, OC, ws);
                moe_set_reference_kernels(1);
                qmatmul_forward(port, in, w, type, N, C, OC, ws);
                moe_set_reference_kernels(0);
                if (!same_bits(fast, port, (size_t)N * OC) && bad_port++ < 3)
                    for (int i = 0; i < N * OC; i++)
                        if (memcmp(&fast[i], &port[i], 4)) {
                            printf("  C %d N %d OC %d [%d][%d]: fast %.9g portable %.9g\n", C, N, OC,
                                   i / OC, i % OC, fast[i], port[i]);
                            break;
                        }
                for (int n = 0; n < N; n++) {
                    /* the oracle itself: the portable converter and vec_dot */
                    at->quantize_act(act, in + (size_t)n * C, C);
                    for (int o = 0; o < OC; o++) {
                        float want = t->vec_dot(w + (size_t)o * rb, act, C);
                        if (memcmp(&want, &fast[(size_t)n * OC + o], 4)) bad_dot++;
                    }
                    qmatmul_forward(alone, in + (size_t)n * C, w, type, 1, C, OC, ws);
                    if (!same_bits(alone, fast + (size_t)n * OC, (size_t)OC)) bad_alone++;
                }
                moe_free(ws);
                moe_free(act);
                shapes++;
            }
        CHECK(bad_port == 0, "%d of %d shapes: fast != portable", bad_port, shapes);
        CHECK(bad_dot == 0, "%d outputs != the portable vec_dot", bad_dot);
        CHECK(bad_alone == 0, "%d rows differ from the row computed alone", bad_alone);
        TEST_END();
    }
    qmatmul_allow_blocked(1);
}

/* AMX-INT8 Q8_0: = its plain-C twin (qmatmul_q8_0_blocked_ref) bit for bit
 * on ragged N and OC, through qmatmul_forward where N >= 16 and through the
 * kernel itself below; within the fp32 rounding bound of the exact product
 * of the dequantised operands (qmatmul_forward_ref, in double); and the same
 * bits on 1 and 2 threads. */
static void test_blocked(const char *name, qmm_blocked_fn kernel, int available, const char *why_not, int picked) {
    TEST_CASE(name);
    if (!available) {
        TEST_SKIP("%s", why_not);
        return;
    }
    enum { AN = 64, AOC = 70, AC = 1056 };
    static float in[AN * AC], got[AN * AOC], twin[AN * AOC], ref[AN * AOC], two[AN * AOC];
    static float wf[AC], af[AC];
    static uint8_t w[AOC * AC * 2], act[AC * 2];
    const int Ns[] = {0, 1, 15, 16, 17, 31, 33, 48, 64}, OCs[] = {1, 3, 16, 17, 33, 70};
    const int Cs[] = {32, 64, 96, 352, 1056};
    moe_rng r;
    moe_rng_seed(&r, 21);
    int bad_twin = 0, bad_bound = 0, bad_thr = 0, shapes = 0;
    const dtype_traits *t = dtype_traits_of(DT_Q8_0);
    for (int ci = 0; ci < 5; ci++)
        for (int ni = 0; ni < 9; ni++) {
            const int C = Cs[ci], N = Ns[ni], OC = OCs[(ci + ni) % 6], nb = C / 32;
            size_t rb;
            dtype_row_bytes(DT_Q8_0, C, &rb);
            fill_weights(DT_Q8_0, w, OC, C, (ci + ni) % 3, &r);
            for (int n = 0; n < N; n++) fill_act(in + (size_t)n * C, C, (ni + n) % 3, &r);
            void *ws = moe_malloc(qmatmul_workspace(DT_Q8_0, N, C) + 1);
            if (N >= QMM_AMX_MIN_ROWS && picked) {
                if (!same_on_1_and_2_threads(got, two, in, w, DT_Q8_0, N, C, OC, ws)) bad_thr++;
            } else { /* below the threshold qmatmul keeps vec_dot (or picks the other kernel): call it */
                for (int n = 0; n < N; n++) qk_q8_0_blocked_pack(ws, in + (size_t)n * C, n, N, C);
                for (int o = 0; o < OC; o += 16)
                    kernel(got + o, (size_t)OC, w + (size_t)o * rb, rb, OC - o < 16 ? OC - o : 16, ws, N, C);
            }
            qmatmul_q8_0_blocked_ref(twin, in, w, N, C, OC);
            qmatmul_forward_ref(ref, in, w, DT_Q8_0, N, C, OC);
            if (!same_bits(got, twin, (size_t)N * OC) && bad_twin++ < 3)
                for (int i = 0; i < N * OC; i++)
                    if (memcmp(&got[i], &twin[i], 4)) {
                        printf("  C %d N %d OC %d [%d][%d]: kernel %.9g twin %.9g\n", C, N, OC, i / OC,
                               i % OC, got[i], twin[i]);
                        break;
                    }
            /* one rounding per block fma and per scale product, of at most
             * the sum of |terms| so far: (2 nb + 1) 2^-24 sum |w a| */
            for (int n = 0; n < N; n++) {
                t->quantize_act(act, in + (size_t)n * C, C);
                t->to_float(af, act, C);
                for (int o = 0; o < OC; o++) {
                    t->to_float(wf, w + (size_t)o * rb, C);
                    double s = 0;
                    for (int k = 0; k < C; k++) s += fabs((double)wf[k] * af[k]);
                    double e = fabs((double)got[(size_t)n * OC + o] - ref[(size_t)n * OC + o]);
                    /* huge rows overflow the fp16 scales: no finite product to bound */
                    if (isfinite(s) && isfinite(ref[(size_t)n * OC + o]) &&
                        !(e <= (2.0 * nb + 1) * 0x1p-24 * s + 1e-37))
                        bad_bound++;
                }
            }
            moe_free(ws);
            shapes++;
        }
    CHECK(bad_twin == 0, "%d of %d shapes: kernel != blocked twin", bad_twin, shapes);
    CHECK(bad_bound == 0, "%d outputs outside the rounding bound of the exact product", bad_bound);
    CHECK(bad_thr == 0, "%d shapes differ between 1 and 2 threads", bad_thr);
    TEST_END();
}

/* The repacked layouts (Q8_0_R8, Q4_K_R4: rows regrouped at load): the
 * packing keeps every row's bytes; qmatmul on the packed rows gives the bits
 * it gives on the rows themselves, on the portable path and the fast one,
 * decode and (Q8_0) blocked prefill, 1 and 2 threads; a shape it cannot
 * hold gives NaN. */
/* outputs a kernel must write: NaN first, so that one it skips cannot pass */
static void poison(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = NAN;
}

static void test_repacked(int rtype) {
    enum { RN = 40, ROC = 72, RC = 1056 };
    static float in[RN * RC], want[RN * ROC], got[RN * ROC], two[RN * ROC];
    static uint8_t w[ROC * RC * 2], wr[ROC * RC * 2], row[RC * 2];
    const int base = dtype_base_type(rtype), gr = dtype_group_rows(rtype), q8 = base == DT_Q8_0;
    const int Ns[] = {0, 1, 2, 3, 4, 5, 15, 16, 17, 40};
    const int OCs[] = {gr, 2 * gr, 3 * gr, 72};
    const int Cs8[] = {32, 64, 96, 352, 1056}, CsK[] = {256, 512, 768, 1024, 256};
    const int *Cs = q8 ? Cs8 : CsK;
    moe_rng r;
    moe_rng_seed(&r, 808 + rtype);
    char name[160];
    snprintf(name, sizeof name, "%s: packing keeps every row; qmatmul = %s bit for bit (portable, fast,%s threads)",
             dtype_name(rtype), dtype_name(base), q8 ? " blocked," : "");
    TEST_CASE(name);
    int bad_row = 0, bad_port = 0, bad_fast = 0, bad_blocked = 0, bad_thr = 0, bad_ref = 0, shapes = 0;
    for (int ci = 0; ci < 5; ci++)
        for (int ni = 0; ni < 10; ni++) {
            const int C = Cs[ci], N = Ns[ni], OC = OCs[(ci + ni) % 4];
            size_t rb;
            dtype_row_bytes(base, C, &rb);
            fill_weights(base, w, OC, C, (ci + ni) % 3, &r);
            for (int n = 0; n < N; n++) fill_act(in + (size_t)n * C, C, (ni + n) % 4, &r);
            CHECK(dtype_repack(rtype, wr, w, OC, C) == 0, "pack refused %d x %d", OC, C);
            for (int o = 0; o < OC; o++) {
                dtype_repacked_row(rtype, row, wr, o, C);
                if (memcmp(row, w + (size_t)o * rb, rb)) bad_row++;
            }
            void *ws = moe_malloc(qmatmul_workspace(rtype, N, C) + 1);
            /* the rows' vec_dot order: portable and fast */
            qmatmul_allow_blocked(0);
            moe_set_reference_kernels(1);
            qmatmul_forward(want, in, w, base, N, C, OC, ws);
            poison(got, N * OC);
            qmatmul_forward(got, in, wr, rtype, N, C, OC, ws);
            if (!same_bits(want, got, (size_t)N * OC)) bad_port++;
            moe_set_reference_kernels(0);
            if (fast_ok()) {
                poison(got, N * OC);
                qmatmul_forward(got, in, wr, rtype, N, C, OC, ws);
                if (!same_bits(want, got, (size_t)N * OC) && bad_fast++ < 3)
                    printf("  C %d N %d OC %d: fast %s != %s\n", C, N, OC, dtype_name(rtype), dtype_name(base));
            }
            qmatmul_allow_blocked(1);
            /* blocked prefill: qmatmul where it takes it, else the kernel itself */
            if (fast_ok() && q8) {
                qmatmul_q8_0_blocked_ref(want, in, w, N, C, OC);
                if (N >= QMM_AMX_MIN_ROWS && blocked_ok()) {
                    poison(got, N * OC);
                    if (!same_on_1_and_2_threads(got, two, in, wr, rtype, N, C, OC, ws)) bad_thr++;
                    if (!same_bits(want, got, (size_t)N * OC) && bad_blocked++ < 3)
                        printf("  C %d N %d OC %d: qmatmul's blocked q8_0_r8 != blocked twin\n", C, N, OC);
                }
                /* and each kernel this CPU has, called itself at every N */
                const qmm_blocked_fn kern[2] = {qk_avx512_q8_0_r8_blocked_tile, amx_ok() ? qk_amx_q8_0_r8_tile : NULL};
                for (int k = 0; k < 2 && kern[k]; k++) {
                    poison(got, N * OC);
                    for (int n = 0; n < N; n++) qk_q8_0_blocked_pack(ws, in + (size_t)n * C, n, N, C);
                    for (int o = 0; o < OC; o += 16)
                        kern[k](got + o, (size_t)OC, wr + (size_t)o * rb, rb, OC - o < 16 ? OC - o : 16, ws, N, C);
                    if (!same_bits(want, got, (size_t)N * OC) && bad_blocked++ < 3)
                        printf("  C %d N %d OC %d: %s q8_0_r8 != blocked twin\n", C, N, OC, k ? "amx" : "vnni");
                }
            } else if (fast_ok() && N > 0) { /* the fast path on 1 and 2 threads */
                if (!same_on_1_and_2_threads(got, two, in, wr, rtype, N, C, OC, ws)) bad_thr++;
            }
            qmatmul_forward_ref(want, in, w, base, N, C, OC);
            poison(got, N * OC);
            qmatmul_forward_ref(got, in, wr, rtype, N, C, OC);
            if (!same_bits(want, got, (size_t)N * OC)) bad_ref++;
            moe_free(ws);
            shapes++;
        }
    CHECK(bad_row == 0, "%d rows changed by packing", bad_row);
    CHECK(bad_port == 0, "%d of %d shapes: portable %s != %s", bad_port, shapes, dtype_name(rtype), dtype_name(base));
    CHECK(bad_fast == 0, "%d of %d shapes: fast %s != %s", bad_fast, shapes, dtype_name(rtype), dtype_name(base));
    CHECK(bad_blocked == 0, "%d of %d shapes: blocked q8_0_r8 != the blocked twin", bad_blocked, shapes);
    CHECK(bad_thr == 0, "%d shapes differ between 1 and 2 threads", bad_thr);
    CHECK(bad_ref == 0, "%d shapes: the reference differs between the layouts", bad_ref);
    /* shapes the layout cannot hold: rows not a whole group, a row not whole blocks */
    const int C0 = Cs[0];
    CHECK(dtype_repack(rtype, wr, w, gr + 2, C0) == -1 && dtype_repack(rtype, wr, w, gr, C0 + 16) == -1 &&
          dtype_repack(DT_Q8_0, wr, w, 8, 64) == -1, "repack took a bad shape or type");
    {
        void *ws = moe_malloc(qmatmul_workspace(rtype, 1, C0) + 1);
        qmatmul_forward(got, in, wr, rtype, 1, C0, gr + 2, ws);
        int nan = 0;
        for (int o = 0; o < gr + 2; o++) nan += isnan(got[o]) != 0;
        CHECK(nan == gr + 2, "OC %d: %d outputs NaN", gr + 2, nan);
        moe_free(ws);
    }
    CHECK(!dtype_usable(rtype) && dtype_repacked_type(base) == rtype && dtype_group_rows(base) == 1, "%s traits",
          dtype_name(rtype));
    if (!fast_ok()) printf("  fast paths of %s not checked: %s\n", dtype_name(rtype), SKIP_REASON);
    TEST_END();
}

/* 1 vs 2 threads on a prefill shape: outputs are split by rows only */
static void test_threads(void) {
    TEST_CASE("avx512: 1 and 2 threads give the same bits (q4_K, q8_0; N 17, OC 70)");
    if (!fast_ok()) {
        TEST_SKIP("%s", SKIP_REASON);
        return;
    }
    enum { N = 17, OC = 70, C = 512 };
    static float in[N * C], o1[N * OC], o2[N * OC];
    static uint8_t w[OC * C * 2];
    moe_rng r;
    moe_rng_seed(&r, 3);
    int saved = omp_get_max_threads(), bad = 0;
    const int tt[] = {DT_Q4_K, DT_Q8_0};
    for (int k = 0; k < 2; k++) {
        fill_weights(tt[k], w, OC, C, 0, &r);
        fill_act(in, N * C, 0, &r);
        void *ws = moe_malloc(qmatmul_workspace(tt[k], N, C));
        omp_set_num_threads(1);
        qmatmul_forward(o1, in, w, tt[k], N, C, OC, ws);
        omp_set_num_threads(2);
        qmatmul_forward(o2, in, w, tt[k], N, C, OC, ws);
        if (!same_bits(o1, o2, (size_t)N * OC)) bad++;
        moe_free(ws);
    }
    omp_set_num_threads(saved);
    CHECK(bad == 0, "%d types differ between thread counts", bad);
    TEST_END();
}

/* the fast converters write the portable bytes, extremes included */
static void test_quantize(void) {
    static float x[4096];
    static uint8_t a[4096 * 2], b[4096 * 2];
    const int dt[] = {DT_Q8_0, DT_Q8_K};
    moe_rng r;
    moe_rng_seed(&r, 11);
    for (int k = 0; k < 2; k++) {
        const dtype_traits *t = dtype_traits_of(dt[k]);
        char name[96];
        snprintf(name, sizeof name, "avx512 %s act: = portable bytes (random, ties, NaN, inf, zeros)", t->name);
        TEST_CASE(name);
        qmm_quant_fn fast = qk_avx512_quantize(dt[k]);
        if (!qk_avx512_supported() || !fast) {
            TEST_SKIP("%s", SKIP_REASON);
            continue;
        }
        int bad = 0;
        for (int trial = 0; trial < 200; trial++) {
            int n = 4096;
            fill_act(x, n, trial % 4, &r);
            if (trial % 5 == 4) /* specials in a few places */
                for (int s = 0; s < 6; s++) {
                    uint32_t sp[] = {0x7fc00000u, 0xffc00001u, 0x7f800000u, 0xff800000u, 0x80000000u, 0};
                    x[moe_rng_below(&r, n)] = f32_of(sp[moe_rng_below(&r, 6)]);
                }
            if (trial % 7 == 6) memset(x, 0, 256 * sizeof(float)); /* an all-zero block */
            size_t rb;
            dtype_row_bytes(dt[k], n, &rb);
            memset(a, 0x55, rb);
            memset(b, 0xaa, rb);
            t->quantize_act(a, x, n);
            fast(b, x, n);
            if (memcmp(a, b, rb)) bad++;
        }
        CHECK(bad == 0, "%d of 200 rows differ", bad);
        TEST_END();
    }
}

/* MOE_KERNELS is read once, at first use: checked in a child that sets it
 * before anything asks */
static void test_env(void) {
    TEST_CASE("MOE_KERNELS=portable and MOE_REFERENCE=1 select the portable path");
    pid_t pid = fork();
    if (pid == 0) {
        setenv("MOE_KERNELS", "portable", 1);
        _exit(strcmp(moe_cpu_kernels(), "portable") == 0 ? 0 : 1);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "MOE_KERNELS=portable not honoured");
    moe_set_reference_kernels(1);
    CHECK(strcmp(moe_cpu_kernels(), "portable") == 0, "reference kernels forced, got %s",
          moe_cpu_kernels());
    moe_set_reference_kernels(0);
    const char *want = !fast_ok() ? "portable" : amx_ok() ? "amx-int8+avx512-vnni" : "avx512-vnni";
    CHECK(strcmp(moe_cpu_kernels(), want) == 0, "detected %s, want %s", moe_cpu_kernels(), want);
    TEST_END();
}

/* llama.cpp's CPU library, loaded at run time when the environment names it */
typedef void (*ggml_dot_fn)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y,
                            size_t by, int nrc);
typedef void (*ggml_quant_fn)(const float *x, void *y, int64_t k);
static void test_llama(void) {
    TEST_CASE("portable vec_dot and converters = llama.cpp's libggml-cpu, bit for bit");
    const char *lib = getenv("MOE_GGML_CPU_LIB");
    void *h = lib && *lib ? dlopen(lib, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!h) {
        TEST_SKIP("%s", lib && *lib ? "MOE_GGML_CPU_LIB does not load"
                                    : "set MOE_GGML_CPU_LIB to a llama.cpp libggml-cpu.so");
        return;
    }
    void (*init)(void) = (void (*)(void))dlsym(h, "ggml_cpu_init");
    ggml_quant_fn q80 = (ggml_quant_fn)dlsym(h, "quantize_row_q8_0");
    ggml_quant_fn q8k = (ggml_quant_fn)dlsym(h, "quantize_row_q8_K");
    const char *names[N_TYPES] = {"ggml_vec_dot_q8_0_q8_0", "ggml_vec_dot_q4_0_q8_0",
                                  "ggml_vec_dot_q4_K_q8_K", "ggml_vec_dot_q5_K_q8_K",
                                  "ggml_vec_dot_q6_K_q8_K", "ggml_vec_dot_f16", "ggml_vec_dot_bf16"};
    int missing = !init || !q80 || !q8k, bad_dot = 0, bad_act = 0, n_dots = 0;
    if (init) init(); /* fp16 tables */
    static float x[MAXC];
    static uint8_t w[MAXC * 2], a[MAXC * 2], b[MAXC * 2];
    moe_rng r;
    moe_rng_seed(&r, 5);
    for (int ti = 0; ti < N_TYPES && !missing; ti++) {
        const dtype_traits *t = dtype_traits_of(types[ti]), *at = dtype_traits_of(t->dot_type);
        ggml_dot_fn f = (ggml_dot_fn)dlsym(h, names[ti]);
        if (!f) { missing = 1; break; }
        /* A native build on a CPU with AVX512_FP16 (Sapphire Rapids) takes
         * vec.cpp's __AVX512FP16__ branch: f16 products summed in half
         * precision, not the fp32 lanes we emulate (nor those of any other
         * x86 build) */
        if (types[ti] == DT_F16 && __builtin_cpu_supports("avx512fp16")) {
            printf("  f16 not compared: this CPU has AVX512_FP16, whose ggml vec_dot_f16 sums in fp16\n");
            continue;
        }
        for (int trial = 0; trial < 100; trial++) {
            int blk = t->blck == 1 ? 64 : t->blck, n = blk * (1 + (int)moe_rng_below(&r, MAXC / blk));
            if (t->blck == 1 && trial % 3 == 0 && n + 63 <= MAXC) n += (int)moe_rng_below(&r, 63);
            fill_weights(types[ti], w, 1, n, trial % 3, &r);
            fill_act(x, n, trial % 3, &r); /* no inf in f16: its NaNs are not compared */
            at->quantize_act(a, x, n);
            if (t->dot_type == DT_Q8_0 || t->dot_type == DT_Q8_K) {
                size_t rb;
                dtype_row_bytes(t->dot_type, n, &rb);
                (t->dot_type == DT_Q8_0 ? q80 : q8k)(x, b, n);
                if (memcmp(a, b, rb)) bad_act++;
            }
            float ours = t->vec_dot(w, a, n), theirs = 0;
            f(n, &theirs, 0, w, 0, a, 0, 1);
            if (memcmp(&ours, &theirs, 4) && bad_dot++ < 3)
                printf("  %s n %d: ours %.9g, llama.cpp %.9g\n", t->name, n, ours, theirs);
            n_dots++;
        }
    }
    CHECK(!missing, "a symbol is missing from %s", lib);
    CHECK(bad_dot == 0, "%d of %d dots differ", bad_dot, n_dots);
    CHECK(bad_act == 0, "%d activation rows differ", bad_act);
    TEST_END();
    dlclose(h);
}

/* The MoE layer's experts with Q8_0 weights: the kernel is chosen by the
 * layer's token count, not by an expert's rows. Ragged per-expert rows
 * (0, 1, 15, 16, 17, 33, 2); in a batch of >= 16 tokens every expert's
 * output is the blocked twin's (qmatmul_q8_0_blocked_ref: gate, up, SwiGLU,
 * down), in a batch below 16 (decode) the exact vec_dot path's; the same
 * bits on 1 and 2 threads. Without AMX the prefill case is skipped. */
static void test_moe_batch(void) {
    TEST_CASE("moe experts, q8_0: prefill batch -> blocked twin at any expert rows, decode -> vec_dot, threads");
    if (!fast_ok()) { TEST_SKIP("%s", SKIP_REASON); return; }
    enum { E = 7, D = 96, F = 64, R = 84 };
    const int prefill_counts[E] = {0, 1, 15, 16, 17, 33, 2}, decode_counts[E] = {1, 0, 2, 0, 0, 1, 0};
    size_t rbd, rbf;
    dtype_row_bytes(DT_Q8_0, D, &rbd);
    dtype_row_bytes(DT_Q8_0, F, &rbf);
    static uint8_t gate[E * F * 128], up[E * F * 128], down[E * D * 128];
    static float hg[R * F], hu[R * F], act[R * F], want[R * D], one[R * D];
    moe_rng rng;
    moe_rng_seed(&rng, 5);
    fill_weights(DT_Q8_0, gate, E * F, D, 0, &rng);
    fill_weights(DT_Q8_0, up, E * F, D, 0, &rng);
    fill_weights(DT_Q8_0, down, E * D, F, 0, &rng);
    moe_weights wt = {.gate = gate, .up = up, .down = down, .gate_t = DT_Q8_0, .up_t = DT_Q8_0,
                      .down_t = DT_Q8_0};
    const int saved = omp_get_max_threads();
    for (int pass = 0; pass < 2; pass++) {
        const int prefill = pass == 0, *counts = prefill ? prefill_counts : decode_counts;
        if (prefill && !blocked_ok()) { printf("  prefill case skipped: MOE_Q8_0_PREFILL=vec_dot\n"); continue; }
        int rows = 0;
        for (int e = 0; e < E; e++) rows += counts[e];
        const int N = prefill ? rows : 4; /* the layer's tokens (k = 1: one row each when prefill) */
        moe_cache c;
        if (moe_cache_init(&c, R, D, E, 1, F, 0, MOE_ROUTING_TOKEN, R) != MOE_OK) TEST_FATAL("%s", moe_last_error());
        const size_t qrow = qmatmul_workspace(DT_Q8_0, 1, D);
        c.qws = moe_malloc(qrow * R);
        c.qws_row = qrow;
        c.r.N = N;
        c.r.rows = rows;
        for (int e = 0, off = 0; e < E; e++) {
            c.r.counts[e] = counts[e];
            c.r.offsets[e] = off;
            off += counts[e];
            c.r.offsets[e + 1] = off;
        }
        for (int i = 0; i < rows; i++) fill_act(c.xe + (size_t)i * D, D, i % 5 == 4 ? 1 : 0, &rng);
        /* the expected rows, expert by expert */
        void *ws = moe_malloc(qmatmul_workspace(DT_Q8_0, R, D));
        qmatmul_allow_blocked(0); /* decode's expectation: vec_dot */
        for (int e = 0; e < E; e++) {
            const int n = counts[e], off = c.r.offsets[e];
            if (!n) continue;
            const float *x = c.xe + (size_t)off * D;
            const uint8_t *g = gate + (size_t)e * F * rbd, *u = up + (size_t)e * F * rbd,
                          *dn = down + (size_t)e * D * rbf;
            if (prefill) {
                qmatmul_q8_0_blocked_ref(hg, x, g, n, D, F);
                qmatmul_q8_0_blocked_ref(hu, x, u, n, D, F);
            } else {
                qmatmul_forward(hg, x, g, DT_Q8_0, n, D, F, ws);
                qmatmul_forward(hu, x, u, DT_Q8_0, n, D, F, ws);
            }
            swiglu_forward(act, hg, hu, n, F);
            if (prefill) qmatmul_q8_0_blocked_ref(want + (size_t)off * D, act, dn, n, F, D);
            else qmatmul_forward(want + (size_t)off * D, act, dn, DT_Q8_0, n, F, D, ws);
        }
        qmatmul_allow_blocked(1);
        for (int th = 1; th <= 2; th++) {
            omp_set_num_threads(th);
            memset(c.ye, 0xff, sizeof(float) * (size_t)rows * D);
            moe_experts_forward(&c, &wt, MATMUL_FP32);
            if (th == 1) memcpy(one, c.ye, sizeof(float) * (size_t)rows * D);
            int bad = 0;
            for (int i = 0; i < rows * D; i++) bad += memcmp(&c.ye[i], &want[i], 4) != 0;
            CHECK(bad == 0, "%s, %d threads: %d of %d outputs differ from the %s", prefill ? "prefill" : "decode",
                  th, bad, rows * D, prefill ? "blocked twin" : "vec_dot path");
        }
        CHECK(same_bits(one, c.ye, (size_t)rows * D), "1 and 2 threads differ");
        omp_set_num_threads(saved);
        moe_free(ws);
        moe_free(c.qws);
        moe_cache_free(&c);
    }
    TEST_END();
}

int main(void) {
    test_env();
    printf("kernels: %s\n", moe_cpu_kernels());
    test_quantize();
    test_tiles();
    test_threads();
    /* qmatmul picks AMX where it runs, else the VNNI form: the other is called directly */
    test_blocked("amx-int8 q8_0: = blocked twin bit for bit (N 0..64, ragged OC), error bound, threads",
                 qk_amx_q8_0_tile, amx_ok(), "no AMX", amx_ok());
    test_blocked("avx512-vnni blocked q8_0: = blocked twin bit for bit (N 0..64, ragged OC), error bound, threads",
                 qk_avx512_q8_0_blocked_tile, fast_ok(), SKIP_REASON, blocked_ok() && !amx_ok());
    test_repacked(DT_Q8_0_R8);
    test_repacked(DT_Q4_K_R4);
    test_repacked(DT_Q5_K_R4);
    test_repacked(DT_Q6_K_R4);
    test_moe_batch();
    test_llama();
    TEST_MAIN_END();
}
