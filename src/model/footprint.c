/* model/footprint: the bytes of a model's weights, and the part of them one
 * decoded token reads: the figure memory-bound decoding is measured against
 * (moe bench's roofline). Counted from the bound views, so a published file's
 * own types (q8_0, q4_K, bf16, ...) give their own sizes. */
#include <stddef.h>

#include "model/model.h"

static int64_t tensor_bytes(const moe_tensor *t) {
    if (!t->data) return 0;
    int64_t rows = 1;
    for (int i = 1; i < t->n_dims && i < 4; i++) rows *= t->ne[i];
    return (int64_t)t->row_bytes * rows;
}

static int is_routed_expert_slot(size_t slot) {
    return slot == offsetof(layer_weights, gate_exps) || slot == offsetof(layer_weights, up_exps) ||
           slot == offsetof(layer_weights, down_exps);
}

moe_weight_bytes moe_model_weight_bytes(const moe_model *m) {
    moe_weight_bytes r = {0, 0};
    if (!m) return r;
    const moe_config *c = &m->cfg;
    model_weights *w = (model_weights *)&m->w; /* read only: model_tensor_slot takes it mutable */
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *td = &m->tensors[i];
        const moe_tensor *t = model_tensor_slot(w, td);
        const int64_t b = tensor_bytes(t);
        r.total += b;
        if (td->layer < 0 && td->slot == offsetof(model_weights, token_embd))
            r.per_token += (int64_t)t->row_bytes; /* a token reads its own row */
        else if (td->layer >= 0 && is_routed_expert_slot(td->slot) && c->n_experts > 0)
            r.per_token += b / c->n_experts * c->top_k; /* k of the E stacked experts */
        else
            r.per_token += b;
    }
    /* a tied head reads the whole embedding matrix once per token */
    if (c->tied_embeddings && w->output.data == w->token_embd.data)
        r.per_token += tensor_bytes(&w->token_embd) - (int64_t)w->token_embd.row_bytes;
    return r;
}
