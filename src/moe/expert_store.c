/* moe/expert_store: the bounded expert cache (expert_store.h). One mutex
 * guards the tables; reads run outside it, so a miss on one thread does
 * not stall the hits of the others. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"
#include "moe/expert_store.h"

enum { SLICE_ALIGN = 64 };

typedef struct {
    int unit;            /* layer * E + e held here, -1 = free           */
    int pins;            /* threads using it now                         */
    int loading;         /* a thread is reading it in                    */
    int64_t last_use;    /* tick of its last counted acquire (LRU)        */
} slot_state;

struct expert_store {
    int fd;
    char path[256];
    int n_layers, E, n_units, n_slots;
    expert_store_layer *layers;  /* [n_layers]                           */
    size_t slot_bytes;           /* every slot: the largest unit, aligned */
    char *slots;                 /* [n_slots][slot_bytes]                 */
    slot_state *slot;            /* [n_slots]                             */
    int *unit_slot;              /* [n_units] slot holding the unit, -1   */
    double *freq;                /* [n_units] decayed use count at freq_at */
    int64_t *freq_at;            /* [n_units] tick of that count          */
    expert_store_opts o;
    int64_t tick;                /* counted acquires so far               */
    expert_store_stats st;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sync_ready;              /* mu and cv initialised                 */
    /* prefetch (expert_store.h): the reader thread and its request */
    pthread_t reader;
    int reader_running, reader_stop;
    pthread_cond_t pf_cv;        /* a new request, or stop                */
    int *pf_queue;               /* [E] units still to read               */
    int pf_len, pf_head;         /* the request is pf_queue[pf_head .. pf_len) */
    int pf_active;               /* the reader holds a unit of it (lock released) */
    int pf_busy;                 /* the layer running now (-1: none)     */
    int64_t pf_req;              /* requests so far                        */
    int64_t *pf_gen;             /* [n_units] request a prefetched, not yet
                                    used unit was read for; -1 = none      */
    int64_t *pf_asked;           /* [n_units] the last request naming the unit */
    uint8_t *pf_evicted;         /* [n_units] 1: last evicted by a prefetch */
    moe_status failed;           /* first read error, and its message     */
    char err[384];
};

static void *prefetch_main(void *arg);

static size_t align_up(size_t n) { return (n + SLICE_ALIGN - 1) & ~(size_t)(SLICE_ALIGN - 1); }

/* bytes of a unit of layer l in a slot: its slices, each 64-byte aligned */
static size_t unit_bytes(const expert_store_layer *L) {
    return align_up(L->bytes[0]) + align_up(L->bytes[1]) + align_up(L->bytes[2]);
}

size_t expert_store_min_budget(const expert_store_layer *layers, int n_layers) {
    size_t m = 0;
    for (int l = 0; l < n_layers; l++) m = MOE_MAX(m, unit_bytes(&layers[l]));
    return m;
}

