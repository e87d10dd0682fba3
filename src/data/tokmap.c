/* data/tokmap.c: the tokenizer's hash tables (see tokmap.h). */
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "data/tokmap.h"

uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        h = mix64(h ^ k) + 0x632be59bd9b4e019ULL;
        s += 8;
        n -= 8;
    }
    uint64_t k = 0;
    for (size_t i = 0; i < n; i++) k |= (uint64_t)s[i] << (8 * i);
    return mix64(h ^ k ^ 0x5bd1e9955bd1e995ULL);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

moe_status u64map_init(u64map *m, size_t expect) {
    size_t cap = pow2_at_least(expect * 2 + 1);
    m->keys = moe_malloc(cap * sizeof(uint64_t));
    m->vals = moe_malloc(cap * sizeof(int32_t));
    if (!m->keys || !m->vals) {
        moe_free(m->keys);
        moe_free(m->vals);
        m->keys = NULL;
        m->vals = NULL;
        return MOE_ERR_NOMEM;
    }
    memset(m->keys, 0xff, cap * sizeof(uint64_t));
    m->mask = cap - 1;
    m->n = 0;
    return MOE_OK;
}

void u64map_free(u64map *m) {
    moe_free(m->keys);
    moe_free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

moe_status u64map_put(u64map *m, uint64_t key, int32_t val) {
    if ((m->n + 1) * 2 > m->mask + 1) {
        u64map bigger;
        moe_status st = u64map_init(&bigger, m->n + 1);
        if (st) return st;
        for (size_t i = 0; i <= m->mask; i++) {
            if (m->keys[i] == UINT64_MAX) continue;
            size_t j = (size_t)mix64(m->keys[i]) & bigger.mask;
            while (bigger.keys[j] != UINT64_MAX) j = (j + 1) & bigger.mask;
            bigger.keys[j] = m->keys[i];
            bigger.vals[j] = m->vals[i];
        }
        bigger.n = m->n;
        u64map_free(m);
        *m = bigger;
    }
    size_t i = (size_t)mix64(key) & m->mask;
    while (m->keys[i] != UINT64_MAX && m->keys[i] != key) i = (i + 1) & m->mask;
    if (m->keys[i] == UINT64_MAX) m->n++;
    m->keys[i] = key;
    m->vals[i] = val;
    return MOE_OK;
}

moe_status strmap_init(strmap *m, size_t cap) {
    cap = pow2_at_least(cap);
    m->e = moe_calloc(cap, sizeof(strent));
    if (!m->e) return MOE_ERR_NOMEM;
    m->mask = cap - 1;
    m->n = 0;
    return MOE_OK;
}

strent *strmap_slot(const strmap *m, const char *p, size_t len, uint64_t h) {
    size_t i = (size_t)h & m->mask;
    for (;;) {
        strent *e = &m->e[i];
        if (!e->p) return e;
        if (e->h == h && e->len == len && memcmp(e->p, p, len) == 0) return e;
        i = (i + 1) & m->mask;
    }
}

moe_status strmap_reserve(strmap *m) {
    if ((m->n + 1) * 2 <= m->mask + 1) return MOE_OK;
    size_t cap = (m->mask + 1) * 2;
    strent *ne = moe_calloc(cap, sizeof(strent));
    if (!ne) return MOE_ERR_NOMEM;
    for (size_t i = 0; i <= m->mask; i++) {
        if (!m->e[i].p) continue;
        size_t j = (size_t)m->e[i].h & (cap - 1);
        while (ne[j].p) j = (j + 1) & (cap - 1);
        ne[j] = m->e[i];
    }
    moe_free(m->e);
    m->e = ne;
    m->mask = cap - 1;
    return MOE_OK;
}

moe_status tokset_init(tokset *t, size_t expect) {
    size_t cap = pow2_at_least(expect * 2 + 1);
    t->h = moe_malloc(cap * sizeof(uint64_t));
    t->id = moe_malloc(cap * sizeof(int32_t));
    if (!t->h || !t->id) {
        moe_free(t->h);
        moe_free(t->id);
        t->h = NULL;
        t->id = NULL;
        return MOE_ERR_NOMEM;
    }
    memset(t->id, 0xff, cap * sizeof(int32_t));
    t->mask = cap - 1;
    t->n = 0;
    return MOE_OK;
}

void tokset_free(tokset *t) {
    moe_free(t->h);
    moe_free(t->id);
    t->h = NULL;
    t->id = NULL;
}

int32_t tokset_find(const tokset *t, const char *blob, const size_t *off, const char *s,
                           size_t len, uint64_t h) {
    size_t i = (size_t)h & t->mask;
    for (;;) {
        int32_t id = t->id[i];
        if (id < 0) return -1;
        if (t->h[i] == h && off[id + 1] - off[id] == len && memcmp(blob + off[id], s, len) == 0)
            return id;
        i = (i + 1) & t->mask;
    }
}

moe_status tokset_add(tokset *t, int32_t id, uint64_t h) {
    if ((t->n + 1) * 2 > t->mask + 1) {
        tokset bigger;
        moe_status st = tokset_init(&bigger, t->n + 1);
        if (st) return st;
        for (size_t i = 0; i <= t->mask; i++) {
            if (t->id[i] < 0) continue;
            size_t j = (size_t)t->h[i] & bigger.mask;
            while (bigger.id[j] >= 0) j = (j + 1) & bigger.mask;
            bigger.h[j] = t->h[i];
            bigger.id[j] = t->id[i];
        }
        bigger.n = t->n;
        tokset_free(t);
        *t = bigger;
    }
    size_t i = (size_t)h & t->mask;
    while (t->id[i] >= 0) i = (i + 1) & t->mask;
    t->h[i] = h;
    t->id[i] = id;
    t->n++;
    return MOE_OK;
}

moe_status tok_grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return MOE_OK;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    size_t bytes;
    if (moe_mul_size(c, elem, &bytes)) return moe_error(MOE_ERR_NOMEM, "tokenizer: size overflow");
    void *q = moe_realloc(*p, bytes);
    if (!q) return MOE_ERR_NOMEM;
    *p = q;
    *cap = c;
    return MOE_OK;
}
