/* Fuzz target: reading a text corpus (moe_read_texts and moe_dataset_load_text:
 * document splitting at form-feed lines, long-document cutting, tokenising,
 * the train/validation split), then sampling batches from it. */
#define FUZZ_HAS_INIT
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "data/dataset.h"

static moe_tokenizer *tok;

static void fuzz_init(void) {
    const char *text = "the cat sat on the mat\n\f\nthe dog sat on the log\n  and   then  ";
    size_t len = strlen(text);
    if (moe_tokenizer_train(&tok, &text, &len, 1, 300) != MOE_OK) abort();
}

static void fuzz_one(const uint8_t *data, size_t size) {
    const char *path = fuzz_file(data, size);
    char **texts = NULL;
    size_t *lens = NULL;
    int n = 0;
    if (moe_read_texts(&path, 1, &texts, &lens, &n) == MOE_OK) {
        if (n != 1 || lens[0] != size || memcmp(texts[0], data, size) != 0) abort();
        moe_free_texts(texts, lens, n);
    }
    moe_dataset *d = NULL;
    if (moe_dataset_load_text(&d, tok, &path, 1) != MOE_OK) return;
    size_t nt = moe_dataset_tokens(d, 0), nv = moe_dataset_tokens(d, 1);
    int V = moe_tokenizer_vocab_size(tok);
    for (int s = 0; s < 2; s++)
        for (size_t i = 0; i < d->n[s]; i++)
            if (d->tokens[s][i] < 0 || d->tokens[s][i] >= V || d->domain[s][i] >= d->n_domains) abort();
    moe_rng rng;
    moe_rng_seed(&rng, size);
    int32_t tk[4 * 8], tg[4 * 8];
    for (int s = 0; s < 2; s++) {
        size_t have = s ? nv : nt;
        moe_status st = dataset_sample(d, s, &rng, 4, 8, tk, tg);
        if ((st == MOE_OK) != (have >= 9)) abort();
    }
    moe_dataset_free(d);
}

static int fuzz_write_seeds(const char *dir) {
    static const char one[] = "the cat sat on the mat and then the dog sat on the log.\n";
    static const char docs[] = "first document\nwith two lines\n\f\nsecond document\n\f\n\f\nthird\n";
    static const char ff[] = "\f\n\f\n\f";
    static const char bin[] = "\x00\xff\xfe\x01 the \xc3\x28 \xe2\x82 \xf0\x9f\x98\x80\x00\n\f";
    int bad = fuzz_put(dir, "one_line.txt", one, sizeof one - 1);
    bad |= fuzz_put(dir, "documents.txt", docs, sizeof docs - 1);
    bad |= fuzz_put(dir, "only_separators.txt", ff, sizeof ff - 1);
    bad |= fuzz_put(dir, "binary.txt", bin, sizeof bin - 1);
    bad |= fuzz_put(dir, "empty.txt", "", 0);
    /* twelve documents (a validation split by document) and one long one
     * (cut at paragraph breaks) */
    char big[20000];
    size_t n = 0;
    for (int i = 0; i < 12; i++) n += (size_t)snprintf(big + n, sizeof big - n, "doc %d: the cat sat.\n\f\n", i);
    bad |= fuzz_put(dir, "twelve_docs.txt", big, n);
    n = 0;
    while (n + 64 < sizeof big) {
        n += (size_t)snprintf(big + n, sizeof big - n, "a paragraph of some words %zu\n", n);
        if (n % 7 == 0) big[n++] = '\n';
    }
    bad |= fuzz_put(dir, "long_doc.txt", big, n);
    return bad;
}
