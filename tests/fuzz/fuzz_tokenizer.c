/* Fuzz target: loading a tokenizer from GGUF (tokenizer_read_gguf, the code
 * behind moe_tokenizer_load and a model file's tokenizer), our own layout or
 * a published one (SPM, GPT-2 BPE with each pre-tokeniser), then encoding
 * with what was accepted. Oracle: for our own vocabulary every text must
 * round-trip through encode and the token bytes; for any vocabulary every id
 * (with and without BOS/EOS and special-token parsing) must name a token
 * whose piece can be read. */
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "data/tokenizer.h"
#include "io/tokenizer_gguf.h"

static const char sample_text[] =
    "The quick brown fox jumps over the lazy dog. It's 2024; the dog's 3 naps\n"
    "  lasted  12.5 minutes!  \xc3\xa9t\xc3\xa9 \xe2\x82\xac 42 \xf0\x9f\x98\x80 <|endoftext|>\n"
    "<s> [INST] <|im_start|>\xe4\xb8\xad\xe6\x96\x87 \xe3\x81\x8b\xe3\x81\xaa 1234567 \r\n\t</s>";

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

static void check_ids(const moe_tokenizer *tok, const char *text, size_t len) {
    int V = moe_tokenizer_vocab_size(tok);
    for (int mode = 0; mode < 4; mode++) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (moe_tokenizer_encode_prompt(tok, text, len, mode & 1, mode >> 1, &ids, &n) != MOE_OK)
            continue; /* NOMEM only */
        for (size_t i = 0; i < n; i++) {
            size_t tl;
            if (ids[i] < 0 || ids[i] >= V || !moe_tokenizer_token(tok, ids[i], &tl)) {
                fprintf(stderr, "bad id %d\n", (int)ids[i]);
                abort();
            }
            (void)moe_tokenizer_is_eog(tok, ids[i]);
        }
        moe_free(ids);
    }
}

static void fuzz_one(const uint8_t *data, size_t size) {
    gguf_ctx *g = NULL;
    if (gguf_open_buffer(&g, data, size) != MOE_OK) return;
    moe_tokenizer *tok = NULL;
    if (tokenizer_read_gguf(&tok, g) == MOE_OK) {
        size_t tail = size < 512 ? size : 512; /* some bytes of the input itself */
        int V = moe_tokenizer_vocab_size(tok);
        if (tok->kind == TOK_OWN) {
            check_round_trip(tok, sample_text, sizeof sample_text - 1);
            check_round_trip(tok, (const char *)data + size - tail, tail);
            if (moe_tokenizer_eos(tok) != V - 1) abort();
        }
        check_ids(tok, sample_text, sizeof sample_text - 1);
        check_ids(tok, (const char *)data + size - tail, tail);
        size_t len;
        if (moe_tokenizer_token(tok, V, &len) || moe_tokenizer_token(tok, -1, &len)) abort();
        int bos = moe_tokenizer_bos(tok), eos = moe_tokenizer_eos(tok);
        if (bos < -1 || bos >= V || eos < -1 || eos >= V) abort();
        moe_tokenizer_free(tok);
    }
    gguf_close(g);
}

/* ---- seeds: our own vocabularies and small published-style ones ---------- */
static int write_published(const char *dir, const char *name, const char *model, const char *pre) {
    /* tokens: SPM -- <unk> <s> </s>, byte tokens, pieces with scores;
     * GPT-2 -- the 256 mapped bytes, merged pieces, special tokens */
    static const char *spm_pieces[] = {"\xe2\x96\x81", "\xe2\x96\x81t", "he", "\xe2\x96\x81the",
                                       "\xe2\x96\x81" "a", "in", "\xe2\x96\x81in", "<|im_start|>",
                                       "<|im_end|>"};
    static const char *bpe_merges[] = {"\xc4\xa0 t", "h e", "\xc4\xa0t he", "i n", "\xc4\xa0 a",
                                       "1 2", "12 3", "\xc4\x8a \xc4\x8a"};
    static const char *bpe_new[] = {"\xc4\xa0t", "he", "\xc4\xa0the", "in", "\xc4\xa0" "a", "12", "123",
                                    "\xc4\x8a\xc4\x8a"};
    const char *tok[300];
    size_t tl[300], ml[8];
    int32_t type[300];
    float score[300];
    char bytes[256][8];
    int n = 0, spm = !strcmp(model, "llama");
    if (spm) {
        const char *ctl[3] = {"<unk>", "<s>", "</s>"};
        for (int i = 0; i < 3; i++) { tok[n] = ctl[i]; type[n] = i ? 3 : 2; score[n++] = 0; }
        for (int b = 0; b < 256; b++) {
            snprintf(bytes[b], sizeof bytes[b], "<0x%02X>", b);
            tok[n] = bytes[b]; type[n] = 6; score[n++] = 0;
        }
        for (int i = 0; i < 9; i++) { tok[n] = spm_pieces[i]; type[n] = i >= 7 ? 3 : 1; score[n] = -(float)i; n++; }
    } else {
        uint16_t b2u[256];
        int16_t u2b[324];
        tok_byte_unicode(b2u, u2b);
        for (int b = 0; b < 256; b++) {
            unsigned cp = b2u[b];
            if (cp < 0x80) { bytes[b][0] = (char)cp; bytes[b][1] = 0; }
            else { bytes[b][0] = (char)(0xC0 | (cp >> 6)); bytes[b][1] = (char)(0x80 | (cp & 0x3F)); bytes[b][2] = 0; }
            tok[n] = bytes[b]; type[n] = 1; score[n++] = 0;
        }
        for (int i = 0; i < 8; i++) { tok[n] = bpe_new[i]; type[n] = 1; score[n++] = 0; }
        const char *sp[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
        for (int i = 0; i < 3; i++) { tok[n] = sp[i]; type[n] = 3; score[n++] = 0; }
    }
    for (int i = 0; i < n; i++) tl[i] = strlen(tok[i]);
    for (int i = 0; i < 8; i++) ml[i] = strlen(bpe_merges[i]);
    gguf_writer *w = gguf_writer_create();
    if (!w) return 1;
    moe_status st = gguf_set_str(w, "tokenizer.ggml.model", model, strlen(model));
    if (!st && pre) st = gguf_set_str(w, "tokenizer.ggml.pre", pre, strlen(pre));
    if (!st) st = gguf_set_arr_str(w, "tokenizer.ggml.tokens", tok, tl, (uint64_t)n);
    if (!st) st = gguf_set_arr_data(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, type, (uint64_t)n);
    if (!st && spm) st = gguf_set_arr_data(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, score, (uint64_t)n);
    if (!st && !spm) st = gguf_set_arr_str(w, "tokenizer.ggml.merges", bpe_merges, ml, 8);
    if (!st) st = gguf_set_u32(w, "tokenizer.ggml.eos_token_id", spm ? 2 : (uint32_t)n - 3);
    if (!st) st = gguf_set_bool(w, "tokenizer.ggml.add_bos_token", 1);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.gguf", dir, name);
    if (!st) st = gguf_write_file(w, path);
    gguf_writer_free(w);
    return st != MOE_OK;
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
    bad |= write_published(dir, "spm", "llama", NULL);
    const char *pres[] = {"default", "gpt-2", "olmo", "qwen2", "qwen35", "llama-bpe", "starcoder",
                          "deepseek-llm", "deepseek-coder", "deepseek-v3"};
    for (size_t i = 0; i < sizeof pres / sizeof pres[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "bpe-%s", pres[i]);
        bad |= write_published(dir, name, "gpt2", pres[i]);
    }
    return bad;
}
