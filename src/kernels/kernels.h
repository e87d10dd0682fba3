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

/* In place on x[N][H][D] (D even): rotates adjacent pairs (x[2i], x[2i+1]) by
 * angle pos[n] * base^(-2i/D) (the llama GGUF layout). Backward rotates the
 * gradient by the opposite angle, also in place. */
void rope_forward(float *x, const int32_t *pos, int N, int H, int D, float base,
                  const float *tab, int n_tab);
void rope_backward(float *dx, const int32_t *pos, int N, int H, int D, float base,
                   const float *tab, int n_tab);
/* The angles' cos and sin for positions [0, n_pos): tab[p*D + i] = cos and
 * tab[p*D + D/2 + i] = sin of angle i at position p (D*n_pos floats). Passed to
 * rope_forward/backward as tab (n_tab = n_pos) it saves recomputing them every
 * call; tab NULL, or a position past n_tab, computes them there instead, with
 * the same values. */
void rope_table_fill(float *tab, int n_pos, int D, float base);

/* Causal self-attention with grouped-query heads, for B sequences of T tokens:
 * q[B*T][H][D], k,v[B*T][KVH][D]; query head h uses kv head h / (H/KVH).
 * out[B*T][H][D]; att[B][H][T][T] keeps the softmax probabilities for backward
 * (entries above the diagonal are 0). Scale 1/sqrt(D). */
void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int H, int KVH, int D);
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                        const float *q, const float *k, const float *v, int B, int T, int H,
                        int KVH, int D);
/* Scalar twins of the two above (no scratch memory; the fast path falls back
 * to them when its scratch cannot be allocated). */
void attention_forward_ref(float *out, float *att, const float *q, const float *k,
                           const float *v, int B, int T, int H, int KVH, int D);
void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *att,
                            const float *q, const float *k, const float *v, int B, int T, int H,
                            int KVH, int D);

/* SwiGLU: out[N][F] = silu(gate) * up. The backward SETS dgate and dup (the
 * one exception to accumulation: its outputs are always fresh buffers). */
void swiglu_forward(float *out, const float *gate, const float *up, int N, int F);
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int F);      /* dgate or dup may be NULL */

/* One row, vectorised, the exp of every kernel here (max error ~1 ulp of
 * expf): dst[j] = exp(x[j] - m), returning their sum in double in a fixed
 * order; and dst[j] = 1 / (1 + exp(-x[j])). dst may equal x. Serial: callers
 * parallelise over rows. */
double exp_shift_sum(float *dst, const float *x, float m, int n);
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
#endif
