/* Tests for the byte-level BPE tokenizer (src/data/tokenizer.c). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"
#include "data/tokenizer.h"
#include "io/tokenizer_gguf.h"
#include "harness.h"
#include "io/gguf.h"


static char tmpdir[256];

/* Encodes text as a prompt and checks every id names a token. */
static int ids_in_range(const moe_tokenizer *tok, const char *text) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (moe_tokenizer_encode_prompt(tok, text, strlen(text), 1, 1, &ids, &n) != MOE_OK) return 0;
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= ids[i] >= 0 && ids[i] < moe_tokenizer_vocab_size(tok);
    moe_free(ids);
    return ok;
}

/* ---- helpers ------------------------------------------------------------- */
/* Encodes and checks that the tokens' bytes concatenate back to the input and
 * that every id is valid and never the special token. Returns the token count
 * or (size_t)-1 on failure. */
static size_t roundtrip(const moe_tokenizer *tok, const char *text, size_t len) {
    int32_t *ids = NULL;
    size_t n = 0;
    moe_status st = moe_tokenizer_encode(tok, text, len, &ids, &n);
    if (st != MOE_OK) {
        printf("    encode failed: %s\n", moe_last_error());
        return (size_t)-1;
    }
    size_t pos = 0;
    int ok = 1;
    int eos = moe_tokenizer_eos(tok);
    for (size_t i = 0; i < n && ok; i++) {
        size_t tl;
        const char *tb = moe_tokenizer_token(tok, ids[i], &tl);
        if (!tb || ids[i] == eos || tl == 0 || pos + tl > len || memcmp(text + pos, tb, tl) != 0)
            ok = 0;
        pos += tl;
    }
    if (pos != len) ok = 0;
    moe_free(ids);
    return ok ? n : (size_t)-1;
}

static int encode_eq(const moe_tokenizer *a, const moe_tokenizer *b, const char *text,
                     size_t len) {
    int32_t *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int ok = moe_tokenizer_encode(a, text, len, &x, &nx) == MOE_OK &&
             moe_tokenizer_encode(b, text, len, &y, &ny) == MOE_OK && nx == ny &&
             (nx == 0 || memcmp(x, y, nx * sizeof(int32_t)) == 0);
    moe_free(x);
    moe_free(y);
    return ok;
}

static int same_vocab(const moe_tokenizer *a, const moe_tokenizer *b) {
    int n = moe_tokenizer_vocab_size(a);
    if (n != moe_tokenizer_vocab_size(b) || moe_tokenizer_eos(a) != moe_tokenizer_eos(b)) return 0;
    for (int i = 0; i < n; i++) {
        size_t la, lb;
        const char *ta = moe_tokenizer_token(a, i, &la), *tb = moe_tokenizer_token(b, i, &lb);
        if (!ta || !tb || la != lb || memcmp(ta, tb, la) != 0) return 0;
    }
    return 1;
}

/* Splits text with the pre-tokenizer and compares with a |-separated list. */
static int pretok_is(const char *text, size_t len, const char *const *want, int n_want) {
    size_t i = 0;
    int k = 0;
    while (i < len) {
        size_t e = tokenizer_pretok_next(text, len, i);
        if (e <= i || e > len) return 0;
        if (k >= n_want || strlen(want[k]) != e - i || memcmp(want[k], text + i, e - i) != 0) {
            printf("    piece %d: got '%.*s'\n", k, (int)(e - i), text + i);
            return 0;
        }
        k++;
        i = e;
    }
    return k == n_want;
}
#define PRETOK(text, ...)                                                                   \
    do {                                                                                    \
        static const char *const w_[] = {__VA_ARGS__};                                      \
        CHECK(pretok_is(text, sizeof(text) - 1, w_, (int)(sizeof(w_) / sizeof(w_[0]))),     \
              "pre-tokenisation of \"%s\"", text);                                          \
    } while (0)

static const char *sample_texts[] = {
    /* English */
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; we'll see if "
    "they're right. I've been told you'd like it, and I'm sure it isn't hard.\n\n"
    "  Indented line with    several   spaces and a tab\there.\r\nWindows line end.\n",
    /* German */
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. Die Straße führt über "
    "die Brücke nach Köln — „Anführungszeichen“ und Maßstäbe.\n",
    /* French */
    "Portez ce vieux whisky au juge blond qui fume. « Où est l'hôtel ? » demanda-t-elle. "
    "Ça coûte 12,50 € à Noël ; l’été dernier était très chaud.\n",
    /* Spanish */
    "El veloz murciélago hindú comía feliz cardillo y kiwi. ¿Dónde está la cigüeña? "
    "¡Qué señor tan simpático! Años atrás, mañana.\n",
    /* C */
    "#include <stdio.h>\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; "
    "i++) {\n        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n    return 0; /* done */\n}\n",
    /* Python */
    "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nif __name__ == "
    "'__main__':\n    print([fib(k) for k in range(10)])  # [0, 1, 1, 2, ...]\n",
    /* numbers */
    "id,value,price\n1,3.14159,100.00\n2,2.71828,2500.50\n3,1.41421,-0.001\n"
    "4,1e-10,123456789012345678901234567890\n   42 | 0x1F | 0b1011 | 3/4 | 99%\n",
    /* mixed scripts and symbols */
    "Ελληνικά, русский текст, 日本語のテキスト、中文。 emoji 😀👍🏽 ∑∫√ ½ ² ‰ ™ © ®\n",
};
#define N_SAMPLES ((int)(sizeof(sample_texts) / sizeof(sample_texts[0])))

