/* Tests for published GGUF vocabularies (src/data/spm.c, bpe.c, pretok.c,
 * vocab.c, src/io/tokenizer_gguf.c): exact ids on hand-worked strings.
 *
 * The vocabularies are the small ones tests/fuzz/fuzz_tokenizer.c writes as
 * seeds with the project's GGUF writer (tests/fuzz/tokenizer/):
 *
 * spm.gguf ("llama", add_bos true, eos 2): 0 <unk> (unknown), 1 <s>, 2 </s>
 *   (control), 3+b the byte token <0xbb>, then pieces with scores
 *   259 "▁" 0, 260 "▁t" -1, 261 "he" -2, 262 "▁the" -3, 263 "▁a" -4,
 *   264 "in" -5, 265 "▁in" -6, 266 "<|im_start|>" and 267 "<|im_end|>" (control).
 * bpe-<pre>.gguf ("gpt2", add_bos true, no bos id: llama.cpp's default 11):
 *   id b = the mapped character of byte b (so ' ' is 32 "Ġ", '\n' is 10 "Ċ"),
 *   merges by rank 0 "Ġ t"->256 "Ġt", 1 "h e"->257, 2 "Ġt he"->258 "Ġthe",
 *   3 "i n"->259, 4 "Ġ a"->260, 5 "1 2"->261, 6 "12 3"->262, 7 "Ċ Ċ"->263,
 *   264 <|endoftext|> (eos), 265 <|im_start|>, 266 <|im_end|> (control).
 * The expected ids below were worked out by hand from the algorithms (see
 * the comments); the same code was also compared with llama.cpp's
 * llama-tokenize on its reference vocabularies (see the final report). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"
#include "data/tokenizer.h"
#include "harness.h"
#include "io/tokenizer_gguf.h"

static const char *seed_dir(void) {
    static const char *dirs[] = {"tests/fuzz/tokenizer", "../tests/fuzz/tokenizer", NULL};
    for (int i = 0; dirs[i]; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/spm.gguf", dirs[i]);
        FILE *f = fopen(p, "rb");
        if (f) {
            fclose(f);
            return dirs[i];
        }
    }
    return NULL;
}

static moe_tokenizer *load(const char *dir, const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s.gguf", dir, name);
    moe_tokenizer *t = NULL;
    if (moe_tokenizer_load(&t, p) != MOE_OK) printf("    load %s: %s\n", p, moe_last_error());
    return t;
}

/* Encodes and compares with want (n ids, -1 terminated). */
static int ids_are(const moe_tokenizer *t, const char *text, int add, int parse, const int *want) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (!t || moe_tokenizer_encode_prompt(t, text, strlen(text), add, parse, &ids, &n) != MOE_OK)
        return 0;
    size_t k = 0;
    while (want[k] >= 0) k++;
    int ok = n == k;
    for (size_t i = 0; ok && i < n; i++) ok = ids[i] == want[i];
    if (!ok) {
        printf("    '%s': got", text);
        for (size_t i = 0; i < n; i++) printf(" %d", (int)ids[i]);
        printf("\n");
    }
    moe_free(ids);
    return ok;
}
#define IDS(...) ((const int[]){__VA_ARGS__, -1})
#define NONE ((const int[]){-1})

