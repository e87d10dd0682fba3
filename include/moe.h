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
/* The kernels quantised matmuls use on this CPU now: "amx-int8+avx512-vnni"
 * (Q8_0 matmuls of 16 rows or more on AMX-INT8; MOE_AMX=0 turns that off),
 * "avx512-vnni" or "portable" (MOE_KERNELS=portable or MOE_REFERENCE=1
 * force the latter). Q8_0 matmuls of 16 rows or more (prefill) sum each block
 * exactly and then in fp32, on AMX or VNNI alike, which differs from
 * llama.cpp's lane order in the last bits; MOE_Q8_0_PREFILL=vec_dot keeps
 * llama.cpp's order at every N. */
MOE_API const char *moe_cpu_kernels(void);
/* The GEMM backend model matmuls run on for fp32 (bf16 = 0) or bf16-input
 * (bf16 = 1) matmuls: "avx512", "avx512_bf16" or "reference" (no fast unit on
 * this CPU, or MOE_REFERENCE=1); chosen once from the detected CPU. */
MOE_API const char *moe_matmul_backend(int bf16);
/* 1 when bf16-input matmuls are faster than fp32 ones on this CPU: AMX tiles, or
 * AVX512_BF16 on an AMD CPU, whose VDPBF16PS issues at the FMA's rate (read
 * from CPUID, not timed, so every process of a run agrees); 0 otherwise and
 * with MOE_REFERENCE=1. */
MOE_API int moe_bf16_matmul_pays(void);

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
/* What to settle while loading, before the memory check a load makes: a
 * published model larger than memory loads when its experts are offloaded
 * (mem_budget, as moe_model_set_mem_budget takes it; NULL = all mapped),
 * and n_ctx (0 = the default) sizes the KV cache the check counts. Our own
 * models (moe train output) given a mem_budget, even "0", are mapped as a
 * published model is, not copied: for inference and evaluation only
 * (moe_train and moe_model_save refuse them). */
typedef struct {
    const char *mem_budget;
    const char *offload_policy; /* NULL = the default (moe_model_set_offload_policy) */
    int n_ctx;
    /* expert parallelism at inference (docs/distributed.md): this process is
     * rank r of expert_parallel ranks of an MPI job (the job's size; the
     * distributed build) and holds only experts [r*E/N, (r+1)*E/N) of every
     * MoE layer, read through the expert cache (offloading: sized for all of
     * them unless mem_budget says less, a share of this rank's). Our own
     * models are then mapped, not copied, so other ranks' experts are never
     * read. The ranks must then run the same calls in step. 0 or 1 = off. */
    int expert_parallel;
    const char *offload_prefetch; /* "on", "off", NULL = the default (moe_model_set_offload_prefetch) */
    const char *offload_warm;     /* a routing trace to warm the cache from (moe_model_offload_warm_trace), or NULL */
} moe_load_options;
MOE_API moe_status moe_model_load_with(moe_model **out, const char *path, const moe_load_options *opts);
/* Bytes of a loaded published model's weights copied at load into the
 * layouts the kernels stream (Q8_0 and Q4_K/Q5_K/Q6_K rows regrouped, on AVX-512 CPUs
 * (Q8_0 not where AMX runs it); the same results; MOE_REPACK=0 turns it
 * off); 0 when none were. */
MOE_API size_t moe_model_repacked_bytes(const moe_model *m);
/* Atomic: writes path.tmp, fsyncs, renames. Includes the tokenizer if set. */
MOE_API moe_status moe_model_save(const moe_model *m, const char *path);
/* Writes the model in a published GGUF layout that llama.cpp runs with the
 * same results: the llama architecture (Mixtral-style MoE or dense), f32
 * weights, the tokenizer if set, no moe.* keys (atomic, like save). Refuses
 * with MOE_ERR_UNSUPPORTED, naming the feature, a model that layout cannot
 * express (sigmoid routing, shared experts, expert choice, ...) or one that
 * is itself a published file. path NULL: only that check, nothing written. */
MOE_API moe_status moe_model_convert(const moe_model *m, const char *path);
/* The same with the matrices in weight type quant: "f32" (as moe_model_convert),
 * "q8_0", "q4_0" or "q4_k" (any case): attention, experts, dense FFN, output
 * head and token embedding quantised by the reference quantisers, a matrix
 * whose rows are not whole blocks of the type in q8_0, else f32; norms,
 * routers and biases stay f32. MOE_ERR_INVALID_ARG names an unknown type. */
MOE_API moe_status moe_model_convert_quant(const moe_model *m, const char *path, const char *quant);
/* Bytes of the weights (tensor data) of that copy of m, for the same types;
 * also for a published model (its tensors as if written from fp32). m NULL:
 * only checks the name (*bytes = 0). */
