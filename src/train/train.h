/* train: AdamW, learning-rate schedule, the training loop and its state file. */
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H
#include "model/model.h"

/* AdamW as torch.optim.AdamW computes it on the gradient gscale * g (gscale:
 * the clipping factor, 1 = none; the same float product clip_grads would
 * store): decoupled decay p *= 1 - lr*wd, then p -= lr/bc1 * m /
 * (sqrt(v)/sqrt(bc2) + eps). t is the 1-based step. Consumes the gradient:
 * g is left zero, ready for the next step's accumulation (one pass over g
 * instead of three: clip, update, zero). */
void adamw_update(float *p, float *g, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t, float gscale);
/* Applies AdamW to every tensor of the model (no decay on norm weights) and
 * zeroes the gradients it used; buffers (no gradient) are left alone. */
void model_adamw(moe_model *mdl, float *m, float *v, float lr, const moe_train_params *p, int t,
                 float gscale);
/* The same on the gradient g (left zero in [lo, hi)) and the parameters in
 * [lo, hi) only: each rank of a sharded optimizer updates its own shard. */
void model_adamw_range(moe_model *mdl, float *g, float *m, float *v, float lr, const moe_train_params *p,
                       int t, float gscale, size_t lo, size_t hi);
/* Global L2 norm of the gradients, summed in a fixed order: the sum of
 * squares of each unit of GRAD_NORM_UNIT floats in double, then the units'
 * sums in order. So any thread count, and any split into whole units over
 * ranks (grad_norm_parts on each, grad_norm_total of them all), gives the
 * same bits. */
enum { GRAD_NORM_UNIT = 1 << 16 };
double grad_norm(const float *g, size_t n);
/* part[u - u0] = the sum of squares of unit u, for units [u0, u1) */
void grad_norm_parts(const float *g, size_t n, size_t u0, size_t u1, double *part);
double grad_norm_total(const double *part, size_t n); /* part: every unit of n floats */
/* Scales gradients so their norm is at most clip (torch's clip_grad_norm_ rule);
 * clip_scale is the factor it multiplies by (1 when no clipping is needed).
 * clip_grads is a test helper (tests/test_model_ref.c clips in the separate
 * pass PyTorch makes): training folds clip_scale into adamw_update's gscale. */
void clip_grads(float *g, size_t n, double norm, float clip);
float clip_scale(double norm, float clip);
/* Reads and checks the training-state file at path as moe_train does on
 * resume, for a model of n_params parameters; *step (may be NULL) gets its
 * step. For tests and fuzzing. */
moe_status train_state_check(const char *path, size_t n_params, int *step);
/* Linear warmup to lr, then cosine down to lr * min_lr_frac at p->steps. */
float lr_at(const moe_train_params *p, int step);
/* Training-state file (MODEL.gguf.state): this header, AdamW m and v
 * (n_params floats each), then an FNV-1a checksum (moe_fnv1a64 from
 * MOE_FNV1A64_BASIS, core/hash.h) of everything before it.
 * Version 2: checksum and dataset fingerprint are true FNV-1a (version 1 began
 * from a wrong offset basis, and hashed the tokens 32 bits at a time), so a
 * version-1 file would fail both checks: it is refused by its version. */
#define STATE_MAGIC "MOESTATE"
#define STATE_VERSION 2u
typedef struct {
    char magic[8];
    uint32_t version, reserved;
    int32_t step, steps, batch, seq, grad_accum, warmup;
    float lr, min_lr_frac, weight_decay, beta1, beta2, adam_eps, grad_clip, pad;
    uint64_t seed, rng[4], fingerprint, n_params;
} state_header;
#endif
