/* data/tokenizer.c: byte-level BPE with GPT-2 style pre-tokenisation.
 *
 * Vocabulary: ids 0..255 are the raw bytes, id 256+i is the result of merge i
 * (merges in the order learned = rank order), and the last id is the special
 * end-of-text token "<|endoftext|>", which encode never produces from text
 * (the literal string is encoded as ordinary bytes).
 *
 * Pre-tokenisation follows GPT-2's pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * implemented by hand (tokenizer_pretok_next). Character classes: ASCII is
 * classified exactly; a valid multi-byte UTF-8 character is a letter unless a
 * small range table (unicode_ranges below) says it is whitespace, a number or
 * "other" (Latin-1 punctuation and symbols, combining diacritics, general
 * punctuation, arrows/math/box drawing/dingbats, CJK punctuation, fullwidth
 * punctuation, emoji, private use). This is an approximation of the Unicode
 * categories, good enough for a tokenizer: it only changes where pieces are
 * cut, never whether text round-trips. Bytes that are not part of a valid
 * UTF-8 sequence (and NUL, and other control characters) are single "other"
 * characters. Every byte sequence round-trips exactly.
 *
 * Training counts the unique pieces, then repeatedly merges the most frequent
 * adjacent pair (ties: smallest (left id, right id)) with incremental pair
 * count updates and a lazy max-heap. A merge whose result has the same bytes
 * as an existing token is skipped, so token byte strings are unique.
 *
 * Encoding applies merges by rank inside each piece (lowest rank first, the
 * leftmost occurrence first among equal ranks) with a min-heap over a linked
 * list, so a long piece costs O(n log n); a per-call cache maps repeated
 * pieces to the ids already produced. The tokenizer is immutable after
 * creation, so encode may be called from several threads at once. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

#define TOK_EOS_TEXT "<|endoftext|>"
#define TOK_EOS_LEN (sizeof(TOK_EOS_TEXT) - 1)
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_PIECE ((size_t)1 << 30)

struct moe_tokenizer {
    int32_t n_vocab;   /* including the special token */
    int32_t n_merges;  /* n_vocab - 257 */
    int32_t *merges;   /* 2 * n_merges: left, right of merge i (id 256 + i) */
    size_t *off;       /* n_vocab + 1 offsets into blob */
    char *blob;        /* all token bytes, the special token's text last */
    uint64_t *pr_keys; /* open-addressing map (left, right) -> rank */
    int32_t *pr_vals;
    size_t pr_mask;
};

