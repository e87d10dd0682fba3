/* kernels/qmatmul: out = in @ W^T for weights of any usable element type.
 * F32 weights use matmul_forward; otherwise every activation row is converted
 * once to the weight type's dot type, then each output is one vec_dot, by the
 * portable code or an AVX-512 tile that computes the same bits. */
#include "kernels/qmatmul.h"
#include "kernels/kernels.h"
#include "core/core.h"
#include "moe.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* below this many multiply-adds a parallel region costs more than it saves */
#define PAR_MIN_WORK 65536.0

/* bytes of one converted activation row; 0 when wtype cannot be multiplied */
static size_t act_row_bytes(int wtype, int C) {
    wtype = dtype_base_type(wtype); /* a repacked layout holds its base type's arithmetic */
    const dtype_traits *t = dtype_traits_of(wtype);
    size_t rb;
    if (!dtype_usable(wtype) || C < 0 || dtype_row_bytes(t->dot_type, C, &rb)) return 0;
    return rb;
}

/* SIZE_MAX (unallocatable) when the type or shape cannot be multiplied */
size_t qmatmul_workspace(int wtype, int N, int C) {
    if (wtype == DT_F32) return 0;
    size_t rb = act_row_bytes(wtype, C), total;
    if ((!rb && C > 0) || N < 0 || moe_mul_size(rb, (size_t)N, &total)) return SIZE_MAX;
    return total;
}

/* MOE_KERNELS=portable, read once (pthread_once: the first call may come
 * from any thread of a team); MOE_REFERENCE and moe_set_reference_kernels
 * are asked on every call, through moe_use_fast_kernels. */
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static int env_portable, env_no_amx, env_no_blocked;
static _Atomic int blocked_allowed = 1;
static void read_env(void) {
    const char *e = getenv("MOE_KERNELS"), *a = getenv("MOE_AMX");
    env_portable = e && strcmp(e, "portable") == 0;
    env_no_amx = a && strcmp(a, "0") == 0;
    const char *q = getenv("MOE_Q8_0_PREFILL"); /* "vec_dot": llama.cpp's order at every N */
    env_no_blocked = q && strcmp(q, "vec_dot") == 0;
}
static int use_avx512(void) {
    pthread_once(&env_once, read_env);
    return !env_portable && moe_use_fast_kernels() && qk_avx512_supported();
}
void qmatmul_allow_blocked(int on) { blocked_allowed = on != 0; }
static int use_blocked(void) { return use_avx512() && !env_no_blocked && blocked_allowed; }
static int use_amx(void) { return use_blocked() && !env_no_amx && qk_amx_q8_0_supported(); }
/* the blocked Q8_0 prefill kernel of this CPU for rows or Q8_0_R8 groups:
 * AMX tiles, else VNNI; NULL when vec_dot must serve every N */
static qmm_blocked_fn blocked_tile(int r8) {
    if (use_amx()) return r8 ? qk_amx_q8_0_r8_tile : qk_amx_q8_0_tile;
    if (!use_blocked()) return NULL;
    return r8 ? qk_avx512_q8_0_r8_blocked_tile : qk_avx512_q8_0_blocked_tile;
}
const char *qmatmul_kernels(void) {
    return use_amx() ? "amx-int8+avx512-vnni" : use_avx512() ? "avx512-vnni" : "portable";
}
MOE_API const char *moe_cpu_kernels(void) { return qmatmul_kernels(); }

/* the portable tile: one vec_dot per output */
static void portable_tile(const dtype_traits *t, float *out, size_t ldo, const char *w,
                          size_t wrow, int nw, const char *a, size_t arow, int na, int C) {
    for (int o = 0; o < nw; o++)
        for (int n = 0; n < na; n++)
            out[(size_t)n * ldo + o] = t->vec_dot(w + (size_t)o * wrow, a + (size_t)n * arow, C);
}

