/* arch_synthetic: the benchmark's models. A random-weight file in the
 * published llama layout (arch_write_random) with a vocabulary of exactly
 * the model's size, so that other engines (llama.cpp's llama-bench) load the
 * same file: the 256 bytes, then merges of byte pairs, then the end-of-text
 * token. The text it would tokenise does not matter; benchmarks feed ids. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "data/tokenizer.h"

/* Byte pair i is (i / 256, i % 256): distinct pairs of tokens that exist
 * before it, so the merge table is valid BPE. */
static moe_status synthetic_vocab(moe_tokenizer **out, int vocab) {
    *out = NULL;
    const int32_t n_merges = vocab - 257;
    if (vocab < 257 || n_merges > 256 * 256)
        return moe_error(MOE_ERR_INVALID_ARG, "a synthetic vocabulary has 257 to %d tokens, not %d",
                         257 + 256 * 256, vocab);
    int32_t *merges = moe_malloc(sizeof(int32_t) * 2 * (size_t)(n_merges ? n_merges : 1));
    size_t *off = moe_malloc(sizeof(size_t) * ((size_t)n_merges + 258));
    char *blob = moe_malloc(256 + 2 * (size_t)n_merges + TOK_EOS_LEN);
    if (!merges || !off || !blob) {
        moe_free(merges);
        moe_free(off);
        moe_free(blob);
        return MOE_ERR_NOMEM;
    }
    size_t len = 0;
    for (int i = 0; i < 256; i++) {
        off[i] = len;
        blob[len++] = (char)i;
    }
    for (int32_t i = 0; i < n_merges; i++) {
        merges[2 * i] = i / 256;
        merges[2 * i + 1] = i % 256;
        off[256 + i] = len;
        blob[len++] = (char)(i / 256);
        blob[len++] = (char)(i % 256);
    }
    off[256 + n_merges] = len;
    memcpy(blob + len, TOK_EOS_TEXT, TOK_EOS_LEN);
    off[257 + n_merges] = len + TOK_EOS_LEN;
    return tokenizer_create_own(out, n_merges, merges, off, blob);
}

/* "q8_0", "Q4_K", "bf16", ...: a type we can write (it has a quantiser) */
static int writable_type(const char *name) {
    for (int t = 0; t < DT_COUNT; t++)
        if (dtype_usable(t) && dtype_traits_of(t)->from_float && !strcasecmp(dtype_name(t), name)) return t;
    return -1;
}

moe_status moe_write_synthetic(const char *path, const moe_config *cfg, const char *type, uint64_t seed) {
    if (!path || !cfg || !type) return moe_error(MOE_ERR_INVALID_ARG, "moe_write_synthetic: NULL argument");
    const int wtype = writable_type(type);
    if (wtype < 0) {
        char known[256] = "";
        size_t o = 0;
        for (int t = 0; t < DT_COUNT && o < sizeof known; t++)
            if (dtype_usable(t) && dtype_traits_of(t)->from_float)
                o += (size_t)snprintf(known + o, sizeof known - o, "%s%s", o ? ", " : "", dtype_name(t));
        return moe_error(MOE_ERR_INVALID_ARG, "cannot write weights of type '%s' (known: %s)", type, known);
    }
    moe_status st = moe_config_validate(cfg);
    if (st) return st;
    moe_tokenizer *tok = NULL;
    st = synthetic_vocab(&tok, cfg->vocab_size);
    if (!st) st = arch_write_random(path, "llama", cfg, wtype, tok, seed);
    moe_tokenizer_free(tok);
    return st;
}
