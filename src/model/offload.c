/* model/offload: a mapped model's routed experts (a published model, or our
 * own loaded with a budget) behind an expert_store (moe/expert_store.h),
 * read from its file on demand. The model side: the
 * budget's text, where each layer's experts lie in the file, keeping their
 * pages out of the process, and the public setters of moe.h. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "io/gguf.h"
#include "model/model.h"
#include "moe/expert_store.h"
#include "stats/route_stats.h"

/* half-lives of the frequency policies, in tokens (moe.h) */
enum { LFU_HALFLIFE_TOKENS = 256, LRFU_HALFLIFE_TOKENS = 4 };
static const char *const policy_names[EXPERT_EVICT_COUNT] = {"lru", "lfu", "lrfu"};
enum { DEFAULT_POLICY = EXPERT_EVICT_LFU }; /* measured best: docs/memory.md */
enum { DEFAULT_PREFETCH = 0 };               /* measured: docs/memory.md      */

/* the stacked experts' matrix k (0 gate, 1 up, 2 down) of layer W */
static const moe_tensor *expert_tensor(const layer_weights *W, int k) {
    return k == 0 ? &W->gate_exps : k == 1 ? &W->up_exps : &W->down_exps;
}

size_t model_expert_bytes(const moe_model *m) {
    size_t n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        if (m->plan[l].ffn != FFN_MOE) continue;
        for (int k = 0; k < 3; k++) {
            const moe_tensor *t = expert_tensor(&m->w.layers[l], k);
            n += (size_t)t->ne[2] * (size_t)t->ne[1] * t->row_bytes;
        }
    }
    return n;
}

/* the experts' bytes this process may hold: all, or its expert-parallel share */
static size_t held_expert_bytes(const moe_model *m) {
    const size_t all = model_expert_bytes(m);
    return m->ep_count ? all / (size_t)m->cfg.n_experts * (size_t)m->ep_count : all;
}

/* Tells the kernel the experts' pages of the mapping are not needed (drops
 * any that are mapped, no read-ahead into them); back to normal when off. */
static void advise_experts(moe_model *m, int offloaded) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        if (m->plan[l].ffn != FFN_MOE) continue;
        for (int k = 0; k < 3; k++) {
            const moe_tensor *t = expert_tensor(&m->w.layers[l], k);
            const uintptr_t a = ((uintptr_t)t->data + pg - 1) & ~(pg - 1); /* whole pages inside the tensor */
            const uintptr_t b = ((uintptr_t)t->data + (size_t)t->ne[2] * t->ne[1] * t->row_bytes) & ~(pg - 1);
            if (b <= a) continue;
            if (offloaded) {
                (void)madvise((void *)a, b - a, MADV_DONTNEED);
                (void)madvise((void *)a, b - a, MADV_RANDOM);
            } else {
                (void)madvise((void *)a, b - a, MADV_NORMAL);
            }
        }
    }
}

void model_offload_free(moe_model *m) {
    expert_store_free(m->store);
    m->store = NULL;
    moe_free(m->path);
    m->path = NULL;
    if (m->ep_infer) expert_parallel_free(m->ep);
    if (m->ep_infer) m->ep = NULL;
    m->ep_infer = 0;
}

/* "0", "4096", "512K", "512M", "2G" (powers of 1024) or "50%" of total */
static moe_status parse_budget(const char *s, size_t total, size_t *out) {
    char *end;
    if (!s || !isdigit((unsigned char)s[0]))
        return moe_error(MOE_ERR_INVALID_ARG, "memory budget '%s': expected bytes (e.g. 512M, 2G) or a percentage (50%%)", s ? s : "");
    double v = strtod(s, &end);
    double mult = 1;
    if (*end == '%') { mult = (double)total / 100.0; end++; }
    else if (*end == 'K' || *end == 'k') { mult = 1024.0; end++; }
    else if (*end == 'M' || *end == 'm') { mult = 1024.0 * 1024; end++; }
    else if (*end == 'G' || *end == 'g') { mult = 1024.0 * 1024 * 1024; end++; }
    else if (*end == 'T' || *end == 't') { mult = 1024.0 * 1024 * 1024 * 1024; end++; }
    if (*end == 'B' || *end == 'b') end++;
    if (*end || !(v >= 0) || v * mult > 9e18 || (s[strlen(s) - 1] == '%' && v > 100))
        return moe_error(MOE_ERR_INVALID_ARG, "memory budget '%s': expected bytes (e.g. 512M, 2G) or a percentage up to 100%%", s);
    *out = (size_t)(v * mult);
    return MOE_OK;
}

