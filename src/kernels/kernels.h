/* kernels: the numerical building blocks, over plain fp32 arrays (matmuls can
 * round their inputs to bf16, see matmul_precision).
 * Each op is <op>_forward / <op>_backward; outputs first, sizes last; shapes in
 * comments are row-major. Backward functions ACCUMULATE (+=) into gradient
 * buffers; zeroing is the caller's explicit step. Two marked exceptions SET
 * their outputs instead: matmul_backward_set_din (din) and swiglu_backward.
 * Every fast path (AVX-512 etc., chosen at run time via moe_use_fast_kernels())
 * has a scalar reference twin with the _ref suffix, used as the test oracle.
 * Parallel loops are partitioned by output and reduce in a fixed order, so
 * results are bit-identical for any thread count. */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H
#include <stddef.h>
#include <stdint.h>

/* Precision of a matmul's multiplies. FP32: plain fp32. BF16: both inputs
 * rounded to bfloat16 (round to nearest even; denormals to zero), products
 * summed in fp32 (AVX512_BF16 dot products on the fast path). Outputs,
 * gradients and everything outside the multiply stay fp32. */
typedef enum { MATMUL_FP32 = 0, MATMUL_BF16 = 1 } matmul_precision;
uint16_t bf16_from_float(float f);
float bf16_to_float(uint16_t h);
/* The hardware conversion (VCVTNEPS2BF16) of one value, the oracle for
 * bf16_from_float; call only when the CPU has AVX512_BF16. */
uint16_t kernels_bf16_hw(float f);

/* The GEMM backend matmuls of this precision run on ("avx512", "avx512_bf16",
 * "reference", ...: gemm.h), chosen once from the CPU's features; "reference"
 * when MOE_REFERENCE=1 forces the scalar loops. */
const char *matmul_backend_name(matmul_precision prec);

/* out[N][OC] = in[N][C] @ w[OC][C]^T (+ bias[OC] if non-NULL)
 * Each output row depends only on its own input row (not on N or the other
 * rows), in both paths: a token gets the same bits alone or in a batch. */
void matmul_forward(float *out, const float *in, const float *w, const float *bias,
                    int N, int C, int OC, matmul_precision prec);
void matmul_forward_ref(float *out, const float *in, const float *w, const float *bias,
                        int N, int C, int OC, matmul_precision prec);
/* din[N][C] += dout[N][OC] @ w[OC][C]        (skipped when din is NULL)
 * dw[OC][C] += dout^T @ in                   (skipped when dw is NULL)
 * dbias[OC] += sum_n dout[n]                 (skipped when dbias is NULL) */
void matmul_backward(float *din, float *dw, float *dbias, const float *dout, const float *in,
                     const float *w, int N, int C, int OC, matmul_precision prec);
void matmul_backward_ref(float *din, float *dw, float *dbias, const float *dout,
                         const float *in, const float *w, int N, int C, int OC,
                         matmul_precision prec);
/* As matmul_backward, but din is SET (din = dout @ w), not accumulated: saves
 * zeroing din first. dw and dbias still accumulate. */
void matmul_backward_set_din(float *din, float *dw, float *dbias, const float *dout,
                             const float *in, const float *w, int N, int C, int OC,
                             matmul_precision prec);

/* out[N][C] = in * rstd * w; rstd[N] = 1/sqrt(mean(in^2) + eps) (saved for backward) */
void rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int N, int C,
                     float eps);
void rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                      const float *rstd, int N, int C);   /* din or dw may be NULL */
/* The same norm in llama.cpp's CPU order (published models at inference):
 * each square rounded to float and summed in double from left to right, the
 * mean rounded to float, rstd = 1.0f / sqrtf(mean + eps) in float, then
 * out = (in * rstd) * w. In place (out == in) is allowed. */
void rmsnorm_forward_ggml(float *out, const float *in, const float *w, int N, int C, float eps);

