/* data/bpe.c: byte-level BPE encoding, for our own vocabulary and for
 * published GPT-2-style ones.
 *
 * Both apply merges by rank inside each piece the pre-tokeniser cut (lowest
 * rank first, the leftmost occurrence first among equal ranks, which is also
 * llama.cpp's order) with a min-heap over a linked list, so a long piece costs
 * O(n log n).
 *
 * Our own vocabulary starts a piece from its raw bytes (ids 0..255) and keeps
 * a per-call cache from repeated pieces to the ids already produced.
 *
 * A published vocabulary works on GPT-2's byte-to-unicode mapped text, as
 * llama.cpp does: the text is decoded to code points leniently (an invalid
 * byte becomes U+FFFD), cut by the pre-tokeniser, and each piece re-encoded as
 * UTF-8 (code points above U+10FFFF, which llama.cpp cannot encode and stops
 * on, become U+FFFD here); each byte then starts as the token of its mapped
 * character. A byte whose character is no token is dropped unless a one-byte
 * token equals a byte of the character's UTF-8 (llama.cpp's fallback). With
 * ignore_merges (the llama-bpe family) a piece that is a token is taken whole. */
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

typedef struct {
    int32_t *sym, *next, *prev;
    uint64_t *heap; /* (rank << 32) | position, min-heap */
    size_t cap;
} bpe_scratch;

static moe_status scratch_reserve(bpe_scratch *sc, size_t n) {
    if (n <= sc->cap) return MOE_OK;
    size_t c = sc->cap ? sc->cap : 64;
    while (c < n) c *= 2;
    int32_t *a = moe_realloc(sc->sym, c * sizeof(int32_t));
    if (!a) return MOE_ERR_NOMEM;
    sc->sym = a;
    a = moe_realloc(sc->next, c * sizeof(int32_t));
    if (!a) return MOE_ERR_NOMEM;
    sc->next = a;
    a = moe_realloc(sc->prev, c * sizeof(int32_t));
    if (!a) return MOE_ERR_NOMEM;
    sc->prev = a;
    uint64_t *h = moe_realloc(sc->heap, 3 * c * sizeof(uint64_t));
    if (!h) return MOE_ERR_NOMEM;
    sc->heap = h;
    sc->cap = c;
    return MOE_OK;
}

static void scratch_free(bpe_scratch *sc) {
    moe_free(sc->sym);
    moe_free(sc->next);
    moe_free(sc->prev);
    moe_free(sc->heap);
}

static inline void mh_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static inline uint64_t mh_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], last = h[--*n];
    size_t m = *n, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (h[c] >= last) break;
        h[i] = h[c];
        i = c;
    }
    if (m) h[i] = last;
    return top;
}

/* Rank of merging ids l and r, -1 if none (an id of -1 is a char without token). */
static inline int32_t pair_rank(const moe_tokenizer *tok, int32_t l, int32_t r) {
    return l < 0 || r < 0 ? -1 : tok_rank(tok, l, r);
}

/* BPE of the n (< 2^31) starting ids in sc->sym; the result is left in sc->sym
 * following sc->next from index 0; returns its length. */
