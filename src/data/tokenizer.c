/* data/tokenizer.c: the tokenizer object, its accessors, and prompt encoding
 * (special-token splitting, BOS/EOS) dispatched on the vocabulary's kind
 * (see tokenizer.h).
 *
 * Special tokens are split out of a prompt the way llama.cpp does it: each
 * special token in turn, longest text first, cuts every stretch of text not
 * yet claimed at each of its occurrences, left to right. Without
 * parse_special, control and unknown tokens are skipped (their text stays
 * text) but user-defined ones still match. Each remaining stretch is then
 * encoded on its own; for SPM a stretch that opens the prompt or follows a
 * special token gets the space prefix (when the vocabulary asks for it). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

void moe_tokenizer_free(moe_tokenizer *tok) {
    if (!tok) return;
    moe_free(tok->merges);
    moe_free(tok->merge_res);
    moe_free(tok->off);
    moe_free(tok->blob);
    moe_free(tok->poff);
    moe_free(tok->pblob);
    moe_free(tok->attr);
    moe_free(tok->score);
    moe_free(tok->pr_keys);
    moe_free(tok->pr_vals);
    tokset_free(&tok->texts);
    moe_free(tok->special);
    moe_free(tok->eog);
    moe_free(tok);
}

moe_status tokenizer_create_own(moe_tokenizer **out, int32_t n_merges, int32_t *merges,
                                size_t *off, char *blob) {
    *out = NULL;
    moe_tokenizer *tok = moe_calloc(1, sizeof(*tok));
    if (!tok) {
        moe_free(merges);
        moe_free(off);
        moe_free(blob);
        return MOE_ERR_NOMEM;
    }
    tok->kind = TOK_OWN;
    tok->n_merges = n_merges;
    tok->n_vocab = 256 + n_merges + 1;
    tok->merges = merges;
    tok->off = off;
    tok->blob = blob;
    tok->eos = tok->n_vocab - 1;
    tok->bos = -1;
    tok->unk = -1;
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
    /* the end-of-text token is the special one (control) */
    tok->special = moe_malloc(sizeof(int32_t));
    tok->eog = moe_malloc(sizeof(int32_t));
    if (!tok->special || !tok->eog) {
        moe_tokenizer_free(tok);
        return MOE_ERR_NOMEM;
    }
    tok->special[0] = tok->eog[0] = tok->eos;
    tok->n_special = tok->n_eog = 1;
    *out = tok;
    return MOE_OK;
}

int moe_tokenizer_vocab_size(const moe_tokenizer *tok) { return tok ? tok->n_vocab : 0; }

int moe_tokenizer_eos(const moe_tokenizer *tok) { return tok ? tok->eos : -1; }

int moe_tokenizer_bos(const moe_tokenizer *tok) { return tok ? tok->bos : -1; }

int moe_tokenizer_is_eog(const moe_tokenizer *tok, int32_t id) {
    if (!tok || id < 0) return 0;
    for (size_t i = 0; i < tok->n_eog; i++)
        if (tok->eog[i] == id) return 1;
    return 0;
}

const char *moe_tokenizer_token(const moe_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    const size_t *off = tok->poff ? tok->poff : tok->off;
    const char *blob = tok->poff ? tok->pblob : tok->blob;
    if (len) *len = off[id + 1] - off[id];
    return blob + off[id];
}

