/* moe.h: the one public API of libmoe, a Mixture-of-Experts transformer engine.
 *
 * Conventions
 *  - Every function that can fail returns moe_status; moe_last_error() gives a
 *    one-line message for the calling thread, valid until its next failing call.
 *  - Objects come in create/free pairs; every *_free accepts NULL.
 *  - Enums only grow at the end. */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_API __attribute__((visibility("default")))

typedef enum {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG = 1,  /* bad argument or impossible configuration */
    MOE_ERR_NOMEM = 2,        /* allocation failed                        */
    MOE_ERR_IO = 3,           /* open/read/write/rename failed            */
    MOE_ERR_FORMAT = 4,       /* file is corrupt, truncated or not ours   */
    MOE_ERR_UNSUPPORTED = 5,  /* valid but not something we handle       */
    MOE_ERR_NUMERIC = 6,      /* NaN/Inf appeared                         */
    MOE_ERR_INTERRUPTED = 7,  /* stopped on request                       */
} moe_status;

MOE_API const char *moe_status_str(moe_status s); /* static text for a code */
/* Phase timers: moe_profile(1) clears and starts them; moe_profile_report
 * writes a table of the time spent per phase (forward, backward, optimizer)
 * since then into buf (always NUL-terminated). */
MOE_API void moe_profile(int on);
MOE_API void moe_profile_report(char *buf, size_t cap);
MOE_API const char *moe_last_error(void);         /* message of last failure */
/* The GEMM backend model matmuls run on for fp32 (bf16 = 0) or bf16-input
 * (bf16 = 1) matmuls: "avx512", "avx512_bf16" or "reference" (no fast unit on
 * this CPU, or MOE_REFERENCE=1); chosen once from the detected CPU. */
MOE_API const char *moe_matmul_backend(int bf16);

/* ---- configuration ------------------------------------------------------ */
typedef struct {
    int vocab_size;
    int d_model;
    int n_layers;
    int n_heads;
    int n_kv_heads;      /* divides n_heads (grouped-query attention)          */
    int d_ff;            /* hidden size of dense SwiGLU FFN layers             */
    int n_experts;       /* 0 = dense model                                    */
    int top_k;
    int d_expert;        /* hidden size of each expert's SwiGLU FFN            */
    int moe_every;       /* layer l is MoE when l >= moe_first_dense and       */
    int moe_first_dense; /*   (l - moe_first_dense) % moe_every == 0           */
    int tied_embeddings; /* 1: output head shares the token embedding          */
    int renorm_topk;     /* 1: top-k weights renormalised to sum to 1          */
    int max_seq;         /* context length                                     */
    float rope_base;
    float norm_eps;
    float aux_loss_coef; /* Switch load-balancing loss coefficient             */
    float z_loss_coef;   /* router z-loss coefficient                          */
    float init_std;
    /* ---- routing and balance (docs/routing.md); fields only grow here ---- */
    int router;          /* scores: MOE_ROUTER_SOFTMAX or MOE_ROUTER_SIGMOID    */
    int routing;         /* who chooses: MOE_ROUTING_TOKEN / _EXPERT / _SEQUENCE */
    float routed_scale;  /* routed-expert weights are multiplied by this        */
    int n_group;         /* group-limited routing: experts in n_group groups   */
    int topk_group;      /*   of which the best topk_group are eligible (<=1: off) */
    float router_jitter; /* training: router input times U(1-eps, 1+eps)       */
    int n_shared_experts;/* experts every token passes through                 */
    int d_shared;        /* hidden size of each shared expert                  */
    int shared_gate;     /* 1: shared output times sigmoid(x . w_gate_shared)  */
    float seq_aux_coef;  /* DeepSeek-V3 sequence-wise balance loss coefficient */
    int expert_bias;     /* 1: per-expert selection bias (non-learned buffer)  */
    float bias_rate;     /* aux-loss-free balancing step gamma (0: frozen bias) */
    float capacity_factor;      /* training: C = ceil(cf * k * N / E); 0 = dropless */
    float eval_capacity_factor; /* evaluation and generation; 0 = dropless         */
    int overflow;        /* over capacity, drop by MOE_OVERFLOW_POSITION / _SCORE */
    /* ---- numerics ---- */
    int matmul;          /* MOE_MATMUL_FP32, or _BF16: matmul inputs rounded to
                            bfloat16, sums, weights, gradients and optimizer fp32 */
    /* ---- attention and positions of published architectures; fields only grow ---- */
    int head_dim;        /* q and k size per head (0: d_model / n_heads)               */
    int v_head_dim;      /* v size per head (0: head_dim)                              */
    int qk_norm;         /* MOE_QK_NORM_NONE, _FULL (RMSNorm over the whole q or k
                            projection, OLMoE) or _HEAD (per head, Qwen3)            */
    int qkv_bias;        /* 1: the q, k and v projections have biases (Qwen2)          */
    int rope_neox;       /* 1: RoPE rotates the two halves of a head; 0: adjacent pairs */
    int rope_dim;        /* rotated dims per head (0: all of head_dim)                 */
    float rope_freq_scale; /* linear position scaling, 1 / factor (1: none)            */
    float yarn_factor;   /* YaRN context extension factor (0: off)                      */
    int yarn_orig_ctx;   /* YaRN: the context length the model was trained on          */
    float yarn_log_mul;  /* YaRN: attention temperature multiplier (DeepSeek: 0.1)     */
    float yarn_beta_fast, yarn_beta_slow; /* YaRN ramp ends (32 and 1)                 */
    int attn;            /* MOE_ATTN_GQA or MOE_ATTN_MLA (multi-head latent attention) */
    int q_lora_rank;     /* MLA: query bottleneck rank (0: none)                        */
    int kv_lora_rank;    /* MLA: size of the cached latent                              */
} moe_config;