/* a repacked layout's portable tile: row o of its group read in place */
static void portable_grouped_tile(int wtype, float *out, size_t ldo, const char *w, size_t wrow, int nw,
                                  const char *a, size_t arow, int na, int C) {
    const int gr = dtype_group_rows(wtype);
    for (int o = 0; o < nw; o++)
        for (int n = 0; n < na; n++)
            out[(size_t)n * ldo + o] =
                dtype_repacked_vec_dot(wtype, w + (size_t)(o / gr) * gr * wrow, o % gr, a + (size_t)n * arow, C);
}

/* output rows per task: a few weight rows stay in L1 while every activation
 * row passes them */
#define ROWS_PER_TASK 16
_Static_assert(ROWS_PER_TASK == 16, "the AMX path gives a task one tile of 16 weight rows");

static void fill_nan(float *out, int N, int OC) {
    for (size_t i = 0; i < (size_t)N * (size_t)OC; i++) out[i] = NAN;
}

/* A shape or type the kernel cannot handle (a caller's bug) gives NaN
 * outputs rather than reading out of bounds. */
void qmatmul_forward(float *out, const float *in, const void *w, int wtype, int N, int C, int OC,
                     void *ws) {
    qmatmul_forward_batch(out, in, w, wtype, N, C, OC, ws, N);
}

void qmatmul_forward_batch(float *out, const float *in, const void *w, int wtype, int N, int C,
                           int OC, void *ws, int batch) {
    if (N <= 0 || OC <= 0) return;
    if (C == 0 && dtype_traits_of(wtype)) {
        memset(out, 0, (size_t)N * (size_t)OC * sizeof(float));
        return;
    }
    if (wtype == DT_F32) {
        matmul_forward(out, in, w, NULL, N, C, OC, MATMUL_FP32);
        return;
    }
    const int atype = dtype_base_type(wtype), group = dtype_group_rows(wtype), r8 = wtype == DT_Q8_0_R8;
    const dtype_traits *t = dtype_traits_of(atype);
    size_t wrow, arow = act_row_bytes(wtype, C);
    if (!arow || !ws || dtype_row_bytes(atype, C, &wrow) || OC % group) {
        fill_nan(out, N, OC);
        return;
    }
    qmm_quant_fn quant = dtype_traits_of(t->dot_type)->quantize_act;
    qmm_tile_fn tile = NULL;
    if (use_avx512()) {
        tile = qk_avx512_tile(wtype);
        qmm_quant_fn fast = qk_avx512_quantize(t->dot_type);
        if (fast) quant = fast;
    }
    char *act = ws;
    const char *wb = w;
    double work = (double)N * C * OC;
    int tasks = (OC + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    qmm_blocked_fn blocked = NULL;
    if (atype == DT_Q8_0 && batch >= QMM_AMX_MIN_ROWS && C / 32 <= QMM_AMX_MAX_BLOCKS)
        blocked = blocked_tile(r8);
    if (blocked) {
        /* activations straight into the tile layout, then 16 weight rows per task */
#pragma omp parallel if (work >= PAR_MIN_WORK)
        {
#pragma omp for schedule(static)
            for (int n = 0; n < N; n++) qk_q8_0_blocked_pack(act, in + (size_t)n * C, n, N, C);
#pragma omp for schedule(static)
            for (int k = 0; k < tasks; k++) {
                int o = k * ROWS_PER_TASK, nw = OC - o < ROWS_PER_TASK ? OC - o : ROWS_PER_TASK;
                blocked(out + o, (size_t)OC, wb + (size_t)o * wrow, wrow, nw, act, N, C);
            }
        }
        return;
    }
#pragma omp parallel if (work >= PAR_MIN_WORK)
    {
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) quant(act + (size_t)n * arow, in + (size_t)n * C, C);
        /* by output rows: a few weight rows are read once and dotted with
         * every activation row while they are in cache */
#pragma omp for schedule(static)
        for (int k = 0; k < tasks; k++) {
            int o = k * ROWS_PER_TASK, nw = OC - o < ROWS_PER_TASK ? OC - o : ROWS_PER_TASK;
            if (tile)
                tile(out + o, (size_t)OC, wb + (size_t)o * wrow, wrow, nw, act, arow, N, C);
            else if (group > 1)
                portable_grouped_tile(wtype, out + o, (size_t)OC, wb + (size_t)o * wrow, wrow, nw, act, arow, N, C);
            else
                portable_tile(t, out + o, (size_t)OC, wb + (size_t)o * wrow, wrow, nw, act, arow, N, C);
        }
    }
}

