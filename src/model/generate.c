/* model/generate: sampling (greedy, temperature, top-k, top-p) over the KV-cached decoder. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

typedef struct { float p; int32_t id; } cand;

enum { PROMPT_CHUNK = 512 }; /* prompt tokens per model_infer call (llama.cpp's default micro-batch) */

static int by_prob_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

/* Picks the next token from logits[V]. cands is scratch of V entries. */
static int32_t sample(const float *logits, int V, const moe_sample_params *sp, moe_rng *rng, cand *cands) {
    int32_t best = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    if (sp->temperature <= 0.0f) return best;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        cands[i].id = i;
        cands[i].p = expf((logits[i] - logits[best]) / sp->temperature);
        sum += cands[i].p;
    }
    int n = V;
    if ((sp->top_k > 0 && sp->top_k < V) || (sp->top_p > 0 && sp->top_p < 1)) {
        qsort(cands, (size_t)V, sizeof(cand), by_prob_desc);
        if (sp->top_k > 0 && sp->top_k < n) n = sp->top_k;
        if (sp->top_p > 0 && sp->top_p < 1) {
            double total = 0, acc = 0;
            for (int i = 0; i < n; i++) total += cands[i].p;
            for (int i = 0; i < n; i++) {
                acc += cands[i].p;
                if (acc >= sp->top_p * total) { n = i + 1; break; }
            }
        }
        sum = 0;
        for (int i = 0; i < n; i++) sum += cands[i].p;
    }
    double r = moe_rng_uniform(rng) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += cands[i].p;
        if (r < acc) return cands[i].id;
    }
    return cands[n - 1].id;
}

moe_status moe_generate(moe_model *m, const int32_t *prompt, size_t n_prompt,
                        const moe_sample_params *sp, moe_token_fn fn, void *user) {
    const moe_config *c = &m->cfg;
    if (n_prompt == 0) return moe_error(MOE_ERR_INVALID_ARG, "empty prompt (pass at least one token)");
    const int ctx = moe_model_context(m);
    if (n_prompt >= (size_t)ctx)
        return moe_error(MOE_ERR_INVALID_ARG, "prompt of %zu tokens does not fit the context of %d", n_prompt, ctx);
    const int V = c->vocab_size;
    float *logits = moe_malloc(sizeof(float) * V);
    cand *cands = moe_malloc(sizeof(cand) * V);
    if (!logits || !cands) { moe_free(logits); moe_free(cands); return MOE_ERR_NOMEM; }
    moe_rng rng;
    moe_rng_seed(&rng, sp->seed);
    moe_status st = MOE_OK;
    int pos = 0;
    /* the prompt in chunks (each token gets the bits it would get alone) */
    for (size_t i = 0; !st && i < n_prompt;) {
        const int n = (int)MOE_MIN(n_prompt - i, (size_t)PROMPT_CHUNK);
        st = model_infer(m, prompt + i, n, pos, logits, 0);
        pos += n;
        i += (size_t)n;
    }
    int eos = m->tok ? moe_tokenizer_eos(m->tok) : -1;
    int vocab_used = m->tok ? moe_tokenizer_vocab_size(m->tok) : V;
    for (int i = 0; !st && i < sp->max_tokens && pos < ctx; i++) {
        /* ids the tokenizer never produces get no probability */
        for (int v = vocab_used; v < V; v++) logits[v] = -INFINITY;
        if (sp->ignore_eos && m->tok) /* as llama.cpp's --ignore-eos: no end-of-generation token */
            for (int v = 0; v < vocab_used; v++)
                if (v == eos || moe_tokenizer_is_eog(m->tok, v)) logits[v] = -INFINITY;
        int32_t next = sample(logits, V, sp, &rng, cands);
        size_t len = 0;
        const char *bytes = m->tok ? moe_tokenizer_token(m->tok, next, &len) : NULL;
        if (next == eos || (m->tok && moe_tokenizer_is_eog(m->tok, next))) break;
        if (fn && fn(next, bytes, bytes ? len : 0, user)) break;
        st = model_decode(m, next, pos++, logits);
    }
    moe_free(logits);
    moe_free(cands);
    return st;
}
