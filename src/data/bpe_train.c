/* data/bpe_train.c: training our own byte-level BPE vocabulary.
 *
 * Training counts the unique pieces (pretok.c's own cutter), then repeatedly
 * merges the most frequent adjacent pair (ties: smallest (left id, right id))
 * with incremental pair count updates and a lazy max-heap. A merge whose
 * result has the same bytes as an existing token is skipped, so token byte
 * strings are unique. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

typedef struct {
    int32_t l, r;
    int32_t n_occ, cap_occ;
    int32_t *occ;   /* words that (may) contain the pair, no duplicates */
    int64_t count;  /* weighted occurrences */
    int32_t stamp;  /* merge step that last touched it as a new pair */
    int32_t banned; /* its result already exists as a token */
} tr_pair;

typedef struct {
    int64_t count;
    int32_t pair;
} tr_heap_ent;

typedef struct {
    /* words: unique pieces */
    int32_t *sym;       /* symbol pool */
    size_t *w_off;      /* start of word i in sym */
    int32_t *w_len;
    int64_t *w_count;
    size_t n_words;
    /* pairs */
    tr_pair *pairs;
    size_t n_pairs, cap_pairs;
    u64map pmap;
    /* heap */
    tr_heap_ent *heap;
    size_t n_heap, cap_heap;
    /* pairs created in the current merge step */
    int32_t *touched;
    size_t n_touched, cap_touched;
    /* vocabulary under construction */
    char *blob;
    size_t blob_len, blob_cap;
    size_t *off;       /* n_tokens + 1 */
    size_t cap_off;
    int32_t *merges;
    size_t cap_merges;
    int32_t n_tokens;
    tokset tset;
} trainer;


static inline int heap_better(const trainer *t, tr_heap_ent a, tr_heap_ent b) {
    if (a.count != b.count) return a.count > b.count;
    const tr_pair *pa = &t->pairs[a.pair], *pb = &t->pairs[b.pair];
    if (pa->l != pb->l) return pa->l < pb->l;
    return pa->r < pb->r;
}

static moe_status heap_push(trainer *t, int32_t pair) {
    moe_status st = tok_grow((void **)&t->heap, &t->cap_heap, t->n_heap + 1, sizeof(tr_heap_ent));
    if (st) return st;
    tr_heap_ent e = {t->pairs[pair].count, pair};
    size_t i = t->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_better(t, e, t->heap[parent])) break;
        t->heap[i] = t->heap[parent];
        i = parent;
    }
    t->heap[i] = e;
    return MOE_OK;
}

static tr_heap_ent heap_pop(trainer *t) {
    tr_heap_ent top = t->heap[0];
    tr_heap_ent last = t->heap[--t->n_heap];
    size_t n = t->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_better(t, t->heap[c + 1], t->heap[c])) c++;
        if (!heap_better(t, t->heap[c], last)) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (n) t->heap[i] = last;
    return top;
}

/* Adds delta to the count of pair (l, r), creating it if needed. With
 * word >= 0 the word is recorded in the pair's occurrence list, and a pair
 * created or increased in this step is remembered for pushing on the heap. */