MOE_API moe_status moe_model_quant_bytes(const moe_model *m, const char *quant, uint64_t *bytes);
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
/* Run-time routing for generation and evaluation (never training, which
 * refuses a model with it set): active_experts experts per token instead of
 * the model's top-k (1..n_experts; 0 = top-k), chosen by the model's own
 * rule (scores, selection bias, group limits) and weighted by it
 * (renormalised over the chosen when the model renormalises, else raw);
 * then, when threshold > 0, of those only the ones whose weight is at least
 * threshold (0..1] times the best one's, and at least min_experts (0 = 1)
 * of the largest. The weight compared is the softmax probability or the
 * sigmoid score, without the selection bias (so, sigmoid routing compares
 * sigmoid scores). All zeros: the model's own routing. Changing the number
 * of active experts drops the KV cache (set it before generating). An
 * expert-choice model takes active_experts as the k of its capacity and
 * refuses a threshold (MOE_ERR_UNSUPPORTED). */
MOE_API moe_status moe_model_set_routing(moe_model *m, int active_experts, float threshold,
                                         int min_experts);
/* Mean routed experts per token and MoE layer in the forward passes since
 * the last reset (0 when none); reset != 0 starts counting anew. */
MOE_API double moe_model_experts_per_token(moe_model *m, int reset);
/* Writes a description of a loaded model (architecture, layers, experts,
 * attention, tensor types, parameters, bytes, memory at the context) into
 * buf, always NUL-terminated. */
MOE_API void moe_model_describe(const moe_model *m, char *buf, size_t cap);

/* ---- expert offloading (docs/memory.md) ------------------------------------
 * A published model's routed experts can stay on disk: with a budget, each
 * expert's gate, up and down slices are read from the model file when the
 * router first picks it, into a cache whose slots take at most budget bytes
 * (its bookkeeping, a few bytes per expert, is table_bytes besides);
 * attention, norms, embeddings and routers stay mapped. Output is
 * bit-identical to the fully resident run.
 * size: "0" (off: every expert mapped, the default), bytes ("4096", "512K",
 * "512M", "2G", powers of 1024) or a share of the experts' bytes ("50%").
 * Refused below one expert's slices (the message says the minimum), and for
 * a model whose weights are in memory (moe_model_create, or our own model
 * loaded without mem_budget or expert_parallel: such a load copies every
 * weight for training). With expert_parallel the share is of this rank's
 * experts, and "0" is refused. */
MOE_API moe_status moe_model_set_mem_budget(moe_model *m, const char *size);
/* Eviction policy for the next moe_model_set_mem_budget (or the current
 * cache, rebuilt empty): "lru", "lfu" (use counts halving every 256 tokens)
 * or "lrfu" (halving every 4 tokens: recency and frequency mixed); NULL =
 * the default, lfu (docs/memory.md says why). drop_page_cache: after
 * every read, tell the kernel to drop those pages (posix_fadvise DONTNEED),
 * so that every miss reaches the disk (for honest measurements). */
MOE_API moe_status moe_model_set_offload_policy(moe_model *m, const char *policy, int drop_page_cache);
/* Prefetch for the next moe_model_set_mem_budget (or the current cache,
 * rebuilt empty): "on" (a reader thread reads the experts the next MoE
 * layer's router predicts from the current layer's input, while this layer
 * computes; decode chunks of up to 4 tokens), "off", or NULL = the default,
 * off (docs/memory.md says why). Output is the same either way. */
MOE_API moe_status moe_model_set_offload_prefetch(moe_model *m, const char *on_off);
typedef struct {
    int64_t budget;        /* bytes given (0: offloading off)                    */
    int64_t expert_bytes;  /* all routed experts' weights in the file (expert
                              parallelism: the ones this rank holds)              */
    int64_t cache_bytes;   /* the cache's slots (<= budget)                       */
    int64_t table_bytes;   /* its bookkeeping, allocated besides                  */
    int slots, units;      /* experts the cache holds at once / experts there are
                              (this rank's under expert parallelism)              */
    int64_t hits, misses;  /* expert uses found in the cache / read from the file */
    int64_t bytes_read;    /* from the file, since the last reset                 */
    int64_t tokens;        /* tokens run since the last reset                     */
    double read_s;         /* seconds spent reading (summed over threads)         */
    int64_t prefetched;    /* experts read ahead by the prefetch thread (in bytes_read) */
    int64_t prefetch_used; /* of those, used before being evicted (hits)          */
    int64_t prefetch_harm; /* misses on experts that a prefetch had evicted       */
} moe_offload_stats;
/* All zero when offloading is off. */
MOE_API void moe_model_offload_stats(const moe_model *m, moe_offload_stats *out);
MOE_API void moe_model_offload_reset_stats(moe_model *m);
/* Fills the empty slots with the experts most used in counts[n_moe][E]
 * (routing statistics of MoE layer i, expert e, e.g. from an earlier run),
 * most used first, and restarts the statistics; no-op when offloading is off. */