static void test_spm(const char *dir) {
    TEST_CASE("SPM: space prefix, merges by score, byte fallback, specials");
    moe_tokenizer *t = load(dir, "spm");
    CHECK(t && t->kind == TOK_SPM, "kind");
    /* "▁the▁in▁a▁1234▁\n\n": best first "▁t" (-1), then "he" (-2) and the
     * pair they make, "▁the" (-3); "▁a" (-4); "in" (-5), then "▁in" (-6).
     * Digits and newlines have no pieces: bytes <0x31>.. = 3+0x31.. and 13. */
    CHECK(ids_are(t, "the in a 1234 \n\n", 1, 1, IDS(1, 262, 265, 263, 259, 52, 53, 54, 55, 259, 13, 13)),
          "sentence");
    /* no BOS without add_special; the prefix is still added (llama.cpp) */
    CHECK(ids_are(t, "the", 0, 0, IDS(262)), "no BOS");
    /* empty text: just BOS, or nothing */
    CHECK(ids_are(t, "", 1, 1, IDS(1)) && ids_are(t, "", 0, 0, NONE), "empty");
    /* special text: with parsing the token, and the text after it gets a
     * space prefix again ("▁x": "▁" 259 + byte 'x' 3+120); without parsing
     * the control token's text is ordinary text: '<' 3+60, '|' 3+124, ... */
    CHECK(ids_are(t, "a<|im_start|>x", 0, 1, IDS(263, 266, 259, 123)), "special parsed");
    CHECK(ids_are(t, "<|im_end|>", 0, 0, IDS(259, 63, 127, 108, 112, 98, 104, 113, 103, 127, 65)),
          "special not parsed");
    /* leading spaces: "▁▁▁a" pairs: "▁▁" no piece, "▁a" -> 263 */
    CHECK(ids_are(t, "  a", 0, 0, IDS(259, 259, 263)), "leading spaces");
    /* é is two bytes without a piece: <0xC3> <0xA9> */
    CHECK(ids_are(t, "\xc3\xa9", 0, 0, IDS(259, 3 + 0xC3, 3 + 0xA9)), "byte fallback");
    size_t l;
    const char *p = moe_tokenizer_token(t, 262, &l);
    CHECK(p && l == 4 && !memcmp(p, " the", 4), "piece: ▁ is a space");
    p = moe_tokenizer_token(t, 3 + 'A', &l);
    CHECK(p && l == 1 && p[0] == 'A', "piece: byte token");
    p = moe_tokenizer_token(t, 266, &l);
    CHECK(p && l == 12 && !memcmp(p, "<|im_start|>", 12), "piece: control token as text");
    CHECK(moe_tokenizer_bos(t) == 1 && moe_tokenizer_eos(t) == 2, "bos/eos");
    /* </s> is eos; <|im_end|> ends a turn (llama.cpp's end-of-generation texts) */
    CHECK(moe_tokenizer_is_eog(t, 2) && moe_tokenizer_is_eog(t, 267) && !moe_tokenizer_is_eog(t, 1),
          "eog");
    moe_tokenizer_free(t);
    TEST_END();
}

static void test_bpe(const char *dir) {
    TEST_CASE("GPT-2 BPE: pre-tokenisers and merges by rank");
    const char *text = "the in a 1234 \n\n<|im_start|>x";
    /* gpt-2 (and olmo, default): pieces "the" " in" " a" " 1234" " \n\n"
     * (white space up to the end of the stretch stays one piece), then the
     * special token, then "x". "the": h e (rank 1) -> 116 257 ("t he" is no
     * merge); " in": i n -> 32 259; " a": Ġ a -> 260; " 1234": 1 2 then 12 3
     * -> 32 262 52; " \n\n": Ċ Ċ -> 32 263; <|im_start|> 265; x 120.
     * BOS: no bos id in the file, llama.cpp's default 11. */
    static const char *same_as_gpt2[] = {"gpt-2", "olmo", "default", "llama-bpe", NULL};
    for (int i = 0; same_as_gpt2[i]; i++) {
        char name[64];
        snprintf(name, sizeof name, "bpe-%s", same_as_gpt2[i]);
        moe_tokenizer *t = load(dir, name);
        CHECK(t && t->kind == TOK_BPE, "%s kind", name);
        CHECK(ids_are(t, text, 1, 1, IDS(11, 116, 257, 32, 259, 260, 32, 262, 52, 32, 263, 265, 120)),
              "%s", name);
        moe_tokenizer_free(t);
    }
    /* qwen2, qwen35, starcoder: single digits, and the space before them
     * is a piece of its own: " " 1 2 3 4 */
    static const char *single_digits[] = {"qwen2", "qwen35", "starcoder", "deepseek-coder", NULL};
    for (int i = 0; single_digits[i]; i++) {
        char name[64];
        snprintf(name, sizeof name, "bpe-%s", single_digits[i]);
        moe_tokenizer *t = load(dir, name);
        /* deepseek-coder also cuts every \r and \n alone: no ĊĊ merge */
        int coder = !strcmp(single_digits[i], "deepseek-coder");
        const int *want = coder ? IDS(11, 116, 257, 32, 259, 260, 32, 49, 50, 51, 52, 32, 10, 10, 265, 120)
                                : IDS(11, 116, 257, 32, 259, 260, 32, 49, 50, 51, 52, 32, 263, 265, 120);
        CHECK(ids_are(t, text, 1, 1, want), "%s", name);
        moe_tokenizer_free(t);
    }
    /* deepseek-v3: digits in groups of 1-3 from the left: 123 | 4 */
    moe_tokenizer *t = load(dir, "bpe-deepseek-v3");
    CHECK(ids_are(t, text, 1, 1, IDS(11, 116, 257, 32, 259, 260, 32, 262, 52, 32, 263, 265, 120)),
          "deepseek-v3");
    CHECK(ids_are(t, "1234567", 0, 0, IDS(262, 52, 53, 54, 55)), "deepseek-v3 digits: 123|456|7");
    moe_tokenizer_free(t);
    /* deepseek-llm: \r and \n alone (no ĊĊ), a number run is one piece:
     * "1234" merges 1 2 -> 12, 12 3 -> 123, then 4 */
    t = load(dir, "bpe-deepseek-llm");
    CHECK(ids_are(t, text, 1, 1, IDS(11, 116, 257, 32, 259, 260, 32, 262, 52, 32, 10, 10, 265, 120)),
          "deepseek-llm");
    moe_tokenizer_free(t);
    /* contractions, parse_special off, pieces */
    t = load(dir, "bpe-gpt-2");
    /* "it's": "it" then "'s" (39 115); qwen2-style would also take "'S" */
    CHECK(ids_are(t, "it's", 0, 0, IDS(105, 116, 39, 115)), "contraction");
    /* without parsing, <|im_start|> is text: '<' '|' "im" ... */
    CHECK(ids_are(t, "<|x", 0, 0, IDS(60, 124, 120)), "special text not parsed");
    CHECK(ids_are(t, "", 1, 1, IDS(11)) && ids_are(t, "", 0, 0, NONE), "empty");
    size_t l;
    const char *p = moe_tokenizer_token(t, 258, &l);
    CHECK(p && l == 4 && !memcmp(p, " the", 4), "piece: Ġ is a space");
    p = moe_tokenizer_token(t, 0xE9, &l);
    CHECK(p && l == 1 && (unsigned char)p[0] == 0xE9, "piece: byte 0xE9");
    CHECK(moe_tokenizer_eos(t) == 264 && moe_tokenizer_is_eog(t, 264) && moe_tokenizer_is_eog(t, 266) &&
              !moe_tokenizer_is_eog(t, 265),
          "eos / eog");
    moe_tokenizer_free(t);
    TEST_END();
}

