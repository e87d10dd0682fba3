/* moe/moe_layer: the Mixture-of-Experts FFN.
 *   x[N][d] -> (jitter) -> router logits[N][E] -> scores (softmax | sigmoid)
 *   -> selection (token choice top-k with bias and group limits | expert choice
 *      | one expert set per sequence) -> combine weights
 *   -> capacity (drop by position or by score) -> dispatch (count per expert,
 *      prefix sum, rows grouped by expert)
 *   -> each expert's SwiGLU FFN as one matmul over its rows -> weighted combine
 *   + shared experts on every token (optionally gated).
 * Routing (which rows go to which expert) is kept apart from running experts so
 * that expert parallelism can move rows between ranks later. The formulas are
 * in docs/routing.md. Experts are stacked: gate/up [E][F][d], down [E][d][F]. */
#ifndef MOE_MOE_LAYER_H
#define MOE_MOE_LAYER_H
#include <stdint.h>
#include "moe.h"
#include "kernels/kernels.h"

typedef struct {
    int score;          /* MOE_ROUTER_SOFTMAX or MOE_ROUTER_SIGMOID               */
    int mode;           /* MOE_ROUTING_TOKEN, _EXPERT or _SEQUENCE                 */
    int renorm;         /* token/sequence: weights renormalised over the chosen k */
    float scale;        /* routed scaling factor (1 = none; 0 is read as 1)        */
    int n_group;        /* group-limited selection when n_group > 1               */
    int topk_group;
    float capacity;     /* capacity factor; 0 = dropless (expert choice: 0 = 1)    */
    int overflow;       /* MOE_OVERFLOW_POSITION or MOE_OVERFLOW_SCORE             */
    int seq_len;        /* tokens per sequence, divides N (0 = N is one sequence)  */
    float jitter;       /* router input times U(1-jitter, 1+jitter); 0 = off       */
    uint64_t jitter_seed;
    /* decoding with sequence routing: running sum of the scores of the tokens
     * before this call ([E], updated) and their count; NULL = whole sequence */
    double *seq_prefix;
    int seq_prefix_n;
    matmul_precision matmul; /* experts' matmuls (the router's stay fp32)      */
    /* [E] 1: expert switched off (ablation): its slots are left empty after
     * selection, nobody takes its weight, and the rest are renormalised only
     * when renorm is set; NULL = all on */
    const uint8_t *disabled;
    /* threshold rule (inference; token and sequence routing): of the k chosen,
     * keep those whose weight (softmax probability or sigmoid score, before
     * renormalisation and scale, without the selection bias) is at least
     * threshold times the best chosen weight, and at least min_keep of them
     * (the largest); the rest become empty slots. 0 = off. The backward pass
     * needs every slot kept: training never sets it. */
    float threshold;
    int min_keep;
} moe_route_opts;

/* Routing result for N tokens. Each token has S slots (S = k, or E for
 * expert choice); a slot holds an expert id or -1. All arrays live in the
 * cache's block. */