/* ---- llama.cpp's CPU arithmetic --------------------------------------------
 * For published models at inference: the same functions in the order an
 * AVX-512 llama.cpp build (GGML_NATIVE, GCC) computes them, for bit-identical
 * results (checked outside the tree against llama.cpp's tensors; the tests
 * check each against its formula written out again).
 * expf_ggml: ggml_v_expf lane by lane (fused multiply-adds, scalef).
 * vec_dot_ggml: ggml_vec_dot_f32: 4 x 16 lanes of fused multiply-adds over
 *   n & ~63 elements, the four combined as (0 + 2) + (1 + 3), the 16 lanes by
 *   _mm512_reduce_add_ps's tree (l + l+8, + l+4, + l+2, 0 + 1), then the rest
 *   added one by one, products rounded; padded = 1: x and y continue with
 *   zeros to a multiple of 64 (llama.cpp's KV cache rows: no rest).
 * vec_dot_ggml_batch: llamafile's tinyBLAS f32 (a matmul of 2 or more rows):
 *   one 16-lane chain of fused multiply-adds, then the same tree.
 * softmax_row_ggml: ggml's soft_max row: exps (expf_ggml on whole 16-blocks,
 *   libm expf on the rest) of x - max, each block's tree sum added in double,
 *   then times (float)(1 / sum); padded = 1: the row continues with masked
 *   (-inf) entries to a multiple of 16 (attention over llama.cpp's cache), so
 *   the last block is a whole one. p may equal x.
 * matmul_ggml_f32: out[N][OC] = in[N][C] @ w[OC][C]^T with f32 weights, each
 *   output vec_dot_ggml_batch (llama.cpp's prompt batches; its 1-token
 *   batches use vec_dot_ggml's order, which agrees only for C <= 16).
 * swiglu_forward_ggml: ggml_vec_swiglu_f32: (g / (1 + expf_ggml(0 - g))) * up
 *   on whole 16-blocks of a row, libm expf(-g) on the rest.
 * Where moe_use_fast_kernels() says so, vec_dot_ggml, softmax_row_ggml and
 * swiglu_forward_ggml run AVX-512 twins of the scalar code (lane for lane:
 * the same bits; the scalar code is the reference kernels' path). */
float expf_ggml(float x);
float vec_dot_ggml(const float *x, const float *y, int n, int padded);
/* s[u] = vec_dot_ggml(q, k + u * ks, D, 0) * scale for u < len (attention's
 * scores against a cache) */
void scores_ggml(float *s, const float *q, const float *k, size_t ks, int len, int D, float scale);
/* vec_dot_ggml's combination of its 4 x 16 lanes (one chain: the others 0) */
float ggml_lanes_sum(const float acc[4][16]);
float vec_dot_ggml_batch(const float *x, const float *y, int n);
void matmul_ggml_f32(float *out, const float *in, const float *w, int N, int C, int OC);
void softmax_row_ggml(float *p, const float *x, int n, int padded);
void swiglu_forward_ggml(float *out, const float *gate, const float *up, int N, int F);

/* ---- RoPE --------------------------------------------------------------------
 * In place on x[N][H][D] (D even): rotates adjacent pairs (x[2i], x[2i+1]) by
 * angle pos[n] * base^(-2i/D) (the llama GGUF layout). Backward rotates the
 * gradient by the opposite angle, also in place. The plain case of
 * rope_apply_forward/backward below (rope_params_plain), same bits. */
void rope_forward(float *x, const int32_t *pos, int N, int H, int D, float base,
                  const float *tab, int n_tab);
void rope_backward(float *dx, const int32_t *pos, int N, int H, int D, float base,
                   const float *tab, int n_tab);
/* The angles' cos and sin for positions [0, n_pos): tab[p*D + i] = cos and
 * tab[p*D + D/2 + i] = sin of angle i at position p (D*n_pos floats). Passed to
 * rope_forward/backward as tab (n_tab = n_pos) it saves recomputing them every
 * call; tab NULL, or a position past n_tab, computes them there instead, with
 * the same values. = rope_table_build(tab, n_pos, rope_params_plain(D, base)). */
