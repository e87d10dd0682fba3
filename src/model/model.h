/* model: parameter layout, training forward/backward, and single-token
 * decoding with a KV cache. The four structs tell the story: moe_config (the
 * blueprint), model_weights (pointers into one flat buffer), model_acts (what
 * the backward pass needs) and moe_model, which owns them. */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H
#include "core/core.h"
#include "core/dtype.h"
#include "moe/moe_layer.h"

/* The layer plan: what each layer is made of, decided once from the config
 * (ours, or one read from a published GGUF file). Forward, backward and
 * decoding dispatch on it, never on which tensors happen to be present. */
typedef enum { ATTN_GQA = 0, ATTN_MLA = 1 } attn_kind;
typedef enum { FFN_DENSE = 0, FFN_MOE = 1 } ffn_kind;
typedef struct {
    attn_kind attn;
    ffn_kind ffn;
    int qk_norm;      /* MOE_QK_NORM_*                                   */
    int qkv_bias;     /* q, k, v projections carry biases                */
    int q_lora;       /* MLA: the query goes through a rank-q_lora_rank bottleneck */
    int n_shared;     /* shared experts (one SwiGLU of n_shared * d_shared) */
    int shared_gate;  /* shared output times sigmoid(x . w)              */
    int expert_bias;  /* selection bias buffer                           */
} layer_plan;

/* Every weight as a typed view (core/dtype.h): fp32 views into the flat
 * parameter buffer for models we train, views into the file mapping in the
 * file's own types for published models. An absent tensor has data NULL. */
typedef struct {
    moe_tensor attn_norm, wq, wk, wv, wo;             /* GQA (wq also MLA without q compression) */
    moe_tensor bq, bk, bv, q_norm, k_norm;            /* optional GQA parts                 */
    moe_tensor wq_a, q_a_norm, wq_b;                  /* MLA query bottleneck               */
    moe_tensor wkv_a, kv_a_norm, wk_b, wv_b;          /* MLA latent, its norm, per-head maps */
    moe_tensor ffn_norm, ffn_gate, ffn_up, ffn_down;  /* dense layers                       */
    moe_tensor router, gate_exps, up_exps, down_exps; /* MoE layers                         */
    moe_tensor exp_bias;                              /* [E] selection bias buffer          */
    moe_tensor sh_inp, sh_gate, sh_up, sh_down;       /* shared experts and their gate      */
} layer_weights;

typedef struct {
    moe_tensor token_embd, output_norm, output; /* output == token_embd when tied */
    layer_weights *layers;
} model_weights;

/* fp32 data of a view (training and our own models only) */
#define F32(t) ((float *)(t).data)

/* One named tensor of the model, in canonical order (the order of the
 * PyTorch reference and of our GGUF files). The one list that says which
 * tensors a model has: it sizes the flat buffer, binds the views of
 * model_weights, names the GGUF tensors and checks a published file. */
typedef struct {
    char name[64];      /* GGUF name, e.g. "blk.0.attn_q.weight" */
    int layer;          /* -1: a model-wide tensor                */
    size_t slot;        /* byte offset of its moe_tensor in layer_weights (or model_weights) */
    size_t offset;      /* in floats, into the flat buffer        */
    size_t size;        /* in floats                               */
    int n_dims;
    int64_t ne[3];      /* ggml order: ne[0] is the row length     */
    int decay;          /* weight decay applies (all but the norm gains and buffers) */
    int init;           /* TENSOR_INIT_*                           */
    int buffer;         /* non-learned: no gradient, no optimizer  */
    int optional;       /* a published file may omit it (output.weight: tied) */
} tensor_desc;
enum { TENSOR_INIT_NORMAL, TENSOR_INIT_ONES, TENSOR_INIT_ZERO, TENSOR_INIT_RESID };