/* values of the enum-like config fields (--set router=sigmoid also works) */
enum { MOE_ROUTER_SOFTMAX = 0, MOE_ROUTER_SIGMOID = 1 };
enum { MOE_ROUTING_TOKEN = 0, MOE_ROUTING_EXPERT = 1, MOE_ROUTING_SEQUENCE = 2 };
enum { MOE_OVERFLOW_POSITION = 0, MOE_OVERFLOW_SCORE = 1 };
enum { MOE_MATMUL_FP32 = 0, MOE_MATMUL_BF16 = 1 };
enum { MOE_QK_NORM_NONE = 0, MOE_QK_NORM_FULL = 1, MOE_QK_NORM_HEAD = 2 };
enum { MOE_ATTN_GQA = 0, MOE_ATTN_MLA = 1 };

MOE_API moe_status moe_config_preset(moe_config *cfg, const char *name);
MOE_API const char *const *moe_preset_names(void);  /* NULL-terminated */
MOE_API const char *moe_preset_about(const char *name); /* one line; NULL if unknown */
/* Sets one field from text, e.g. key "n_experts", value "4". */
MOE_API moe_status moe_config_set(moe_config *cfg, const char *key, const char *value);
MOE_API moe_status moe_config_validate(const moe_config *cfg);
MOE_API int moe_config_layer_is_moe(const moe_config *cfg, int layer);
MOE_API int moe_config_n_moe_layers(const moe_config *cfg); /* the rest are dense */
/* Per-head sizes with the 0 defaults resolved: q/k, v, and RoPE's rotated part. */
MOE_API int moe_config_head_dim(const moe_config *cfg);
MOE_API int moe_config_v_head_dim(const moe_config *cfg);
MOE_API int moe_config_rope_dim(const moe_config *cfg);
/* Writes "key = value" lines into buf (always NUL-terminated). */
MOE_API void moe_config_describe(const moe_config *cfg, char *buf, size_t cap);
typedef struct {
    int64_t total;        /* every parameter stored                          */
    int64_t active;       /* parameters a single token passes through        */
    int64_t embedding;    /* token embedding (+ untied head)                 */
    int64_t experts;      /* all routed-expert weights                       */
    int64_t shared;       /* all shared-expert weights (and their gates)     */
} moe_param_counts;
MOE_API moe_param_counts moe_config_param_counts(const moe_config *cfg);

/* ---- tokenizer ----------------------------------------------------------- */
typedef struct moe_tokenizer moe_tokenizer;
MOE_API moe_status moe_tokenizer_train(moe_tokenizer **out, const char *const *texts,
                                       const size_t *lens, int n_texts, int vocab_size);
/* GGUF: our own vocabulary, or a published one (tokenizer.ggml.model "llama"
 * or "gpt2" with a supported tokenizer.ggml.pre), tokenised as llama.cpp does. */