/* (Re)builds the store for m->store_budget with the current policy. */
static moe_status open_store(moe_model *m) {
    expert_store_free(m->store);
    m->store = NULL;
    if (!m->store_budget && !m->store_all) { advise_experts(m, 0); return MOE_OK; }
    const int L = m->cfg.n_layers;
    expert_store_layer *layers = moe_calloc((size_t)L, sizeof *layers);
    if (!layers) return moe_error_prefix(MOE_ERR_NOMEM, "expert offloading");
    for (int l = 0; l < L; l++) {
        if (m->plan[l].ffn != FFN_MOE) continue;
        for (int k = 0; k < 3; k++) {
            const moe_tensor *t = expert_tensor(&m->w.layers[l], k);
            layers[l].off[k] = (int64_t)gguf_file_offset(m->file, t->data);
            layers[l].bytes[k] = (size_t)t->ne[1] * t->row_bytes;
        }
    }
    const double per_token = (double)m->cfg.top_k * moe_config_n_moe_layers(&m->cfg); /* acquires */
    const int policy = m->store_policy ? m->store_policy - 1 : DEFAULT_POLICY;
    const int prefetch = m->store_prefetch ? m->store_prefetch == 1 || m->store_prefetch == 3 : DEFAULT_PREFETCH;
    expert_store_opts o = {.policy = policy, .drop_page_cache = m->store_drop_cache, .prefetch = prefetch,
                           .prefetch_wait = m->store_prefetch == 3,
                           .halflife = per_token * (policy == EXPERT_EVICT_LRFU ? LRFU_HALFLIFE_TOKENS : LFU_HALFLIFE_TOKENS),
                           .first = m->ep_first, .count = m->ep_count};
    if (m->store_all) /* a slot for every expert held: each is read once, then stays */
        m->store_budget = expert_store_min_budget(layers, L) * (size_t)moe_config_n_moe_layers(&m->cfg) *
                          (size_t)(m->ep_count ? m->ep_count : m->cfg.n_experts);
    moe_status st = expert_store_open(&m->store, m->path, layers, L, m->cfg.n_experts, m->store_budget, &o);
    moe_free(layers);
    if (st) { m->store_budget = 0; m->store_all = 0; return st; }
    advise_experts(m, 1);
    model_repack_drop_experts(m); /* the store hands out the file's rows */
    m->store_tokens = 0;
    return MOE_OK;
}

moe_status moe_model_set_mem_budget(moe_model *m, const char *size) {
    size_t budget = 0;
    const size_t total = m->cfg.n_experts > 0 ? held_expert_bytes(m) : 0;
    moe_status st = parse_budget(size, total, &budget);
    if (st) return st;
    if (!budget && m->ep_infer)
        return moe_error(MOE_ERR_INVALID_ARG, "with expert parallelism a rank's experts are always read through the expert "
                         "cache: give --mem-budget above 0, or leave it out to hold all of this rank's experts");
    if (budget && (!m->file || !m->path))
        return moe_error(MOE_ERR_UNSUPPORTED, "this model's weights are all in memory already (created, or loaded for "
                         "training): give the budget when loading it (--mem-budget, moe_load_options.mem_budget), which "
                         "keeps the weights in the file");
    if (budget && !total) return moe_error(MOE_ERR_UNSUPPORTED, "the model has no routed experts to offload");
    m->store_budget = budget;
    m->store_all = 0;
    return open_store(m);
}

moe_status moe_model_set_offload_policy(moe_model *m, const char *policy, int drop_page_cache) {
    int p = DEFAULT_POLICY;
    if (policy) {
        for (p = 0; p < EXPERT_EVICT_COUNT && strcmp(policy, policy_names[p]); p++) {}
        if (p == EXPERT_EVICT_COUNT) return moe_error(MOE_ERR_INVALID_ARG, "eviction policy '%s': expected lru, lfu or lrfu", policy);
    }
    m->store_policy = p + 1;
    m->store_drop_cache = drop_page_cache != 0;
    return m->store ? open_store(m) : MOE_OK;
}