MOE_API moe_status moe_model_offload_warm(moe_model *m, const int64_t *counts);
/* The same with the counts of a routing trace as moe route --json writes it
 * (one token a line), of this model: a file that is not one is
 * MOE_ERR_FORMAT naming the line; no-op when offloading is off. */
MOE_API moe_status moe_model_offload_warm_trace(moe_model *m, const char *path);
/* ---- routing telemetry and ablation -------------------------------------- */
/* The routing of one token: for each of the n_moe MoE layers (layers[i] is
 * its index among all layers) the k chosen experts, best first, and their
 * combine weights; expert -1 with weight 0 is an empty slot (a disabled
 * expert's). The arrays are valid during the callback only. */
typedef struct {
    size_t pos;              /* index of the token in the input               */
    int32_t token;
    int n_moe, k;
    const int *layers;       /* [n_moe]                                       */
    const int32_t *experts;  /* [n_moe][k]                                    */
    const float *weights;    /* [n_moe][k]                                    */
} moe_token_route;
typedef int (*moe_route_fn)(const moe_token_route *r, void *user); /* nonzero stops */
/* Runs tokens[n] through m as inference does (dropless, the KV-cached path;
 * our own and published models alike) and calls fn for each token in order.
 * Past the context the model starts over: token i sits at position
 * i % context. A dense model calls fn with n_moe 0. */
MOE_API moe_status moe_model_route(moe_model *m, const int32_t *tokens, size_t n, moe_route_fn fn,
                                   void *user);
/* Switches expert `expert` of MoE layer `layer` off for evaluation,
 * generation and moe_model_route (not training): where the router picks
 * it, its slot stays empty, its weight goes to no one, and the other
 * chosen experts are renormalised only when the router renormalises
 * (renorm_topk). MOE_ERR_INVALID_ARG for a layer or expert out of range or
 * a dense layer. moe_model_enable_experts switches all back on. */
MOE_API moe_status moe_model_disable_expert(moe_model *m, int layer, int expert);
MOE_API void moe_model_enable_experts(moe_model *m);

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
    float save_minutes;   /* also checkpoint when this many minutes passed since
                             the last save (default 10; 0 = off)             */
    int expert_parallel;  /* a distributed run (make MPI=1): ranks per expert-parallel
                             group, each owning n_experts / EP experts (0, 1 = none) */
} moe_train_params;
MOE_API void moe_train_params_default(moe_train_params *p);

/* A tokenised corpus: documents with a domain label, split train/validation. */
typedef struct moe_dataset moe_dataset;
/* paths: text files or directories (each file is one domain, named by the file). */
MOE_API moe_status moe_dataset_load_text(moe_dataset **out, const moe_tokenizer *tok,
                                         const char *const *paths, int n_paths);
MOE_API void moe_dataset_free(moe_dataset *d);
MOE_API size_t moe_dataset_tokens(const moe_dataset *d, int validation);
/* Domains: one per data file, named by the file without its extension. */
MOE_API int moe_dataset_n_domains(const moe_dataset *d);
MOE_API const char *moe_dataset_domain_name(const moe_dataset *d, int i); /* NULL if out of range */
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
    /* a distributed run (ranks > 1), this rank (0) over the step:          */
    int ranks;
    double a2a_bytes;      /* all-to-all bytes sent plus received           */
    double a2a_s, reduce_s, compute_s; /* seconds in the all-to-all, in the
                                          reductions, and in everything else */
} moe_train_progress;
typedef void (*moe_progress_fn)(const moe_train_progress *p, void *user);

/* Trains m on d. When resume_state is non-NULL it names a training-state file
 * to continue from. After moe_request_stop it finishes the current step,
 * saves the checkpoint and its state (as a pause does) and returns
 * MOE_ERR_INTERRUPTED; resuming from there continues bit-identically. A
 * request seen before the first step returns MOE_ERR_INTERRUPTED at once,
 * nothing trained, nothing saved. */
MOE_API moe_status moe_train(moe_model *m, const moe_dataset *d, const moe_train_params *p,
                             const char *resume_state, moe_progress_fn fn, void *user);
/* Asks a running moe_train (between steps) or moe_evaluate / _progress
 * (between batches) to stop cleanly and return MOE_ERR_INTERRUPTED.
 * Async-signal-safe and callable from any thread: meant for SIGINT and
 * SIGTERM handlers. A request made while neither runs is honoured by the next
 * call; the call that honours it clears it. */
MOE_API void moe_request_stop(void);
/* The step a resume of m from state_path would start at, and the run's
 * horizon, after the checks moe_train makes on that file (so *step >= *steps
 * means there is nothing left to train; moe_train would refuse). Reads the
 * whole state: meant for once, before the data is loaded. */
