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
 * Same bits as adamw_update per tensor. */
void model_adamw(moe_model *mdl, float *m, float *v, float lr, const moe_train_params *p, int t,
                 float gscale) {
    const adamw_consts c_decay =
        adamw_consts_at(lr, p->beta1, p->beta2, p->adam_eps, p->weight_decay, t, gscale);
    const adamw_consts c_plain = adamw_consts_at(lr, p->beta1, p->beta2, p->adam_eps, 0.0f, t, gscale);
    #pragma omp parallel if (mdl->n_params > 65536)
    for (int i = 0; i < mdl->n_tensors; i++) {
        const tensor_desc *td = &mdl->tensors[i];
        if (td->buffer) continue; /* non-learned (the selection bias): no optimizer */
        const adamw_consts c = td->decay ? c_decay : c_plain;
        float *restrict pp = mdl->params + td->offset, *restrict gg = mdl->grads + td->offset;
        float *restrict mm = m + td->offset, *restrict vv = v + td->offset;
        const size_t n = td->size;
        #pragma omp for simd schedule(static) nowait
        for (size_t j = 0; j < n; j++) ADAMW_BODY(c, pp, gg, mm, vv, j);
    }
}

double grad_norm(const float *g, size_t n) {
    /* fixed chunks summed in order: same result for any thread count */
    enum { CHUNK = 1 << 16 };
    size_t nchunks = (n + CHUNK - 1) / CHUNK;
    double total = 0;
    for (size_t c0 = 0; c0 < nchunks; c0 += 64) {
        double part[64] = {0};
        size_t cn = MOE_MIN((size_t)64, nchunks - c0);
        #pragma omp parallel for schedule(static)
        for (size_t c = 0; c < cn; c++) {
            size_t lo = (c0 + c) * CHUNK, hi = MOE_MIN(n, lo + CHUNK);
            double s = 0;
            #pragma omp simd reduction(+ : s)
            for (size_t i = lo; i < hi; i++) s += (double)g[i] * g[i];
            part[c] = s;
        }
        for (size_t c = 0; c < cn; c++) total += part[c];
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
