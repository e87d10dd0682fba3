/* data/tokmap.h (internal): the hash tables the tokenizer code shares --
 * a uint64 -> int32 map, a byte-string -> (size_t, size_t) map over borrowed
 * pointers, and a set of token ids keyed by their bytes in a blob -- plus a
 * doubling grow() for arrays. */
#ifndef MOE_TOKMAP_H
#define MOE_TOKMAP_H
#include <stddef.h>
#include <stdint.h>

#include "moe.h"

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t pair_key(int32_t l, int32_t r) {
    return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
}

uint64_t hash_bytes(const void *p, size_t n);

/* ---- map: uint64 key -> int32 value (UINT64_MAX = empty) ------------------- */
typedef struct {
    uint64_t *keys;
    int32_t *vals;
    size_t mask, n;
} u64map;

moe_status u64map_init(u64map *m, size_t expect);
void u64map_free(u64map *m);
moe_status u64map_put(u64map *m, uint64_t key, int32_t val);
static inline int32_t u64map_get(const uint64_t *keys, const int32_t *vals, size_t mask,
                                 uint64_t key) {
    size_t i = (size_t)mix64(key) & mask;
    for (;;) {
        if (keys[i] == key) return vals[i];
        if (keys[i] == UINT64_MAX) return -1;
        i = (i + 1) & mask;
    }
}

/* ---- map: byte string (borrowed pointer) -> two size_t values --------------- */
typedef struct {
    uint64_t h;
    const char *p; /* NULL = empty slot */
    size_t len;
    size_t v1, v2;
} strent;

typedef struct {
    strent *e;
    size_t mask, n;
} strmap;

moe_status strmap_init(strmap *m, size_t cap);
/* Finds key; when absent returns the empty slot where it would go. */
strent *strmap_slot(const strmap *m, const char *p, size_t len, uint64_t h);
/* Makes room for one more entry (may move entries: re-find slots after). */
moe_status strmap_reserve(strmap *m);

/* ---- token byte strings -> id (compares against a blob that may move) ------ */
typedef struct {
    uint64_t *h;
    int32_t *id; /* -1 = empty */
    size_t mask, n;
} tokset;

moe_status tokset_init(tokset *t, size_t expect);
void tokset_free(tokset *t);
int32_t tokset_find(const tokset *t, const char *blob, const size_t *off, const char *s,
                    size_t len, uint64_t h);
/* Adds id (whose hash is h); the caller has checked it is not present. */
moe_status tokset_add(tokset *t, int32_t id, uint64_t h);

/* Grows *p (capacity *cap elements of elem bytes) to hold need elements. */
moe_status tok_grow(void **p, size_t *cap, size_t need, size_t elem);
#endif