typedef struct {
    float *x_in, *hn1, *rstd1, *q, *k, *v, *att, *atto, *x_mid, *hn2, *rstd2;
    float *hg, *hu, *act;  /* dense FFN */
    /* MLA (q, k, v, att, atto above hold the per-head [N][H][hd] query and
     * key, [N][H][vd] value and output): the query bottleneck before and
     * after its norm, the latent before and after its norm */
    float *qa, *qan, *rstd_qa, *lat_raw, *lat, *rstd_kv;
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
    /* MLA scratch: [latent | k_pe] or its gradient, latent gradients, one
     * head's key part, the query bottleneck's gradients, RoPE'd parts */
    float *kv, *dlat, *dlat_raw, *head, *dqa, *dqan, *pe;
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

typedef struct infer_state infer_state;

/* bound on the precomputed RoPE angles: 4 MB, 8,192 positions at head dim 128 */
#define ROPE_TABLE_FLOATS (1 << 20)

struct moe_model {
    moe_config cfg;
    layer_plan *plan;        /* [n_layers] */
    size_t n_params;
    float *params;           /* flat, canonical order (NULL for a published model) */
    model_weights w;
    tensor_desc *tensors;
    int n_tensors;
    /* a published model: weights are views into the file mapping */
    void *file;              /* the open gguf_ctx (io/gguf.h) that owns the mapping */
    char arch[32];           /* general.architecture ("" for our own models) */
    float *owned;            /* fp32 copies some tensors need (e.g. a quantised router) */
    int ctx;                 /* context length the KV cache is sized for (0: max_seq) */
    moe_tokenizer *tok;
    float *grads;            /* same layout as params (allocated on demand) */
    model_weights g;
    model_acts acts;         /* sized for acts.B x acts.T (0 = none)        */
    infer_state *inf;        /* inference: KV cache and scratch (model/infer.c) */
    int train_step;          /* optimizer steps taken (saved in the GGUF) */
    int training;            /* 1: forward uses the training capacity and jitter */
    uint64_t jitter_seed;    /* per micro-batch, set by the training loop         */
    struct expert_parallel *ep; /* experts split over ranks (dist/), or NULL; not owned,
                                   except ep_infer's                                    */
    int ep_infer;            /* 1: ep is inference's (model_hold_experts), owned   */
    int ep_first, ep_count;  /* experts of each MoE layer this process holds (count 0: all) */
    route_stats stats;
    uint8_t *disabled;       /* [n_layers][E] experts switched off for evaluation and
                                inference (moe_model_disable_expert); NULL: none */
    /* routing telemetry (stats/trace.c): when tap_ids is set, model_infer
     * copies each MoE layer's chosen experts and weights of its n tokens to
     * tap_ids/tap_w[n][n_moe][top_k] */
    int32_t *tap_ids;
    float *tap_w;
    float *rope_tab;         /* RoPE cos/sin for positions [0, rope_n) (rope_table_fill) */
    int rope_n;              /* min(max_seq, ROPE_TABLE_FLOATS / head dim)                */
    /* expert offloading (model/offload.c): store NULL = every expert mapped */
    struct expert_store *store;
    char *path;              /* the file a published model was loaded from */
    size_t store_budget;     /* bytes the store was given                  */
    int64_t store_tokens;    /* tokens run since the stats were reset      */
    int store_policy;        /* 1 + EXPERT_EVICT_*, 0 = the default          */
    int store_drop_cache;    /* posix_fadvise(DONTNEED) after every read     */
    int store_all;           /* size the cache for every expert held (expert
                                parallelism without a budget)                  */
    int store_prefetch;      /* 1 on, 2 off, 0 = the default (offload.c); 3 on, each
                                request waited for (tests: counts independent of scheduling) */
    /* run-time routing at inference (moe_model_set_routing; 0 = the model's own) */
    int route_k;             /* experts chosen per token instead of top_k           */
    float route_threshold;   /* of those, keep weights >= this times the best       */
    int route_min;           /* ... but at least this many                          */
    int64_t routed_tokens, routed_experts; /* tokens through MoE layers and experts they used */
    /* what inference's kernels read (model/repack.c): w with its Q8_0 and
     * K-quant matrices repacked at load; layers NULL when nothing was */
    model_weights run;
    size_t repacked_bytes;
};

/* The views inference multiplies with: m->run when weights were repacked. */
static inline const model_weights *model_kernel_weights(const moe_model *m) {
    return m->run.layers ? &m->run : &m->w;
}
/* model/repack.c: repack a published model's Q8_0 and K-quant matrices for
 * the kernels (no-op where they would not gain, with MOE_REPACK=0, or for
 * what memory cannot be had for: those stay rows); free the copies; give
 * the experts back to the file's views (the expert cache reads rows). */
void model_repack(moe_model *m);
void model_repack_free(moe_model *m);
void model_repack_drop_experts(moe_model *m);

/* The layer plan of a config (plan[n_layers]). */
void model_plan_layers(const moe_config *c, layer_plan *plan);
/* The tensor list of a config and plan into t[cap] (t NULL: count only);
 * returns the count, or -1 when cap is too small. n_floats (may be NULL)
 * gets the size of the flat fp32 buffer. */
int model_tensor_list(const moe_config *c, const layer_plan *plan, tensor_desc *t, int cap,
                      size_t *n_floats);
/* The view a tensor of the list binds to. */
moe_tensor *model_tensor_slot(model_weights *w, const tensor_desc *t);

/* Allocates the plan, the tensor table and the views, without parameters. */
moe_status model_alloc_shell(moe_model **out, const moe_config *cfg);
/* Closes m->file (io/model_io.c). */
void model_close_file(moe_model *m);
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
/* Inference (model/infer.c) over the KV cache, sized for m->ctx positions
 * (0: max_seq): runs tokens[n] at positions pos0..pos0+n-1, which must
 * follow the positions already run; logits[n][V] for every position when
 * all_logits, else logits[V] of the last. */
moe_status model_infer(moe_model *m, const int32_t *tokens, int n, int pos0, float *logits,
                       int all_logits);
/* Plans the KV cache and the scratch for chunks of up to n_max tokens. */
moe_status model_infer_alloc(moe_model *m, int n_max);
void model_infer_free(moe_model *m);
/* Bytes of the KV cache for ctx positions. */
size_t model_kv_bytes(const moe_config *c, int ctx);
/* Decoding: logits[V] for token at position pos (model_infer of one token). */
moe_status model_decode(moe_model *m, int32_t token, int pos, float *logits);
/* The MoE layer's weights of a layer, as moe_forward takes them. */
moe_weights model_layer_moe_weights(const layer_weights *W);

void model_stats_reset(moe_model *m);
/* The route options layer l uses for the model's current mode. */
/* precision of the model's matmuls (the router's are always fp32) */
matmul_precision model_matmul(const moe_config *c);
moe_route_opts model_route_opts(const moe_model *m, int layer, int T);
/* Experts chosen per token: the run-time setting, else the config's top_k
 * (the MoE caches are sized for it). */
int model_route_k(const moe_model *m);
/* Counts the experts r used (moe_model_experts_per_token). */
void model_count_routing(moe_model *m, const moe_routing *r);
/* The bias update of aux-loss-free balancing, from the stats since the last reset. */
void model_update_bias(moe_model *m);

/* Bytes of all routed experts' weights in their own types (offloading's
 * 100%), and the unpinning of their pages in the mapping (model/offload.c). */
size_t model_expert_bytes(const moe_model *m);
void model_offload_free(moe_model *m);
/* Expert parallelism at inference (moe_load_options.expert_parallel): this
 * rank holds its share of the experts, behind the store, and the MoE layers
 * run through an EP_SAME_TOKENS exchange. Needs m->file and m->path. */
moe_status model_hold_experts(moe_model *m, int ep);

/* config field table (config.c) */
int moe_config_n_fields(void);
int moe_config_field_required(int i); /* present in every model file */
const char *moe_config_field(int i, int *is_float);
double moe_config_get_field(const moe_config *c, int i);
void moe_config_put_field(moe_config *c, int i, double v);
#endif
