/* moe/moe_layer: the Mixture-of-Experts FFN.
 *   x[N][d] -> router logits[N][E] -> softmax -> top-k (ids, weights)
 *   -> dispatch (count per expert, prefix sum, rows grouped by expert, dropless)
 *   -> each expert's SwiGLU FFN as one matmul over its rows -> weighted combine.
 * Routing (which rows go to which expert) is kept apart from running experts so
 * that expert parallelism can move rows between ranks later.
 * Experts are stacked: gate/up [E][F][d], down [E][d][F]. */
#ifndef MOE_MOE_LAYER_H
#define MOE_MOE_LAYER_H
#include <stdint.h>
#include "moe.h"

typedef struct {
    int renorm;        /* renormalise the k weights to sum to 1 */
} moe_route_opts;

/* Routing result for N tokens. All arrays owned by the caller (see moe_cache). */
typedef struct {
    float *logits;     /* [N][E] router logits                              */
    float *probs;      /* [N][E] softmax                                    */
    int32_t *ids;      /* [N][k] chosen experts, by descending probability  */
    float *topv;       /* [N][k] their probabilities                        */
    float *w;          /* [N][k] combine weights                            */
    int32_t *counts;   /* [E] rows per expert                               */
    int32_t *offsets;  /* [E+1] prefix sum of counts                        */
    int32_t *row_slot; /* [N*k] slot (t*k+j) of each dispatched row          */
    int32_t *slot_row; /* [N*k] dispatched row of each slot                  */
    int32_t *order;    /* [E] experts with rows, busiest first (scratch)     */
    float *lse;        /* [N] logsumexp of each row of logits (z-loss)      */
    double z;          /* mean over tokens of lse^2 (router z-loss)         */
    double aux;        /* Switch loss E * sum_e f_e P_e                     */
} moe_routing;

/* Everything the backward pass needs, sized for up to N tokens. */
typedef struct {
    int N, d, E, k, F;
    moe_routing r;
    float *xe;   /* [N*k][d] gathered inputs           */
    float *hg;   /* [N*k][F] gate pre-activations      */
    float *hu;   /* [N*k][F] up projections            */
    float *act;  /* [N*k][F] silu(hg) * hu             */
    float *ye;   /* [N*k][d] expert outputs            */
    float *scratch; /* backward scratch                */
    void *block;    /* single allocation behind all of the above */
} moe_cache;

moe_status moe_cache_init(moe_cache *c, int N, int d, int E, int k, int F);
void moe_cache_free(moe_cache *c);

/* Scores, selects and dispatches N tokens (router[E][d]). */
void moe_route(moe_routing *r, const float *x, const float *router, int N, int d, int E, int k,
               const moe_route_opts *o);

/* out[N][d] = sum_j w[t,j] * expert_{ids[t,j]}(x[t]). Fills c for backward. */
void moe_forward(float *out, moe_cache *c, const float *x, const float *router,
                 const float *gate, const float *up, const float *down, int N,
                 const moe_route_opts *o);

/* Accumulates gradients. aux_scale / z_scale are d(loss)/d(aux) and
 * d(loss)/d(z) where aux and z are this layer's Switch loss and z-loss
 * (z = mean_t logsumexp^2). dout is d(loss)/d(out). */
void moe_backward(float *dx, float *drouter, float *dgate, float *dup, float *ddown,
                  const float *dout, moe_cache *c, const float *x, const float *router,
                  const float *gate, const float *up, const float *down,
                  const moe_route_opts *o, float aux_scale, float z_scale);

/* Load statistics of the last routing: fraction of assignments per expert. */
void moe_load_fractions(const moe_routing *r, int N, int E, int k, float *frac);
#endif