typedef struct {
    int N, E, k, S;
    float *xj;         /* [N][d] jittered router input (jitter only)            */
    float *noise;      /* [N][d] the jitter multipliers                          */
    float *logits;     /* [N][E] router logits                                   */
    float *probs;      /* [N][E] scores: softmax or sigmoid of the logits       */
    float *ssum;       /* [N] sum of the scores (1 for softmax)                  */
    float *lse;        /* [N] logsumexp of each row of logits (z-loss)           */
    float *sel;        /* [N][E] selection scores: score + bias, masked groups   */
    int32_t *ids;      /* [N][S] chosen experts (-1: empty slot)                 */
    float *topv;       /* [N][S] their scores                                    */
    float *w;          /* [N][S] combine weights                                 */
    int32_t *sel_counts; /* [E] assignments chosen, before capacity              */
    int32_t *counts;   /* [E] rows per expert (kept assignments)                 */
    int32_t *offsets;  /* [E+1] prefix sum of counts                             */
    int32_t *row_slot; /* [rows] slot (t*S+j) of each dispatched row             */
    int32_t *slot_row; /* [N][S] dispatched row of each slot, -1: none/dropped   */
    int32_t *order;    /* [E] experts with rows, busiest first (scratch)         */
    int32_t *iscratch; /* [N*S + N] selection and capacity scratch               */
    float *seqf;       /* [B][E] sequence-wise loss: f_i of each sequence        */
    double *psum;      /* [B+1][E] sums over tokens of the normalised scores:
                          per sequence, then over all (balance-term scratch)    */
    double *hrow;      /* [N] routing entropy of each token (scratch)            */
    char *qws;         /* a quantised router's activation rows (the cache's qws)  */
    int rows;          /* dispatched rows                                        */
    int capacity;      /* per-expert capacity used (0 = none)                    */
    int64_t assigned, dropped; /* assignments chosen / dropped by capacity       */
    double z;          /* mean over tokens of lse^2 (router z-loss)              */
    double aux;        /* Switch loss E * sum_e f_e P_e                          */
    double seq_aux;    /* DeepSeek-V3 sequence-wise loss, mean over sequences    */
    double entropy;    /* mean over tokens of H(normalised scores) / log E       */
} moe_routing;

/* The experts' matrices may be of any usable element type (core/dtype.h;
 * a published model's quantised weights), named by the *_t fields (0 =
 * DT_F32). Training and the backward pass need fp32. */
typedef struct {
    const void *router;                  /* [E][d]                              */
    const void *gate, *up, *down;        /* [E][F][d], [E][F][d], [E][d][F]     */
    const float *bias;                   /* [E] selection bias, or NULL          */
    const void *sh_gate, *sh_up, *sh_down; /* [Fs][d], [Fs][d], [d][Fs] or NULL  */
    const float *sh_inp;                 /* [d] shared-expert gate, or NULL      */
    int router_t, gate_t, up_t, down_t, sh_gate_t, sh_up_t, sh_down_t; /* element types */
    /* offloading: the routed experts come from this store (layer store_layer)
     * instead of gate/up/down; NULL = they are all in memory */
    struct expert_store *store;
    int store_layer;
    /* 1: a published model's layer at inference, in llama.cpp's arithmetic
     * (router softmax and SwiGLU as kernels.h's *_ggml functions) */
    int ggml_order;
} moe_weights;

typedef struct {
    float *router, *gate, *up, *down;    /* same shapes as moe_weights           */
    float *sh_gate, *sh_up, *sh_down, *sh_inp;
} moe_grads;

/* d(loss)/d(term) of this layer's balance terms */
typedef struct { float aux, z, seq; } moe_loss_scales;

/* Expert parallelism (dist/expert_parallel.c): when a cache has one, the
 * expert stages send their rows to the ranks that own the experts and take
 * the results back, instead of running every expert here. */
typedef struct moe_cache moe_cache;
typedef struct moe_exchange moe_exchange;
struct moe_exchange {
    void (*experts_forward)(moe_exchange *x, moe_cache *c, const moe_weights *w, matmul_precision mm);
    void (*experts_backward)(moe_exchange *x, moe_cache *c, const moe_weights *w, const moe_grads *g,
                             matmul_precision mm);
};