static void test_refusals(void) {
    TEST_CASE("refused vocabularies: one-line errors naming the value");
    const char *models[] = {"bert", "t5", "rwkv"};
    char path[] = "/tmp/moe_tok_gguf_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "tmp");
    close(fd);
    for (int i = 0; i < 6; i++) {
        gguf_writer *w = gguf_writer_create();
        const char *tok[3] = {"a", "b", "ab"};
        size_t tl[3] = {1, 1, 2};
        const char *mg[1] = {i == 4 ? "a c" : "a b"};
        size_t ml[1] = {3};
        const char *model = i < 3 ? models[i] : "gpt2";
        float sc[2] = {0, 0};
        gguf_set_str(w, "tokenizer.ggml.model", model, strlen(model));
        if (i == 3) gguf_set_str(w, "tokenizer.ggml.pre", "no-such-pre", 11);
        gguf_set_arr_str(w, "tokenizer.ggml.tokens", tok, tl, 3);
        gguf_set_arr_str(w, "tokenizer.ggml.merges", mg, ml, 1);
        if (i == 5) gguf_set_arr_data(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, sc, 2);
        if (i == 5) { /* scores shorter than the vocabulary, on an SPM vocabulary */
            gguf_writer_free(w);
            w = gguf_writer_create();
            gguf_set_str(w, "tokenizer.ggml.model", "llama", 5);
            gguf_set_arr_str(w, "tokenizer.ggml.tokens", tok, tl, 3);
            gguf_set_arr_data(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, sc, 2);
        }
        CHECK(gguf_write_file(w, path) == MOE_OK, "write");
        gguf_writer_free(w);
        moe_tokenizer *t = (moe_tokenizer *)1;
        moe_status st = moe_tokenizer_load(&t, path);
        const char *msg = moe_last_error();
        const char *named[] = {"bert", "t5", "rwkv", "no-such-pre", "merge 0", "scores"};
        CHECK(st == MOE_ERR_FORMAT && t == NULL && strstr(msg, named[i]) && !strchr(msg, '\n'),
              "case %d: status %d: %s", i, (int)st, msg);
    }
    unlink(path);
    TEST_END();
}

int main(void) {
    const char *dir = seed_dir();
    if (!dir) {
        TEST_CASE("published vocabularies");
        TEST_SKIP("tests/fuzz/tokenizer/ seeds not found (run from the repository)");
    } else {
        test_spm(dir);
        test_bpe(dir);
    }
    test_refusals();
    TEST_MAIN_END();
}
