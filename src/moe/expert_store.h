/* moe/expert_store: a bounded cache of routed experts' weights, read from
 * the model file on demand (expert offloading).
 *
 * A unit is one expert of one layer: its gate, up and down slices, each a
 * contiguous range of the file in the file's own type, held in a slot as
 *   [gate F rows][up F rows][down d rows].
 * Every slot has the size of the largest unit; the slots are one counted
 * allocation (moe_malloc) of n_slots * slot_bytes <= budget, made once.
 * The bookkeeping (a few bytes per unit and slot, table_bytes) comes on top.
 *
 * acquire(layer, e) pins the unit (reading it with pread on a miss, outside
 * the lock, so other threads go on meanwhile) and hands out the three
 * slices; release(layer, e) unpins it. Any number of threads may hold units
 * at once; when every slot is pinned, acquire waits for a release (each
 * thread holds one unit at a time, so one slot is enough to make progress).
 * A read error is recorded once (the first one wins) and acquire fails from
 * then on; expert_store_check turns it into the caller's moe_error.
 *
 * Prefetch (opts.prefetch): one reader thread of the store's own reads the
 * units expert_store_prefetch names into the cache ahead of their use. It
 * only fills slots, within the same budget: it never evicts a pinned or
 * loading unit, nor one of the layer in progress or one its request
 * names; an acquire of a unit it is reading waits for that read. Units it
 * read are kept from demand eviction (when another victim exists) until
 * used or two requests old. Every unit it evicts that a later acquire
 * misses is counted (prefetch_harm). expert_store_free stops and joins it. */
#ifndef MOE_EXPERT_STORE_H
#define MOE_EXPERT_STORE_H
#include <stddef.h>
#include <stdint.h>
#include "core/core.h"

/* eviction policies (docs/memory.md "## Offloading" says which won and why) */
enum {
    EXPERT_EVICT_LRU = 0,  /* least recently used                                  */
    EXPERT_EVICT_LFU = 1,  /* least used, counts halved every `halflife` acquires (long) */
    EXPERT_EVICT_LRFU = 2, /* the same with a short half-life: frequency and recency mixed */
    EXPERT_EVICT_COUNT
};

/* Where one layer's experts are in the file: expert e's slice of matrix
 * m (0 gate, 1 up, 2 down) is bytes[m] bytes at off[m] + e * bytes[m].
 * A layer without routed experts has bytes all 0. */
typedef struct {
    int64_t off[3];
    size_t bytes[3];
} expert_store_layer;

typedef struct {
    int policy;              /* EXPERT_EVICT_*                                       */
    double halflife;         /* LFU/LRFU: acquires over which a count halves (> 0)   */
    int drop_page_cache;     /* 1: posix_fadvise(DONTNEED) after every read, so that
                                every miss reaches the device (honest measurements) */
    /* expert parallelism: only experts [first, first + count) of each layer
     * are this process's; acquiring another is an error (recorded like a
     * read error), so their bytes are never read. count 0 = every expert */
    int first, count;
    int prefetch;            /* 1: run the prefetch reader thread                  */
    int prefetch_wait;       /* 1: each expert_store_prefetch returns once its request
                                is read (tests: prefetch counts that do not depend on
                                how the threads are scheduled)                        */
} expert_store_opts;

typedef struct {
    int64_t hits, misses;    /* acquires that found / read their unit               */
    int64_t bytes_read;      /* from the file                                       */
    int64_t waits;           /* acquires that waited for a free slot or a read     */
    double read_s;           /* wall time inside pread, summed over threads          */
    int64_t prefetched;      /* units the prefetch thread read (in bytes_read too)    */
    int64_t prefetch_used;   /* of those, acquired before being evicted             */
    int64_t prefetch_harm;   /* misses on units a prefetch had evicted               */
    size_t slot_bytes;
    int n_slots;
    size_t table_bytes;      /* the store's bookkeeping, besides the slots          */
} expert_store_stats;

typedef struct expert_store expert_store;

/* The smallest budget that works: one slot (the largest unit). */
size_t expert_store_min_budget(const expert_store_layer *layers, int n_layers);
/* Opens path for reading and sizes the cache for budget bytes (at most
 * one slot per unit). MOE_ERR_INVALID_ARG below expert_store_min_budget. */
moe_status expert_store_open(expert_store **out, const char *path, const expert_store_layer *layers,
                             int n_layers, int n_experts, size_t budget, const expert_store_opts *o);
void expert_store_free(expert_store *s);

/* Pins unit (layer, e) and points the three slices at its slot. counts: 1
 * for the first of an expert's tasks in a forward call (hits and the
 * frequency are counted once per use, not per row block; a miss is always
 * counted, as it reads). Returns 0, or -1 after a read error or for an
 * expert outside [first, first + count) (recorded, nothing read). */
int expert_store_acquire(expert_store *s, int layer, int e, int counts, const void **gate,
                         const void **up, const void **down);
void expert_store_release(expert_store *s, int layer, int e);
/* MOE_OK, or the recorded read error as the calling thread's moe_error. */
moe_status expert_store_check(expert_store *s);
/* Loads units into free slots, most used first by count[n_layers][E]
 * (routing statistics), until the cache is full; no evictions. */
moe_status expert_store_warm(expert_store *s, const int64_t *count);
/* Asks the prefetch thread to read units (layer, ids[0..n-1]) that are not
 * cached (duplicates and ids < 0 skipped), replacing what it has not read
 * yet of the previous request; busy_layer is the layer now running (its
 * units are not evicted for this). No-op without opts.prefetch. */
void expert_store_prefetch(expert_store *s, int layer, const int32_t *ids, int n, int busy_layer);
void expert_store_get_stats(expert_store *s, expert_store_stats *out);
void expert_store_reset_stats(expert_store *s);
#endif
