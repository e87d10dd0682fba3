/* data/spm.c: SentencePiece-style encoding of a published "llama" vocabulary,
 * the way llama.cpp does it.
 *
 * Every space becomes U+2581 ("▁"), and with space_prefix one more goes in
 * front. The text is cut into UTF-8 characters by their lead byte alone (no
 * validation, the last one clipped to the text). Then, repeatedly, the
 * adjacent pair whose concatenation is a token with the highest score is
 * merged (ties: the leftmost), until no adjacent pair forms a token. A final
 * piece that is no token is spelt in byte tokens "<0xXX>" (or a one-byte
 * token); a byte with neither becomes the unknown token, or nothing when the
 * vocabulary has none (llama.cpp stops with an error there). */
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

typedef struct {
    size_t start, n; /* bytes of the piece; n = 0 once merged into its left */
    int32_t prev, next;
} spm_sym;

typedef struct {
    float score;
    int32_t left, right;
    size_t size; /* bytes of the pair when it was queued */
} spm_pair;

/* a before b in the queue: higher score, then further left */
static inline int pair_first(const spm_pair *a, const spm_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct {
    const moe_tokenizer *tok;
    const char *s;
    spm_sym *sym;
    spm_pair *heap;
    size_t nh;
} spm_state;

static void queue_pair(spm_state *z, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    size_t size = z->sym[l].n + z->sym[r].n;
    int32_t id = tok_text_id(z->tok, z->s + z->sym[l].start, size);
    if (id < 0) return;
    spm_pair e = {z->tok->score ? z->tok->score[id] : 0.0f, l, r, size};
    size_t i = z->nh++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!pair_first(&e, &z->heap[p])) break;
        z->heap[i] = z->heap[p];
        i = p;
    }
    z->heap[i] = e;
}

static spm_pair pop_pair(spm_state *z) {
    spm_pair top = z->heap[0], last = z->heap[--z->nh];
    size_t m = z->nh, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && pair_first(&z->heap[c + 1], &z->heap[c])) c++;
        if (!pair_first(&z->heap[c], &last)) break;
        z->heap[i] = z->heap[c];
        i = c;
    }
    if (m) z->heap[i] = last;
    return top;
}

static inline size_t utf8_lead_len(unsigned char c) {
    static const unsigned char by_high_bits[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return by_high_bits[c >> 4];
}

moe_status spm_encode(const moe_tokenizer *tok, const char *text, size_t len, int space_prefix,
                      tok_ids *o) {
    if (len > TOK_MAX_PIECE)
        return moe_error(MOE_ERR_UNSUPPORTED, "tokenizer_encode: text of %zu bytes", len);
    size_t cap = 3 * (len + 1);
    char *s = moe_malloc(cap);
    spm_sym *sym = moe_malloc(cap * sizeof(spm_sym));
    spm_pair *heap = moe_malloc(3 * cap * sizeof(spm_pair));
    moe_status st = MOE_OK;
    if (!s || !sym || !heap) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    size_t n = 0;
    if (space_prefix) {
        memcpy(s, "\xe2\x96\x81", 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(s + n, "\xe2\x96\x81", 3);
            n += 3;
        } else {
            s[n++] = text[i];
        }
    }
    size_t ns = 0;
    for (size_t at = 0; at < n; ns++) {
        size_t l = utf8_lead_len((unsigned char)s[at]);
        if (l > n - at) l = n - at;
        sym[ns].start = at;
        sym[ns].n = l;
        sym[ns].prev = (int32_t)ns - 1;
        at += l;
        sym[ns].next = at == n ? -1 : (int32_t)ns + 1;
    }
    spm_state z = {tok, s, sym, heap, 0};
    for (size_t i = 1; i < ns; i++) queue_pair(&z, (int32_t)i - 1, (int32_t)i);
    while (z.nh) {
        spm_pair p = pop_pair(&z);
        spm_sym *l = &sym[p.left], *r = &sym[p.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != p.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = p.left;
        queue_pair(&z, l->prev, p.left);
        queue_pair(&z, p.left, l->next);
    }
    for (int32_t i = ns ? 0 : -1; i >= 0; i = sym[i].next) {
        int32_t id = tok_text_id(tok, s + sym[i].start, sym[i].n);
        if (id >= 0) {
            if ((st = tok_ids_push(o, id))) goto done;
            continue;
        }
        for (size_t k = 0; k < sym[i].n; k++) {
            int32_t b = tok->byte_tok[(unsigned char)s[sym[i].start + k]];
            if (b < 0) b = tok->unk;
            if (b >= 0 && (st = tok_ids_push(o, b))) goto done;
        }
    }
done:
    moe_free(s);
    moe_free(sym);
    moe_free(heap);
    return st;
}