moe_status expert_store_open(expert_store **out, const char *path, const expert_store_layer *layers,
                             int n_layers, int n_experts, size_t budget, const expert_store_opts *o) {
    *out = NULL;
    if (n_layers < 1 || n_experts < 1 || (int64_t)n_layers * n_experts > INT32_MAX)
        return moe_error(MOE_ERR_INVALID_ARG, "expert store: %d layers of %d experts", n_layers, n_experts);
    if (o->policy < 0 || o->policy >= EXPERT_EVICT_COUNT || !(o->halflife > 0))
        return moe_error(MOE_ERR_INVALID_ARG, "expert store: bad policy %d or half-life %g", o->policy, o->halflife);
    const int n_units = n_layers * n_experts;
    const size_t slot_bytes = expert_store_min_budget(layers, n_layers);
    if (!slot_bytes) return moe_error(MOE_ERR_INVALID_ARG, "expert store: the model has no routed experts");
    const int held = o->count ? o->count : n_experts; /* experts of each layer this process may read */
    if (o->first < 0 || held < 1 || o->first > n_experts - held)
        return moe_error(MOE_ERR_INVALID_ARG, "expert store: experts %d..%d of %d", o->first, o->first + held - 1, n_experts);
    int used_units = 0; /* units that exist (layers with experts) and may be read */
    for (int l = 0; l < n_layers; l++) used_units += unit_bytes(&layers[l]) ? held : 0;
    if (budget < slot_bytes)
        return moe_error(MOE_ERR_INVALID_ARG, "a memory budget of %zu bytes is below the minimum of %zu bytes "
                         "(one expert's gate, up and down slices)", budget, slot_bytes);
    size_t n_slots = budget / slot_bytes;
    if (n_slots > (size_t)used_units) n_slots = (size_t)used_units;

    int fd;
    struct stat sb;
    if (file_open_read(path, &fd, &sb)) return moe_error_prefix(MOE_ERR_IO, "expert store");
    /* every slice must lie inside the file now (a later truncation is a read error) */
    for (int l = 0; l < n_layers; l++)
        for (int k = 0; k < 3; k++) {
            const expert_store_layer *L = &layers[l];
            size_t span;
            if (!L->bytes[k]) continue;
            if (L->off[k] < 0 || moe_mul_size(L->bytes[k], (size_t)n_experts, &span) ||
                (uint64_t)L->off[k] > (uint64_t)sb.st_size || span > (uint64_t)sb.st_size - (uint64_t)L->off[k]) {
                close(fd);
                return moe_error(MOE_ERR_FORMAT, "expert store: layer %d's experts lie outside %s", l, path);
            }
        }
    expert_store *s = moe_calloc(1, sizeof *s);
    if (!s) { close(fd); return moe_error_prefix(MOE_ERR_NOMEM, "expert store"); }
    s->fd = fd;
    snprintf(s->path, sizeof s->path, "%s", path);
    s->n_layers = n_layers; s->E = n_experts; s->n_units = n_units; s->n_slots = (int)n_slots;
    s->slot_bytes = slot_bytes;
    s->o = *o;
    s->o.count = held;
    s->layers = moe_malloc((size_t)n_layers * sizeof *s->layers);
    s->slot = moe_calloc(n_slots, sizeof *s->slot);
    s->unit_slot = moe_malloc((size_t)n_units * sizeof(int));
    s->freq = moe_calloc((size_t)n_units, sizeof(double));
    s->freq_at = moe_calloc((size_t)n_units, sizeof(int64_t));
    size_t slots_total;
    if (!moe_mul_size(n_slots, slot_bytes, &slots_total)) s->slots = moe_malloc(slots_total);
    s->pf_queue = moe_malloc((size_t)n_experts * sizeof(int));
    s->pf_gen = moe_malloc((size_t)n_units * sizeof(int64_t));
    s->pf_evicted = moe_calloc((size_t)n_units, 1);
    s->pf_asked = moe_calloc((size_t)n_units, sizeof(int64_t));
    if (!s->layers || !s->slot || !s->unit_slot || !s->freq || !s->freq_at || !s->slots || !s->pf_queue ||
        !s->pf_gen || !s->pf_evicted || !s->pf_asked) {
        expert_store_free(s);
        return moe_error_prefix(MOE_ERR_NOMEM, "expert cache of %zu slots of %zu bytes", n_slots, slot_bytes);
    }
    memcpy(s->layers, layers, (size_t)n_layers * sizeof *s->layers);
    for (int u = 0; u < n_units; u++) { s->unit_slot[u] = -1; s->pf_gen[u] = -1; }
    for (size_t i = 0; i < n_slots; i++) s->slot[i].unit = -1;
    s->st.slot_bytes = slot_bytes;
    s->st.n_slots = (int)n_slots;
    s->st.table_bytes = sizeof *s + (size_t)n_layers * sizeof *s->layers + n_slots * sizeof *s->slot +
                        (size_t)n_units * (sizeof(int) + sizeof(double) + 3 * sizeof(int64_t) + 1) +
                        (size_t)n_experts * sizeof(int);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->pf_cv, NULL);
    s->sync_ready = 1;
    s->pf_busy = -1;
    if (o->prefetch) {
        const int err = pthread_create(&s->reader, NULL, prefetch_main, s);
        if (err) {
            expert_store_free(s);
            return moe_error(MOE_ERR_IO, "expert store: starting the prefetch thread: %s", strerror(err));
        }
        s->reader_running = 1;
    }
    if (o->drop_page_cache) (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    *out = s;
    return MOE_OK;
}