void rope_table_fill(float *tab, int n_pos, int D, float base);

/* RoPE as llama.cpp's ggml_rope_ext parameterises it (field names as there).
 * Pair i < n_rot/2 turns by theta_i(pos), with
 *   extrap = pos * base^(-2i/n_rot) [/ freq_factors[i]],  interp = freq_scale * extrap,
 *   theta  = interp                                        if ext_factor == 0,
 *          = interp * (1 - mix_i) + extrap * mix_i           otherwise (YaRN),
 *   mix_i  = ext_factor * (1 - clamp((i - lo) / max(0.001, hi - lo), 0, 1)),
 *   [lo, hi] = rope_yarn_corr_dims: floor/ceil of n_rot ln(n_ctx_orig / (beta 2 pi))
 *              / (2 ln base) for beta_fast / beta_slow, clamped to [0, n_rot - 1];
 * and cos/sin are multiplied by mscale = attn_factor, times
 * (1 + 0.1 ln(1/freq_scale)) when ext_factor != 0. The rotation is
 *   x0' = x0*c - x1*s,  x1' = x0*s + x1*c   (c, s with mscale; two rounded
 *   products, one rounded sum, never fused), or with fused = 1 as llama.cpp's
 *   native x86 build computes ggml's rotation (its compiler contracts it):
 *   x0' = fma(x0, c, -(x1*s)),  x1' = fma(x0, s, x1*c)
 * on pairs (x[2i], x[2i+1]) (neox = 0: llama, Mixtral, DeepSeek, Granite) or
 * (x[i], x[i + n_rot/2]) (neox = 1: Qwen2/3(-MoE), OLMoE); dims [n_rot, D) are
 * left as they are (DeepSeek's MLA ropes only a 64-dim part of q and k).
 * Angles: ggml_angles = 0 computes each angle (and the ramp) in double and
 * rounds cos/sin to float once (the plain case is exactly rope_forward);
 * ggml_angles = 1 follows ggml's CPU code in float (base^(-2i/n_rot) by
 * repeated multiplication with powf(base, -2/n_rot) from (float)pos, the ramp
 * in float, cosf/sinf) for llama.cpp's rounding. The corr dims and mscale are
 * float either way, as ggml computes them. Float angles drift with position:
 * up to 3e-4 from the double ones by position 4200 (test_kernels prints it).
 * llama.cpp's context passes its own attn_factor: for YaRN it divides by
 * (1 + 0.1 ln(1/freq_scale)) so the rope's net magnitude is what the model asks
 * for (DeepSeek-V2/V3: net 1, and the YaRN magnitude goes into the attention
 * scale instead: mscale^2 / sqrt(Dk), mscale = 1 + 0.1 * mscale_all_dim * ln(factor)).
 * n_rot must be even with 2 <= n_rot <= D, base and freq_scale > 0; otherwise
 * the calls do nothing. */
typedef struct {
    int n_rot;                 /* rotated dims per head (even, <= D)                    */
    int neox;                  /* 0: adjacent pairs; 1: halves                          */
    float base, freq_scale;    /* theta base; 1 / (context scaling factor)              */
    float ext_factor;          /* YaRN: 0 off, 1 on (llama.cpp's default for YaRN)      */
    float attn_factor;         /* magnitude of cos/sin (before YaRN's own factor)       */
    float beta_fast, beta_slow;/* YaRN ramp ends, in rotations over n_ctx_orig (32, 1)  */
    int n_ctx_orig;            /* YaRN: the context the model was trained for           */
    const float *freq_factors; /* NULL, or [n_rot/2] divisors of pair i's frequency     */
    int ggml_angles;           /* angles in float as ggml (1) or in double (0)          */
    int fused;                 /* 1: the rotation with llama.cpp's fused multiply-adds   */
} rope_params;
/* n_rot = D, adjacent pairs, no scaling: rope_forward's parameters */
rope_params rope_params_plain(int D, float base);
/* YaRN's ramp ends [lo, hi] (pair indices), as ggml_rope_yarn_corr_dims */
void rope_yarn_corr_dims(float dims[2], const rope_params *p);
/* tab[p*n_rot + i] = cos, tab[p*n_rot + n_rot/2 + i] = sin of pair i at
 * position p, mscale folded in, for p in [0, n_pos) (n_rot*n_pos floats) */
