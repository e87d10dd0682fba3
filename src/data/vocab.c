/* data/vocab.c: building a published vocabulary's tokenizer (TOK_SPM /
 * TOK_BPE) from what the GGUF reader found, with llama.cpp's rules:
 *
 * - token_type 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
 *   6 byte; others "undefined". An empty token text is read as "[EMPTY_<id>]".
 *   Two tokens with the same text are an error (llama.cpp stops too).
 * - special ids: defaults SPM bos 1 / eos 2 / unk 0, BPE bos = eos = 11 (each
 *   dropped when outside the vocabulary); a file id outside the vocabulary
 *   keeps the default. add_bos defaults to true for SPM and for the llama-bpe
 *   family, add_eos to false; the file's flags win.
 * - end-of-turn, end-of-message and fill-in-the-middle tokens missing from
 *   the metadata are found by their text (the lowest id where several texts
 *   match; llama.cpp takes whichever its hash map lists first) and become
 *   control tokens. End of generation: the eos, eot and eom ids, the FIM
 *   pad/repo/separator tokens, and every token whose text is one of llama.cpp's
 *   end-of-generation texts (also made control), with its two exceptions
 *   ("<|end|>" is dropped beside "<|return|>" + "<|call|>" or "<|calls|>" +
 *   "<|flush|>", "</s>" beside "<|tool_response>").
 * - special tokens (control, user-defined, unknown) are split out of a prompt
 *   longest text first.
 * - a token's piece (token_to_piece with special rendering): special tokens
 *   give their text, byte tokens their byte, normal ones their text with "▁"
 *   as space (SPM) or byte-to-unicode unmapped (BPE; a code point that stands
 *   for no byte gives "[UNK_BYTE_0x<utf8 hex><text>]"), unused and undefined
 *   ones nothing. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"

static const char *const eot_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<end_of_utterance>", NULL};
static const char *const eom_texts[] = {"<|eom_id|>", NULL};
static const char *const fim_pre_texts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
    "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>", NULL};
static const char *const fim_suf_texts[] = {
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>",
    "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>", NULL};
static const char *const fim_mid_texts[] = {
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
    "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>", NULL};
static const char *const fim_pad_texts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
                                            "[PAD]", NULL};
static const char *const fim_rep_texts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                            "<REPO>", "<reponame>", NULL};
static const char *const fim_sep_texts[] = {"<|file_sep|>", NULL};
static const char *const eog_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~[", NULL};

int32_t tok_text_id(const moe_tokenizer *tok, const char *s, size_t len) {
    return tokset_find(&tok->texts, tok->blob, tok->off, s, len, hash_bytes(s, len));
}

static int32_t find_text(const moe_tokenizer *tok, const char *s) {
    return tok_text_id(tok, s, strlen(s));
}

/* Lowest id whose text is in list, -1 if none. */
static int32_t find_any(const moe_tokenizer *tok, const char *const *list) {
    int32_t best = -1;
    for (; *list; list++) {
        int32_t id = find_text(tok, *list);
        if (id >= 0 && (best < 0 || id < best)) best = id;
    }
    return best;
}

/* The metadata id when given, else the token found by text (made control). */
static int32_t id_or_text(moe_tokenizer *tok, int32_t given, const char *const *list) {
    if (given >= 0) return given;
    int32_t id = find_any(tok, list);
    if (id >= 0) tok->attr[id] |= TA_CONTROL;
    return id;
}

static moe_status eog_add(moe_tokenizer *tok, int32_t id) {
    if (id < 0) return MOE_OK;
    for (size_t i = 0; i < tok->n_eog; i++)
        if (tok->eog[i] == id) return MOE_OK;
    size_t cap = tok->n_eog;
    moe_status st = tok_grow((void **)&tok->eog, &cap, tok->n_eog + 1, sizeof(int32_t));
    if (st) return st;
    tok->eog[tok->n_eog++] = id;
    return MOE_OK;
}

static void eog_remove(moe_tokenizer *tok, int32_t id) {
    for (size_t i = 0; i < tok->n_eog; i++)
        if (tok->eog[i] == id) {
            tok->eog[i] = tok->eog[--tok->n_eog];
            return;
        }
}

static int eog_has_text(const moe_tokenizer *tok, const char *s, int32_t *id) {
    int32_t t = find_text(tok, s);
    for (size_t i = 0; t >= 0 && i < tok->n_eog; i++)
        if (tok->eog[i] == t) {
            if (id) *id = t;
            return 1;
        }
    return 0;
}