static moe_status tr_pair_add(trainer *t, int32_t l, int32_t r, int64_t delta, int32_t word,
                              int32_t step) {
    uint64_t key = pair_key(l, r);
    int32_t idx = u64map_get(t->pmap.keys, t->pmap.vals, t->pmap.mask, key);
    moe_status st;
    if (idx < 0) {
        if (t->n_pairs >= INT32_MAX) return moe_error(MOE_ERR_UNSUPPORTED, "tokenizer: too many pairs");
        st = tok_grow((void **)&t->pairs, &t->cap_pairs, t->n_pairs + 1, sizeof(tr_pair));
        if (st) return st;
        idx = (int32_t)t->n_pairs;
        st = u64map_put(&t->pmap, key, idx);
        if (st) return st;
        t->n_pairs++;
        tr_pair *p = &t->pairs[idx];
        memset(p, 0, sizeof(*p));
        p->l = l;
        p->r = r;
        p->stamp = -1;
    }
    tr_pair *p = &t->pairs[idx];
    p->count += delta;
    if (word >= 0) {
        if (p->n_occ == 0 || p->occ[p->n_occ - 1] != word) {
            size_t cap = (size_t)p->cap_occ;
            st = tok_grow((void **)&p->occ, &cap, (size_t)p->n_occ + 1, sizeof(int32_t));
            if (st) return st;
            if (cap > INT32_MAX) cap = INT32_MAX;
            p->cap_occ = (int32_t)cap;
            p->occ[p->n_occ++] = word;
        }
        if (p->stamp != step) {
            p->stamp = step;
            st = tok_grow((void **)&t->touched, &t->cap_touched, t->n_touched + 1, sizeof(int32_t));
            if (st) return st;
            t->touched[t->n_touched++] = idx;
        }
    }
    return MOE_OK;
}

static moe_status tr_add_token(trainer *t, const char *bytes, size_t len, uint64_t h) {
    moe_status st = tok_grow((void **)&t->blob, &t->blob_cap, t->blob_len + len, 1);
    if (st) return st;
    st = tok_grow((void **)&t->off, &t->cap_off, (size_t)t->n_tokens + 2, sizeof(size_t));
    if (st) return st;
    memcpy(t->blob + t->blob_len, bytes, len);
    t->blob_len += len;
    t->off[t->n_tokens + 1] = t->blob_len;
    st = tokset_add(&t->tset, t->n_tokens, h);
    if (st) return st;
    t->n_tokens++;
    return MOE_OK;
}

/* Merges every occurrence of pair pi = (a, b) into new token x, updating the
 * neighbouring pairs' counts locally. */
static moe_status tr_merge(trainer *t, int32_t pi, int32_t x, int32_t step) {
    int32_t a = t->pairs[pi].l, b = t->pairs[pi].r;
    moe_status st;
    t->n_touched = 0;
    /* the pair's own list is not appended to during this step (every new
     * pair contains x), but t->pairs may move: index it afresh */
    for (int32_t oi = 0; oi < t->pairs[pi].n_occ; oi++) {
        int32_t w = t->pairs[pi].occ[oi];
        int32_t *s = t->sym + t->w_off[w];
        int32_t len = t->w_len[w];
        int64_t cnt = t->w_count[w];
        int32_t m = 0, k = 0;
        while (k < len) {
            if (k + 1 < len && s[k] == a && s[k + 1] == b) {
                if (m > 0) {
                    int32_t prev = s[m - 1];
                    if (!(prev == a && a == b)) { /* (prev, a) unless it is (a, b) itself */
                        st = tr_pair_add(t, prev, a, -cnt, -1, step);
                        if (st) return st;
                    }
                    st = tr_pair_add(t, prev, x, cnt, w, step);
                    if (st) return st;
                }
                if (k + 2 < len) {
                    int32_t next = s[k + 2];
                    if (!(next == b && a == b)) {
                        st = tr_pair_add(t, b, next, -cnt, -1, step);
                        if (st) return st;
                    }
                    st = tr_pair_add(t, x, next, cnt, w, step);
                    if (st) return st;
                }
                s[m++] = x;
                k += 2;
            } else {
                s[m++] = s[k++];
            }
        }
        t->w_len[w] = m;
    }
    tr_pair *p = &t->pairs[pi];
    p->count = 0;
    moe_free(p->occ);
    p->occ = NULL;
    p->n_occ = p->cap_occ = 0;
    for (size_t i = 0; i < t->n_touched; i++) {
        int32_t q = t->touched[i];
        if (t->pairs[q].count > 0) {
            st = heap_push(t, q);
            if (st) return st;
        }
    }
    return MOE_OK;
}

