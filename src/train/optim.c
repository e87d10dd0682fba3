/* train/optim: AdamW, gradient clipping and the learning-rate schedule. */
#include <math.h>
#include <string.h>

#include "train/train.h"

/* One tensor's constants for a step: the bias corrections and the decay. */
typedef struct {
    float beta1, beta2, eps, bc2_sqrt, step, decay, gscale;
} adamw_consts;

static adamw_consts adamw_consts_at(float lr, float beta1, float beta2, float eps,
                                    float weight_decay, int t, float gscale) {
    const float bc1 = 1.0f - powf(beta1, (float)t);
    return (adamw_consts){.beta1 = beta1, .beta2 = beta2, .eps = eps,
                          .bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)t)), .step = lr / bc1,
                          .decay = 1.0f - lr * weight_decay, .gscale = gscale};
}

/* The update of element i; an elementwise body, so any partition of the
 * elements over threads gives the same bits. */
#define ADAMW_BODY(c, p, g, m, v, i)                                               \
    do {                                                                           \
        const float gi = g[i] * (c).gscale; /* exact when gscale is 1 */           \
        g[i] = 0.0f;                                                               \
        m[i] = (c).beta1 * m[i] + (1.0f - (c).beta1) * gi;                         \
        v[i] = (c).beta2 * v[i] + (1.0f - (c).beta2) * gi * gi;                    \
        p[i] *= (c).decay;                                                         \
        p[i] -= (c).step * m[i] / (sqrtf(v[i]) / (c).bc2_sqrt + (c).eps);          \
    } while (0)

void adamw_update(float *restrict p, float *restrict g, float *restrict m, float *restrict v, size_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay, int t,
                  float gscale) {
    const adamw_consts c = adamw_consts_at(lr, beta1, beta2, eps, weight_decay, t, gscale);
    /* simd: vector sqrt and divide round exactly like the scalar ones */
    #pragma omp parallel for simd schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) ADAMW_BODY(c, p, g, m, v, i);
}

/* One parallel region for all tensors (each split over the threads without a
 * barrier between tensors) rather than one per tensor: a step has dozens of
 * tensors, and on a shared machine every join waits for the slowest thread.
 * Same bits as adamw_update per tensor, and for any split of [lo, hi). */
void model_adamw_range(moe_model *mdl, float *g, float *m, float *v, float lr, const moe_train_params *p,
                       int t, float gscale, size_t lo, size_t hi) {
    const adamw_consts c_decay =
        adamw_consts_at(lr, p->beta1, p->beta2, p->adam_eps, p->weight_decay, t, gscale);
    const adamw_consts c_plain = adamw_consts_at(lr, p->beta1, p->beta2, p->adam_eps, 0.0f, t, gscale);
    #pragma omp parallel if (hi - lo > 65536)
    for (int i = 0; i < mdl->n_tensors; i++) {
        const tensor_desc *td = &mdl->tensors[i];
        if (td->buffer) continue; /* non-learned (the selection bias): no optimizer */
        const size_t a = MOE_MAX(lo, td->offset), b = MOE_MIN(hi, td->offset + td->size);
        if (a >= b) continue;
        const adamw_consts c = td->decay ? c_decay : c_plain;
        float *restrict pp = mdl->params + a, *restrict gg = g + a;
        float *restrict mm = m + a, *restrict vv = v + a;
        const size_t n = b - a;
        #pragma omp for simd schedule(static) nowait
        for (size_t j = 0; j < n; j++) ADAMW_BODY(c, pp, gg, mm, vv, j);
    }
}

void model_adamw(moe_model *mdl, float *m, float *v, float lr, const moe_train_params *p, int t,
                 float gscale) {
    model_adamw_range(mdl, mdl->grads, m, v, lr, p, t, gscale, 0, mdl->n_params);
}

void grad_norm_parts(const float *g, size_t n, size_t u0, size_t u1, double *part) {
    #pragma omp parallel for schedule(static) if (u1 - u0 > 1)
    for (size_t u = u0; u < u1; u++) {
        size_t lo = u * GRAD_NORM_UNIT, hi = MOE_MIN(n, lo + GRAD_NORM_UNIT);
        double s = 0;
        #pragma omp simd reduction(+ : s)
        for (size_t i = lo; i < hi; i++) s += (double)g[i] * g[i];
        part[u - u0] = s;
    }
}

double grad_norm_total(const double *part, size_t n) {
    const size_t units = (n + GRAD_NORM_UNIT - 1) / GRAD_NORM_UNIT;
    double total = 0;
    for (size_t u = 0; u < units; u++) total += part[u];
    return sqrt(total);
}

double grad_norm(const float *g, size_t n) {
    /* fixed units summed in order: same result for any thread count */
    const size_t units = (n + GRAD_NORM_UNIT - 1) / GRAD_NORM_UNIT;
    double total = 0;
    for (size_t u0 = 0; u0 < units; u0 += 64) {
        double part[64];
        const size_t un = MOE_MIN((size_t)64, units - u0);
        grad_norm_parts(g, n, u0, u0 + un, part);
        for (size_t u = 0; u < un; u++) total += part[u];
    }
    return sqrt(total);
}

float clip_scale(double norm, float clip) {
    if (clip <= 0) return 1.0f;
    double coef = clip / (norm + 1e-6);
    return coef >= 1.0 ? 1.0f : (float)coef;
}

/* Only tests call this (the reference step of tests/test_model_ref.c):
 * moe_train passes clip_scale to adamw_update as gscale instead of a pass. */
void clip_grads(float *g, size_t n, double norm, float clip) {
    float cf = clip_scale(norm, clip);
    if (cf == 1.0f) return;
    #pragma omp parallel for simd schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) g[i] *= cf;
}

float lr_at(const moe_train_params *p, int step) {
    if (p->warmup > 0 && step < p->warmup) return p->lr * (float)(step + 1) / (float)p->warmup;
    int decay_steps = p->steps - p->warmup;
    if (decay_steps <= 0) return p->lr;
    double progress = (double)(step - p->warmup) / decay_steps;
    if (progress > 1) progress = 1;
    double floor_ = p->lr * p->min_lr_frac;
    return (float)(floor_ + 0.5 * (p->lr - floor_) * (1.0 + cos(M_PI * progress)));
}
