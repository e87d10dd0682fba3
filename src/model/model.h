/* model: parameter layout, training forward/backward, and single-token
 * decoding with a KV cache. The four structs tell the story: moe_config (the
 * blueprint), model_weights (pointers into one flat buffer), model_acts (what
 * the backward pass needs) and moe_model, which owns them. */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H
#include "core/core.h"
#include "moe/moe_layer.h"

typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm;
    float *ffn_gate, *ffn_up, *ffn_down;              /* dense layers */
    float *router, *gate_exps, *up_exps, *down_exps;  /* MoE layers   */
    float *exp_bias;                                  /* [E] selection bias buffer, or NULL */
    float *sh_gate, *sh_up, *sh_down, *sh_inp;        /* shared experts, or NULL */
} layer_weights;

typedef struct {
    float *token_embd, *output_norm, *output; /* output == token_embd when tied */
    layer_weights *layers;
} model_weights;

/* One named tensor of the flat parameter buffer, in canonical order (the
 * order of the PyTorch reference and of the GGUF file). */
typedef struct {
    char name[64];      /* GGUF name, e.g. "blk.0.attn_q.weight" */
    size_t offset;      /* in floats, into the flat buffer        */
    size_t size;        /* in floats                               */
    int n_dims;
    int64_t ne[3];      /* ggml order: ne[0] is the row length     */
    int decay;          /* weight decay applies (all but the norm gains and buffers) */
    int init;           /* TENSOR_INIT_*                           */
    int buffer;         /* non-learned: no gradient, no optimizer  */
} tensor_desc;
enum { TENSOR_INIT_NORMAL, TENSOR_INIT_ONES, TENSOR_INIT_ZERO };

typedef struct {
    float *x_in, *hn1, *rstd1, *q, *k, *v, *att, *atto, *x_mid, *hn2, *rstd2;
    float *hg, *hu, *act;  /* dense FFN */
    moe_cache moe;         /* MoE FFN   */
} layer_acts;

typedef struct {
    int B, T;
    layer_acts *layers;
    float *x_final, *hnf, *rstdf, *logits;
    int32_t *pos;
    /* backward scratch */
    float *dx, *dx2, *dh, *dq, *dk, *dv, *datto, *dff1, *dff2, *dff3, *dlogits;
    float *qkv;  /* [N][qd+2kd] the fused q/k/v projection (forward) or its gradient */
    void **blocks; int n_blocks;
} model_acts;

typedef struct {
    double loss;       /* total: ce + aux, z and seq_aux times their coefs */
    double ce;         /* mean cross-entropy                              */
    double aux, z;     /* summed over MoE layers, before coefficients     */
    int n_moe;         /* MoE layers                                      */
    double seq_aux;    /* sequence-wise balance loss, summed over layers  */
} model_losses;

/* Routing statistics per MoE layer, summed over forward calls since the
 * last model_stats_reset (training steps and evaluations reset them). */
typedef struct {
    int n_moe, E;
    int64_t *counts;              /* [n_moe][E] assignments chosen (before capacity) */
    int64_t *assigned, *dropped;  /* [n_moe]                                          */
    double *aux, *z, *seq_aux, *entropy; /* [n_moe] sums of each call's value       */
    int calls;
} route_stats;

/* bound on the precomputed RoPE angles: 4 MB, 8,192 positions at head dim 128 */
#define ROPE_TABLE_FLOATS (1 << 20)

struct moe_model {
    moe_config cfg;
    size_t n_params;
    float *params;           /* flat, canonical order */
    model_weights w;
    tensor_desc *tensors;
    int n_tensors;
    moe_tokenizer *tok;
    float *grads;            /* same layout as params (allocated on demand) */
    model_weights g;
    model_acts acts;         /* sized for acts.B x acts.T (0 = none)        */
    /* decoding */
    float *kcache, *vcache;  /* [L][max_seq][KVH*hd] */
    float *dec;              /* decode scratch */
    moe_cache dec_moe;
    int train_step;          /* optimizer steps taken (saved in the GGUF) */
    int training;            /* 1: forward uses the training capacity and jitter */
    uint64_t jitter_seed;    /* per micro-batch, set by the training loop         */
    route_stats stats;
    double *dec_seq;         /* [L][E] decoding: prefix score sums (sequence routing) */
    float *rope_tab;         /* RoPE cos/sin for positions [0, rope_n) (rope_table_fill) */
    int rope_n;              /* min(max_seq, ROPE_TABLE_FLOATS / head dim)                */
};

/* Allocates parameters (uninitialised) and the tensor table. */
moe_status model_alloc(moe_model **out, const moe_config *cfg);
void model_init_weights(moe_model *m, uint64_t seed);
moe_status model_alloc_grads(moe_model *m);
moe_status model_alloc_acts(moe_model *m, int B, int T);
/* Forward over B x T tokens (targets may be NULL: no loss). Returns losses. */
moe_status model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B,
                         int T, model_losses *losses);
/* Backward of loss_scale * total loss; accumulates into m->grads. Needs the
 * forward of the same batch just before. */
void model_backward(moe_model *m, const int32_t *tokens, const int32_t *targets, float loss_scale);
/* Decoding: logits[V] for token at position pos, using and filling the KV cache. */
moe_status model_decode(moe_model *m, int32_t token, int pos, float *logits);

void model_stats_reset(moe_model *m);
/* The route options layer l uses for the model's current mode. */
/* precision of the model's matmuls (the router's are always fp32) */
matmul_precision model_matmul(const moe_config *c);
moe_route_opts model_route_opts(const moe_model *m, int layer, int T);
/* The bias update of aux-loss-free balancing, from the stats since the last reset. */
void model_update_bias(moe_model *m);

/* config field table (config.c) */
int moe_config_n_fields(void);
int moe_config_field_required(int i); /* present in every model file */
const char *moe_config_field(int i, int *is_float);
double moe_config_get_field(const moe_config *c, int i);
void moe_config_put_field(moe_config *c, int i, double v);
const char *moe_preset_about(const char *name);
#endif