/* Everything the backward pass needs, sized for up to N tokens. */
struct moe_cache {
    int N, d, E, k, F, Fs, S, max_rows;
    moe_routing r;
    float *xe;   /* [rows][d] gathered inputs           */
    float *hg;   /* [rows][F] gate pre-activations      */
    float *hu;   /* [rows][F] up projections            */
    float *act;  /* [rows][F] silu(hg) * hu             */
    float *ye;   /* [rows][d] expert outputs            */
    float *sh_hg, *sh_hu, *sh_act; /* [N][Fs] shared experts */
    float *sh_y;  /* [N][d] shared-expert output before the gate */
    float *sh_g;  /* [N] shared gate sigmoid(x . w)              */
    /* backward scratch */
    float *dye, *dact, *dhg, *dhu, *dxe, *dlogits, *dprobs, *dw, *dxj;
    float *sh_dy, *sh_dact, *sh_dhg, *sh_dhu, *sh_dg;
    void *block;    /* single allocation behind all of the above */
    /* quantised experts: activation rows converted for the dot products,
     * qws_row bytes per dispatched row (or per token, for shared experts);
     * the caller plans and owns it (NULL when every weight is fp32) */
    char *qws;
    size_t qws_row;
    moe_exchange *ex; /* NULL: every expert runs here (set by the caller, not by init) */
};

/* Dispatched rows needed for N tokens: N*k for token choice, E*c for expert
 * choice with the largest capacity factor that will be used. */
int64_t moe_rows_needed(int N, int E, int k, int mode, float max_capacity);
/* Per-expert capacity ceil(cf * k * N / E) (at least 1, at most N). */
int moe_capacity(float cf, int k, int N, int E);
/* Fs = total shared hidden size (0 = none); mode decides the slots per token. */
moe_status moe_cache_init(moe_cache *c, int N, int d, int E, int k, int F, int Fs, int mode,
                          int64_t max_rows);
void moe_cache_free(moe_cache *c);

/* Scores, selects and dispatches N tokens; computes the balance terms. */
void moe_route(moe_routing *r, const float *x, const moe_weights *w, int N, int d,
               const moe_route_opts *o);

/* The forward stages, callable one by one so that an all-to-all (expert
 * parallelism), a prefetch (offloading) or a telemetry tap can stand between
 * them; moe_forward runs them in this order:
 *   moe_route           scores, selection, capacity, dispatch plan (c->r)
 *   moe_dispatch        gathers the kept rows by expert: c->xe
 *   moe_experts_forward each expert's SwiGLU over its rows: c->ye
 *   moe_shared_forward  the shared experts over every token (when Fs > 0)
 *   moe_combine         out[t] = weighted sum of its rows (+ gated shared) */
void moe_dispatch(moe_cache *c, const float *x);
void moe_experts_forward(moe_cache *c, const moe_weights *w, matmul_precision mm);
/* The experts' backward over the dispatched rows: c->dye -> c->dxe, and
 * their weight gradients accumulated into g (moe_backward's middle stage). */
void moe_experts_backward(moe_cache *c, const moe_weights *w, const moe_grads *g, matmul_precision mm);
void moe_shared_forward(moe_cache *c, const float *x, const moe_weights *w, int N, matmul_precision mm);
void moe_combine(float *out, moe_cache *c, const float *x, const moe_weights *w, int N);

/* out[N][d] = sum_j w[t,j] * expert_{ids[t,j]}(x[t]) + shared(x[t]). Fills c for backward. */
void moe_forward(float *out, moe_cache *c, const float *x, const moe_weights *w, int N,
                 const moe_route_opts *o);

/* Accumulates gradients (dx and every non-NULL g field). dout is d(loss)/d(out).
 * The selection bias never gets a gradient. */
void moe_backward(float *dx, const moe_grads *g, const float *dout, moe_cache *c, const float *x,
                  const moe_weights *w, const moe_route_opts *o, moe_loss_scales s);

/* Load statistics of the last routing: share of the chosen assignments per expert. */
void moe_load_fractions(const moe_routing *r, int E, float *frac);

/* Auxiliary-loss-free balancing: bias[e] += gamma * sign(mean load - load[e]),
 * from the assignment counts of one optimizer step (exact integer comparison). */
void moe_bias_update(float *bias, const int64_t *counts, int E, float gamma);
float shared_gate_ggml(float a); /* qwen2moe's shared-expert gate as llama.cpp computes it */

#endif
