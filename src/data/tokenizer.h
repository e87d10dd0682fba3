/* data/tokenizer.h (internal): the tokenizer object and its constructors.
 *
 * Three kinds share one object:
 *  - TOK_OWN: our own byte-level BPE (bpe_train.c, bpe.c). Ids 0..255 are the
 *    raw bytes, id 256+i is merge i, and the last id is "<|endoftext|>".
 *  - TOK_SPM: a published SentencePiece-style vocabulary (GGUF
 *    tokenizer.ggml.model = "llama"), encoded as llama.cpp does (spm.c).
 *  - TOK_BPE: a published GPT-2-style byte-level BPE vocabulary ("gpt2", with
 *    the pre-tokeniser named by tokenizer.ggml.pre), encoded as llama.cpp
 *    does (bpe.c, pretok.c).
 * The object is immutable after creation: encode may run on several threads. */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>

#include "data/pretok.h"
#include "data/tokmap.h"
#include "moe.h"

typedef enum { TOK_OWN, TOK_SPM, TOK_BPE } tok_kind;

/* token attributes (llama.cpp's, from tokenizer.ggml.token_type) */
enum {
    TA_NORMAL = 1,
    TA_UNKNOWN = 2,
    TA_CONTROL = 4,
    TA_USER = 8, /* user-defined */
    TA_UNUSED = 16,
    TA_BYTE = 32
};
/* the attributes that make a token "special" (split out of the text first) */
#define TA_SPECIAL (TA_CONTROL | TA_USER | TA_UNKNOWN)

#define TOK_EOS_TEXT "<|endoftext|>"
#define TOK_EOS_LEN (sizeof(TOK_EOS_TEXT) - 1)
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_PIECE ((size_t)1 << 30)

struct moe_tokenizer {
    tok_kind kind;
    pretok_kind pre;   /* TOK_BPE */
    int32_t n_vocab;   /* TOK_OWN: including the special token */
    size_t *off;       /* n_vocab + 1 offsets into blob */
    char *blob;        /* token texts as stored (TOK_OWN: the bytes themselves) */
    size_t *poff;      /* pieces (what token_to_piece gives); NULL: off/blob */
    char *pblob;
    uint8_t *attr;     /* TA_*; NULL for TOK_OWN */
    float *score;      /* TOK_SPM */
    int32_t n_merges;
    int32_t *merges;   /* 2 * n_merges: left, right of merge (rank) i */
    int32_t *merge_res;/* its result; NULL for TOK_OWN, where it is 256 + i */
    uint64_t *pr_keys; /* open-addressing map (left, right) -> rank */
    int32_t *pr_vals;
    size_t pr_mask;
    tokset texts;      /* text -> id (published vocabularies) */
    int32_t byte_tok[256];   /* SPM: <0xXX> or the one-byte token; BPE: the byte's char */
    int32_t byte_fb[256][2]; /* BPE: what a byte whose char is no token becomes */
    int32_t *special;  /* special tokens, longest text first */
    size_t n_special;
    int32_t *eog;      /* end-of-generation ids, ascending */
    size_t n_eog;
    int32_t bos, eos, unk; /* -1: none */
    int add_bos, add_eos, add_space_prefix, ignore_merges;
};

/* Our own vocabulary: takes ownership of merges (2 per merge), off
 * (n_merges + 258 entries) and blob (the special token's text last), also on
 * failure. Distinct merge pairs. */
moe_status tokenizer_create_own(moe_tokenizer **out, int32_t n_merges, int32_t *merges,
                                size_t *off, char *blob);

/* A published vocabulary as read from GGUF (the strings point into the file). */
typedef struct {
    tok_kind kind;              /* TOK_SPM or TOK_BPE */
    pretok_kind pre;
    int32_t n_vocab;
    const char *const *text;    /* n_vocab token texts */
    const size_t *text_len;
    const int32_t *type;        /* n_vocab token types, or NULL (all normal) */
    const float *score;         /* n_vocab scores, or NULL (all 0) */
    int32_t n_merges;           /* TOK_BPE: merge strings "left right" */
    const char *const *merge;
    const size_t *merge_len;
    /* ids from the file, -1 when absent (out-of-range ones: see vocab.c) */
    int64_t bos, eos, eot, eom, unk, fim_pre, fim_suf, fim_mid, fim_pad, fim_rep, fim_sep;
    int add_bos, add_eos, add_space_prefix; /* -1 when absent */
    int ignore_merges, add_bos_default;     /* from the pre name */
} tok_vocab_in;

/* Builds a TOK_SPM / TOK_BPE tokenizer; bad data is MOE_ERR_FORMAT. */
moe_status tokenizer_create_vocab(moe_tokenizer **out, const tok_vocab_in *in);

/* growable id array */
typedef struct {
    int32_t *v;
    size_t n, cap;
} tok_ids;
moe_status tok_ids_push(tok_ids *o, int32_t id);

/* Encoders of one stretch of raw text (no special tokens in it), appending. */
moe_status bpe_encode_own(const moe_tokenizer *tok, const char *text, size_t len, tok_ids *o);
moe_status bpe_encode_vocab(const moe_tokenizer *tok, const char *text, size_t len, tok_ids *o);
moe_status spm_encode(const moe_tokenizer *tok, const char *text, size_t len, int space_prefix,
                      tok_ids *o);

/* GPT-2's byte <-> unicode mapping: b2u[byte] is the code point standing for
 * byte; u2b[cp] the byte (-1 if cp stands for none), cp < 324. */
void tok_byte_unicode(uint16_t b2u[256], int16_t u2b[324]);

/* Text -> id in a published vocabulary, -1 if absent. */
int32_t tok_text_id(const moe_tokenizer *tok, const char *s, size_t len);

static inline int32_t tok_rank(const moe_tokenizer *tok, int32_t l, int32_t r) {
    return u64map_get(tok->pr_keys, tok->pr_vals, tok->pr_mask, pair_key(l, r));
}
#endif