/* A deterministic training corpus: the samples repeated with variations. */
static char *make_corpus(size_t *len_out) {
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    moe_rng r;
    moe_rng_seed(&r, 7);
    while (len + 4096 < cap) {
        const char *s = sample_texts[moe_rng_below(&r, N_SAMPLES)];
        size_t l = strlen(s);
        memcpy(buf + len, s, l);
        len += l;
        len += (size_t)snprintf(buf + len, cap - len, "%llu items, row %d\n",
                                (unsigned long long)moe_rng_below(&r, 100000), (int)(len % 977));
    }
    *len_out = len;
    return buf;
}

static moe_tokenizer *train_one(const char *text, size_t len, int vocab) {
    moe_tokenizer *tok = NULL;
    const char *texts[1] = {text};
    size_t lens[1] = {len};
    if (moe_tokenizer_train(&tok, texts, lens, 1, vocab) != MOE_OK) {
        printf("    train failed: %s\n", moe_last_error());
        return NULL;
    }
    return tok;
}

static int ids_are(const moe_tokenizer *tok, const char *text, const int32_t *want, size_t n_want) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (moe_tokenizer_encode(tok, text, strlen(text), &ids, &n) != MOE_OK) return 0;
    int ok = n == n_want && memcmp(ids, want, n * sizeof(int32_t)) == 0;
    if (!ok) {
        printf("    encode \"%s\":", text);
        for (size_t i = 0; i < n; i++) printf(" %d", ids[i]);
        printf("\n");
    }
    moe_free(ids);
    return ok;
}

static int token_is(const moe_tokenizer *tok, int id, const char *want) {
    size_t l;
    const char *t = moe_tokenizer_token(tok, id, &l);
    return t && l == strlen(want) && memcmp(t, want, l) == 0;
}