void expert_store_free(expert_store *s) {
    if (!s) return;
    if (s->reader_running) { /* wakes the reader; it finishes a read in progress, then returns */
        pthread_mutex_lock(&s->mu);
        s->reader_stop = 1;
        pthread_cond_signal(&s->pf_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->reader, NULL);
    }
    if (s->sync_ready) { pthread_mutex_destroy(&s->mu); pthread_cond_destroy(&s->cv); pthread_cond_destroy(&s->pf_cv); }
    if (s->fd >= 0) close(s->fd);
    moe_free(s->slots);
    moe_free(s->slot);
    moe_free(s->unit_slot);
    moe_free(s->freq);
    moe_free(s->freq_at);
    moe_free(s->layers);
    moe_free(s->pf_queue);
    moe_free(s->pf_gen);
    moe_free(s->pf_evicted);
    moe_free(s->pf_asked);
    moe_free(s);
}

/* the decayed use count of unit u now (LFU and LRFU) */
static double freq_now(const expert_store *s, int u) {
    return s->freq[u] * exp2(-(double)(s->tick - s->freq_at[u]) / s->o.halflife);
}

/* a prefetched unit not used yet, read for this request or the one before */
static int prefetch_fresh(const expert_store *s, int u) { return s->pf_gen[u] >= 0 && s->pf_gen[u] >= s->pf_req - 1; }

/* A free slot, else the unpinned slot the policy likes least; -1 when every
 * slot is pinned or loading. Demand (for_prefetch 0) takes a freshly
 * prefetched unit only when nothing else is free to go; the prefetcher
 * never takes one, nor a unit of the running layer, nor one its request
 * names.
 * Called with the lock held. */
static int pick_victim(const expert_store *s, int for_prefetch) {
    int best = -1, best_fresh = -1;
    double best_score = 0, fresh_score = 0;
    for (int i = 0; i < s->n_slots; i++) {
        const slot_state *t = &s->slot[i];
        if (t->pins || t->loading) continue;
        if (t->unit < 0) return i;
        const int l = t->unit / s->E, fresh = prefetch_fresh(s, t->unit);
        if (for_prefetch && (fresh || l == s->pf_busy || s->pf_asked[t->unit] == s->pf_req)) continue;
        const double score = s->o.policy == EXPERT_EVICT_LRU ? (double)t->last_use : freq_now(s, t->unit);
        if (fresh) { if (best_fresh < 0 || score < fresh_score) { best_fresh = i; fresh_score = score; } }
        else if (best < 0 || score < best_score) { best = i; best_score = score; }
    }
    return best >= 0 ? best : best_fresh;
}

/* Gives slot i to unit u (lock held): the previous occupant leaves the
 * tables, remembered as a prefetch's victim when it is one. */
static void claim_slot(expert_store *s, int i, int u, int by_prefetch) {
    slot_state *t = &s->slot[i];
    if (t->unit >= 0) {
        s->unit_slot[t->unit] = -1;
        s->pf_gen[t->unit] = -1;
        s->pf_evicted[t->unit] = (uint8_t)by_prefetch;
    }
    t->unit = u;
    t->loading = 1;
    t->last_use = s->tick; /* not the previous occupant's */
    s->unit_slot[u] = i;
    s->pf_evicted[u] = 0;
}

/* pread all of n bytes at off into dst; 0, or -1 with errno (0: end of file) */
static int read_full(int fd, char *dst, size_t n, int64_t off) {
    while (n) {
        ssize_t got = pread(fd, dst, n, (off_t)off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) { if (got == 0) errno = 0; return -1; }
        dst += got; n -= (size_t)got; off += got;
    }
    return 0;
}

static char *slice_at(const expert_store *s, int slot, int l, int k) {
    const expert_store_layer *L = &s->layers[l];
    size_t at = 0;
    for (int j = 0; j < k; j++) at += align_up(L->bytes[j]);
    return s->slots + (size_t)slot * s->slot_bytes + at;
}

/* Reads unit (l, e) into slot (lock not held); 0 or -1 with s->err set.
 * On success *counted (if given) grows with bytes_read, under one lock, so
 * stats read while a read ahead is in flight stay consistent. */