void qmatmul_forward_ref(float *out, const float *in, const void *w, int wtype, int N, int C,
                         int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C == 0 && dtype_traits_of(wtype)) {
        memset(out, 0, (size_t)N * (size_t)OC * sizeof(float));
        return;
    }
    const int rtype = wtype, group = dtype_group_rows(wtype), grouped = group > 1;
    wtype = dtype_base_type(wtype);
    const dtype_traits *t = dtype_traits_of(wtype);
    size_t wrow, arow = wtype == DT_F32 ? (size_t)C * sizeof(float) : act_row_bytes(wtype, C);
    if (!t || !arow || dtype_row_bytes(wtype, C, &wrow) || OC % group) {
        fill_nan(out, N, OC);
        return;
    }
    float *wf = moe_malloc((size_t)C * sizeof(float)), *af = moe_malloc((size_t)C * sizeof(float));
    void *act = moe_malloc(arow), *row = grouped ? moe_malloc(wrow ? wrow : 1) : NULL; /* a repacked row unpacked */
    if (!wf || !af || !act || (grouped && !row)) {
        fill_nan(out, N, OC);
    } else {
        const dtype_traits *at = dtype_traits_of(wtype == DT_F32 ? DT_F32 : t->dot_type);
        for (int n = 0; n < N; n++) {
            at->quantize_act(act, in + (size_t)n * C, C);
            at->to_float(af, act, C);
            for (int o = 0; o < OC; o++) {
                if (grouped) dtype_repacked_row(rtype, row, w, o, C);
                t->to_float(wf, grouped ? row : (const char *)w + (size_t)o * wrow, C);
                double s = 0.0;
                for (int k = 0; k < C; k++) s += (double)wf[k] * (double)af[k];
                out[(size_t)n * OC + o] = (float)s;
            }
        }
    }
    moe_free(wf);
    moe_free(af);
    moe_free(act);
    moe_free(row);
}

void qmatmul_q8_0_blocked_ref(float *out, const float *in, const void *w, int N, int C, int OC) {
    const dtype_traits *t = dtype_traits_of(DT_Q8_0);
    size_t rb;
    if (N <= 0 || OC <= 0) return;
    uint8_t *act = dtype_row_bytes(DT_Q8_0, C, &rb) ? NULL : moe_malloc(rb ? rb : 1);
    if (!act) {
        fill_nan(out, N, OC);
        return;
    }
    const uint8_t *wb = w;
    for (int n = 0; n < N; n++) {
        t->quantize_act(act, in + (size_t)n * C, C);
        for (int o = 0; o < OC; o++) {
            const uint8_t *wr = wb + (size_t)o * rb;
            float acc = 0.0f;
            for (int b = 0; b < C / 32; b++) {
                const uint8_t *x = wr + 34 * b, *y = act + 34 * b;
                int32_t dot = 0;
                for (int k = 0; k < 32; k++) dot += (int32_t)(int8_t)x[2 + k] * (int8_t)y[2 + k];
                uint16_t hw, ha;
                memcpy(&hw, x, 2);
                memcpy(&ha, y, 2);
                acc = fmaf((float)dot, dtype_f16_to_f32(hw) * dtype_f16_to_f32(ha), acc);
            }
            out[(size_t)n * OC + o] = acc;
        }
    }
    moe_free(act);
}