static void tr_free(trainer *t) {
    moe_free(t->sym);
    moe_free(t->w_off);
    moe_free(t->w_len);
    moe_free(t->w_count);
    if (t->pairs)
        for (size_t i = 0; i < t->n_pairs; i++) moe_free(t->pairs[i].occ);
    moe_free(t->pairs);
    u64map_free(&t->pmap);
    moe_free(t->heap);
    moe_free(t->touched);
    moe_free(t->blob);
    moe_free(t->off);
    moe_free(t->merges);
    tokset_free(&t->tset);
}

/* Counts the unique pieces of all texts and builds the word table. */
static moe_status tr_count_pieces(trainer *t, const char *const *texts, const size_t *lens,
                                  int n_texts) {
    strmap m;
    moe_status st = strmap_init(&m, 1 << 12);
    if (st) return st;
    size_t cap_words = 0, total = 0;
    for (int d = 0; d < n_texts; d++) {
        const char *s = texts[d];
        size_t n = lens ? lens[d] : (s ? strlen(s) : 0);
        if (n && !s) {
            st = moe_error(MOE_ERR_INVALID_ARG, "tokenizer_train: text %d is NULL", d);
            goto done;
        }
        size_t i = 0;
        while (i < n) {
            size_t e = tokenizer_pretok_next(s, n, i);
            size_t plen = e - i;
            if (plen >= 2) { /* single bytes have no pairs */
                if (plen > TOK_MAX_PIECE) {
                    st = moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_train: piece of %zu bytes", plen);
                    goto done;
                }
                uint64_t h = hash_bytes(s + i, plen);
                strent *en = strmap_slot(&m, s + i, plen, h);
                if (en->p) {
                    t->w_count[en->v1]++;
                } else {
                    if ((st = strmap_reserve(&m))) goto done;
                    en = strmap_slot(&m, s + i, plen, h);
                    if (t->n_words >= INT32_MAX) {
                        st = moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_train: too many pieces");
                        goto done;
                    }
                    size_t c1 = cap_words, c2 = cap_words, c3 = cap_words;
                    if ((st = tok_grow((void **)&t->w_off, &c1, t->n_words + 1, sizeof(size_t))) ||
                        (st = tok_grow((void **)&t->w_len, &c2, t->n_words + 1, sizeof(int32_t))) ||
                        (st = tok_grow((void **)&t->w_count, &c3, t->n_words + 1, sizeof(int64_t))))
                        goto done;
                    cap_words = c1;
                    en->h = h;
                    en->p = s + i;
                    en->len = plen;
                    en->v1 = t->n_words;
                    m.n++;
                    t->w_off[t->n_words] = 0; /* laid out below */
                    t->w_len[t->n_words] = (int32_t)plen;
                    t->w_count[t->n_words] = 1;
                    t->n_words++;
                    total += plen;
                }
            }
            i = e;
        }
    }
    /* symbol pool: lay the words out in order of first appearance */
    size_t bytes;
    if (moe_mul_size(total ? total : 1, sizeof(int32_t), &bytes)) {
        st = moe_error(MOE_ERR_NOMEM, "tokenizer_train: size overflow");
        goto done;
    }
    t->sym = moe_malloc(bytes);
    if (!t->sym) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    {
        size_t pos = 0;
        for (size_t w = 0; w < t->n_words; w++) {
            t->w_off[w] = pos;
            pos += (size_t)t->w_len[w];
        }
        for (size_t i = 0; i <= m.mask; i++) {
            const strent *en = &m.e[i];
            if (!en->p) continue;
            int32_t *dst = t->sym + t->w_off[en->v1];
            const unsigned char *src = (const unsigned char *)en->p;
            for (size_t j = 0; j < en->len; j++) dst[j] = src[j];
        }
    }
    st = MOE_OK;
done:
    moe_free(m.e);
    return st;
}