void tok_byte_unicode(uint16_t b2u[256], int16_t u2b[324]) {
    /* printable bytes stand for themselves, the other 68 map to U+0100.. in byte order */
    int n = 0;
    for (int i = 0; i < 324; i++) u2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        b2u[b] = (uint16_t)(printable ? b : 256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

/* ---- special-token splitting ------------------------------------------------- */
typedef struct {
    size_t off, len;
    int32_t id; /* -1: text */
} fragment;

typedef struct {
    fragment *v;
    size_t n, cap;
} fraglist;

static moe_status frag_push(fraglist *l, size_t off, size_t len, int32_t id) {
    if (l->n == l->cap) {
        moe_status st = tok_grow((void **)&l->v, &l->cap, l->n + 1, sizeof(fragment));
        if (st) return st;
    }
    l->v[l->n++] = (fragment){off, len, id};
    return MOE_OK;
}

static const char *find_bytes(const char *h, size_t hn, const char *nd, size_t nn) {
    if (nn == 0 || nn > hn) return NULL;
    return memmem(h, hn, nd, nn);
}

/* Splits text into text stretches and special tokens (into *out). */
static moe_status split_special(const moe_tokenizer *tok, const char *text, size_t len,
                                int parse_special, fraglist *out) {
    fraglist cur = {0}, next = {0};
    moe_status st = MOE_OK;
    if (len && (st = frag_push(&cur, 0, len, -1))) return st;
    for (size_t k = 0; k < tok->n_special && cur.n; k++) {
        int32_t id = tok->special[k];
        uint8_t a = tok->attr ? tok->attr[id] : TA_CONTROL;
        if (!parse_special && (a & (TA_CONTROL | TA_UNKNOWN))) continue;
        const char *st_text = tok->blob + tok->off[id];
        size_t st_len = tok->off[id + 1] - tok->off[id];
        next.n = 0;
        for (size_t f = 0; f < cur.n; f++) {
            fragment fr = cur.v[f];
            if (fr.id >= 0) {
                if ((st = frag_push(&next, fr.off, fr.len, fr.id))) goto done;
                continue;
            }
            size_t at = fr.off, end = fr.off + fr.len;
            const char *m;
            while ((m = find_bytes(text + at, end - at, st_text, st_len))) {
                size_t pos = (size_t)(m - text);
                if (pos > at && (st = frag_push(&next, at, pos - at, -1))) goto done;
                if ((st = frag_push(&next, pos, st_len, id))) goto done;
                at = pos + st_len;
            }
            if (at < end && (st = frag_push(&next, at, end - at, -1))) goto done;
        }
        fraglist t = cur;
        cur = next;
        next = t;
    }
    *out = cur;
    cur.v = NULL;
done:
    moe_free(cur.v);
    moe_free(next.v);
    return st;
}

moe_status moe_tokenizer_encode_prompt(const moe_tokenizer *tok, const char *text, size_t len,
                                       int add_special, int parse_special, int32_t **ids,
                                       size_t *n_ids) {
    if (ids) *ids = NULL;
    if (n_ids) *n_ids = 0;
    if (!tok || !ids || !n_ids || (len && !text))
        return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_encode: NULL argument");
    tok_ids o = {NULL, 0, 0};
    fraglist fr = {0};
    moe_status st = tok_grow((void **)&o.v, &o.cap, len / 3 + 16, sizeof(int32_t));
    if (st) return st;
    if ((st = split_special(tok, text, len, parse_special, &fr))) goto fail;
    if (add_special && tok->add_bos && tok->bos >= 0 && (st = tok_ids_push(&o, tok->bos)))
        goto fail;
    int after_special = 1; /* SPM: the prompt's start counts as after a special token */
    for (size_t f = 0; f < fr.n; f++) {
        const fragment *g = &fr.v[f];
        if (g->id >= 0) {
            st = tok_ids_push(&o, g->id);
            after_special = 1;
        } else if (tok->kind == TOK_OWN) {
            st = bpe_encode_own(tok, text + g->off, g->len, &o);
        } else if (tok->kind == TOK_BPE) {
            st = bpe_encode_vocab(tok, text + g->off, g->len, &o);
        } else {
            st = spm_encode(tok, text + g->off, g->len, tok->add_space_prefix && after_special, &o);
            after_special = 0;
        }
        if (st) goto fail;
    }
    if (add_special && tok->add_eos && tok->eos >= 0 && (st = tok_ids_push(&o, tok->eos)))
        goto fail;
    moe_free(fr.v);
    *ids = o.v;
    *n_ids = o.n;
    return MOE_OK;
fail:
    moe_free(fr.v);
    moe_free(o.v);
    return st;
}

moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                int32_t **ids, size_t *n_ids) {
    return moe_tokenizer_encode_prompt(tok, text, len, 0, 0, ids, n_ids);
}
