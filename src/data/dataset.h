/* data/dataset: text files -> documents -> token streams with domain labels.
 * Each file is one domain named by the file (without extension). Documents
 * inside a file are separated by a line holding only a form feed; long
 * documents are cut at paragraph breaks. Every 10th document goes to the
 * validation split (with fewer than 10 documents, the last 10% of tokens). */
#ifndef MOE_DATASET_H
#define MOE_DATASET_H
#include "core/core.h"

struct moe_dataset {
    int32_t *tokens[2];   /* [0] train, [1] validation; documents joined by EOS */
    uint8_t *domain[2];   /* domain id of every token                          */
    size_t n[2];
    int n_domains;
    char **domain_names;
    uint64_t fingerprint; /* hash of the training tokens, checked on resume    */
};

/* B windows of T+1 tokens at random offsets of the split: tokens[B*T] and
 * targets[B*T] (next tokens). */
moe_status dataset_sample(const moe_dataset *d, int split, moe_rng *rng, int B, int T,
                          int32_t *tokens, int32_t *targets);
#endif