static int cmp_id(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static moe_status find_eog(moe_tokenizer *tok, const tok_vocab_in *in, int32_t eot, int32_t eom) {
    moe_status st;
    int32_t pad = id_or_text(tok, (int32_t)in->fim_pad, fim_pad_texts);
    int32_t rep = id_or_text(tok, (int32_t)in->fim_rep, fim_rep_texts);
    int32_t sep = id_or_text(tok, (int32_t)in->fim_sep, fim_sep_texts);
    if ((st = eog_add(tok, pad)) || (st = eog_add(tok, rep)) || (st = eog_add(tok, sep))) return st;
    for (const char *const *t = eog_texts; *t; t++) {
        int32_t id = find_text(tok, *t);
        if (id < 0) continue;
        if ((st = eog_add(tok, id))) return st;
        tok->attr[id] |= TA_CONTROL;
    }
    if ((st = eog_add(tok, tok->eos)) || (st = eog_add(tok, eot)) || (st = eog_add(tok, eom)))
        return st;
    int32_t end_id = -1, s_id = -1;
    int has_end = eog_has_text(tok, "<|end|>", &end_id);
    int has_call = eog_has_text(tok, "<|call|>", NULL) || eog_has_text(tok, "<|calls|>", NULL);
    if (has_end && has_call &&
        (eog_has_text(tok, "<|return|>", NULL) || eog_has_text(tok, "<|flush|>", NULL))) {
        eog_remove(tok, end_id);
        tok->attr[end_id] = TA_USER;
    }
    if (eog_has_text(tok, "<|tool_response>", NULL) && eog_has_text(tok, "</s>", &s_id)) {
        eog_remove(tok, s_id);
        tok->attr[s_id] = TA_NORMAL;
    }
    if (tok->n_eog) qsort(tok->eog, tok->n_eog, sizeof(int32_t), cmp_id);
    return MOE_OK;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* growable byte buffer for the pieces */
typedef struct {
    char *p;
    size_t n, cap;
} pbuf;

#define PIECE_MAX ((size_t)1 << 20) /* "[UNK_BYTE..]" repeats the text per char */

static moe_status put(pbuf *b, const void *s, size_t len) {
    moe_status st = tok_grow((void **)&b->p, &b->cap, b->n + len + 1, 1);
    if (st) return st;
    memcpy(b->p + b->n, s, len);
    b->n += len;
    return MOE_OK;
}

/* Appends the piece of token id to b. */
static moe_status add_piece(const moe_tokenizer *tok, const int16_t u2b[324], int32_t id, pbuf *b) {
    const char *t = tok->blob + tok->off[id];
    size_t tl = tok->off[id + 1] - tok->off[id], start = b->n;
    uint8_t a = tok->attr[id];
    moe_status st = MOE_OK;
    if (a & TA_SPECIAL) return put(b, t, tl);
    if (a & TA_BYTE && !(a & TA_NORMAL)) { /* strtol of text[3..5) in base 16 */
        unsigned v = 0;
        for (size_t i = 3; i < 5 && i < tl; i++) {
            int c = t[i] | 32, d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
            if (d < 0) break;
            v = v * 16 + (unsigned)d;
        }
        char c = (char)v;
        return put(b, &c, 1);
    }
    if (!(a & TA_NORMAL)) return MOE_OK;
    for (size_t i = 0; i < tl && !st;) {
        if (tok->kind == TOK_SPM) {
            int space = i + 2 < tl && !memcmp(t + i, "\xe2\x96\x81", 3);
            st = put(b, space ? " " : t + i, 1);
            i += space ? 3 : 1;
            continue;
        }
        uint32_t cp;
        size_t l = pretok_decode((const unsigned char *)t + i, tl - i, &cp);
        i += l;
        if (cp < 324 && u2b[cp] >= 0) {
            char c = (char)u2b[cp];
            st = put(b, &c, 1);
            continue;
        }
        /* llama.cpp: "[UNK_BYTE_0x" + the char's UTF-8 in hex + the whole text + "]" */
        unsigned char u[4];
        char hex[9];
        size_t ul = pretok_encode(cp, u);
        for (size_t k = 0; k < ul; k++) snprintf(hex + 2 * k, 3, "%02x", u[k]);
        if (b->n - start > PIECE_MAX)
            return moe_error(MOE_ERR_FORMAT, "tokenizer: token %d's text decodes to too much", (int)id);
        if (!(st = put(b, "[UNK_BYTE_0x", 12)) && !(st = put(b, hex, 2 * ul)) &&
            !(st = put(b, t, tl)))
            st = put(b, "]", 1);
    }
    return st;
}

static moe_status build_pieces(moe_tokenizer *tok) {
    uint16_t b2u[256];
    int16_t u2b[324];
    tok_byte_unicode(b2u, u2b);
    size_t nv = (size_t)tok->n_vocab;
    pbuf b = {NULL, 0, 0};
    moe_status st = put(&b, "", 0);
    tok->poff = moe_malloc((nv + 1) * sizeof(size_t));
    if (st || !tok->poff) {
        moe_free(b.p);
        return MOE_ERR_NOMEM;
    }
    tok->poff[0] = 0;
    for (size_t i = 0; i < nv; i++) {
        if ((st = add_piece(tok, u2b, (int32_t)i, &b))) {
            moe_free(b.p);
            return st;
        }
        tok->poff[i + 1] = b.n;
    }
    tok->pblob = b.p;
    return MOE_OK;
}

static moe_status read_merges(moe_tokenizer *tok, const tok_vocab_in *in) {
    int32_t nm = in->n_merges;
    tok->n_merges = nm;
    tok->merges = moe_malloc(2 * ((size_t)nm + 1) * sizeof(int32_t));
    tok->merge_res = moe_malloc(((size_t)nm + 1) * sizeof(int32_t));
    char *cat = NULL;
    size_t cat_cap = 0;
    u64map m;
    memset(&m, 0, sizeof(m));
    moe_status st = MOE_OK;
    if (!tok->merges || !tok->merge_res || (st = u64map_init(&m, (size_t)nm))) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    for (int32_t i = 0; i < nm; i++) {
        const char *s = in->merge[i];
        size_t len = in->merge_len[i];
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL; /* the first after [0] */
        if (!sp) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d is not two tokens and a space", i);
            goto done;
        }
        size_t ll = (size_t)(sp - s), rl = len - ll - 1;
        int32_t l = tok_text_id(tok, s, ll), r = tok_text_id(tok, sp + 1, rl), res = -1;
        if ((st = tok_grow((void **)&cat, &cat_cap, ll + rl + 1, 1))) goto done;
        memcpy(cat, s, ll);
        memcpy(cat + ll, sp + 1, rl);
        if (l >= 0 && r >= 0) res = tok_text_id(tok, cat, ll + rl);
        if (res < 0) {
            st = moe_error(MOE_ERR_FORMAT, "tokenizer: merge %d ('%.*s') names or makes a token "
                                           "missing from the vocabulary",
                           i, (int)(len > 40 ? 40 : len), s);
            goto done;
        }
        tok->merges[2 * i] = l;
        tok->merges[2 * i + 1] = r;
        tok->merge_res[i] = res;
        uint64_t key = pair_key(l, r);
        if (u64map_get(m.keys, m.vals, m.mask, key) < 0 && (st = u64map_put(&m, key, i)))
            goto done; /* a repeated pair keeps its first rank */
    }
    tok->pr_keys = m.keys;
    tok->pr_vals = m.vals;
    tok->pr_mask = m.mask;
    m.keys = NULL;
    m.vals = NULL;
done:
    u64map_free(&m);
    moe_free(cat);
    return st;
}

static moe_status read_texts(moe_tokenizer *tok, const tok_vocab_in *in) {
    size_t nv = (size_t)in->n_vocab, total = 0;
    for (size_t i = 0; i < nv; i++) total += in->text_len[i] ? in->text_len[i] : 24;
    tok->off = moe_malloc((nv + 1) * sizeof(size_t));
    tok->blob = moe_malloc(total + 1);
    tok->attr = moe_malloc(nv);
    moe_status st;
    if (!tok->off || !tok->blob || !tok->attr || (st = tokset_init(&tok->texts, nv)))
        return MOE_ERR_NOMEM;
    static const uint8_t attr_of_type[7] = {0, TA_NORMAL, TA_UNKNOWN, TA_CONTROL,
                                            TA_USER, TA_UNUSED, TA_BYTE};
    size_t at = 0;
    tok->off[0] = 0;
    for (size_t i = 0; i < nv; i++) {
        char *d = tok->blob + at;
        size_t l = in->text_len[i];
        if (l) memcpy(d, in->text[i], l);
        else l = (size_t)snprintf(d, 24, "[EMPTY_%zu]", i);
        uint64_t h = hash_bytes(d, l);
        tok->off[i + 1] = at + l;
        int32_t dup = tokset_find(&tok->texts, tok->blob, tok->off, d, l, h);
        if (dup >= 0)
            return moe_error(MOE_ERR_FORMAT, "tokenizer: token %zu has the same text as token %d",
                             i, (int)dup);
        if ((st = tokset_add(&tok->texts, (int32_t)i, h))) return st;
        at += l;
        int32_t ty = in->type ? in->type[i] : 1;
        tok->attr[i] = ty >= 0 && ty < 7 ? attr_of_type[ty] : 0;
    }
    return MOE_OK;
}

/* id from the file when it names a token, else the default (if it does) */
static int32_t pick_id(int64_t file, int32_t def, int32_t nv) {
    if (file >= 0 && file < nv) return (int32_t)file;
    return def < nv ? def : -1;
}

moe_status tokenizer_create_vocab(moe_tokenizer **out, const tok_vocab_in *in) {
    *out = NULL;
    if (in->n_vocab < 1 || in->n_vocab > TOK_MAX_VOCAB)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %d tokens", (int)in->n_vocab);
    moe_tokenizer *tok = moe_calloc(1, sizeof(*tok));
    if (!tok) return MOE_ERR_NOMEM;
    tok->kind = in->kind;
    tok->pre = in->pre;
    tok->n_vocab = in->n_vocab;
    int32_t nv = in->n_vocab;
    moe_status st;
    if ((st = read_texts(tok, in))) goto fail;
    if (in->score) {
        tok->score = moe_malloc((size_t)nv * sizeof(float));
        if (!tok->score) {
            st = MOE_ERR_NOMEM;
            goto fail;
        }
        memcpy(tok->score, in->score, (size_t)nv * sizeof(float));
    }
    if (in->kind == TOK_BPE && (st = read_merges(tok, in))) goto fail;
    int spm = in->kind == TOK_SPM;
    tok->bos = pick_id(in->bos, spm ? 1 : 11, nv);
    tok->eos = pick_id(in->eos, spm ? 2 : 11, nv);
    tok->unk = pick_id(in->unk, spm ? 0 : -1, nv);
    tok->add_bos = in->add_bos >= 0 ? in->add_bos : spm ? 1 : in->add_bos_default;
    tok->add_eos = in->add_eos >= 0 ? in->add_eos : 0;
    tok->add_space_prefix = in->add_space_prefix >= 0 ? in->add_space_prefix : spm;
    tok->ignore_merges = in->ignore_merges;
    int32_t eot = id_or_text(tok, pick_id(in->eot, -1, nv), eot_texts);
    int32_t eom = id_or_text(tok, pick_id(in->eom, -1, nv), eom_texts);
    id_or_text(tok, pick_id(in->fim_pre, -1, nv), fim_pre_texts); /* only their type matters */
    id_or_text(tok, pick_id(in->fim_suf, -1, nv), fim_suf_texts);
    id_or_text(tok, pick_id(in->fim_mid, -1, nv), fim_mid_texts);
    tok_vocab_in ids = *in;
    ids.fim_pad = pick_id(in->fim_pad, -1, nv);
    ids.fim_rep = pick_id(in->fim_rep, -1, nv);
    ids.fim_sep = pick_id(in->fim_sep, -1, nv);
    if ((st = find_eog(tok, &ids, eot, eom))) goto fail;
    /* special tokens, longest first */
    uint64_t *order = moe_malloc(((size_t)nv + 1) * sizeof(uint64_t)); /* (~length, id) */
    tok->special = moe_malloc(((size_t)nv + 1) * sizeof(int32_t));
    if (!order || !tok->special) {
        moe_free(order);
        st = MOE_ERR_NOMEM;
        goto fail;
    }
    for (int32_t i = 0; i < nv; i++) {
        size_t tl = tok->off[i + 1] - tok->off[i];
        if (tok->attr[i] & TA_SPECIAL)
            order[tok->n_special++] = ((uint64_t)(UINT32_MAX - (tl > UINT32_MAX ? UINT32_MAX : tl)) << 32) | (uint32_t)i;
    }
    if (tok->n_special) qsort(order, tok->n_special, sizeof(uint64_t), cmp_u64);
    for (size_t i = 0; i < tok->n_special; i++) tok->special[i] = (int32_t)(order[i] & 0xffffffffu);
    moe_free(order);
    /* byte tokens */
    uint16_t b2u[256];
    int16_t u2b[324];
    tok_byte_unicode(b2u, u2b);
    for (int b = 0; b < 256; b++) {
        char t[8];
        tok->byte_fb[b][0] = tok->byte_fb[b][1] = -1;
        if (spm) {
            snprintf(t, sizeof t, "<0x%02X>", b);
            tok->byte_tok[b] = find_text(tok, t);
            if (tok->byte_tok[b] < 0) {
                t[0] = (char)b;
                tok->byte_tok[b] = tok_text_id(tok, t, 1);
            }
            continue;
        }
        unsigned cp = b2u[b];
        size_t tl = 1;
        if (cp < 0x80) {
            t[0] = (char)cp;
        } else {
            t[0] = (char)(0xC0 | (cp >> 6));
            t[1] = (char)(0x80 | (cp & 0x3F));
            tl = 2;
        }
        tok->byte_tok[b] = tok_text_id(tok, t, tl);
        if (tok->byte_tok[b] < 0 && tl == 2)
            for (int k = 0; k < 2; k++) tok->byte_fb[b][k] = tok_text_id(tok, t + k, 1);
    }
    if ((st = build_pieces(tok))) goto fail;
    *out = tok;
    return MOE_OK;
fail:
    moe_tokenizer_free(tok);
    return st;
}
