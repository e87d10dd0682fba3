/* bench_offload: decode speed and expert-cache behaviour against the memory
 * budget (docs/memory.md, "## Offloading").
 *   build/bench/bench_offload [MODEL.gguf [DECODE [BUDGETS [POLICIES [CACHES [PREFETCH]]]]]]
 * (lists comma-separated; defaults 32, "0,100%,75%,50%,25%", "lru,lfu,lrfu",
 * "warm,cold", "off,on" (innermost, so on and off runs alternate); BENCH_SMALL=1 writes d_model 128, expert hidden 64 instead;
 * BENCH_THREADS, default 1).
 * Writes MODEL (default /tmp/moe-offload-bench.gguf) when it is missing: a
 * random-weight llama-layout MoE, 8 layers, d_model 1024, 64 experts top-8,
 * expert hidden 512, Q8_0 (BENCH_OWN=1: one of our own fp32 files, as moe
 * train writes them, of the default preset instead). MODEL may be any file
 * moe loads, our own included. Then, for each budget (mapped, 100/75/50/25% of
 * the experts' bytes) and each eviction policy: a 16-token prompt, 16
 * decode steps to fill the cache, then the measured decode steps (the
 * tokens a fixed pseudo-random stream, so routing has no more locality than
 * random weights give; BENCH_GREEDY=1 feeds back the argmax instead), once with the file in the page cache
 * and once "cold": the whole file dropped from the page cache with
 * posix_fadvise(POSIX_FADV_DONTNEED) before the run and every expert read
 * dropped again after it (no root needed), so each miss reaches the disk.
 * One line per run: tokens/s, hit rate, MiB read per token, experts
 * prefetched per token and the share of them used before eviction, misses
 * on experts a prefetch evicted per token, the process's
 * resident memory (VmRSS, and its file-backed part), the allocator's
 * count at the end of the run (cache, KV cache, scratch), and the bytes
 * read from the file over (misses + experts prefetched) x one expert's
 * bytes (1.000: no byte more than the misses imply). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "model/model.h"

static double rss_mib(const char *field) { /* "VmRSS:" etc. from /proc/self/status */
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, field, strlen(field))) kb = atof(line + strlen(field));
    if (f) fclose(f);
    return kb / 1024.0;
}

static void drop_file_cache(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

enum { PROMPT = 16, FILL = 16 };

static int greedy; /* 1: feed back the argmax (random weights fall into loops); 0: a fixed pseudo-random stream */
static uint64_t lcg = 1;
static int32_t next_token(const float *logits, int V) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return greedy ? argmax(logits, V) : (int32_t)((lcg >> 33) % (uint64_t)V);
}

static int run_one(const char *path, const char *budget, const char *policy, int cold, const char *prefetch, int n_decode) {
    lcg = 1; /* every run sees the same tokens */
    if (cold) drop_file_cache(path);
    const size_t base = moe_alloc_in_use();
    moe_model *m = NULL;
    /* the budget at load time: our own models are then mapped, not copied ("0": all mapped) */
    const moe_load_options o = {.mem_budget = budget, .offload_policy = policy, .offload_prefetch = prefetch};
    if (moe_model_load_with(&m, path, &o) != MOE_OK || moe_model_set_context(m, MOE_MIN(1024, m->cfg.max_seq)) != MOE_OK ||
        (cold && moe_model_set_offload_policy(m, policy, cold) != MOE_OK)) {
        fprintf(stderr, "bench_offload: %s\n", moe_last_error());
        moe_model_free(m);
        return 1;
    }
    const int V = m->cfg.vocab_size;
    float *logits = moe_malloc(sizeof(float) * (size_t)PROMPT * V);
    int32_t tok[PROMPT];
    for (int i = 0; i < PROMPT; i++) tok[i] = (int32_t)((i * 97 + 5) % V);
    moe_status st = model_infer(m, tok, PROMPT, 0, logits, 0);
    int32_t next = next_token(logits, V);
    int pos = PROMPT;
    for (int i = 0; !st && i < FILL; i++, pos++) {
        st = model_infer(m, &next, 1, pos, logits, 0);
        next = next_token(logits, V);
    }
    moe_model_offload_reset_stats(m);
    const double t0 = moe_now();
    for (int i = 0; !st && i < n_decode; i++, pos++) {
        st = model_infer(m, &next, 1, pos, logits, 0);
        next = next_token(logits, V);
    }
    const double dt = moe_now() - t0;
    if (st) { fprintf(stderr, "bench_offload: %s\n", moe_last_error()); moe_free(logits); moe_model_free(m); return 1; }
    moe_offload_stats s;
    moe_model_offload_stats(m, &s);
    const double uses = (double)(s.hits + s.misses), mib = 1024.0 * 1024.0;
    /* bytes read over what the misses and prefetches imply (one expert's bytes each): 1 */
    double one = 0;
    for (int l = 0; l < m->cfg.n_layers && !one; l++)
        if (m->plan[l].ffn == FFN_MOE) {
            const layer_weights *W = &m->w.layers[l];
            one = (double)W->gate_exps.ne[1] * W->gate_exps.row_bytes + (double)W->up_exps.ne[1] * W->up_exps.row_bytes +
                  (double)W->down_exps.ne[1] * W->down_exps.row_bytes;
        }
    const double implied = (double)(s.misses + s.prefetched) * one;
    const double tokens = s.tokens ? (double)s.tokens : 1.0;
    printf("%-6s %-5s %-5s %-4s %8.2f %7.1f%% %9.2f %7.2f %5.0f%% %6.2f %9.1f %9.1f %9.1f %9.1f %8.3f\n", budget, policy,
           cold ? "cold" : "warm", s.budget ? prefetch : "-", n_decode / dt, uses ? 100.0 * s.hits / uses : 100.0,
           s.bytes_read / mib / tokens, s.prefetched / tokens, s.prefetched ? 100.0 * s.prefetch_used / s.prefetched : 0.0,
           s.prefetch_harm / tokens, s.cache_bytes / mib, rss_mib("VmRSS:"), rss_mib("RssFile:"), (moe_alloc_in_use() - base) / mib,
           implied > 0 ? (double)s.bytes_read / implied : s.bytes_read ? -1.0 : 1.0);
    fflush(stdout);
    moe_free(logits);
    moe_model_free(m);
    return 0;
}

