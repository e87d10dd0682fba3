/* io/tokenizer_gguf.c: tokenizers in GGUF.
 *
 * Our own vocabulary is written the way GPT-2 tokenizers are stored
 * (tokenizer.ggml.model = "gpt2", pre "gpt-2", tokens as byte-to-unicode
 * mapped strings, merges as "left right", the last token "<|endoftext|>" of
 * type control and both eos and bos), so other GGUF tools tokenise our models'
 * text the same way (up to our pre-tokeniser's approximate Unicode classes).
 *
 * Reading accepts that layout (checked strictly, read as our own) and
 * published vocabularies: tokenizer.ggml.model "llama" (SentencePiece style)
 * or "gpt2" with a tokenizer.ggml.pre from the table below (llama.cpp's names
 * for the pre-tokenisers we reproduce). Anything else is refused with the
 * value named. A file of the exact own layout is read as our own even though
 * llama.cpp would classify its characters slightly differently. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"
#include "io/tokenizer_gguf.h"

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
    if (tok->kind != TOK_OWN)
        return moe_error(MOE_ERR_UNSUPPORTED,
                         "tokenizer_write_gguf: only our own vocabulary can be written");
    uint16_t b2u[256];
    int16_t u2b[324];
    tok_byte_unicode(b2u, u2b);
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

/* Our own vocabulary, checked strictly (ids 0..255 the bytes, merge i makes
 * token 256 + i, the last token "<|endoftext|>"). */
static moe_status read_own(moe_tokenizer **out, const gguf_ctx *ctx) {
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
    tok_byte_unicode(b2u, u2b);
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
        if ((st = tok_grow((void **)&blob, &blob_cap, blen + len + 1, 1))) goto fail;
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
        if ((st = tok_grow((void **)&tmp, &tmp_cap, len, 1))) goto fail;
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
    /* distinct tokens imply distinct merge pairs, as tokenizer_create_own needs */
    return tokenizer_create_own(out, nm, merges, off, blob);
fail:
    tokset_free(&ts);
    moe_free(tmp);
    moe_free(off);
    moe_free(merges);
    moe_free(blob);
    return st;
}

/* tokenizer.ggml.pre names (llama.cpp's) -> our cutters and the flags
 * llama.cpp sets with them */
static const struct {
    const char *name;
    pretok_kind pre;
    int ignore_merges, add_bos;
} pre_names[] = {
    {"default", PRE_DEFAULT, 0, 0},
    {"gpt-2", PRE_GPT2, 0, 0},        {"phi-2", PRE_GPT2, 0, 0},
    {"mpt", PRE_GPT2, 0, 0},          {"olmo", PRE_GPT2, 0, 0},
    {"jais", PRE_GPT2, 0, 0},         {"trillion", PRE_GPT2, 0, 0},
    {"granite-docling", PRE_GPT2, 0, 0}, {"gigachat", PRE_GPT2, 0, 0},
    {"a.x-4.0", PRE_GPT2, 0, 0},      {"mellum", PRE_GPT2, 0, 0},
    {"exaone4", PRE_GPT2, 0, 0},
    {"llama3", PRE_LLAMA3, 1, 1},     {"llama-v3", PRE_LLAMA3, 1, 1},
    {"llama-bpe", PRE_LLAMA3, 1, 1},  {"falcon3", PRE_LLAMA3, 1, 1},
    {"falcon-h1", PRE_LLAMA3, 1, 1},  {"pixtral", PRE_LLAMA3, 1, 1},
    {"midm-2.0", PRE_LLAMA3, 1, 1},   {"lfm2", PRE_LLAMA3, 1, 1},
    {"jina-v5-nano", PRE_LLAMA3, 1, 1},
    {"dbrx", PRE_LLAMA3, 0, 0},       {"smaug-bpe", PRE_LLAMA3, 0, 0},
    {"qwen2", PRE_QWEN2, 0, 0},       {"deepseek-r1-qwen", PRE_QWEN2, 0, 0},
    {"kormo", PRE_QWEN2, 0, 0},       {"f2llmv2", PRE_QWEN2, 0, 0},
    {"stablelm2", PRE_QWEN2, 0, 0},   {"megrez", PRE_QWEN2, 0, 0},
    {"qwen35", PRE_QWEN35, 0, 0},
    {"starcoder", PRE_STARCODER, 0, 0}, {"refact", PRE_STARCODER, 0, 0},
    {"command-r", PRE_STARCODER, 0, 0}, {"smollm", PRE_STARCODER, 0, 0},
    {"codeshell", PRE_STARCODER, 0, 0}, {"exaone", PRE_STARCODER, 0, 0},
    {"minerva-7b", PRE_STARCODER, 0, 0}, {"mellum2", PRE_STARCODER, 0, 0},
    {"deepseek-llm", PRE_DEEPSEEK_LLM, 0, 0},
    {"deepseek-coder", PRE_DEEPSEEK_CODER, 0, 0},
    {"deepseek-v3", PRE_DEEPSEEK3, 0, 0},
};