/* ---- hashing -------------------------------------------------------------- */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t hash_bytes(const void *p, size_t n) {
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

static inline uint64_t pair_key(int32_t l, int32_t r) {
    return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* ---- map: uint64 key -> int32 value (UINT64_MAX = empty) ------------------- */
typedef struct {
    uint64_t *keys;
    int32_t *vals;
    size_t mask, n;
} u64map;

static moe_status u64map_init(u64map *m, size_t expect) {
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

static void u64map_free(u64map *m) {
    moe_free(m->keys);
    moe_free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

static inline int32_t u64map_get(const uint64_t *keys, const int32_t *vals, size_t mask,
                                 uint64_t key) {
    size_t i = (size_t)mix64(key) & mask;
    for (;;) {
        if (keys[i] == key) return vals[i];
        if (keys[i] == UINT64_MAX) return -1;
        i = (i + 1) & mask;
    }
}

static moe_status u64map_put(u64map *m, uint64_t key, int32_t val) {
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

static moe_status strmap_init(strmap *m, size_t cap) {
    cap = pow2_at_least(cap);
    m->e = moe_calloc(cap, sizeof(strent));
    if (!m->e) return MOE_ERR_NOMEM;
    m->mask = cap - 1;
    m->n = 0;
    return MOE_OK;
}

/* Finds key; when absent returns the empty slot where it would go. */
static strent *strmap_slot(const strmap *m, const char *p, size_t len, uint64_t h) {
    size_t i = (size_t)h & m->mask;
    for (;;) {
        strent *e = &m->e[i];
        if (!e->p) return e;
        if (e->h == h && e->len == len && memcmp(e->p, p, len) == 0) return e;
        i = (i + 1) & m->mask;
    }
}

/* Makes room for one more entry (may move entries: re-find slots after). */
static moe_status strmap_reserve(strmap *m) {
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

/* ---- token byte strings -> id (compares against a blob that may move) ------ */
typedef struct {
    uint64_t *h;
    int32_t *id; /* -1 = empty */
    size_t mask, n;
} tokset;

static moe_status tokset_init(tokset *t, size_t expect) {
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

static void tokset_free(tokset *t) {
    moe_free(t->h);
    moe_free(t->id);
    t->h = NULL;
    t->id = NULL;
}

static int32_t tokset_find(const tokset *t, const char *blob, const size_t *off, const char *s,
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

/* Adds id (whose hash is h); the caller has checked it is not present. */
static moe_status tokset_add(tokset *t, int32_t id, uint64_t h) {
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

/* ---- pre-tokenisation ----------------------------------------------------- */
enum { CL_LETTER = 0, CL_NUMBER = 1, CL_SPACE = 2, CL_OTHER = 3 };

/* Non-letter ranges among multi-byte characters; everything else that is
 * valid UTF-8 counts as a letter. Sorted, non-overlapping. */
static const struct { uint32_t lo, hi; uint8_t cls; } unicode_ranges[] = {
    {0x0080, 0x0084, CL_OTHER},   {0x0085, 0x0085, CL_SPACE},   {0x0086, 0x009F, CL_OTHER},
    {0x00A0, 0x00A0, CL_SPACE},   {0x00A1, 0x00A9, CL_OTHER},   {0x00AB, 0x00B1, CL_OTHER},
    {0x00B2, 0x00B3, CL_NUMBER},  {0x00B4, 0x00B4, CL_OTHER},   {0x00B6, 0x00B8, CL_OTHER},
    {0x00B9, 0x00B9, CL_NUMBER},  {0x00BB, 0x00BB, CL_OTHER},   {0x00BC, 0x00BE, CL_NUMBER},
    {0x00BF, 0x00BF, CL_OTHER},   {0x00D7, 0x00D7, CL_OTHER},   {0x00F7, 0x00F7, CL_OTHER},
    {0x02C2, 0x02C5, CL_OTHER},   {0x02D2, 0x02DF, CL_OTHER},   {0x02E5, 0x02EB, CL_OTHER},
    {0x02ED, 0x02ED, CL_OTHER},   {0x02EF, 0x036F, CL_OTHER},   {0x037E, 0x037E, CL_OTHER},
    {0x0384, 0x0385, CL_OTHER},   {0x0387, 0x0387, CL_OTHER},   {0x0483, 0x0489, CL_OTHER},
    {0x0660, 0x0669, CL_NUMBER},  {0x06F0, 0x06F9, CL_NUMBER},  {0x0966, 0x096F, CL_NUMBER},
    {0x1680, 0x1680, CL_SPACE},   {0x2000, 0x200A, CL_SPACE},   {0x200B, 0x2027, CL_OTHER},
    {0x2028, 0x2029, CL_SPACE},   {0x202A, 0x202E, CL_OTHER},   {0x202F, 0x202F, CL_SPACE},
    {0x2030, 0x205E, CL_OTHER},   {0x205F, 0x205F, CL_SPACE},   {0x2060, 0x206F, CL_OTHER},
    {0x2070, 0x2070, CL_NUMBER},  {0x2074, 0x2079, CL_NUMBER},  {0x207A, 0x207E, CL_OTHER},
    {0x2080, 0x2089, CL_NUMBER},  {0x208A, 0x208E, CL_OTHER},   {0x20A0, 0x20FF, CL_OTHER},
    {0x2100, 0x2101, CL_OTHER},   {0x2103, 0x2106, CL_OTHER},   {0x2108, 0x2109, CL_OTHER},
    {0x2114, 0x2114, CL_OTHER},   {0x2116, 0x2118, CL_OTHER},   {0x211E, 0x2123, CL_OTHER},
    {0x2125, 0x2125, CL_OTHER},   {0x2127, 0x2127, CL_OTHER},   {0x2129, 0x2129, CL_OTHER},
    {0x212E, 0x212E, CL_OTHER},   {0x213A, 0x213B, CL_OTHER},   {0x2140, 0x2144, CL_OTHER},
    {0x214A, 0x214D, CL_OTHER},   {0x214F, 0x214F, CL_OTHER},   {0x2150, 0x2182, CL_NUMBER},  {0x2185, 0x2189, CL_NUMBER},  {0x218A, 0x218B, CL_OTHER},
    {0x2190, 0x245F, CL_OTHER},   {0x2460, 0x249B, CL_NUMBER},  {0x249C, 0x24E9, CL_OTHER},
    {0x24EA, 0x24FF, CL_NUMBER},  {0x2500, 0x2775, CL_OTHER},   {0x2776, 0x2793, CL_NUMBER},
    {0x2794, 0x2BFF, CL_OTHER},   {0x2E00, 0x2E7F, CL_OTHER},   {0x3000, 0x3000, CL_SPACE},
    {0x3001, 0x3004, CL_OTHER},   {0x3007, 0x3007, CL_NUMBER},  {0x3008, 0x3020, CL_OTHER},
    {0x3021, 0x3029, CL_NUMBER},  {0x302A, 0x3030, CL_OTHER},   {0x3036, 0x3037, CL_OTHER},
    {0x3038, 0x303A, CL_NUMBER},  {0x303D, 0x303F, CL_OTHER},   {0x3099, 0x309C, CL_OTHER},
    {0x30A0, 0x30A0, CL_OTHER},   {0x30FB, 0x30FB, CL_OTHER},   {0xE000, 0xF8FF, CL_OTHER},
    {0xFD3E, 0xFD3F, CL_OTHER},   {0xFE00, 0xFE19, CL_OTHER},   {0xFE20, 0xFE6F, CL_OTHER},
    {0xFEFF, 0xFEFF, CL_OTHER},   {0xFF01, 0xFF0F, CL_OTHER},   {0xFF10, 0xFF19, CL_NUMBER},
    {0xFF1A, 0xFF20, CL_OTHER},   {0xFF3B, 0xFF40, CL_OTHER},   {0xFF5B, 0xFF65, CL_OTHER},
    {0xFFE0, 0xFFEE, CL_OTHER},   {0xFFF0, 0xFFFF, CL_OTHER},   {0x1F000, 0x1FBFF, CL_OTHER},
    {0xE0000, 0xE007F, CL_OTHER}, {0xE0100, 0xE01EF, CL_OTHER}, {0xF0000, 0x10FFFF, CL_OTHER},
};

static int unicode_class(uint32_t cp) {
    size_t lo = 0, hi = sizeof(unicode_ranges) / sizeof(unicode_ranges[0]);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < unicode_ranges[mid].lo) hi = mid;
        else if (cp > unicode_ranges[mid].hi) lo = mid + 1;
        else return unicode_ranges[mid].cls;
    }
    return CL_LETTER;
}

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0; /* overlong */
        if (c == 0xED && s[1] > 0x9F) return 0; /* surrogate */
        *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0; /* overlong */
        if (c == 0xF4 && s[1] > 0x8F) return 0; /* > U+10FFFF */
        *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
              ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        return 4;
    }
    return 0;
}

static inline int ascii_class(unsigned c) {
    if ((unsigned)((c | 32) - 'a') < 26) return CL_LETTER;
    if ((unsigned)(c - '0') < 10) return CL_NUMBER;
    if (c == ' ' || (c >= 9 && c <= 13)) return CL_SPACE;
    return CL_OTHER;
}

/* Class of the character at s[i]; its byte length in *clen. */
static inline int char_at(const unsigned char *s, size_t n, size_t i, size_t *clen) {
    unsigned c = s[i];
    if (c < 0x80) {
        *clen = 1;
        return ascii_class(c);
    }
    uint32_t cp;
    size_t l = utf8_seq(s + i, n - i, &cp);
    if (!l) {
        *clen = 1;
        return CL_OTHER;
    }
    *clen = l;
    return unicode_class(cp);
}

/* End (exclusive) of the piece starting at i < n. Not static: the tests
 * check it directly (declared there). */
size_t tokenizer_pretok_next(const char *text, size_t n, size_t i);
size_t tokenizer_pretok_next(const char *text, size_t n, size_t i) {
    const unsigned char *s = (const unsigned char *)text;
    unsigned c = s[i];
    if (c == '\'' && i + 1 < n) { /* 's 't 're 've 'm 'll 'd */
        unsigned c1 = s[i + 1];
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
        if (i + 2 < n) {
            unsigned c2 = s[i + 2];
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
                return i + 3;
        }
    }
    size_t cl, p;
    int k = char_at(s, n, i, &cl);
    if (k == CL_SPACE) {
        if (c == ' ' && i + 1 < n) { /* " ?X+" with X letter, number or other */
            size_t cl2;
            int k2 = char_at(s, n, i + 1, &cl2);
            if (k2 != CL_SPACE) {
                k = k2;
                p = i + 1 + cl2;
                goto run;
            }
        }
        /* \s+(?!\S) | \s+ : a whitespace run; when something follows it, its
         * last character is left to start the next piece (unless the run is a
         * single character). */
        size_t last = i;
        p = i + cl;
        while (p < n) {
            size_t l;
            if (char_at(s, n, p, &l) != CL_SPACE) break;
            last = p;
            p += l;
        }
        if (p < n && last > i) return last;
        return p;
    }
    p = i + cl;
run:
    while (p < n) {
        size_t l;
        if (char_at(s, n, p, &l) != k) break;
        p += l;
    }
    return p;
}

/* ---- tokenizer object ------------------------------------------------------ */
void moe_tokenizer_free(moe_tokenizer *tok) {
    if (!tok) return;
    moe_free(tok->merges);
    moe_free(tok->off);
    moe_free(tok->blob);
    moe_free(tok->pr_keys);
    moe_free(tok->pr_vals);
    moe_free(tok);
}

/* Takes ownership of merges, off (n_vocab + 1 entries) and blob (the special
 * token's text already last), also on failure. */
static moe_status tok_create(moe_tokenizer **out, int32_t n_merges, int32_t *merges, size_t *off,
                             char *blob) {
    *out = NULL;
    moe_tokenizer *tok = moe_calloc(1, sizeof(*tok));
    if (!tok) {
        moe_free(merges);
        moe_free(off);
        moe_free(blob);
        return MOE_ERR_NOMEM;
    }
    tok->n_merges = n_merges;
    tok->n_vocab = 256 + n_merges + 1;
    tok->merges = merges;
    tok->off = off;
    tok->blob = blob;
    u64map m;
    moe_status st = u64map_init(&m, (size_t)n_merges);
    if (st) {
        moe_tokenizer_free(tok);
        return st;
    }
    for (int32_t i = 0; i < n_merges; i++) {
        /* the caller guarantees distinct pairs; the map is pre-sized: no growth */
        st = u64map_put(&m, pair_key(merges[2 * i], merges[2 * i + 1]), i);
        if (st) {
            u64map_free(&m);
            moe_tokenizer_free(tok);
            return st;
        }
    }
    tok->pr_keys = m.keys;
    tok->pr_vals = m.vals;
    tok->pr_mask = m.mask;
    *out = tok;
    return MOE_OK;
}

int moe_tokenizer_vocab_size(const moe_tokenizer *tok) { return tok ? tok->n_vocab : 0; }

int moe_tokenizer_eos(const moe_tokenizer *tok) { return tok ? tok->n_vocab - 1 : -1; }

const char *moe_tokenizer_token(const moe_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = tok->off[id + 1] - tok->off[id];
    return tok->blob + tok->off[id];
}

static inline int32_t tok_rank(const moe_tokenizer *tok, int32_t l, int32_t r) {
    return u64map_get(tok->pr_keys, tok->pr_vals, tok->pr_mask, pair_key(l, r));
}

/* ---- training ---------------------------------------------------------------- */
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

static moe_status grow(void **p, size_t *cap, size_t need, size_t elem) {
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

static inline int heap_better(const trainer *t, tr_heap_ent a, tr_heap_ent b) {
    if (a.count != b.count) return a.count > b.count;
    const tr_pair *pa = &t->pairs[a.pair], *pb = &t->pairs[b.pair];
    if (pa->l != pb->l) return pa->l < pb->l;
    return pa->r < pb->r;
}

static moe_status heap_push(trainer *t, int32_t pair) {
    moe_status st = grow((void **)&t->heap, &t->cap_heap, t->n_heap + 1, sizeof(tr_heap_ent));
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
        st = grow((void **)&t->pairs, &t->cap_pairs, t->n_pairs + 1, sizeof(tr_pair));
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
            st = grow((void **)&p->occ, &cap, (size_t)p->n_occ + 1, sizeof(int32_t));
            if (st) return st;
            if (cap > INT32_MAX) cap = INT32_MAX;
            p->cap_occ = (int32_t)cap;
            p->occ[p->n_occ++] = word;
        }
        if (p->stamp != step) {
            p->stamp = step;
            st = grow((void **)&t->touched, &t->cap_touched, t->n_touched + 1, sizeof(int32_t));
            if (st) return st;
            t->touched[t->n_touched++] = idx;
        }
    }
    return MOE_OK;
}

static moe_status tr_add_token(trainer *t, const char *bytes, size_t len, uint64_t h) {
    moe_status st = grow((void **)&t->blob, &t->blob_cap, t->blob_len + len, 1);
    if (st) return st;
    st = grow((void **)&t->off, &t->cap_off, (size_t)t->n_tokens + 2, sizeof(size_t));
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
                    if ((st = grow((void **)&t->w_off, &c1, t->n_words + 1, sizeof(size_t))) ||
                        (st = grow((void **)&t->w_len, &c2, t->n_words + 1, sizeof(int32_t))) ||
                        (st = grow((void **)&t->w_count, &c3, t->n_words + 1, sizeof(int64_t))))
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
    if ((st = grow((void **)&t.off, &t.cap_off, 1024, sizeof(size_t)))) goto fail;
    if ((st = grow((void **)&t.merges, &t.cap_merges, 1024, sizeof(int32_t)))) goto fail;
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
        if ((st = grow((void **)&tmp, &tmp_cap, la + lb, 1))) break;
        memcpy(tmp, t.blob + t.off[a], la);
        memcpy(tmp + la, t.blob + t.off[b], lb);
        uint64_t h = hash_bytes(tmp, la + lb);
        if (tokset_find(&t.tset, t.blob, t.off, tmp, la + lb, h) >= 0) {
            p->banned = 1; /* same bytes as an existing token */
            continue;
        }
        int32_t x = t.n_tokens;
        if ((st = tr_add_token(&t, tmp, la + lb, h))) break;
        if ((st = grow((void **)&t.merges, &t.cap_merges, 2 * (size_t)n_merges + 2,
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
    if ((st = grow((void **)&t.blob, &t.blob_cap, t.blob_len + TOK_EOS_LEN, 1))) goto fail;
    if ((st = grow((void **)&t.off, &t.cap_off, (size_t)t.n_tokens + 2, sizeof(size_t))))
        goto fail;
    memcpy(t.blob + t.blob_len, TOK_EOS_TEXT, TOK_EOS_LEN);
    t.blob_len += TOK_EOS_LEN;
    t.off[t.n_tokens + 1] = t.blob_len;

    st = tok_create(out, n_merges, t.merges, t.off, t.blob);
    t.merges = NULL;
    t.off = NULL;
    t.blob = NULL;
fail:
    tr_free(&t);
    return st;
}

/* ---- encoding ------------------------------------------------------------------ */
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

/* BPE of one piece (n >= 2 bytes, n < 2^31); the ids are left in sc->sym
 * following sc->next from index 0; returns their count. */
static size_t bpe_piece(const moe_tokenizer *tok, bpe_scratch *sc, const unsigned char *s,
                        size_t n) {
    int32_t *sym = sc->sym, *next = sc->next, *prev = sc->prev;
    uint64_t *heap = sc->heap;
    size_t nh = 0, count = n;
    for (size_t i = 0; i < n; i++) {
        sym[i] = s[i];
        next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        prev[i] = (int32_t)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t r = tok_rank(tok, sym[i], sym[i + 1]);
        if (r >= 0) mh_push(heap, &nh, ((uint64_t)r << 32) | i);
    }
    const int32_t *mg = tok->merges;
    while (nh) {
        uint64_t v = mh_pop(heap, &nh);
        int32_t r = (int32_t)(v >> 32), p = (int32_t)(v & 0xffffffffu);
        int32_t q = next[p];
        /* still there? (merged nodes change id, dead nodes have id -1) */
        if (q < 0 || sym[p] != mg[2 * r] || sym[q] != mg[2 * r + 1]) continue;
        sym[p] = 256 + r;
        sym[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        count--;
        if (prev[p] >= 0) {
            int32_t r2 = tok_rank(tok, sym[prev[p]], sym[p]);
            if (r2 >= 0) mh_push(heap, &nh, ((uint64_t)r2 << 32) | (uint32_t)prev[p]);
        }
        if (next[p] >= 0) {
            int32_t r2 = tok_rank(tok, sym[p], sym[next[p]]);
            if (r2 >= 0) mh_push(heap, &nh, ((uint64_t)r2 << 32) | (uint32_t)p);
        }
    }
    return count;
}

moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                int32_t **ids, size_t *n_ids) {
    if (ids) *ids = NULL;
    if (n_ids) *n_ids = 0;
    if (!tok || !ids || !n_ids || (len && !text))
        return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_encode: NULL argument");
    const unsigned char *s = (const unsigned char *)text;
    size_t cap = len / 3 + 16, n = 0;
    int32_t *o = moe_malloc(cap * sizeof(int32_t));
    if (!o) return MOE_ERR_NOMEM;
    strmap cache;
    bpe_scratch sc;
    memset(&sc, 0, sizeof(sc));
    moe_status st = strmap_init(&cache, len < 4096 ? 64 : 4096);
    if (st) {
        moe_free(o);
        return st;
    }
    const size_t cache_max = (size_t)1 << 18;
    size_t i = 0;
    while (i < len) {
        size_t e = tokenizer_pretok_next(text, len, i);
        size_t plen = e - i;
        if (plen == 1) {
            if (n == cap && (st = grow((void **)&o, &cap, n + 1, sizeof(int32_t)))) goto fail;
            o[n++] = s[i];
            i = e;
            continue;
        }
        uint64_t h = hash_bytes(s + i, plen);
        strent *en = strmap_slot(&cache, text + i, plen, h);
        if (en->p) { /* seen before: copy the ids it gave then */
            size_t start = en->v1, cnt = en->v2;
            if ((st = grow((void **)&o, &cap, n + cnt, sizeof(int32_t)))) goto fail;
            memcpy(o + n, o + start, cnt * sizeof(int32_t));
            n += cnt;
            i = e;
            continue;
        }
        if (plen > TOK_MAX_PIECE) {
            st = moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_encode: piece of %zu bytes", plen);
            goto fail;
        }
        if ((st = scratch_reserve(&sc, plen))) goto fail;
        size_t cnt = bpe_piece(tok, &sc, s + i, plen);
        if ((st = grow((void **)&o, &cap, n + cnt, sizeof(int32_t)))) goto fail;
        size_t start = n;
        for (int32_t k = 0; k >= 0; k = sc.next[k]) o[n++] = sc.sym[k];
        if (cache.n < cache_max) {
            if ((st = strmap_reserve(&cache))) goto fail;
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
    moe_free(cache.e);
    moe_free(sc.sym);
    moe_free(sc.next);
    moe_free(sc.prev);
    moe_free(sc.heap);
    *ids = o;
    *n_ids = n;
    return MOE_OK;
fail:
    moe_free(cache.e);
    moe_free(sc.sym);
    moe_free(sc.next);
    moe_free(sc.prev);
    moe_free(sc.heap);
    moe_free(o);
    return st;
}

/* ---- GGUF ------------------------------------------------------------------- */
/* GPT-2's byte-to-unicode table: printable bytes stand for themselves, the
 * other 68 map to U+0100.. in byte order. */
static void byte_unicode_tables(uint16_t b2u[256], int16_t u2b[324]) {
    int n = 0;
    for (int i = 0; i < 324; i++) u2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        b2u[b] = (uint16_t)(printable ? b : 256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

/* Writes the mapped form of bytes into dst (room for 2 * len); returns length. */
static size_t map_bytes(const uint16_t b2u[256], const char *src, size_t len, char *dst) {
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned cp = b2u[(unsigned char)src[i]];
        if (cp < 0x80) {
            dst[o++] = (char)cp;
        } else {
            dst[o++] = (char)(0xC0 | (cp >> 6));
            dst[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    return o;
}

/* Inverse of map_bytes; dst has room for len bytes. Returns the decoded
 * length, or (size_t)-1 if s is not a valid mapped string. */
static size_t unmap_bytes(const int16_t u2b[324], const char *src, size_t len, char *dst) {
    const unsigned char *s = (const unsigned char *)src;
    size_t o = 0, i = 0;
    while (i < len) {
        unsigned cp;
        if (s[i] < 0x80) {
            cp = s[i];
            i++;
        } else if (s[i] >= 0xC2 && s[i] <= 0xDF && i + 1 < len && (s[i + 1] & 0xC0) == 0x80) {
            cp = ((unsigned)(s[i] & 0x1F) << 6) | (s[i + 1] & 0x3F);
            i += 2;
        } else {
            return (size_t)-1;
        }
        if (cp >= 324 || u2b[cp] < 0) return (size_t)-1;
        dst[o++] = (char)u2b[cp];
    }
    return o;
}

moe_status tokenizer_write_gguf(const moe_tokenizer *tok, gguf_writer *w) {
    if (!tok || !w) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_write_gguf: NULL argument");
    uint16_t b2u[256];
    int16_t u2b[324];
    byte_unicode_tables(b2u, u2b);
    size_t nv = (size_t)tok->n_vocab, nm = (size_t)tok->n_merges;
    size_t normal_bytes = tok->off[nv - 1];
    /* tokens: 2 bytes per byte at most; merges: 2 per byte of both parts + 1 */
    size_t buf_cap = 2 * normal_bytes + TOK_EOS_LEN + 1;
    for (size_t i = 0; i < nm; i++) buf_cap += 2 * (tok->off[257 + i] - tok->off[256 + i]) + 1;
    char *buf = moe_malloc(buf_cap);
    const char **strs = moe_malloc((nv + nm + 1) * sizeof(char *));
    size_t *lens = moe_malloc((nv + nm + 1) * sizeof(size_t));
    size_t *soff = moe_malloc((nv + nm + 1) * sizeof(size_t));
    int32_t *types = moe_malloc(nv * sizeof(int32_t));
    moe_status st = MOE_OK;
    if (!buf || !strs || !lens || !soff || !types) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    size_t pos = 0;
    for (size_t i = 0; i + 1 < nv; i++) {
        soff[i] = pos;
        lens[i] = map_bytes(b2u, tok->blob + tok->off[i], tok->off[i + 1] - tok->off[i], buf + pos);
        pos += lens[i];
        types[i] = 1; /* normal */
    }
    soff[nv - 1] = pos;
    memcpy(buf + pos, TOK_EOS_TEXT, TOK_EOS_LEN);
    lens[nv - 1] = TOK_EOS_LEN;
    pos += TOK_EOS_LEN;
    types[nv - 1] = 3; /* control */
    for (size_t i = 0; i < nm; i++) {
        int32_t l = tok->merges[2 * i], r = tok->merges[2 * i + 1];
        size_t k = nv + i;
        soff[k] = pos;
        memcpy(buf + pos, buf + soff[l], lens[l]);
        pos += lens[l];
        buf[pos++] = ' ';
        memcpy(buf + pos, buf + soff[r], lens[r]);
        pos += lens[r];
        lens[k] = lens[l] + 1 + lens[r];
    }
    for (size_t i = 0; i < nv + nm; i++) strs[i] = buf + soff[i];
    if ((st = gguf_set_str(w, "tokenizer.ggml.model", "gpt2", 4)) ||
        (st = gguf_set_str(w, "tokenizer.ggml.pre", "gpt-2", 5)) ||
        (st = gguf_set_arr_str(w, "tokenizer.ggml.tokens", strs, lens, nv)) ||
        (st = gguf_set_arr_data(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, nv)) ||
        (st = gguf_set_arr_str(w, "tokenizer.ggml.merges", strs + nv, lens + nv, nm)) ||
        (st = gguf_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)(nv - 1))) ||
        (st = gguf_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)(nv - 1))))
        goto done;
done:
    moe_free(buf);
    moe_free(strs);
    moe_free(lens);
    moe_free(soff);
    moe_free(types);
    return st;
}

static moe_status need_string(const gguf_ctx *ctx, const char *key, const char *want) {
    if (!gguf_has_key(ctx, key)) return moe_error(MOE_ERR_FORMAT, "tokenizer: missing key %s", key);
    const char *s;
    size_t len;
    moe_status st = gguf_get_str(ctx, key, &s, &len);
    if (st) return moe_error_prefix(st, "tokenizer");
    if (len != strlen(want) || memcmp(s, want, len) != 0)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %s is '%.*s', expected '%s'", key,
                         (int)(len > 40 ? 40 : len), s, want);
    return MOE_OK;
}

static moe_status need_array(const gguf_ctx *ctx, const char *key, gguf_type type, uint64_t *n) {
    if (!gguf_has_key(ctx, key)) return moe_error(MOE_ERR_FORMAT, "tokenizer: missing key %s", key);
    gguf_type elem;
    moe_status st = gguf_get_arr_info(ctx, key, &elem, n);
    if (st) return moe_error_prefix(st, "tokenizer");
    if (elem != type)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %s has element type %d, expected %d", key,
                         (int)elem, (int)type);
    return MOE_OK;
}

static moe_status need_id(const gguf_ctx *ctx, const char *key, uint32_t want) {
    if (!gguf_has_key(ctx, key)) return moe_error(MOE_ERR_FORMAT, "tokenizer: missing key %s", key);
    uint32_t v;
    moe_status st = gguf_get_u32(ctx, key, &v);
    if (st) return moe_error_prefix(st, "tokenizer");
    if (v != want)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %s is %u, expected %u (the last token)", key,
                         v, want);
    return MOE_OK;
}

moe_status tokenizer_read_gguf(moe_tokenizer **out, const gguf_ctx *ctx) {
    if (!out) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_read_gguf: out is NULL");
    *out = NULL;
    if (!ctx) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_read_gguf: ctx is NULL");
    moe_status st;
    uint64_t nv64, nt64, nm64;
    if ((st = need_string(ctx, "tokenizer.ggml.model", "gpt2"))) return st;
    if ((st = need_string(ctx, "tokenizer.ggml.pre", "gpt-2"))) return st;
    if ((st = need_array(ctx, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &nv64))) return st;
    if (nv64 < 257 || nv64 > TOK_MAX_VOCAB)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %llu tokens, expected 257..%d",
                         (unsigned long long)nv64, TOK_MAX_VOCAB);
    if ((st = need_array(ctx, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, &nt64))) return st;
    if (nt64 != nv64)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %llu token types for %llu tokens",
                         (unsigned long long)nt64, (unsigned long long)nv64);
    if ((st = need_array(ctx, "tokenizer.ggml.merges", GGUF_TYPE_STRING, &nm64))) return st;
    if (nm64 != nv64 - 257)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %llu merges for %llu tokens (expected %llu)",
                         (unsigned long long)nm64, (unsigned long long)nv64,
                         (unsigned long long)(nv64 - 257));
    int32_t nv = (int32_t)nv64, nm = (int32_t)nm64;
    if ((st = need_id(ctx, "tokenizer.ggml.eos_token_id", (uint32_t)(nv - 1)))) return st;
    if ((st = need_id(ctx, "tokenizer.ggml.bos_token_id", (uint32_t)(nv - 1)))) return st;

    {
        gguf_type elem;
        uint64_t n;
        const void *data;
        if ((st = gguf_get_arr_data(ctx, "tokenizer.ggml.token_type", &elem, &n, &data)))
            return moe_error_prefix(st, "tokenizer");
        for (int32_t i = 0; i < nv; i++) {
            int32_t ty;
            memcpy(&ty, (const char *)data + 4 * (size_t)i, 4);
            int want = i == nv - 1 ? 3 : 1;
            if (ty != want)
                return moe_error(MOE_ERR_FORMAT, "tokenizer: token %d has type %d, expected %d", i,
                                 (int)ty, want);
        }
    }

    uint16_t b2u[256];
    int16_t u2b[324];
    byte_unicode_tables(b2u, u2b);
    size_t *off = moe_malloc(((size_t)nv + 1) * sizeof(size_t));
    int32_t *merges = moe_malloc(((size_t)nm * 2 + 1) * sizeof(int32_t));
    char *blob = NULL, *tmp = NULL;
    size_t blob_cap = 0, tmp_cap = 0;
    tokset ts;
    memset(&ts, 0, sizeof(ts));
    if (!off || !merges || (st = tokset_init(&ts, (size_t)nv))) {
        st = MOE_ERR_NOMEM;
        goto fail;
    }
    /* tokens */
    off[0] = 0;
    size_t blen = 0;
    for (int32_t i = 0; i < nv; i++) {
        const char *s;
        size_t len;
        if ((st = gguf_get_arr_str(ctx, "tokenizer.ggml.tokens", (uint64_t)i, &s, &len))) {
            st = moe_error_prefix(st, "tokenizer");
            goto fail;
        }
        if ((st = grow((void **)&blob, &blob_cap, blen + len + 1, 1))) goto fail;
        if (i == nv - 1) {
            if (len != TOK_EOS_LEN || memcmp(s, TOK_EOS_TEXT, len) != 0) {
                st = moe_error(MOE_ERR_FORMAT, "tokenizer: last token %d is not %s", i,
                               TOK_EOS_TEXT);
                goto fail;
            }
            memcpy(blob + blen, s, len);
            blen += len;
            off[i + 1] = blen;
            break;
        }
        size_t dl = unmap_bytes(u2b, s, len, blob + blen);
        if (dl == (size_t)-1) {
            st = moe_error(MOE_ERR_FORMAT,
                           "tokenizer: token %d is not a byte-to-unicode mapped string", i);
            goto fail;
        }
        if (dl == 0) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: token %d is empty", i);
            goto fail;
        }
        if (i < 256 && (dl != 1 || (unsigned char)blob[blen] != (unsigned)i)) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: token %d is not the single byte 0x%02x", i,
                           (unsigned)i);
            goto fail;
        }
        uint64_t h = hash_bytes(blob + blen, dl);
        off[i + 1] = blen + dl;
        int32_t dup = tokset_find(&ts, blob, off, blob + blen, dl, h);
        if (dup >= 0) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: token %d duplicates token %d", i, dup);
            goto fail;
        }
        if ((st = tokset_add(&ts, i, h))) goto fail;
        blen += dl;
    }
    /* merges: "left right", each part a token defined before the result */
    for (int32_t i = 0; i < nm; i++) {
        const char *s;
        size_t len;
        if ((st = gguf_get_arr_str(ctx, "tokenizer.ggml.merges", (uint64_t)i, &s, &len))) {
            st = moe_error_prefix(st, "tokenizer");
            goto fail;
        }
        const char *sp = len ? memchr(s, ' ', len) : NULL;
        if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp + 1 - s))) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d is not two tokens separated by "
                                           "one space", i);
            goto fail;
        }
        if ((st = grow((void **)&tmp, &tmp_cap, len, 1))) goto fail;
        size_t ll = unmap_bytes(u2b, s, (size_t)(sp - s), tmp);
        size_t rl = unmap_bytes(u2b, sp + 1, len - (size_t)(sp + 1 - s),
                                tmp + (ll == (size_t)-1 ? 0 : ll));
        if (ll == (size_t)-1 || rl == (size_t)-1 || ll == 0 || rl == 0) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d has a part that is not a "
                                           "byte-to-unicode mapped string", i);
            goto fail;
        }
        int32_t l = tokset_find(&ts, blob, off, tmp, ll, hash_bytes(tmp, ll));
        int32_t r = tokset_find(&ts, blob, off, tmp + ll, rl, hash_bytes(tmp + ll, rl));
        int32_t id = 256 + i;
        if (l < 0 || r < 0 || l >= id || r >= id) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d names a token that is unknown "
                                           "or not defined before token %d", i, id);
            goto fail;
        }
        size_t tl = off[id + 1] - off[id];
        if (tl != ll + rl || memcmp(blob + off[id], tmp, tl) != 0) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d does not produce token %d", i, id);
            goto fail;
        }
        merges[2 * i] = l;
        merges[2 * i + 1] = r;
    }
    tokset_free(&ts);
    moe_free(tmp);
    /* distinct tokens imply distinct merge pairs, as tok_create needs */
    return tok_create(out, nm, merges, off, blob);
fail:
    tokset_free(&ts);
    moe_free(tmp);
    moe_free(off);
    moe_free(merges);
    moe_free(blob);
    return st;
}

moe_status moe_tokenizer_save(const moe_tokenizer *tok, const char *path) {
    if (!tok || !path) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_save: NULL argument");
    gguf_writer *w = gguf_writer_create();
    if (!w) return moe_error(MOE_ERR_NOMEM, "tokenizer_save: out of memory");
    moe_status st = tokenizer_write_gguf(tok, w);
    if (!st) st = gguf_write_file(w, path);
    gguf_writer_free(w);
    return st;
}

moe_status moe_tokenizer_load(moe_tokenizer **out, const char *path) {
    if (!out) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_load: out is NULL");
    *out = NULL;
    if (!path) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_load: path is NULL");
    gguf_ctx *ctx = NULL;
    moe_status st = gguf_open(&ctx, path);
    if (st) return st;
    st = tokenizer_read_gguf(out, ctx);
    gguf_close(ctx);
    if (st) return moe_error_prefix(st, "%s", path);
    return MOE_OK;
}