MOE_API moe_status moe_tokenizer_load(moe_tokenizer **out, const char *path);
/* Our own vocabulary only (MOE_ERR_UNSUPPORTED for a published one). */
MOE_API moe_status moe_tokenizer_save(const moe_tokenizer *tok, const char *path);
MOE_API void moe_tokenizer_free(moe_tokenizer *tok);
MOE_API int moe_tokenizer_vocab_size(const moe_tokenizer *tok);
/* End-of-text id: our own vocabulary's last id, a published one's eos (-1: none). */
MOE_API int moe_tokenizer_eos(const moe_tokenizer *tok);
/* Beginning-of-sequence id, -1 when none. */
MOE_API int moe_tokenizer_bos(const moe_tokenizer *tok);
/* Whether id ends generation (eos, end of turn, end of message, ...; for a
 * published vocabulary the set llama.cpp derives). */
MOE_API int moe_tokenizer_is_eog(const moe_tokenizer *tok, int32_t id);
/* Encodes len bytes of raw text: no BOS, special-token text is plain text
 * (user-defined tokens of a published vocabulary still match, as in
 * llama.cpp). *ids is allocated with malloc-compatible moe_free. */
MOE_API moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                        int32_t **ids, size_t *n_ids);
/* Encodes a prompt as llama.cpp's tokenizer does: add_special adds BOS (and
 * EOS) where the vocabulary asks for them; parse_special turns the text of
 * special tokens into those tokens (llama-completion uses 1, 1). */
MOE_API moe_status moe_tokenizer_encode_prompt(const moe_tokenizer *tok, const char *text,
                                               size_t len, int add_special, int parse_special,
                                               int32_t **ids, size_t *n_ids);
/* Bytes of one token (not NUL-terminated); NULL for an invalid id. For a
 * published vocabulary: llama.cpp's token_to_piece with special tokens
 * rendered as their text (may be empty, e.g. for unused tokens). */
MOE_API const char *moe_tokenizer_token(const moe_tokenizer *tok, int32_t id, size_t *len);

/* ---- model -------------------------------------------------------------- */
typedef struct moe_model moe_model;
MOE_API moe_status moe_model_create(moe_model **out, const moe_config *cfg, uint64_t seed);
MOE_API moe_status moe_model_load(moe_model **out, const char *path);  /* GGUF */
/* Atomic: writes path.tmp, fsyncs, renames. Includes the tokenizer if set. */
MOE_API moe_status moe_model_save(const moe_model *m, const char *path);
/* Writes the model in a published GGUF layout that llama.cpp runs with the
 * same results: the llama architecture (Mixtral-style MoE or dense), f32
 * weights, the tokenizer if set, no moe.* keys (atomic, like save). Refuses
 * with MOE_ERR_UNSUPPORTED, naming the feature, a model that layout cannot
 * express (sigmoid routing, shared experts, expert choice, ...) or one that
 * is itself a published file. path NULL: only that check, nothing written. */
MOE_API moe_status moe_model_convert(const moe_model *m, const char *path);
MOE_API void moe_model_free(moe_model *m);
MOE_API const moe_config *moe_model_config(const moe_model *m);
MOE_API const moe_tokenizer *moe_model_tokenizer(const moe_model *m);
/* The model takes ownership of tok. */
MOE_API void moe_model_set_tokenizer(moe_model *m, moe_tokenizer *tok);
/* Positions the KV cache holds for generation and evaluation (0: the default:
 * the model's context length, at most 4096 for a published model). Refuses a
 * context whose cache, with the weights, would not fit in memory. */
MOE_API moe_status moe_model_set_context(moe_model *m, int n_ctx);
MOE_API int moe_model_context(const moe_model *m);
/* Writes a description of a loaded model (architecture, layers, experts,
 * attention, tensor types, parameters, bytes, memory at the context) into
 * buf, always NUL-terminated. */
MOE_API void moe_model_describe(const moe_model *m, char *buf, size_t cap);

/* ---- training ------------------------------------------------------------ */
typedef struct {
    int steps;            /* horizon of the whole run (schedule length)      */
    int batch;            /* sequences per micro-batch                       */
    int seq;              /* tokens per sequence                             */
    int grad_accum;       /* micro-batches per optimizer step                */
    float lr;             /* peak learning rate                              */
    float min_lr_frac;    /* cosine floor as a fraction of lr                */
    int warmup;           /* warmup steps                                    */
    float weight_decay;
    float beta1, beta2, adam_eps;
    float grad_clip;      /* global norm; 0 = off                            */
    uint64_t seed;
    int threads;          /* 0 = all cores                                   */
    int eval_every;       /* 0 = only at the end                             */
    int eval_batches;
    int save_every;       /* 0 = only at the end / pause                     */
    int stop_after;       /* pause after this many steps of this process (0 = run to horizon) */
    const char *out_path; /* model GGUF; training state goes to out_path + ".state" */
    const char *log_path; /* JSONL log, NULL = none                          */
} moe_train_params;
MOE_API void moe_train_params_default(moe_train_params *p);

