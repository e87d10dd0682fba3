/* data/pretok.h (internal): pre-tokenisation, i.e. cutting text into the
 * pieces BPE works inside, and the Unicode classes it needs.
 *
 * Two families:
 *  - our own tokenizer's GPT-2 style cutter over raw bytes
 *    (tokenizer_pretok_next), kept exactly as trained vocabularies need it;
 *  - the cutters of published GGUF vocabularies (tokenizer.ggml.pre), done
 *    the way llama.cpp does them: over code points decoded leniently
 *    (pretok_decode), one stage after another, each stage cutting every
 *    piece of the stage before (pretok_split). */
#ifndef MOE_PRETOK_H
#define MOE_PRETOK_H
#include <stddef.h>
#include <stdint.h>

#include "moe.h"

/* Unicode class bits (one per code point), from src/data/unicode_tab.c. */
enum {
    UCAT_UNASSIGNED = 0x01,
    UCAT_NUMBER = 0x02,      /* \p{N} */
    UCAT_LETTER = 0x04,      /* \p{L} */
    UCAT_SEPARATOR = 0x08,   /* \p{Z} */
    UCAT_MARK = 0x10,        /* \p{M} */
    UCAT_PUNCTUATION = 0x20, /* \p{P} */
    UCAT_SYMBOL = 0x40,      /* \p{S} */
    UCAT_CONTROL = 0x80,     /* \p{C} */
    UCAT_SPACE = 0x100       /* White_Space property (not a category) */
};
extern const uint32_t unicode_tab[];
extern const size_t unicode_tab_n;
extern const uint32_t unicode_space[];
extern const size_t unicode_space_n;
extern const char unicode_tab_version[];

/* Length of the valid UTF-8 sequence at s (n >= 1 bytes available), 0 if
 * invalid (overlong, surrogate, beyond U+10FFFF, cut short); *cp its code point. */
size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp);
/* Class bits of cp (UCAT_UNASSIGNED beyond U+10FFFF), UCAT_SPACE included. */
unsigned unicode_class_bits(uint32_t cp);

/* Our own cutter: end (exclusive) of the piece of text[0..n) starting at i < n. */
size_t tokenizer_pretok_next(const char *text, size_t n, size_t i);

/* Published vocabularies' cutters (llama.cpp's names in tokenizer.ggml.pre
 * map onto these; see tokenizer_gguf.c). */
typedef enum {
    PRE_DEFAULT,        /* no or "default" pre */
    PRE_GPT2,           /* gpt-2, olmo, mpt, ... */
    PRE_LLAMA3,         /* llama-bpe, dbrx, ...: digits in 1-3 groups */
    PRE_QWEN2,          /* qwen2, stablelm2, ...: single digits */
    PRE_QWEN35,         /* qwen35: qwen2 with marks joining letters */
    PRE_STARCODER,      /* starcoder, refact, smollm, ...: digits first, then gpt-2 */
    PRE_DEEPSEEK_LLM,   /* deepseek-llm */
    PRE_DEEPSEEK_CODER, /* deepseek-coder */
    PRE_DEEPSEEK3       /* deepseek-v3 */
} pretok_kind;

/* Decodes s[0..n) (n >= 1) the lenient way llama.cpp does: no check for
 * overlong forms, surrogates or values above U+10FFFF; a byte that does not
 * start a complete sequence becomes U+FFFD and one byte is used. Returns the
 * bytes used (>= 1). */
size_t pretok_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* UTF-8 of cp into d (room for 4): what llama.cpp writes back after cutting;
 * a value above U+10FFFF (which it cannot write) becomes U+FFFD. */
size_t pretok_encode(uint32_t cp, unsigned char *d);

/* Cuts the code points cps[0..n) into pieces; *lens receives the piece
 * lengths in code points (moe_free it), summing to n. */
moe_status pretok_split(pretok_kind kind, const uint32_t *cps, size_t n, size_t **lens,
                        size_t *n_lens);
#endif
