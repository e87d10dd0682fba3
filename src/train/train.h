/* train: AdamW, learning-rate schedule, the training loop and its state file. */
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H
#include "model/model.h"

/* AdamW as torch.optim.AdamW computes it: decoupled decay p *= 1 - lr*wd,
 * then p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). t is the 1-based step. */
void adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t);
/* Applies AdamW to every tensor of the model (no decay on norm weights). */
void model_adamw(moe_model *mdl, float *m, float *v, float lr, const moe_train_params *p, int t);
/* Global L2 norm of the gradients, summed in a fixed order. */
double grad_norm(const float *g, size_t n);
/* Scales gradients so their norm is at most clip (torch's clip_grad_norm_ rule). */
void clip_grads(float *g, size_t n, double norm, float clip);
/* Reads and checks the training-state file at path as moe_train does on
 * resume, for a model of n_params parameters; *step (may be NULL) gets its
 * step. For tests and fuzzing. */
moe_status train_state_check(const char *path, size_t n_params, int *step);
/* Linear warmup to lr, then cosine down to lr * min_lr_frac at p->steps. */
float lr_at(const moe_train_params *p, int step);
#endif