/* GPT-2 byte-to-unicode, written independently of the library for the test */
static size_t test_map_byte(unsigned b, char *out) {
    unsigned cp;
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) {
        cp = b;
    } else {
        unsigned n = 0;
        for (unsigned c = 0; c < b; c++)
            if (!((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE)) n++;
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

static int arr_str_is(const gguf_ctx *c, const char *key, uint64_t i, const char *want,
                      size_t wlen) {
    const char *s;
    size_t l;
    if (gguf_get_arr_str(c, key, i, &s, &l) != MOE_OK) return 0;
    return l == wlen && memcmp(s, want, l) == 0;
}

/* ---- the tokenizer keys of a saved file, copied, to write broken variants ---- */
typedef struct {
    char **tok;
    size_t *tok_len;
    uint64_t n_tok;
    char **mrg;
    size_t *mrg_len;
    uint64_t n_mrg;
    int32_t *types;
} tok_arrays;

static int read_arrays(const char *path, tok_arrays *a) {
    memset(a, 0, sizeof(*a));
    gguf_ctx *c = NULL;
    if (gguf_open(&c, path) != MOE_OK) return 0;
    gguf_type et;
    int ok = gguf_get_arr_info(c, "tokenizer.ggml.tokens", &et, &a->n_tok) == MOE_OK &&
             gguf_get_arr_info(c, "tokenizer.ggml.merges", &et, &a->n_mrg) == MOE_OK;
    if (ok) {
        a->tok = calloc(a->n_tok, sizeof(char *));
        a->tok_len = calloc(a->n_tok, sizeof(size_t));
        a->mrg = calloc(a->n_mrg + 1, sizeof(char *));
        a->mrg_len = calloc(a->n_mrg + 1, sizeof(size_t));
        a->types = calloc(a->n_tok, sizeof(int32_t));
        for (uint64_t i = 0; i < a->n_tok && ok; i++) {
            const char *s;
            size_t l;
            ok = gguf_get_arr_str(c, "tokenizer.ggml.tokens", i, &s, &l) == MOE_OK;
            if (ok) {
                a->tok[i] = malloc(l + 8);
                memcpy(a->tok[i], s, l);
                a->tok_len[i] = l;
            }
        }
        for (uint64_t i = 0; i < a->n_mrg && ok; i++) {
            const char *s;
            size_t l;
            ok = gguf_get_arr_str(c, "tokenizer.ggml.merges", i, &s, &l) == MOE_OK;
            if (ok) {
                a->mrg[i] = malloc(l + 8);
                memcpy(a->mrg[i], s, l);
                a->mrg_len[i] = l;
            }
        }
        const void *d;
        uint64_t n;
        ok = ok && gguf_get_arr_data(c, "tokenizer.ggml.token_type", &et, &n, &d) == MOE_OK &&
             n == a->n_tok;
        if (ok) memcpy(a->types, d, n * sizeof(int32_t));
    }
    gguf_close(c);
    return ok;
}

static void free_arrays(tok_arrays *a) {
    for (uint64_t i = 0; i < a->n_tok; i++) free(a->tok[i]);
    for (uint64_t i = 0; i < a->n_mrg; i++) free(a->mrg[i]);
    free(a->tok);
    free(a->tok_len);
    free(a->mrg);
    free(a->mrg_len);
    free(a->types);
}

enum { BR_NONE, BR_NO_TOKENS, BR_NO_MERGES, BR_MODEL, BR_PRE, BR_DROP_MERGE, BR_TYPES_SHORT,
       BR_TYPE_VALUE, BR_UNKNOWN_MERGE, BR_MERGE_NO_SPACE, BR_BAD_UNICODE, BR_RAW_SPACE,
       BR_BYTE_ORDER, BR_MERGE_SWAP, BR_EOS_ID, BR_BOS_MISSING, BR_LAST_TOKEN, BR_DUP_TOKEN,
       BR_TOKENS_NOT_STR, BR_FEW_TOKENS, BR_MERGE_FORWARD, BR_EMPTY_TOKEN, BR_COUNT };

/* Writes the arrays with one defect; returns 1 if written. */
static int write_broken(const tok_arrays *a, int defect, const char *path) {
    gguf_writer *w = gguf_writer_create();
    uint64_t nt = a->n_tok, nm = a->n_mrg;
    const char **tok = malloc((nt + 1) * sizeof(char *));
    size_t *tl = malloc((nt + 1) * sizeof(size_t));
    const char **mrg = malloc((nm + 1) * sizeof(char *));
    size_t *ml = malloc((nm + 1) * sizeof(size_t));
    int32_t *types = malloc((nt + 1) * sizeof(int32_t));
    for (uint64_t i = 0; i < nt; i++) {
        tok[i] = a->tok[i];
        tl[i] = a->tok_len[i];
        types[i] = a->types[i];
    }
    for (uint64_t i = 0; i < nm; i++) {
        mrg[i] = a->mrg[i];
        ml[i] = a->mrg_len[i];
    }
    uint32_t eos = (uint32_t)(nt - 1), bos = eos;
    const char *model = "gpt2", *pre = "gpt-2";
    switch (defect) {
    case BR_MODEL: model = "llama"; break;
    case BR_PRE: pre = "qwen2"; break;
    case BR_DROP_MERGE: nm--; break;
    case BR_TYPES_SHORT: break;
    case BR_TYPE_VALUE: types[300] = 3; break;
    case BR_UNKNOWN_MERGE: mrg[5] = "zqzq qzqz"; ml[5] = 9; break;
    case BR_MERGE_NO_SPACE: mrg[3] = "abc"; ml[3] = 3; break;
    case BR_BAD_UNICODE: tok[280] = "\xff\xfe"; tl[280] = 2; break;
    case BR_RAW_SPACE: tok[270] = " a"; tl[270] = 2; break;
    case BR_BYTE_ORDER: tok[65] = a->tok[66]; tl[65] = a->tok_len[66];
                        tok[66] = a->tok[65]; tl[66] = a->tok_len[65]; break;
    case BR_MERGE_SWAP: mrg[0] = a->mrg[1]; ml[0] = a->mrg_len[1];
                        mrg[1] = a->mrg[0]; ml[1] = a->mrg_len[0]; break;
    case BR_EOS_ID: eos = 5; break;
    case BR_LAST_TOKEN: tok[nt - 1] = "<|end|>"; tl[nt - 1] = 7; break;
    case BR_DUP_TOKEN: tok[300] = a->tok[299]; tl[300] = a->tok_len[299]; break;
    case BR_FEW_TOKENS: nt = 100; nm = 0; break;
    case BR_MERGE_FORWARD: break;
    case BR_EMPTY_TOKEN: tok[290] = ""; tl[290] = 0; break;
    default: break;
    }
    if (defect == BR_MERGE_FORWARD) {
        /* merge 0 names token 260 (defined later) as a part */
        static char buf[256];
        size_t l = a->tok_len[260];
        memcpy(buf, a->tok[260], l);
        buf[l] = ' ';
        memcpy(buf + l + 1, a->tok[261], a->tok_len[261]);
        mrg[0] = buf;
        ml[0] = l + 1 + a->tok_len[261];
    }
    gguf_set_str(w, "general.architecture", "moe", 3);
    gguf_set_str(w, "tokenizer.ggml.model", model, strlen(model));
    gguf_set_str(w, "tokenizer.ggml.pre", pre, strlen(pre));
    if (defect == BR_TOKENS_NOT_STR)
        gguf_set_arr_data(w, "tokenizer.ggml.tokens", GGUF_TYPE_INT32, types, nt);
    else if (defect != BR_NO_TOKENS)
        gguf_set_arr_str(w, "tokenizer.ggml.tokens", tok, tl, nt);
    gguf_set_arr_data(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types,
                      defect == BR_TYPES_SHORT ? nt - 1 : nt);
    if (defect != BR_NO_MERGES) gguf_set_arr_str(w, "tokenizer.ggml.merges", mrg, ml, nm);
    gguf_set_u32(w, "tokenizer.ggml.eos_token_id", eos);
    if (defect != BR_BOS_MISSING) gguf_set_u32(w, "tokenizer.ggml.bos_token_id", bos);
    int ok = gguf_write_file(w, path) == MOE_OK;
    gguf_writer_free(w);
    free(tok);
    free(tl);
    free(mrg);
    free(ml);
    free(types);
    return ok;
}

static double now_s(void) { return moe_now(); }

/* ---- cases ----------------------------------------------------------------- */
static void test_pretok(void) {
    TEST_CASE("pre-tokenisation examples");
    PRETOK("Hello world's 123 foo!!", "Hello", " world", "'s", " 123", " foo", "!!");
    PRETOK("  hello", " ", " hello");
    PRETOK("a\n\nb", "a", "\n", "\n", "b");
    PRETOK("x   ", "x", "   ");
    PRETOK("x  \n  y", "x", "  \n ", " y");
    PRETOK("hello\tworld", "hello", "\t", "world");
    PRETOK("don't we'll they're I've I'm he'd", "don", "'t", " we", "'ll", " they", "'re", " I",
           "'ve", " I", "'m", " he", "'d");
    PRETOK("I'M 'sam", "I", "'", "M", " '", "sam");
    PRETOK("abc123def", "abc", "123", "def");
    PRETOK(" ,.;x", " ,.;", "x");
    PRETOK("1 2  3", "1", " 2", " ", " 3");
    PRETOK("café naïve Öl", "café", " naïve", " Öl");
    PRETOK("«Bonjour» ¿qué?", "«", "Bonjour", "»", " ¿", "qué", "?");
    PRETOK("a\xff\xfe" "b", "a", "\xff\xfe", "b");
    PRETOK("\xc3" "a", "\xc3", "a"); /* truncated sequence: an "other" byte */
    PRETOK("x\xe2\x80\x94y", "x", "\xe2\x80\x94", "y"); /* em dash is punctuation */
    PRETOK("a\xc2\xa0" "b", "a", "\xc2\xa0", "b");     /* no-break space is whitespace */
    PRETOK("\n", "\n");
    PRETOK("'", "'");
    PRETOK("x'", "x", "'");
    PRETOK("''s", "''", "s");
    PRETOK("Lotus\xe2\x84\xa2 \xe2\x84\x95", "Lotus", "\xe2\x84\xa2", " \xe2\x84\x95"); /* TM sign, double-struck N */
    PRETOK("x\xcc\x81y", "x", "\xcc\x81", "y"); /* a combining mark is not a letter (GPT-2) */
    PRETOK("\xef\xbc\x91\xef\xbc\x92", "\xef\xbc\x91\xef\xbc\x92"); /* fullwidth digits */
    PRETOK("1\xc2\xbd", "1\xc2\xbd"); /* one half is a number */
    {
        /* NUL bytes are "other" characters: "\0\0" "a" "\0" */
        const char t[] = {'\0', '\0', 'a', '\0'};
        size_t e1 = tokenizer_pretok_next(t, 4, 0), e2 = tokenizer_pretok_next(t, 4, e1),
               e3 = tokenizer_pretok_next(t, 4, e2);
        CHECK(e1 == 2 && e2 == 3 && e3 == 4, "NUL bytes split as other: %zu %zu %zu", e1, e2, e3);
    }
    TEST_END();
}

static void test_tiny_training(void) {
    TEST_CASE("tiny training: known merge order");
    moe_tokenizer *tok = train_one("ab ab ab cd", 11, 1000);
    CHECK(tok != NULL, "train");
    if (tok) {
        /* pairs: (a,b) 3, (' ',a) 2, (' ',c) 1, (c,d) 1 */
        CHECK(moe_tokenizer_vocab_size(tok) == 261, "stops early: vocab %d",
              moe_tokenizer_vocab_size(tok));
        CHECK(moe_tokenizer_eos(tok) == 260, "eos is the last id");
        CHECK(token_is(tok, 256, "ab"), "first merge ab");
        CHECK(token_is(tok, 257, " ab"), "second merge ' ab'");
        CHECK(token_is(tok, 258, " c"), "tie broken by smallest pair: ' c'");
        CHECK(token_is(tok, 259, " cd"), "then ' cd'");
        CHECK(token_is(tok, 260, "<|endoftext|>"), "special token text");
        CHECK(token_is(tok, 'x', "x"), "byte token");
        CHECK(moe_tokenizer_token(tok, 261, NULL) == NULL, "id past the end");
        CHECK(moe_tokenizer_token(tok, -1, NULL) == NULL, "negative id");
        static const int32_t w1[] = {256, 257, 259};
        CHECK(ids_are(tok, "ab ab cd", w1, 3), "encode with the merges");
        static const int32_t w2[] = {'b', 'a', 258, 'x'};
        CHECK(ids_are(tok, "ba cx", w2, 4), "partial merges");
        static const int32_t w3[] = {'<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't', '|', '>'};
        CHECK(ids_are(tok, "<|endoftext|>", w3, 13), "special text is not the special token");
    }
    moe_tokenizer_free(tok);

    /* overlapping pairs: "aaaa" -> (a,a) then (aa,aa) */
    tok = train_one("aaaa", 4, 300);
    CHECK(tok && moe_tokenizer_vocab_size(tok) == 259, "aaaa: 2 merges");
    if (tok) {
        CHECK(token_is(tok, 256, "aa") && token_is(tok, 257, "aaaa"), "aaaa merges");
        static const int32_t w1[] = {256, 'a'};
        CHECK(ids_are(tok, "aaa", w1, 2), "aaa -> aa a (leftmost first)");
        static const int32_t w2[] = {257, 'a'};
        CHECK(ids_are(tok, "aaaaa", w2, 2), "aaaaa -> aaaa a");
        static const int32_t w3[] = {257, 257, 256};
        CHECK(ids_are(tok, "aaaaaaaaaa", w3, 3), "a*10");
    }
    moe_tokenizer_free(tok);

    /* vocab limit: exactly 2 merges requested */
    tok = train_one("ab ab ab cd", 11, 259);
    CHECK(tok && moe_tokenizer_vocab_size(tok) == 259 && moe_tokenizer_eos(tok) == 258,
          "vocab_size respected");
    moe_tokenizer_free(tok);

    /* no merges at all */
    tok = train_one("", 0, 257);
    CHECK(tok && moe_tokenizer_vocab_size(tok) == 257, "empty data, vocab 257");
    if (tok) {
        static const int32_t w1[] = {'h', 'i'};
        CHECK(ids_are(tok, "hi", w1, 2), "bytes only");
        CHECK(roundtrip(tok, "x\0y", 3) == 3, "NUL round trip");
    }
    moe_tokenizer_free(tok);

    moe_tokenizer *bad = (moe_tokenizer *)1;
    const char *t1[1] = {"abc"};
    CHECK(moe_tokenizer_train(&bad, t1, NULL, 1, 256) == MOE_ERR_INVALID_ARG && bad == NULL,
          "vocab 256 rejected");
    CHECK(moe_tokenizer_train(&bad, NULL, NULL, 1, 1000) == MOE_ERR_INVALID_ARG, "NULL texts");
    CHECK(moe_tokenizer_train(NULL, t1, NULL, 1, 1000) == MOE_ERR_INVALID_ARG, "NULL out");
    CHECK(moe_tokenizer_train(&bad, t1, NULL, -1, 1000) == MOE_ERR_INVALID_ARG, "n_texts < 0");
    /* lens NULL: NUL-terminated texts */
    CHECK(moe_tokenizer_train(&bad, t1, NULL, 1, 1000) == MOE_OK && bad &&
              moe_tokenizer_vocab_size(bad) == 259,
          "lens NULL uses strlen");
    moe_tokenizer_free(bad);
    CHECK(moe_tokenizer_vocab_size(NULL) == 0 && moe_tokenizer_eos(NULL) == -1, "NULL tokenizer");
    int32_t *ids = (int32_t *)1;
    size_t n = 7;
    CHECK(moe_tokenizer_encode(NULL, "a", 1, &ids, &n) == MOE_ERR_INVALID_ARG && ids == NULL &&
              n == 0,
          "encode NULL tokenizer");
    moe_tokenizer_free(NULL);
    TEST_END();
}

static void test_roundtrips(const moe_tokenizer *tok) {
    TEST_CASE("round trip: texts, code, numbers");
    size_t total_bytes = 0, total_tokens = 0;
    for (int i = 0; i < N_SAMPLES; i++) {
        size_t len = strlen(sample_texts[i]);
        size_t n = roundtrip(tok, sample_texts[i], len);
        CHECK(n != (size_t)-1, "sample %d", i);
        if (n != (size_t)-1) {
            total_bytes += len;
            total_tokens += n;
        }
    }
    CHECK(total_tokens * 2 < total_bytes, "trained text compresses: %zu tokens for %zu bytes",
          total_tokens, total_bytes);
    static char buf[32768];
    size_t l = 0;
    for (int i = 0; i < 300; i++)
        l += (size_t)snprintf(buf + l, sizeof(buf) - l, "%d\t%.4f\t%x\n", i * 37, i / 7.0,
                              i * 12345);
    CHECK(roundtrip(tok, buf, l) != (size_t)-1, "number table");
    CHECK(roundtrip(tok, "", 0) == 0, "empty text");
    TEST_END();

    TEST_CASE("round trip: random bytes, all byte values, invalid UTF-8");
    char all[512];
    for (int i = 0; i < 256; i++) all[i] = (char)i, all[511 - i] = (char)i;
    CHECK(roundtrip(tok, all, 512) != (size_t)-1, "all 256 byte values");
    static const char *invalid[] = {
        "\x80", "\xbf\x80", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
        "\xf8\x88\x80\x80\x80", "abc\xe2\x82", "\xe2\x82 \xe2\x82\xac", "\xff\xfe\xfd", "\xc3",
        "caf\xe9 na\xefve", "\xf0\x9f\x98", "'\xffs 're\xc3'll",
    };
    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++)
        CHECK(roundtrip(tok, invalid[i], strlen(invalid[i])) != (size_t)-1, "invalid utf-8 %zu", i);
    moe_rng r;
    moe_rng_seed(&r, 1234);
    static char rnd[70000];
    int fails = 0;
    for (int iter = 0; iter < 400; iter++) {
        size_t len = iter < 64 ? (size_t)iter : (size_t)moe_rng_below(&r, iter < 380 ? 600 : 70000);
        int mode = iter % 4;
        for (size_t i = 0; i < len; i++) {
            uint64_t v = moe_rng_u64(&r);
            if (mode == 0) rnd[i] = (char)v; /* uniform bytes */
            else if (mode == 1) rnd[i] = " eatn\n'sh\xc3\xa9\x80"[v % 12]; /* text-like */
            else if (mode == 2) rnd[i] = v % 4 == 0 ? (char)(v >> 8) : "the quick 0123"[v % 14];
            else rnd[i] = (char)(v % 3 ? ' ' : (v >> 8)); /* long whitespace runs */
        }
        if (roundtrip(tok, rnd, len) == (size_t)-1) fails++;
    }
    CHECK(fails == 0, "%d random buffers failed", fails);
    /* one long piece (1 MB run of one character class) */
    size_t big = 1 << 20;
    char *b = malloc(big);
    memset(b, '=', big);
    double t0 = now_s();
    size_t n = roundtrip(tok, b, big);
    double dt = now_s() - t0;
    CHECK(n != (size_t)-1 && dt < 2.0, "1 MB single piece: %zu tokens in %.2f s", n, dt);
    memset(b, ' ', big);
    CHECK(roundtrip(tok, b, big) != (size_t)-1, "1 MB of spaces");
    free(b);
    TEST_END();
}

static void test_determinism_and_save(const char *corpus, size_t clen) {
    TEST_CASE("determinism: same input, same vocab");
    double t0 = now_s();
    moe_tokenizer *a = train_one(corpus, clen, 1500);
    double dt = now_s() - t0;
    moe_tokenizer *b = train_one(corpus, clen, 1500);
    CHECK(a && b, "train");
    if (a && b) {
        CHECK(same_vocab(a, b), "vocabularies differ");
        CHECK(encode_eq(a, b, corpus, clen), "encodings differ");
        printf("    trained 1500 tokens (%d real) on %.1f KB in %.3f s\n",
               moe_tokenizer_vocab_size(a), clen / 1024.0, dt);
    }
    /* splitting the corpus into several texts changes nothing but boundaries */
    const char *parts[3] = {corpus, corpus + clen / 3, corpus + 2 * (clen / 3)};
    size_t plens[3] = {clen / 3, clen / 3, clen - 2 * (clen / 3)};
    moe_tokenizer *c = NULL;
    CHECK(moe_tokenizer_train(&c, parts, plens, 3, 1500) == MOE_OK, "train on 3 texts");
    moe_tokenizer *d = NULL;
    CHECK(moe_tokenizer_train(&d, parts, plens, 3, 1500) == MOE_OK && same_vocab(c, d),
          "multi-text determinism");
    moe_tokenizer_free(c);
    moe_tokenizer_free(d);
    TEST_END();

    if (a) test_roundtrips(a);

    TEST_CASE("save -> load: same vocab and encodings");
    char path[512];
    snprintf(path, sizeof(path), "%s/tok.gguf", tmpdir);
    moe_tokenizer *l = NULL;
    CHECK(a && moe_tokenizer_save(a, path) == MOE_OK, "save: %s", moe_last_error());
    CHECK(moe_tokenizer_load(&l, path) == MOE_OK, "load: %s", moe_last_error());
    if (a && l) {
        CHECK(same_vocab(a, l), "vocab");
        CHECK(encode_eq(a, l, corpus, clen), "corpus encoding");
        for (int i = 0; i < N_SAMPLES; i++)
            CHECK(encode_eq(a, l, sample_texts[i], strlen(sample_texts[i])), "sample %d", i);
        char all[256];
        for (int i = 0; i < 256; i++) all[i] = (char)i;
        CHECK(encode_eq(a, l, all, 256), "all bytes");
    }
    /* a tokenizer with no merges also survives */
    moe_tokenizer *e = train_one("", 0, 257), *el = NULL;
    char path2[512];
    snprintf(path2, sizeof(path2), "%s/tok0.gguf", tmpdir);
    CHECK(e && moe_tokenizer_save(e, path2) == MOE_OK && moe_tokenizer_load(&el, path2) == MOE_OK &&
              same_vocab(e, el),
          "vocab of 257: %s", moe_last_error());
    moe_tokenizer_free(e);
    moe_tokenizer_free(el);
    /* the tokenizer inside a model-like GGUF (other keys and a tensor) */
    gguf_writer *w = gguf_writer_create();
    float tensor[4] = {1, 2, 3, 4};
    int64_t ne[1] = {4};
    char path3[512];
    snprintf(path3, sizeof(path3), "%s/model.gguf", tmpdir);
    moe_tokenizer *m = NULL;
    CHECK(w && gguf_set_str(w, "general.architecture", "moe", 3) == MOE_OK &&
              gguf_set_u32(w, "moe.block_count", 2) == MOE_OK &&
              tokenizer_write_gguf(a, w) == MOE_OK &&
              gguf_add_tensor(w, "token_embd.weight", GGML_TYPE_F32, 1, ne, tensor) == MOE_OK &&
              gguf_write_file(w, path3) == MOE_OK,
          "write model gguf: %s", moe_last_error());
    gguf_writer_free(w);
    CHECK(moe_tokenizer_load(&m, path3) == MOE_OK && same_vocab(a, m), "load from model gguf: %s",
          moe_last_error());
    moe_tokenizer_free(m);
    moe_tokenizer_free(l);
    TEST_END();

    TEST_CASE("GGUF layout: GPT-2 byte-to-unicode strings");
    gguf_ctx *g = NULL;
    CHECK(gguf_open(&g, path) == MOE_OK, "open");
    if (g && a) {
        const char *s;
        size_t sl;
        CHECK(gguf_get_str(g, "tokenizer.ggml.model", &s, &sl) == MOE_OK && sl == 4 &&
                  !memcmp(s, "gpt2", 4),
              "model gpt2");
        CHECK(gguf_get_str(g, "tokenizer.ggml.pre", &s, &sl) == MOE_OK && sl == 5 &&
                  !memcmp(s, "gpt-2", 5),
              "pre gpt-2");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", ' ', "\xc4\xa0", 2), "' ' -> U+0120 Ġ");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", '\n', "\xc4\x8a", 2), "'\\n' -> U+010A Ċ");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 0, "\xc4\x80", 2), "0x00 -> U+0100 Ā");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 0x7F, "\xc4\xa1", 2), "0x7F -> U+0121");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 0xAD, "\xc5\x83", 2), "0xAD -> U+0143");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 'a', "a", 1), "'a' -> a");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 0xE9, "\xc3\xa9", 2), "0xE9 -> é");
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", 0xFF, "\xc3\xbf", 2), "0xFF -> ÿ");
        int nv = moe_tokenizer_vocab_size(a);
        CHECK(arr_str_is(g, "tokenizer.ggml.tokens", (uint64_t)nv - 1, "<|endoftext|>", 13),
              "special token literal");
        /* every token equals the independent mapping of its bytes */
        int bad = 0;
        char mapped[1024];
        for (int i = 0; i + 1 < nv; i++) {
            size_t tl, ml = 0;
            const char *tb = moe_tokenizer_token(a, i, &tl);
            if (tl > 500) continue;
            for (size_t k = 0; k < tl; k++) ml += test_map_byte((unsigned char)tb[k], mapped + ml);
            if (!arr_str_is(g, "tokenizer.ggml.tokens", (uint64_t)i, mapped, ml)) bad++;
        }
        CHECK(bad == 0, "%d tokens not mapped as expected", bad);
        gguf_type et;
        uint64_t n;
        const void *data;
        CHECK(gguf_get_arr_data(g, "tokenizer.ggml.token_type", &et, &n, &data) == MOE_OK &&
                  et == GGUF_TYPE_INT32 && n == (uint64_t)nv,
              "token_type");
        if (n == (uint64_t)nv) {
            int32_t t0v, tl;
            memcpy(&t0v, data, 4);
            memcpy(&tl, (const char *)data + 4 * (size_t)(nv - 1), 4);
            CHECK(t0v == 1 && tl == 3, "types normal / control");
        }
        CHECK(gguf_get_arr_info(g, "tokenizer.ggml.merges", &et, &n) == MOE_OK &&
                  et == GGUF_TYPE_STRING && n == (uint64_t)nv - 257,
              "merges count");
        /* merge i is "A B" of the two parts, which concatenate to token 256+i */
        size_t l0;
        const char *t256 = moe_tokenizer_token(a, 256, &l0);
        CHECK(gguf_get_arr_str(g, "tokenizer.ggml.merges", 0, &s, &sl) == MOE_OK &&
                  memchr(s, ' ', sl) != NULL,
              "merge 0 has a space");
        (void)t256;
        uint32_t eos = 0, bos = 0;
        CHECK(gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos) == MOE_OK &&
                  eos == (uint32_t)nv - 1 &&
                  gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos) == MOE_OK && bos == eos,
              "eos/bos ids");
    }
    gguf_close(g);
    TEST_END();

    TEST_CASE("broken tokenizer files give clean errors");
    tok_arrays arr;
    CHECK(read_arrays(path, &arr), "read arrays");
    if (arr.n_tok > 400) {
        char bp[512];
        snprintf(bp, sizeof(bp), "%s/broken.gguf", tmpdir);
        /* the unmodified copy loads */
        moe_tokenizer *t = NULL;
        CHECK(write_broken(&arr, BR_NONE, bp) && moe_tokenizer_load(&t, bp) == MOE_OK &&
                  same_vocab(t, a),
              "control copy: %s", moe_last_error());
        moe_tokenizer_free(t);
        for (int d = BR_NONE + 1; d < BR_COUNT; d++) {
            t = (moe_tokenizer *)1;
            CHECK(write_broken(&arr, d, bp), "write defect %d", d);
            moe_status st = moe_tokenizer_load(&t, bp);
            /* these are no longer our layout but are valid published
             * vocabularies (llama.cpp loads them too): read as such */
            if (d == BR_MODEL || d == BR_PRE || d == BR_DROP_MERGE || d == BR_TYPE_VALUE ||
                d == BR_BYTE_ORDER || d == BR_EOS_ID || d == BR_BOS_MISSING ||
                d == BR_LAST_TOKEN || d == BR_FEW_TOKENS) {
                CHECK(st == MOE_OK && t && t->kind == (d == BR_MODEL ? TOK_SPM : TOK_BPE),
                      "defect %d: published vocabulary: status %d (%s)", d, (int)st,
                      moe_last_error());
                if (st == MOE_OK) moe_tokenizer_free(t);
                continue;
            }
            CHECK(st == MOE_ERR_FORMAT && t == NULL, "defect %d: status %d (%s)", d, (int)st,
                  moe_last_error());
            const char *msg = moe_last_error();
            CHECK(strchr(msg, '\n') == NULL && strlen(msg) > 10, "one-line message: %s", msg);
            if (d == BR_MERGE_SWAP || d == BR_UNKNOWN_MERGE || d == BR_BYTE_ORDER)
                printf("    defect %d: %s\n", d, msg);
        }
    }
    free_arrays(&arr);
    {
        char bp[512];
        snprintf(bp, sizeof(bp), "%s/garbage.gguf", tmpdir);
        moe_tokenizer *t = (moe_tokenizer *)1;
        CHECK(moe_tokenizer_load(&t, "/nonexistent/dir/x.gguf") == MOE_ERR_IO && t == NULL,
              "missing file: IO");
        FILE *f = fopen(bp, "wb");
        fputs("this is not a gguf file at all, just text", f);
        fclose(f);
        CHECK(moe_tokenizer_load(&t, bp) == MOE_ERR_FORMAT, "garbage: %s", moe_last_error());
        /* truncations of a real file */
        FILE *src = fopen(path, "rb");
        fseek(src, 0, SEEK_END);
        long sz = ftell(src);
        fseek(src, 0, SEEK_SET);
        char *all = malloc((size_t)sz);
        CHECK(fread(all, 1, (size_t)sz, src) == (size_t)sz, "read");
        fclose(src);
        int bad = 0;
        for (long cut = 0; cut < sz; cut += 1 + sz / 37) {
            f = fopen(bp, "wb");
            fwrite(all, 1, (size_t)cut, f);
            fclose(f);
            moe_status st = moe_tokenizer_load(&t, bp);
            if (st != MOE_ERR_FORMAT) bad++;
            if (st == MOE_OK) moe_tokenizer_free(t);
        }
        CHECK(bad == 0, "%d truncations not rejected", bad);
        /* random byte flips: never crash; whatever loads must still round-trip */
        moe_rng r;
        moe_rng_seed(&r, 99);
        int loaded = 0;
        for (int it = 0; it < 60; it++) {
            char *cp = malloc((size_t)sz);
            memcpy(cp, all, (size_t)sz);
            int flips = it % 2 ? 1 : 4;
            for (int k = 0; k < flips; k++)
                cp[moe_rng_below(&r, (uint64_t)sz)] ^= (char)(1 + moe_rng_below(&r, 255));
            gguf_ctx *c = NULL;
            if (gguf_open_buffer(&c, cp, (size_t)sz) == MOE_OK) {
                moe_tokenizer *t2 = NULL;
                if (tokenizer_read_gguf(&t2, c) == MOE_OK) {
                    loaded++;
                    if (t2->kind == TOK_OWN)
                        CHECK(roundtrip(t2, sample_texts[0], strlen(sample_texts[0])) != (size_t)-1,
                              "flipped file round trip");
                    else
                        CHECK(ids_in_range(t2, sample_texts[0]), "flipped file: ids in range");
                    moe_tokenizer_free(t2);
                }
                gguf_close(c);
            }
            free(cp);
        }
        printf("    %d of 60 randomly corrupted files still valid\n", loaded);
        free(all);
    }
    TEST_END();

    moe_tokenizer_free(a);
    moe_tokenizer_free(b);
}