MOE_API moe_status moe_train_resume_point(const moe_model *m, const char *state_path, int *step,
                                          int *steps);
/* Mean per-token cross-entropy over the validation split (or all of d when it has none). */
MOE_API moe_status moe_evaluate(moe_model *m, const moe_dataset *d, int seq, int max_batches,
                                int use_all, double *loss_out, size_t *tokens_out);
/* The same, calling fn(tokens done, tokens in all, user) after every batch (fn may be NULL).
 * Both stop after a batch on moe_request_stop: MOE_ERR_INTERRUPTED, with
 * *loss_out and *tokens_out over the tokens measured so far (0 tokens: no loss). */
typedef void (*moe_eval_progress_fn)(size_t done, size_t total, void *user);
MOE_API moe_status moe_evaluate_progress(moe_model *m, const moe_dataset *d, int seq,
                                         int max_batches, int use_all, double *loss_out,
                                         size_t *tokens_out, moe_eval_progress_fn fn, void *user);
/* moe_evaluate_progress (over all of d with use_all, else its validation split), the loss also split by the
 * domain of each target token: dom_loss[i] its mean loss over dom_tokens[i]
 * targets (0 when none), for i < moe_dataset_n_domains(d). The overall loss
 * is computed exactly as moe_evaluate computes it. */
MOE_API moe_status moe_evaluate_domains(moe_model *m, const moe_dataset *d, int seq, int use_all, double *loss_out,
                                        size_t *tokens_out, double *dom_loss, size_t *dom_tokens,
                                        moe_eval_progress_fn fn, void *user);
/* An evaluation with its sampling error: the standard error of the mean
 * loss, taking blocks of 8 consecutive windows (block_tokens positions) as
 * the independent units (a ratio estimator; the tokens inside a window are
 * not independent), and again with blocks 16 times as long: when the two
 * agree, neighbouring blocks are not correlated either. 0 with fewer than
 * two blocks. dom_loss and dom_tokens may be NULL (no per-domain split). */
typedef struct {
    double loss;          /* mean per-token cross-entropy            */
    size_t tokens;        /* targets counted                         */
    size_t block_tokens;  /* positions per block (8 x seq)           */
    size_t blocks;        /* blocks measured                         */
    size_t wide_tokens;   /* positions per wide block                */
    double se_block;      /* standard error of loss, blocks           */
    double se_wide;       /* the same, blocks of 16 blocks            */
} moe_eval_result;
/* block_fn (may be NULL) gets each block's loss sum and target count, in
 * order, with user: the same blocks for any model with the same tokenizer,
 * so two models' block losses pair up (the standard error of a difference). */
typedef void (*moe_eval_block_fn)(double loss_sum, size_t targets, void *user);
MOE_API moe_status moe_evaluate_full(moe_model *m, const moe_dataset *d, int seq, int use_all, moe_eval_result *res,
                                     double *dom_loss, size_t *dom_tokens, moe_eval_progress_fn fn,
                                     moe_eval_block_fn block_fn, void *user);

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

/* ---- benchmarking (moe bench, make bench; docs/performance.md) ------------ */
/* Writes a random-weight model of cfg's shapes in the published llama layout
 * (Mixtral-style experts when cfg->n_experts > 0, else dense), every matrix in
 * type ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_K", ...; rows that are not
 * whole blocks of it fall back to q8_0, then f32; routers stay f32), with a
 * synthetic vocabulary of exactly cfg->vocab_size tokens (257 to 65,793) so
 * that other engines load the same file. */
MOE_API moe_status moe_write_synthetic(const char *path, const moe_config *cfg, const char *type,
                                       uint64_t seed);
typedef struct {
    int64_t total;     /* bytes of every weight as stored                        */
    int64_t per_token; /* bytes one decoded token reads: every weight outside the
                          routed experts, k of the E experts of each MoE layer, the
                          whole output matrix, one row of the token embedding    */
} moe_weight_bytes;
MOE_API moe_weight_bytes moe_model_weight_bytes(const moe_model *m);
/* Streaming-read bandwidth in GB/s (1e9 bytes/s) on the current thread count:
 * the median of reps passes over a buffer of bytes (0: 512 MiB, far beyond
 * the caches; reps 0: 7). */
MOE_API moe_status moe_measure_bandwidth(size_t bytes, int reps, double *gbs);
/* "units: avx2 fma avx512f ...; kernels: fast (avx512)": the CPU units
 * detected at run time and the kernel path they select (buf NUL-terminated). */
MOE_API void moe_cpu_describe(char *buf, size_t cap);

MOE_API void moe_set_threads(int n);  /* 0 = all cores */
/* Releases memory the library hands out (e.g. moe_tokenizer_encode's ids). */
MOE_API void moe_free(void *p);

#ifdef __cplusplus
}
#endif
#endif