moe_status moe_model_set_offload_prefetch(moe_model *m, const char *on_off) {
    int p = 0;
    if (on_off && !strcmp(on_off, "on")) p = 1;
    else if (on_off && !strcmp(on_off, "off")) p = 2;
    else if (on_off) return moe_error(MOE_ERR_INVALID_ARG, "expert prefetch '%s': expected on or off", on_off);
    m->store_prefetch = p;
    return m->store ? open_store(m) : MOE_OK;
}

void moe_model_offload_stats(const moe_model *m, moe_offload_stats *out) {
    memset(out, 0, sizeof *out);
    if (!m->store) return;
    expert_store_stats s;
    expert_store_get_stats(m->store, &s);
    out->budget = (int64_t)m->store_budget;
    out->expert_bytes = (int64_t)held_expert_bytes(m);
    out->cache_bytes = (int64_t)(s.slot_bytes * (size_t)s.n_slots);
    out->table_bytes = (int64_t)s.table_bytes;
    out->slots = s.n_slots;
    out->units = moe_config_n_moe_layers(&m->cfg) * (m->ep_count ? m->ep_count : m->cfg.n_experts);
    out->hits = s.hits;
    out->misses = s.misses;
    out->bytes_read = s.bytes_read;
    out->tokens = m->store_tokens;
    out->read_s = s.read_s;
    out->prefetched = s.prefetched;
    out->prefetch_used = s.prefetch_used;
    out->prefetch_harm = s.prefetch_harm;
}

void moe_model_offload_reset_stats(moe_model *m) {
    if (!m->store) return;
    expert_store_reset_stats(m->store);
    m->store_tokens = 0;
}

moe_status moe_model_offload_warm(moe_model *m, const int64_t *counts) {
    if (!m->store) return MOE_OK;
    const int L = m->cfg.n_layers, E = m->cfg.n_experts;
    int64_t *by_layer = moe_calloc((size_t)L * E, sizeof(int64_t));
    if (!by_layer) return moe_error_prefix(MOE_ERR_NOMEM, "warming the expert cache");
    for (int l = 0, i = 0; l < L; l++)
        if (m->plan[l].ffn == FFN_MOE) memcpy(by_layer + (size_t)l * E, counts + (size_t)i++ * E, sizeof(int64_t) * E);
    moe_status st = expert_store_warm(m->store, by_layer);
    moe_free(by_layer);
    moe_model_offload_reset_stats(m); /* the counts start with the warm cache */
    return st;
}

moe_status moe_model_offload_warm_trace(moe_model *m, const char *path) {
    if (!m->store) return MOE_OK;
    int64_t *counts = moe_calloc((size_t)moe_config_n_moe_layers(&m->cfg) * m->cfg.n_experts, sizeof(int64_t));
    if (!counts) return moe_error_prefix(MOE_ERR_NOMEM, "warming the expert cache");
    moe_status st = route_counts_read(path, &m->cfg, counts);
    if (!st) st = moe_model_offload_warm(m, counts);
    moe_free(counts);
    return st;
}

moe_status model_hold_experts(moe_model *m, int ep) {
    const moe_dist *w = dist_world();
    if (ep <= 1) return MOE_OK;
    if (!m->file || !m->path) return moe_error(MOE_ERR_INVALID_ARG, "internal: expert parallelism needs the model's file");
    if (w->size != ep)
        return moe_error(MOE_ERR_INVALID_ARG, "--expert-parallel %d must equal the job's %d rank%s: at inference every rank "
                         "runs the same tokens and holds 1/%d of the experts%s", ep, w->size, w->size == 1 ? "" : "s", ep,
                         dist_is_mpi() ? " (mpirun -np N ... --expert-parallel N)"
                                       : " (the distributed build, make MPI=1, under mpirun -np N)");
    moe_status st = dist_set_expert_parallel(ep, m->cfg.n_experts);
    if (st) return st;
    if ((st = expert_parallel_create(&m->ep, moe_config_n_moe_layers(&m->cfg), m->cfg.n_experts, EP_SAME_TOKENS)))
        return st;
    m->ep_infer = 1;
    m->ep_count = m->cfg.n_experts / ep;
    m->ep_first = w->ep_rank * m->ep_count;
    m->store_all = 1;
    return open_store(m);
}