static void test_alloc_failures(const char *corpus, size_t clen) {
    TEST_CASE("allocation failures: clean errors, no leaks");
    size_t base = moe_alloc_in_use();
    int tried = 0, wrong = 0;
    size_t use = clen < 20000 ? clen : 20000;
    char path[512];
    snprintf(path, sizeof(path), "%s/tok.gguf", tmpdir);
    for (long k = 1; k < 400; k += (k < 60 ? 1 : 7)) {
        moe_tokenizer *t = NULL;
        const char *texts[1] = {corpus};
        size_t lens[1] = {use};
        moe_alloc_fail_after(k);
        moe_status st = moe_tokenizer_train(&t, texts, lens, 1, 400);
        moe_alloc_fail_after(0);
        if (st != MOE_OK && st != MOE_ERR_NOMEM) wrong++;
        if (st == MOE_OK) {
            int32_t *ids = NULL;
            size_t n = 0;
            moe_alloc_fail_after(k % 9 + 1);
            st = moe_tokenizer_encode(t, corpus, use, &ids, &n);
            moe_alloc_fail_after(0);
            if (st != MOE_OK && st != MOE_ERR_NOMEM) wrong++;
            moe_free(ids);
            moe_tokenizer *l = NULL;
            moe_alloc_fail_after(k % 23 + 1);
            st = moe_tokenizer_load(&l, path);
            moe_alloc_fail_after(0);
            if (st != MOE_OK && st != MOE_ERR_NOMEM) wrong++;
            moe_tokenizer_free(l);
            moe_tokenizer_free(t);
        }
        tried++;
    }
    CHECK(wrong == 0, "%d wrong status codes in %d tries", wrong, tried);
    CHECK(moe_alloc_in_use() == base, "leaked %zu bytes", moe_alloc_in_use() - base);
    TEST_END();
}