static int str_is(const char *s, size_t len, const char *want) {
    return len == strlen(want) && memcmp(s, want, len) == 0;
}

/* An optional id key: -1 when absent. */
static moe_status opt_id(const gguf_ctx *ctx, const char *key, int64_t *out) {
    *out = -1;
    if (!gguf_has_key(ctx, key)) return MOE_OK;
    uint32_t v;
    moe_status st = gguf_get_u32(ctx, key, &v);
    if (st) return moe_error_prefix(st, "tokenizer");
    *out = v;
    return MOE_OK;
}

static moe_status opt_bool(const gguf_ctx *ctx, const char *key, int *out) {
    *out = -1;
    if (!gguf_has_key(ctx, key)) return MOE_OK;
    moe_status st = gguf_get_bool(ctx, key, out);
    return st ? moe_error_prefix(st, "tokenizer") : MOE_OK;
}

/* An optional numeric array of at least n elements of type want, copied
 * (the data may be unaligned); *out stays NULL when the key is absent. */
static moe_status opt_array(const gguf_ctx *ctx, const char *key, gguf_type want, uint64_t n,
                            void **out) {
    *out = NULL;
    if (!gguf_has_key(ctx, key)) return MOE_OK;
    gguf_type elem;
    uint64_t have;
    const void *data;
    moe_status st = gguf_get_arr_data(ctx, key, &elem, &have, &data);
    if (st) return moe_error_prefix(st, "tokenizer");
    if (elem != want)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %s has element type %d, expected %d", key,
                         (int)elem, (int)want);
    if (have < n)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %s has %llu entries for %llu tokens", key,
                         (unsigned long long)have, (unsigned long long)n);
    *out = moe_malloc((size_t)n * 4 + 1);
    if (!*out) return MOE_ERR_NOMEM;
    memcpy(*out, data, (size_t)n * 4);
    return MOE_OK;
}

/* Reads n strings of a string array into freshly allocated pointer/length arrays. */
static moe_status str_array(const gguf_ctx *ctx, const char *key, uint64_t n, const char ***s,
                            size_t **len) {
    *s = moe_malloc(((size_t)n + 1) * sizeof(char *));
    *len = moe_malloc(((size_t)n + 1) * sizeof(size_t));
    if (!*s || !*len) return MOE_ERR_NOMEM;
    for (uint64_t i = 0; i < n; i++) {
        moe_status st = gguf_get_arr_str(ctx, key, i, &(*s)[i], &(*len)[i]);
        if (st) return moe_error_prefix(st, "tokenizer");
    }
    return MOE_OK;
}