/* comma-separated list item i of s into buf, or NULL past the end */
static const char *item(const char *s, int i, char *buf, size_t cap) {
    for (; i > 0 && s; i--) { s = strchr(s, ','); if (s) s++; }
    if (!s || !*s) return NULL;
    size_t n = strcspn(s, ",");
    if (n >= cap) n = cap - 1;
    memcpy(buf, s, n);
    buf[n] = 0;
    return buf;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/tmp/moe-offload-bench.gguf";
    const int n_decode = argc > 2 ? atoi(argv[2]) : 32;
    const char *budgets = argc > 3 ? argv[3] : "0,100%,75%,50%,25%";
    const char *policies = argc > 4 ? argv[4] : "lru,lfu,lrfu";
    const char *caches = argc > 5 ? argv[5] : "warm,cold";
    const char *prefetches = argc > 6 ? argv[6] : "off,on";
    const int small = getenv("BENCH_SMALL") != NULL; /* the same routing shape, small matrices */
    /* one thread by default: on a machine shared with other jobs, every
     * parallel region waits for a descheduled thread */
    moe_set_threads(getenv("BENCH_THREADS") ? atoi(getenv("BENCH_THREADS")) : 1);
    greedy = getenv("BENCH_GREEDY") != NULL;
    if (access(path, R_OK) != 0 && getenv("BENCH_OWN")) {
        moe_config c;
        moe_model *m = NULL;
        moe_config_preset(&c, "default");
        fprintf(stderr, "bench_offload: writing %s (our own layout, default preset)\n", path);
        if (moe_model_create(&m, &c, 42) != MOE_OK || moe_model_save(m, path) != MOE_OK) {
            fprintf(stderr, "bench_offload: %s\n", moe_last_error());
            moe_model_free(m);
            return 1;
        }
        moe_model_free(m);
    }
    if (access(path, R_OK) != 0) {
        moe_config c;
        moe_config_preset(&c, "default");
        c.vocab_size = 1024; c.d_model = small ? 128 : 1024; c.n_layers = 8; c.n_heads = 8; c.n_kv_heads = 8;
        c.n_experts = 64; c.top_k = 8; c.d_expert = small ? 64 : 512; c.d_ff = c.d_expert; c.max_seq = 1024;
        c.norm_eps = 1e-5f; c.rope_base = 10000.0f;
        fprintf(stderr, "bench_offload: writing %s\n", path);
        if (arch_write_random(path, "llama", &c, DT_Q8_0, NULL, 42) != MOE_OK) {
            fprintf(stderr, "bench_offload: %s\n", moe_last_error());
            return 1;
        }
    }
    printf("budget policy cache pref    tok/s hit rate MiB/token pf/tok  used harm/t  cacheMiB    RSSMiB   RSSfile  allocMiB read/implied\n");
    char cb[16], bb[32], pb[16], fb[8];
    for (int ci = 0; item(caches, ci, cb, sizeof cb); ci++)
        for (int bi = 0; item(budgets, bi, bb, sizeof bb); bi++)
            for (int pi = 0; item(policies, pi, pb, sizeof pb); pi++) {
                if (!strcmp(bb, "0") && pi > 0) continue; /* mapped: no policy */
                for (int fi = 0; item(prefetches, fi, fb, sizeof fb); fi++) {
                    if (!strcmp(bb, "0") && fi > 0) continue; /* mapped: no prefetch */
                    if (run_one(path, bb, pb, !strcmp(cb, "cold"), fb, n_decode)) return 1;
                }
            }
    return 0;
}