/* Round-trips every corpus file if data/corpus-small exists. */
static void test_corpus(void) {
    TEST_CASE("corpus-small round trip");
    const char *dirs[] = {"data/corpus-small", "../data/corpus-small", NULL};
    DIR *dir = NULL;
    const char *dname = NULL;
    for (int i = 0; dirs[i] && !dir; i++) {
        dir = opendir(dirs[i]);
        dname = dirs[i];
    }
    if (!dir) {
        TEST_SKIP("data/corpus-small/ not found");
        return;
    }
    char *texts[64];
    size_t lens[64];
    char names[64][256];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dir)) && n < 64) {
        size_t nl = strlen(de->d_name);
        if (nl < 5 || strcmp(de->d_name + nl - 4, ".txt") != 0) continue;
        char p[1024];
        snprintf(p, sizeof(p), "%s/%s", dname, de->d_name);
        FILE *f = fopen(p, "rb");
        if (!f) continue;
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        texts[n] = malloc((size_t)sz + 1);
        lens[n] = fread(texts[n], 1, (size_t)sz, f);
        fclose(f);
        snprintf(names[n], sizeof(names[n]), "%s", de->d_name);
        n++;
    }
    closedir(dir);
    /* readdir order is arbitrary: sort by name so training is reproducible */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char tn[256];
            memcpy(tn, names[j], sizeof(tn));
            memcpy(names[j], names[j - 1], sizeof(tn));
            memcpy(names[j - 1], tn, sizeof(tn));
            char *tt = texts[j];
            texts[j] = texts[j - 1];
            texts[j - 1] = tt;
            size_t tl = lens[j];
            lens[j] = lens[j - 1];
            lens[j - 1] = tl;
        }
    size_t total = 0;
    for (int i = 0; i < n; i++) total += lens[i];
    moe_tokenizer *tok = NULL;
    double t0 = now_s();
    moe_status st = moe_tokenizer_train(&tok, (const char *const *)texts, lens, n, 4096);
    double dt = now_s() - t0;
    CHECK(st == MOE_OK, "train on corpus: %s", moe_last_error());
    printf("    trained 4096 on %d files, %.2f MB in %.2f s\n", n, total / 1048576.0, dt);
    for (int i = 0; i < n && tok; i++) {
        t0 = now_s();
        size_t nt = roundtrip(tok, texts[i], lens[i]);
        dt = now_s() - t0;
        CHECK(nt != (size_t)-1, "round trip %s", names[i]);
        printf("    %-24s %8.2f MB  %9.0f tokens/MB  (%.2f bytes/token, encode+check %.2f s)\n",
               names[i], lens[i] / 1048576.0, nt / (lens[i] / 1048576.0 + 1e-12),
               (double)lens[i] / (double)(nt ? nt : 1), dt);
    }
    moe_tokenizer_free(tok);
    for (int i = 0; i < n; i++) free(texts[i]);
    TEST_END();
}

int main(void) {
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/moe_test_tokenizer_%d", (int)getpid());
    mkdir(tmpdir, 0700);
    size_t clen;
    char *corpus = make_corpus(&clen);

    test_pretok();
    test_tiny_training();
    test_determinism_and_save(corpus, clen);
    test_alloc_failures(corpus, clen);
    test_corpus();

    free(corpus);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0) printf("note: could not remove %s\n", tmpdir);
    TEST_MAIN_END();
}