static int load_unit(expert_store *s, int slot, int l, int e, int64_t *counted) {
    const expert_store_layer *L = &s->layers[l];
    const double t0 = moe_now();
    int rc = 0;
    size_t total = 0;
    for (int k = 0; k < 3 && !rc; k++) {
        const int64_t off = L->off[k] + (int64_t)e * (int64_t)L->bytes[k];
        if (read_full(s->fd, slice_at(s, slot, l, k), L->bytes[k], off)) {
            const int err = errno;
            pthread_mutex_lock(&s->mu);
            if (!s->failed) {
                s->failed = MOE_ERR_IO;
                if (err) snprintf(s->err, sizeof s->err, "reading expert %d of layer %d from %s: %s", e, l, s->path, strerror(err));
                else snprintf(s->err, sizeof s->err, "reading expert %d of layer %d from %s: the file ends early "
                              "(truncated since it was loaded?)", e, l, s->path);
            }
            pthread_mutex_unlock(&s->mu);
            rc = -1;
        }
        if (!rc && s->o.drop_page_cache) { /* whole pages around the slice, so the next miss reads the device */
            const int64_t pg = 4096, a = off & ~(pg - 1), b = (off + (int64_t)L->bytes[k] + pg - 1) & ~(pg - 1);
            (void)posix_fadvise(s->fd, (off_t)a, (off_t)(b - a), POSIX_FADV_DONTNEED);
        }
        total += L->bytes[k];
    }
    const double dt = moe_now() - t0;
    pthread_mutex_lock(&s->mu);
    s->st.read_s += dt;
    if (!rc) {
        s->st.bytes_read += (int64_t)total;
        if (counted) ++*counted;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int expert_store_acquire(expert_store *s, int layer, int e, int counts, const void **gate,
                         const void **up, const void **down) {
    const int u = layer * s->E + e;
    int waited = 0, slot;
    pthread_mutex_lock(&s->mu);
    if ((e < s->o.first || e >= s->o.first + s->o.count) && !s->failed) { /* a bug of the caller, never a read */
        s->failed = MOE_ERR_INVALID_ARG;
        snprintf(s->err, sizeof s->err, "expert %d of layer %d belongs to another rank (this one holds experts %d..%d)",
                 e, layer, s->o.first, s->o.first + s->o.count - 1);
    }
    if (counts) { /* the use: recency and decayed frequency */
        s->tick++;
        s->freq[u] = freq_now(s, u) + 1.0;
        s->freq_at[u] = s->tick;
    }
    for (;;) {
        if (s->failed) { pthread_mutex_unlock(&s->mu); return -1; }
        slot = s->unit_slot[u];
        if (slot >= 0 && !s->slot[slot].loading) { /* a hit */
            s->slot[slot].pins++;
            if (counts) s->st.hits++;
            if (s->pf_gen[u] >= 0) { s->st.prefetch_used++; s->pf_gen[u] = -1; }
            break;
        }
        const int victim = slot >= 0 ? -1 : pick_victim(s, 0);
        if (victim >= 0) { /* a miss: claim the slot, read without the lock */
            slot_state *t = &s->slot[victim];
            s->st.prefetch_harm += s->pf_evicted[u];
            claim_slot(s, victim, u, 0);
            t->pins = 1;
            s->st.misses++;
            pthread_mutex_unlock(&s->mu);
            const int rc = load_unit(s, victim, layer, e, NULL);
            pthread_mutex_lock(&s->mu);
            t->loading = 0;
            if (rc) { t->unit = -1; t->pins = 0; s->unit_slot[u] = -1; }
            pthread_cond_broadcast(&s->cv);
            if (rc) { pthread_mutex_unlock(&s->mu); return -1; }
            slot = victim;
            break;
        }
        /* another thread is reading this unit, or every slot is pinned */
        if (!waited) { s->st.waits++; waited = 1; }
        pthread_cond_wait(&s->cv, &s->mu);
    }
    if (counts) s->slot[slot].last_use = s->tick;
    pthread_mutex_unlock(&s->mu);
    *gate = slice_at(s, slot, layer, 0);
    *up = slice_at(s, slot, layer, 1);
    *down = slice_at(s, slot, layer, 2);
    return 0;
}

void expert_store_release(expert_store *s, int layer, int e) {
    pthread_mutex_lock(&s->mu);
    const int slot = s->unit_slot[layer * s->E + e];
    if (slot >= 0 && s->slot[slot].pins > 0 && --s->slot[slot].pins == 0) pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

moe_status expert_store_check(expert_store *s) {
    pthread_mutex_lock(&s->mu);
    moe_status st = s->failed;
    if (st) moe_error(st, "%s", s->err);
    pthread_mutex_unlock(&s->mu);
    return st;
}

moe_status expert_store_warm(expert_store *s, const int64_t *count) {
    for (;;) {
        int free_slot = -1, best = -1;
        pthread_mutex_lock(&s->mu);
        for (int i = 0; i < s->n_slots && free_slot < 0; i++)
            if (s->slot[i].unit < 0) free_slot = i;
        for (int u = 0; free_slot >= 0 && u < s->n_units; u++)
            if (s->unit_slot[u] < 0 && count[u] > 0 && unit_bytes(&s->layers[u / s->E]) && u % s->E >= s->o.first &&
                u % s->E < s->o.first + s->o.count && (best < 0 || count[u] > count[best]))
                best = u;
        if (best < 0) { pthread_mutex_unlock(&s->mu); return MOE_OK; }
        slot_state *t = &s->slot[free_slot];
        t->unit = best;
        t->loading = 1; /* the prefetch thread may be choosing victims meanwhile */
        s->unit_slot[best] = free_slot;
        pthread_mutex_unlock(&s->mu);
        const int rc = load_unit(s, free_slot, best / s->E, best % s->E, NULL);
        pthread_mutex_lock(&s->mu);
        t->loading = 0;
        if (rc) { t->unit = -1; s->unit_slot[best] = -1; }
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (rc) return expert_store_check(s);
    }
}

/* The prefetch thread: reads the requested units one at a time, the lock
 * released during each read (as acquire's misses are). */
static void *prefetch_main(void *arg) {
    expert_store *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->pf_head == s->pf_len) pthread_cond_broadcast(&s->cv); /* idle: a waiting request is done */
        while (!s->reader_stop && s->pf_head == s->pf_len) pthread_cond_wait(&s->pf_cv, &s->mu);
        if (s->reader_stop) break;
        const int u = s->pf_queue[s->pf_head++];
        if (s->failed || s->unit_slot[u] >= 0) continue;
        const int victim = pick_victim(s, 1);
        if (victim < 0) continue; /* no room without evicting something wanted soon */
        slot_state *t = &s->slot[victim];
        claim_slot(s, victim, u, 1);
        s->pf_gen[u] = s->pf_req;
        s->pf_active = 1;
        pthread_mutex_unlock(&s->mu);
        const int rc = load_unit(s, victim, u / s->E, u % s->E, &s->st.prefetched);
        pthread_mutex_lock(&s->mu);
        s->pf_active = 0;
        t->loading = 0;
        if (rc) { t->unit = -1; s->unit_slot[u] = -1; s->pf_gen[u] = -1; }
        pthread_cond_broadcast(&s->cv); /* acquires waiting for this unit, or for a slot */
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

void expert_store_prefetch(expert_store *s, int layer, const int32_t *ids, int n, int busy_layer) {
    if (!s->reader_running || layer < 0 || layer >= s->n_layers || !unit_bytes(&s->layers[layer])) return;
    pthread_mutex_lock(&s->mu);
    s->pf_req++;
    s->pf_busy = busy_layer;
    s->pf_head = s->pf_len = 0;
    for (int i = 0; i < n && s->pf_len < s->E; i++) {
        /* another rank's expert (expert parallelism) is never read, not even ahead */
        if (ids[i] < s->o.first || ids[i] >= s->o.first + s->o.count) continue;
        const int u = layer * s->E + ids[i];
        int dup = 0;
        for (int j = 0; j < s->pf_len && !dup; j++) dup = s->pf_queue[j] == u;
        s->pf_asked[u] = s->pf_req;
        if (!dup && s->unit_slot[u] < 0) s->pf_queue[s->pf_len++] = u;
    }
    if (s->pf_len) pthread_cond_signal(&s->pf_cv);
    while (s->o.prefetch_wait && (s->pf_head < s->pf_len || s->pf_active) && !s->reader_stop)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

void expert_store_get_stats(expert_store *s, expert_store_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    pthread_mutex_unlock(&s->mu);
}

void expert_store_reset_stats(expert_store *s) {
    pthread_mutex_lock(&s->mu);
    const expert_store_stats keep = s->st;
    memset(&s->st, 0, sizeof s->st);
    s->st.slot_bytes = keep.slot_bytes;
    s->st.n_slots = keep.n_slots;
    s->st.table_bytes = keep.table_bytes;
    pthread_mutex_unlock(&s->mu);
}