void rope_table_build(float *tab, int n_pos, const rope_params *p);
/* In place on x[N][H][D] at positions pos[N]; tab/n_tab as for rope_forward
 * (built by rope_table_build with the same parameters, or NULL). The backward
 * applies the transpose: the opposite angle, the same magnitude. */
void rope_apply_forward(float *x, const int32_t *pos, int N, int H, int D, const rope_params *p,
                        const float *tab, int n_tab);
void rope_apply_backward(float *dx, const int32_t *pos, int N, int H, int D,
                         const rope_params *p, const float *tab, int n_tab);

/* ---- attention ---------------------------------------------------------------
 * Causal self-attention with grouped-query heads, for B sequences of T tokens:
 * q[B*T][H][Dk], k[B*T][KVH][Dk], v[B*T][KVH][Dv]; query head h uses kv head
 * h / (H/KVH). out[B*T][H][Dv]; att[B][H][T][T] keeps the softmax
 * probabilities for backward (entries above the diagonal are 0). Scores are
 * (q . k) * scale, softmax in fp32 with the max subtracted and its sum in
 * double. Dk != Dv: DeepSeek's MLA (e.g. Dk 192 = 128 + 64 roped, Dv 128). */
void attention_forward_ex(float *out, float *att, const float *q, const float *k, const float *v,
                          int B, int T, int H, int KVH, int Dk, int Dv, float scale);
/* dq[B*T][H][Dk], dk[B*T][KVH][Dk], dv[B*T][KVH][Dv] += (accumulate) */
void attention_backward_ex(float *dq, float *dk, float *dv, const float *dout, const float *att,
                           const float *q, const float *k, const float *v, int B, int T, int H,
                           int KVH, int Dk, int Dv, float scale);
/* Scalar twins (no scratch memory; the fast path falls back to them when its
 * scratch cannot be allocated or the reference kernels are forced). */
void attention_forward_ex_ref(float *out, float *att, const float *q, const float *k,
                              const float *v, int B, int T, int H, int KVH, int Dk, int Dv,
                              float scale);
void attention_backward_ex_ref(float *dq, float *dk, float *dv, const float *dout,
                               const float *att, const float *q, const float *k, const float *v,
                               int B, int T, int H, int KVH, int Dk, int Dv, float scale);
/* The Dk = Dv = D, scale = 1/sqrt(D) case of the four above, same bits. */
void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int H, int KVH, int D);
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                        const float *q, const float *k, const float *v, int B, int T, int H,
                        int KVH, int D);
void attention_forward_ref(float *out, float *att, const float *q, const float *k,
                           const float *v, int B, int T, int H, int KVH, int D);
void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *att,
                            const float *q, const float *k, const float *v, int B, int T, int H,
                            int KVH, int D);

/* Attention over a KV cache, for decoding (n = 1) and chunked prefill:
 * out[n][H][Dv] for queries q[n][H][Dk] at positions pos0 .. pos0+n-1; query i
 * attends to cache positions 0 .. pos0+i, which kc/vc already hold. Position t
 * of kv head g is at kc + t*k_stride + g*Dk and vc + t*v_stride + g*Dv.
 * Scores (q . k) * scale, softmax as attention_forward_ex, out = sum_t p_t v_t
 * in t order. Each (query, head) is computed alone, so a token gets the same
 * bits in a chunk of any n as alone, for any thread count (the fast path and
 * the _ref twin differ only in the order of the q . k sums).
 * scratch: attention_cached_scratch(n_ctx, n, H) floats, n_ctx >= pos0 + n. */