moe_status moe_tokenizer_train(moe_tokenizer **out, const char *const *texts, const size_t *lens,
                               int n_texts, int vocab_size) {
    if (!out) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_train: out is NULL");
    *out = NULL;
    if (n_texts < 0 || (n_texts > 0 && !texts))
        return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_train: no texts (n_texts %d)", n_texts);
    if (vocab_size < 257 || vocab_size > TOK_MAX_VOCAB)
        return moe_error(MOE_ERR_INVALID_ARG,
                         "tokenizer_train: vocab_size %d out of range [257, %d]", vocab_size,
                         TOK_MAX_VOCAB);
    int32_t target_merges = vocab_size - 257;
    trainer t;
    memset(&t, 0, sizeof(t));
    moe_status st;
    if ((st = u64map_init(&t.pmap, 1 << 12))) goto fail;
    /* tables grow with the vocabulary: the data may run out long before */
    if ((st = tokset_init(&t.tset, 1024))) goto fail;
    if ((st = tok_grow((void **)&t.off, &t.cap_off, 1024, sizeof(size_t)))) goto fail;
    if ((st = tok_grow((void **)&t.merges, &t.cap_merges, 1024, sizeof(int32_t)))) goto fail;
    t.off[0] = 0;
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        if ((st = tr_add_token(&t, &c, 1, hash_bytes(&c, 1)))) goto fail;
    }
    if ((st = tr_count_pieces(&t, texts, lens, n_texts))) goto fail;

    /* initial pair counts */
    for (size_t w = 0; w < t.n_words; w++) {
        const int32_t *s = t.sym + t.w_off[w];
        for (int32_t k = 0; k + 1 < t.w_len[w]; k++)
            if ((st = tr_pair_add(&t, s[k], s[k + 1], t.w_count[w], (int32_t)w, 0))) goto fail;
    }
    for (size_t i = 0; i < t.n_pairs; i++)
        if ((st = heap_push(&t, (int32_t)i))) goto fail;

    int32_t n_merges = 0;
    char *tmp = NULL;
    size_t tmp_cap = 0;
    while (n_merges < target_merges && t.n_heap > 0) {
        tr_heap_ent e = heap_pop(&t);
        tr_pair *p = &t.pairs[e.pair];
        if (p->banned || p->count <= 0) continue;
        if (e.count != p->count) { /* stale: counts of old pairs only fall */
            if ((st = heap_push(&t, e.pair))) break;
            continue;
        }
        int32_t a = p->l, b = p->r;
        size_t la = t.off[a + 1] - t.off[a], lb = t.off[b + 1] - t.off[b];
        if ((st = tok_grow((void **)&tmp, &tmp_cap, la + lb, 1))) break;
        memcpy(tmp, t.blob + t.off[a], la);
        memcpy(tmp + la, t.blob + t.off[b], lb);
        uint64_t h = hash_bytes(tmp, la + lb);
        if (tokset_find(&t.tset, t.blob, t.off, tmp, la + lb, h) >= 0) {
            p->banned = 1; /* same bytes as an existing token */
            continue;
        }
        int32_t x = t.n_tokens;
        if ((st = tr_add_token(&t, tmp, la + lb, h))) break;
        if ((st = tok_grow((void **)&t.merges, &t.cap_merges, 2 * (size_t)n_merges + 2,
                       sizeof(int32_t))))
            break;
        t.merges[2 * n_merges] = a;
        t.merges[2 * n_merges + 1] = b;
        n_merges++;
        if ((st = tr_merge(&t, e.pair, x, n_merges))) break;
    }
    moe_free(tmp);
    if (st) goto fail;

    /* the special token */
    if ((st = tok_grow((void **)&t.blob, &t.blob_cap, t.blob_len + TOK_EOS_LEN, 1))) goto fail;
    if ((st = tok_grow((void **)&t.off, &t.cap_off, (size_t)t.n_tokens + 2, sizeof(size_t))))
        goto fail;
    memcpy(t.blob + t.blob_len, TOK_EOS_TEXT, TOK_EOS_LEN);
    t.blob_len += TOK_EOS_LEN;
    t.off[t.n_tokens + 1] = t.blob_len;

    st = tokenizer_create_own(out, n_merges, t.merges, t.off, t.blob);
    t.merges = NULL;
    t.off = NULL;
    t.blob = NULL;
fail:
    tr_free(&t);
    return st;
}