static moe_status read_published(moe_tokenizer **out, const gguf_ctx *ctx, tok_kind kind,
                                 int pre_index) {
    tok_vocab_in in;
    memset(&in, 0, sizeof(in));
    in.kind = kind;
    if (pre_index >= 0) {
        in.pre = pre_names[pre_index].pre;
        in.ignore_merges = pre_names[pre_index].ignore_merges;
        in.add_bos_default = pre_names[pre_index].add_bos;
    }
    uint64_t nv, nm = 0;
    moe_status st;
    const char **text = NULL, **merge = NULL;
    size_t *text_len = NULL, *merge_len = NULL;
    void *types = NULL, *scores = NULL;
    if ((st = need_array(ctx, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &nv))) return st;
    if (nv < 1 || nv > TOK_MAX_VOCAB)
        return moe_error(MOE_ERR_FORMAT, "tokenizer: %llu tokens, expected 1..%d",
                         (unsigned long long)nv, TOK_MAX_VOCAB);
    if (kind == TOK_BPE) {
        if ((st = need_array(ctx, "tokenizer.ggml.merges", GGUF_TYPE_STRING, &nm))) return st;
        if (nm > INT32_MAX)
            return moe_error(MOE_ERR_FORMAT, "tokenizer: %llu merges", (unsigned long long)nm);
    }
    if ((st = str_array(ctx, "tokenizer.ggml.tokens", nv, &text, &text_len))) goto done;
    if (kind == TOK_BPE && (st = str_array(ctx, "tokenizer.ggml.merges", nm, &merge, &merge_len)))
        goto done;
    if ((st = opt_array(ctx, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, nv, &types)) ||
        (st = opt_array(ctx, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, nv, &scores)))
        goto done;
    int64_t pre_dep, suf_dep, mid_dep;
    if ((st = opt_id(ctx, "tokenizer.ggml.bos_token_id", &in.bos)) ||
        (st = opt_id(ctx, "tokenizer.ggml.eos_token_id", &in.eos)) ||
        (st = opt_id(ctx, "tokenizer.ggml.eot_token_id", &in.eot)) ||
        (st = opt_id(ctx, "tokenizer.ggml.eom_token_id", &in.eom)) ||
        (st = opt_id(ctx, "tokenizer.ggml.unknown_token_id", &in.unk)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_pre_token_id", &in.fim_pre)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_suf_token_id", &in.fim_suf)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_mid_token_id", &in.fim_mid)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_pad_token_id", &in.fim_pad)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_rep_token_id", &in.fim_rep)) ||
        (st = opt_id(ctx, "tokenizer.ggml.fim_sep_token_id", &in.fim_sep)) ||
        (st = opt_id(ctx, "tokenizer.ggml.prefix_token_id", &pre_dep)) ||
        (st = opt_id(ctx, "tokenizer.ggml.suffix_token_id", &suf_dep)) ||
        (st = opt_id(ctx, "tokenizer.ggml.middle_token_id", &mid_dep)) ||
        (st = opt_bool(ctx, "tokenizer.ggml.add_bos_token", &in.add_bos)) ||
        (st = opt_bool(ctx, "tokenizer.ggml.add_eos_token", &in.add_eos)) ||
        (st = opt_bool(ctx, "tokenizer.ggml.add_space_prefix", &in.add_space_prefix)))
        goto done;
    /* the deprecated names are read after the new ones and win, as in llama.cpp */
    if (pre_dep >= 0) in.fim_pre = pre_dep;
    if (suf_dep >= 0) in.fim_suf = suf_dep;
    if (mid_dep >= 0) in.fim_mid = mid_dep;
    in.n_vocab = (int32_t)nv;
    in.text = text;
    in.text_len = text_len;
    in.type = types;
    in.score = scores;
    in.n_merges = (int32_t)nm;
    in.merge = merge;
    in.merge_len = merge_len;
    st = tokenizer_create_vocab(out, &in);
done:
    moe_free(text);
    moe_free(text_len);
    moe_free(merge);
    moe_free(merge_len);
    moe_free(types);
    moe_free(scores);
    return st;
}