size_t attention_cached_scratch(int n_ctx, int n, int H);
void attention_cached(float *out, const float *q, const float *kc, const float *vc, int pos0,
                      int n, int H, int KVH, int Dk, int Dv, size_t k_stride, size_t v_stride,
                      float scale, float *scratch);
void attention_cached_ref(float *out, const float *q, const float *kc, const float *vc, int pos0,
                          int n, int H, int KVH, int Dk, int Dv, size_t k_stride,
                          size_t v_stride, float scale, float *scratch);
/* The same in llama.cpp's order (no flash attention, f32 cache): scores by
 * vec_dot_ggml, times scale, softmax_row_ggml over the (padded) row, and each
 * output dim the dot of the probabilities with its value column:
 * vec_dot_ggml_batch (batch = 1: llama.cpp's batches of 2 or more tokens, its
 * tinyBLAS matmul) or padded vec_dot_ggml (batch = 0: a 1-token batch). The
 * two orders agree while a row has at most 16 positions. */
void attention_cached_ggml(float *out, const float *q, const float *kc, const float *vc, int pos0,
                           int n, int H, int KVH, int Dk, int Dv, size_t k_stride, size_t v_stride,
                           float scale, float *scratch, int batch);

/* SwiGLU: out[N][F] = silu(gate) * up. The backward SETS dgate and dup (the
 * one exception to accumulation: its outputs are always fresh buffers). */
void swiglu_forward(float *out, const float *gate, const float *up, int N, int F);
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int F);      /* dgate or dup may be NULL */

/* One row, vectorised, the exp of every kernel here (max error 0.99 ulp
 * against the exact exp, see fexp in ops.c): dst[j] = exp(x[j] - m), returning their sum in double in a fixed
 * order; and dst[j] = 1 / (1 + exp(-x[j])). dst may equal x. Serial: callers
 * parallelise over rows. */
double exp_shift_sum(float *dst, const float *x, float m, int n);
double exp_shift_sum_ref(float *dst, const float *x, float m, int n); /* scalar twin, same bits */
void sigmoid_row(float *dst, const float *x, int n);

/* Row-wise softmax: out[N][C] = softmax(in[N][C]); in may equal out. */
void softmax_forward(float *out, const float *in, int N, int C);
/* Given probabilities p[N][C] and dL/dp, din[N][C] += p * (dp - sum(p*dp)). */
void softmax_backward(float *din, const float *dp, const float *p, int N, int C);

/* Cross-entropy of logits[N][V] against targets[N] (targets < 0, or >= V, are ignored).
 * Returns the sum of per-token losses; losses[N] optional (NULL ok).
 * Backward: dlogits[N][V] = scale * (softmax - onehot) for counted rows
 * (overwrites; rows with ignored targets are zeroed; dlogits may equal logits). */
double crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                            int V);
void crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, int N,
                           int V, float scale);
/* Fused form for training: probs[N][V] = softmax(logits) and the summed loss
 * in one pass; the backward then turns probs into dlogits in place:
 * scale * (probs - onehot), zero rows for ignored targets. */
double crossentropy_softmax(float *probs, const float *logits, const int32_t *targets, int N,
                            int V);
void crossentropy_softmax_backward(float *probs, const int32_t *targets, int N, int V,
                                   float scale);

/* Helpers shared by the kernel files (ops.c, attention.c): the max of x[0..n)
 * (n >= 1), and sum x*y with products and sums in double over 8 interleaved
 * lanes combined in a fixed tree. Below KERNELS_PAR_MIN elements of work a
 * parallel region costs more than it saves. */
float kernels_row_max(const float *x, int n);
double kernels_dot8d(const float *x, const float *y, int n);
#define KERNELS_PAR_MIN 16384.0
#endif
