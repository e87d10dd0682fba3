/* kernels/qmatmul: matmul against weights of any usable element type
 * (core/dtype.h), for inference of published models.
 *
 *   out[N][OC] = in[N][C] @ W^T, W a [OC][C] matrix of type wtype whose rows
 *   are dtype_row_bytes(wtype, C) apart.
 *
 * F32 weights go to matmul_forward (fp32). Any other type first converts each
 * input row to the type's dot_type (quantize_act: as llama.cpp does), then
 * every output element is the type's vec_dot of a weight row and an
 * activation row: computed by the portable vec_dot, or by an AVX-512 tile
 * (kernels/quant_avx512.c) that does the same float operations in the same
 * order, chosen once per process from the CPU (MOE_KERNELS=portable or
 * MOE_REFERENCE=1 force the portable path). Work is split by output rows and
 * no output depends on which other rows share its tile, so results do not
 * depend on the thread count, on N, or on the path.
 *
 * One exception, for prefill speed: Q8_0 weights with N >= QMM_AMX_MIN_ROWS
 * on a CPU with AMX-INT8 (kernels/quant_amx.c) or else AVX-512 VNNI
 * (qk_avx512_q8_0_blocked_tile) sum each output as qmatmul_q8_0_blocked_ref
 * does (exact int32 per block, one fp32 fma per block), which differs from
 * vec_dot in the last bits; both units give the same bits. Decode (N = 1)
 * and every other type keep vec_dot. Still independent of the thread count
 * and of which rows share a tile; MOE_AMX=0 leaves the VNNI form,
 * MOE_Q8_0_PREFILL=vec_dot or qmatmul_allow_blocked(0) turn both off.
 * ws is qmatmul_workspace(wtype, N, C) bytes, planned by the caller (NULL
 * when that is 0); the kernel allocates nothing.
 *
 * A repacked wtype (DT_Q8_0_R8, DT_Q4_K_R4: rows regrouped, core/dtype.h;
 * OC a multiple of dtype_group_rows, else NaN) gives the same bits as its
 * base type on the same rows, on every path: the layout changes how rows are
 * read, not the arithmetic; Q8_0_R8's blocked prefill path is AMX or VNNI
 * as Q8_0's is. */
#ifndef MOE_QMATMUL_H
#define MOE_QMATMUL_H
#include <stddef.h>
#include "core/dtype.h"

size_t qmatmul_workspace(int wtype, int N, int C);
void qmatmul_forward(float *out, const float *in, const void *w, int wtype, int N, int C,
                     int OC, void *ws);
/* As qmatmul_forward, for the N rows of a batch of `batch` rows (an
 * expert's share of a prompt chunk's tokens): the AMX path is chosen by the
 * batch, not by N, so in a prefill chunk of >= QMM_AMX_MIN_ROWS tokens every
 * expert's rows take it however few they are, and a decode step (batch < 16)
 * none. qmatmul_forward is batch = N. */
void qmatmul_forward_batch(float *out, const float *in, const void *w, int wtype, int N, int C,
                           int OC, void *ws, int batch);
/* "amx-int8+avx512-vnni", "avx512-vnni" or "portable": the path
 * qmatmul_forward takes now (amx-int8: for Q8_0 prefill). */
const char *qmatmul_kernels(void);

/* A tile: for o < nw and n < na,
 *   out[n * ldo + o] = vec_dot(w + o * wrow, a + n * arow, C)
 * bit for bit as the weight type's portable vec_dot computes it, a holding
 * activation rows converted to the dot type. */
typedef void (*qmm_tile_fn)(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                            const void *a, size_t arow, int na, int64_t C);
typedef void (*qmm_quant_fn)(void *dst, const float *src, int64_t n);
/* kernels/quant_avx512.c: 1 when the CPU has AVX-512 F/BW/VL/VNNI/BF16 and
 * FMA; the tile for a weight type, the converter for a dot type (Q8_0, Q8_K;
 * the same bytes as quantize_act), NULL for types it lacks. */
int qk_avx512_supported(void);
qmm_tile_fn qk_avx512_tile(int wtype);
qmm_quant_fn qk_avx512_quantize(int dot_type);

/* kernels/quant_amx.c: AMX-INT8 Q8_0 x Q8_0. supported: the CPU has AMX-INT8
 * and the tiles were granted. pack (both blocked tiles read it; needs only
 * AVX-512): quantises row n (of N) of C floats
 * into the tile layout (same bytes in all as N Q8_0 rows). tile: for
 * nw <= 16 weight rows and all N packed rows, out[n * ldo + o] as
 * qmatmul_q8_0_blocked_ref computes it; C <= 32 * QMM_AMX_MAX_BLOCKS. */
#define QMM_AMX_MIN_ROWS 16
#define QMM_AMX_MAX_BLOCKS 512
int qk_amx_q8_0_supported(void);
void qk_q8_0_blocked_pack(void *dst, const float *in, int n, int N, int64_t C);
void qk_amx_q8_0_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                      const void *pack, int N, int64_t C);
/* the same on Q8_0_R8 groups (nw 8 or 16, w the first group) */
void qk_amx_q8_0_r8_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                         const void *pack, int N, int64_t C);
/* the signature both blocked tiles share (AMX above, VNNI below) */
typedef void (*qmm_blocked_fn)(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                               const void *pack, int N, int64_t C);
/* kernels/quant_avx512.c: the same as qk_amx_q8_0_tile, bit for bit, on
 * the same pack, in AVX-512 VNNI: the blocked prefill path of CPUs without
 * AMX (needs qk_avx512_supported()). */
void qk_avx512_q8_0_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                 const void *pack, int N, int64_t C);
/* the same on Q8_0_R8 groups (nw a multiple of 8, w the first group) */
void qk_avx512_q8_0_r8_blocked_tile(float *out, size_t ldo, const void *w, size_t wrow, int nw,
                                    const void *pack, int N, int64_t C);
/* 0 keeps every matmul on vec_dot (exactness tests): no blocked prefill
 * path, AMX or VNNI; default 1. */
void qmatmul_allow_blocked(int on);

/* The blocked paths' twin for Q8_0 weights, plain C: activations by the portable
 * quantize_act; per output acc = 0, then for each block in order
 * acc = fmaf((float)exact_int32_dot, d_w * d_a, acc). */
void qmatmul_q8_0_blocked_ref(float *out, const float *in, const void *w, int N, int C, int OC);

/* The reference twin: every weight row dequantised with to_float and summed
 * against the activation row as its dot type rounds it, in double. Test oracle
 * (a tolerance check; the fast path must agree with vec_dot bit for bit). */
void qmatmul_forward_ref(float *out, const float *in, const void *w, int wtype, int N, int C,
                         int OC);
#endif