/* Whether the file has our own layout (read_own then checks the rest). */
static int looks_own(const gguf_ctx *ctx) {
    gguf_type elem;
    uint64_t nv, nm, nt;
    const void *data;
    const char *s;
    size_t len;
    uint32_t eos, bos;
    if (gguf_get_arr_info(ctx, "tokenizer.ggml.tokens", &elem, &nv) || elem != GGUF_TYPE_STRING ||
        nv < 257 || nv > TOK_MAX_VOCAB)
        return 0;
    if (gguf_get_arr_info(ctx, "tokenizer.ggml.merges", &elem, &nm) || elem != GGUF_TYPE_STRING ||
        nm != nv - 257)
        return 0;
    if (gguf_get_arr_data(ctx, "tokenizer.ggml.token_type", &elem, &nt, &data) ||
        elem != GGUF_TYPE_INT32 || nt != nv)
        return 0;
    for (uint64_t i = 0; i < nv; i++) {
        int32_t ty;
        memcpy(&ty, (const char *)data + 4 * i, 4);
        if (ty != (i + 1 == nv ? 3 : 1)) return 0;
    }
    if (gguf_get_u32(ctx, "tokenizer.ggml.eos_token_id", &eos) || eos != nv - 1 ||
        gguf_get_u32(ctx, "tokenizer.ggml.bos_token_id", &bos) || bos != nv - 1)
        return 0;
    if (gguf_get_arr_str(ctx, "tokenizer.ggml.tokens", nv - 1, &s, &len) ||
        !str_is(s, len, TOK_EOS_TEXT))
        return 0;
    uint16_t b2u[256];
    int16_t u2b[324];
    tok_byte_unicode(b2u, u2b);
    for (int b = 0; b < 256; b++) {
        char m[2];
        if (gguf_get_arr_str(ctx, "tokenizer.ggml.tokens", (uint64_t)b, &s, &len)) return 0;
        if (map_bytes(b2u, (const char *)&(unsigned char){(unsigned char)b}, 1, m) != len ||
            memcmp(m, s, len) != 0)
            return 0;
    }
    return 1;
}

moe_status tokenizer_read_gguf(moe_tokenizer **out, const gguf_ctx *ctx) {
    if (!out) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_read_gguf: out is NULL");
    *out = NULL;
    if (!ctx) return moe_error(MOE_ERR_INVALID_ARG, "tokenizer_read_gguf: ctx is NULL");
    const char *model, *pre = NULL;
    size_t model_len, pre_len = 0;
    moe_status st;
    if (!gguf_has_key(ctx, "tokenizer.ggml.model"))
        return moe_error(MOE_ERR_FORMAT, "tokenizer: missing key tokenizer.ggml.model");
    if ((st = gguf_get_str(ctx, "tokenizer.ggml.model", &model, &model_len)))
        return moe_error_prefix(st, "tokenizer");
    if (gguf_has_key(ctx, "tokenizer.ggml.pre") &&
        (st = gguf_get_str(ctx, "tokenizer.ggml.pre", &pre, &pre_len)))
        return moe_error_prefix(st, "tokenizer");
    int spm = str_is(model, model_len, "llama");
    if (!spm && !str_is(model, model_len, "gpt2"))
        return moe_error(MOE_ERR_FORMAT,
                         "tokenizer: tokenizer.ggml.model '%.*s' is not supported (llama or gpt2)",
                         (int)(model_len > 40 ? 40 : model_len), model);
    if (spm) return read_published(out, ctx, TOK_SPM, -1);
    int pre_index = 0; /* no pre: llama.cpp uses "default" */
    if (pre) {
        pre_index = -1;
        for (size_t i = 0; i < sizeof(pre_names) / sizeof(pre_names[0]); i++)
            if (str_is(pre, pre_len, pre_names[i].name)) pre_index = (int)i;
        if (pre_index < 0)
            return moe_error(MOE_ERR_FORMAT,
                             "tokenizer: tokenizer.ggml.pre '%.*s' is not a supported pre-tokenizer",
                             (int)(pre_len > 40 ? 40 : pre_len), pre);
    }
    if (pre && str_is(pre, pre_len, "gpt-2") && looks_own(ctx)) return read_own(out, ctx);
    return read_published(out, ctx, TOK_BPE, pre_index);
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