/* A tokenised corpus: documents with a domain label, split train/validation. */
typedef struct moe_dataset moe_dataset;
/* paths: text files or directories (each file is one domain, named by the file). */
MOE_API moe_status moe_dataset_load_text(moe_dataset **out, const moe_tokenizer *tok,
                                         const char *const *paths, int n_paths);
MOE_API void moe_dataset_free(moe_dataset *d);
MOE_API size_t moe_dataset_tokens(const moe_dataset *d, int validation);
/* Reads the raw texts of the given paths (for tokenizer training). */
MOE_API moe_status moe_read_texts(const char *const *paths, int n_paths, char ***texts,
                                  size_t **lens, int *n_texts);
MOE_API void moe_free_texts(char **texts, size_t *lens, int n_texts);
/* Reads all of stream f (name is for messages) or of the file at path into
 * one buffer, *len bytes followed by a NUL that *len does not count; free it
 * with moe_free. */
MOE_API moe_status moe_read_stream(FILE *f, const char *name, char **out, size_t *len);
MOE_API moe_status moe_read_file(const char *path, char **out, size_t *len);

typedef struct {
    int step, steps;
    float loss, val_loss;  /* val_loss < 0 when not evaluated yet          */
    float lr, tokens_per_s, balance; /* balance: max expert load / mean load */
    double elapsed_s, eta_s;
    int evaluated;         /* 1 on the step an evaluation ran              */
    float maxvio;          /* worst MoE layer's (max load - mean) / mean   */
    float drop_rate;       /* share of assignments dropped by capacity     */
} moe_train_progress;
typedef void (*moe_progress_fn)(const moe_train_progress *p, void *user);

/* Trains m on d. When resume_state is non-NULL it names a training-state file
 * to continue from. */
MOE_API moe_status moe_train(moe_model *m, const moe_dataset *d, const moe_train_params *p,
                             const char *resume_state, moe_progress_fn fn, void *user);
/* The step a resume of m from state_path would start at, and the run's
 * horizon, after the checks moe_train makes on that file (so *step >= *steps
 * means there is nothing left to train; moe_train would refuse). Reads the
 * whole state: meant for once, before the data is loaded. */
MOE_API moe_status moe_train_resume_point(const moe_model *m, const char *state_path, int *step,
                                          int *steps);
/* Mean per-token cross-entropy over the validation split (or all of d when it has none). */
MOE_API moe_status moe_evaluate(moe_model *m, const moe_dataset *d, int seq, int max_batches,
                                int use_all, double *loss_out, size_t *tokens_out);
/* The same, calling fn(tokens done, tokens in all, user) after every batch (fn may be NULL). */
typedef void (*moe_eval_progress_fn)(size_t done, size_t total, void *user);
MOE_API moe_status moe_evaluate_progress(moe_model *m, const moe_dataset *d, int seq,
                                         int max_batches, int use_all, double *loss_out,
                                         size_t *tokens_out, moe_eval_progress_fn fn, void *user);

/* ---- generation ---------------------------------------------------------- */
typedef struct {
    int max_tokens;
    float temperature;    /* 0 = greedy                                     */
    int top_k;            /* 0 = off                                        */
    float top_p;          /* 1 = off                                        */
    uint64_t seed;
    int ignore_eos;       /* 1: end-of-generation tokens get no probability */
} moe_sample_params;
typedef int (*moe_token_fn)(int32_t id, const char *bytes, size_t len, void *user); /* nonzero stops */
MOE_API moe_status moe_generate(moe_model *m, const int32_t *prompt, size_t n_prompt,
                                const moe_sample_params *sp, moe_token_fn fn, void *user);

MOE_API void moe_set_threads(int n);  /* 0 = all cores */
/* Releases memory the library hands out (e.g. moe_tokenizer_encode's ids). */
MOE_API void moe_free(void *p);

#ifdef __cplusplus
}
#endif
#endif
