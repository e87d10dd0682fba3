/* Fuzz target: loading a tokenizer from GGUF (tokenizer_read_gguf, the code
 * behind moe_tokenizer_load and a model file's tokenizer), then encoding with
 * what was accepted. Oracle: every text must round-trip through encode and
 * the token bytes, and every id must be below the vocabulary size. */
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "data/tokenizer.h"
#include "io/tokenizer_gguf.h"

static const char sample_text[] =
    "The quick brown fox jumps over the lazy dog. It's 2024; the dog's 3 naps\n"
    "  lasted  12.5 minutes!  \xc3\xa9t\xc3\xa9 \xe2\x82\xac 42 \xf0\x9f\x98\x80 <|endoftext|>\n";

static void check_round_trip(const moe_tokenizer *tok, const char *text, size_t len) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (moe_tokenizer_encode(tok, text, len, &ids, &n) != MOE_OK) return; /* NOMEM only */
    size_t at = 0;
    int V = moe_tokenizer_vocab_size(tok);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= V - 1) { fprintf(stderr, "bad id %d\n", (int)ids[i]); abort(); }
        size_t tl;
        const char *b = moe_tokenizer_token(tok, ids[i], &tl);
        if (!b || tl > len - at || memcmp(b, text + at, tl) != 0) {
            fprintf(stderr, "tokenizer: text does not round-trip at byte %zu\n", at);
            abort();
        }
        at += tl;
    }
    if (at != len) { fprintf(stderr, "tokenizer: round trip lost %zu bytes\n", len - at); abort(); }
    moe_free(ids);
}

static void fuzz_one(const uint8_t *data, size_t size) {
    gguf_ctx *g = NULL;
    if (gguf_open_buffer(&g, data, size) != MOE_OK) return;
    moe_tokenizer *tok = NULL;
    if (tokenizer_read_gguf(&tok, g) == MOE_OK) {
        check_round_trip(tok, sample_text, sizeof sample_text - 1);
        size_t tail = size < 512 ? size : 512; /* some bytes of the input itself */
        check_round_trip(tok, (const char *)data + size - tail, tail);
        int V = moe_tokenizer_vocab_size(tok);
        size_t len;
        if (moe_tokenizer_token(tok, V, &len) || moe_tokenizer_token(tok, -1, &len)) abort();
        if (moe_tokenizer_eos(tok) != V - 1) abort();
        moe_tokenizer_free(tok);
    }
    gguf_close(g);
}

static int fuzz_write_seeds(const char *dir) {
    const char *texts[] = {sample_text, "aaaa bbbb aaaa bbbb abab ab ab the the then there"};
    size_t lens[] = {sizeof sample_text - 1, strlen(texts[1])};
    int bad = 0;
    int vocabs[] = {257, 270, 300};
    for (int i = 0; i < 3; i++) {
        moe_tokenizer *tok = NULL;
        if (moe_tokenizer_train(&tok, texts, lens, 2, vocabs[i]) != MOE_OK) return 1;
        char path[1024];
        snprintf(path, sizeof path, "%s/vocab%d.gguf", dir, vocabs[i]);
        bad |= moe_tokenizer_save(tok, path) != MOE_OK;
        moe_tokenizer_free(tok);
    }
    return bad;
}