static size_t bpe_merge(const moe_tokenizer *tok, bpe_scratch *sc, size_t n) {
    int32_t *sym = sc->sym, *next = sc->next, *prev = sc->prev;
    uint64_t *heap = sc->heap;
    size_t nh = 0, count = n;
    for (size_t i = 0; i < n; i++) {
        next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        prev[i] = (int32_t)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t r = pair_rank(tok, sym[i], sym[i + 1]);
        if (r >= 0) mh_push(heap, &nh, ((uint64_t)r << 32) | i);
    }
    const int32_t *mg = tok->merges;
    while (nh) {
        uint64_t v = mh_pop(heap, &nh);
        int32_t r = (int32_t)(v >> 32), p = (int32_t)(v & 0xffffffffu);
        int32_t q = next[p];
        /* still there? (merged nodes change id, dead nodes have id -1) */
        if (q < 0 || sym[p] != mg[2 * r] || sym[q] != mg[2 * r + 1]) continue;
        sym[p] = tok->merge_res ? tok->merge_res[r] : 256 + r;
        sym[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        count--;
        if (prev[p] >= 0) {
            int32_t r2 = pair_rank(tok, sym[prev[p]], sym[p]);
            if (r2 >= 0) mh_push(heap, &nh, ((uint64_t)r2 << 32) | (uint32_t)prev[p]);
        }
        if (next[p] >= 0) {
            int32_t r2 = pair_rank(tok, sym[p], sym[next[p]]);
            if (r2 >= 0) mh_push(heap, &nh, ((uint64_t)r2 << 32) | (uint32_t)p);
        }
    }
    return count;
}

moe_status tok_ids_push(tok_ids *o, int32_t id) {
    if (o->n == o->cap) {
        moe_status st = tok_grow((void **)&o->v, &o->cap, o->n + 1, sizeof(int32_t));
        if (st) return st;
    }
    o->v[o->n++] = id;
    return MOE_OK;
}

moe_status bpe_encode_own(const moe_tokenizer *tok, const char *text, size_t len, tok_ids *o) {
    const unsigned char *s = (const unsigned char *)text;
    strmap cache;
    bpe_scratch sc;
    memset(&sc, 0, sizeof(sc));
    moe_status st = strmap_init(&cache, len < 4096 ? 64 : 4096);
    if (st) return st;
    const size_t cache_max = (size_t)1 << 18;
    size_t i = 0;
    while (i < len) {
        size_t e = tokenizer_pretok_next(text, len, i);
        size_t plen = e - i;
        if (plen == 1) {
            if ((st = tok_ids_push(o, s[i]))) goto done;
            i = e;
            continue;
        }
        uint64_t h = hash_bytes(s + i, plen);
        strent *en = strmap_slot(&cache, text + i, plen, h);
        if (en->p) { /* seen before: copy the ids it gave then */
            size_t start = en->v1, cnt = en->v2;
            if ((st = tok_grow((void **)&o->v, &o->cap, o->n + cnt, sizeof(int32_t)))) goto done;
            memcpy(o->v + o->n, o->v + start, cnt * sizeof(int32_t));
            o->n += cnt;
            i = e;
            continue;
        }
        if (plen > TOK_MAX_PIECE) {
            st = moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_encode: piece of %zu bytes", plen);
            goto done;
        }
        if ((st = scratch_reserve(&sc, plen))) goto done;
        for (size_t k = 0; k < plen; k++) sc.sym[k] = s[i + k];
        size_t cnt = bpe_merge(tok, &sc, plen);
        if ((st = tok_grow((void **)&o->v, &o->cap, o->n + cnt, sizeof(int32_t)))) goto done;
        size_t start = o->n;
        for (int32_t k = 0; k >= 0; k = sc.next[k]) o->v[o->n++] = sc.sym[k];
        if (cache.n < cache_max) {
            if ((st = strmap_reserve(&cache))) goto done;
            en = strmap_slot(&cache, text + i, plen, h);
            en->h = h;
            en->p = text + i;
            en->len = plen;
            en->v1 = start;
            en->v2 = cnt;
            cache.n++;
        }
        i = e;
    }
done:
    moe_free(cache.e);
    scratch_free(&sc);
    return st;
}

moe_status bpe_encode_vocab(const moe_tokenizer *tok, const char *text, size_t len, tok_ids *o) {
    if (len > TOK_MAX_PIECE)
        return moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_encode: text of %zu bytes", len);
    const unsigned char *s = (const unsigned char *)text;
    uint32_t *cps = moe_malloc((len ? len : 1) * sizeof(uint32_t));
    unsigned char *word = NULL; /* a piece as UTF-8 */
    char *mapped = NULL;        /* and byte-to-unicode mapped */
    size_t *lens = NULL, n_lens = 0, word_cap = 0, mapped_cap = 0;
    bpe_scratch sc;
    memset(&sc, 0, sizeof(sc));
    uint16_t b2u[256];
    int16_t u2b[324];
    tok_byte_unicode(b2u, u2b);
    moe_status st = MOE_OK;
    if (!cps) return MOE_ERR_NOMEM;
    size_t n = 0;
    for (size_t i = 0; i < len; n++) i += pretok_decode(s + i, len - i, &cps[n]);
    if ((st = pretok_split(tok->pre, cps, n, &lens, &n_lens))) goto done;
    size_t at = 0;
    for (size_t w = 0; w < n_lens; w++) {
        size_t wl = 0;
        if ((st = tok_grow((void **)&word, &word_cap, 4 * lens[w], 1))) goto done;
        for (size_t k = 0; k < lens[w]; k++) wl += pretok_encode(cps[at + k], word + wl);
        at += lens[w];
        if (tok->ignore_merges) {
            size_t ml = 0;
            if ((st = tok_grow((void **)&mapped, &mapped_cap, 2 * wl, 1))) goto done;
            for (size_t k = 0; k < wl; k++) {
                unsigned cp = b2u[word[k]];
                if (cp < 0x80) {
                    mapped[ml++] = (char)cp;
                } else {
                    mapped[ml++] = (char)(0xC0 | (cp >> 6));
                    mapped[ml++] = (char)(0x80 | (cp & 0x3F));
                }
            }
            int32_t id = tok_text_id(tok, mapped, ml);
            if (id >= 0) {
                if ((st = tok_ids_push(o, id))) goto done;
                continue;
            }
        }
        if ((st = scratch_reserve(&sc, wl))) goto done;
        for (size_t k = 0; k < wl; k++) sc.sym[k] = tok->byte_tok[word[k]];
        bpe_merge(tok, &sc, wl);
        for (int32_t k = 0; k >= 0; k = sc.next[k]) {
            if (sc.sym[k] >= 0) {
                if ((st = tok_ids_push(o, sc.sym[k]))) goto done;
                continue;
            }
            /* an unmerged byte whose char is no token */
            for (int j = 0; j < 2; j++)
                if (tok->byte_fb[word[k]][j] >= 0 && (st = tok_ids_push(o, tok->byte_fb[word[k]][j])))
                    goto done;
        }
    }
done:
    moe_free(cps);
    moe_free(word);
    moe_free(mapped);
    moe_free(lens);
    scratch_free(&sc);
    return st;
}
