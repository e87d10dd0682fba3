/* stats/trace: routing telemetry (which experts each token chose in every
 * MoE layer, through the inference tap of model/infer.c) and expert
 * ablation (switching chosen experts off for evaluation). */
#include <string.h>

#include "model/model.h"

enum { ROUTE_CHUNK = 64 }; /* positions per inference call */

moe_status moe_model_route(moe_model *m, const int32_t *tokens, size_t n, moe_route_fn fn, void *user) {
    if (!m || (n && !tokens) || !fn) return moe_error(MOE_ERR_INVALID_ARG, "moe_model_route: missing argument");
    const moe_config *c = &m->cfg;
    /* k: the experts routing keeps now (moe_model_set_routing may change it) */
    const int n_moe = moe_config_n_moe_layers(c), k = n_moe ? model_route_k(m) : 0;
    const int ctx = moe_model_context(m);
    const size_t per = (size_t)ROUTE_CHUNK * MOE_MAX(n_moe * k, 1);
    int *layers = moe_calloc((size_t)MOE_MAX(n_moe, 1), sizeof(int));
    int32_t *ids = moe_malloc(per * sizeof(int32_t));
    float *w = moe_malloc(per * sizeof(float));
    float *logits = moe_malloc((size_t)c->vocab_size * sizeof(float));
    moe_status st = MOE_OK;
    if (!layers || !ids || !w || !logits) st = moe_error(MOE_ERR_NOMEM, "routing trace buffers");
    for (int l = 0, j = 0; !st && l < c->n_layers; l++)
        if (m->plan[l].ffn == FFN_MOE) layers[j++] = l;
    if (!st && n_moe) { m->tap_ids = ids; m->tap_w = w; }
    int stop = 0;
    for (size_t i0 = 0; !st && !stop && i0 < n;) {
        /* a chunk never crosses a context boundary */
        const int pos0 = (int)(i0 % (size_t)ctx);
        const int len = (int)MOE_MIN((size_t)MOE_MIN(ROUTE_CHUNK, ctx - pos0), n - i0);
        st = model_infer(m, tokens + i0, len, pos0, logits, 0);
        for (int i = 0; !st && !stop && i < len; i++) {
            const size_t at = (size_t)i * n_moe * k;
            moe_token_route r = {.pos = i0 + i, .token = tokens[i0 + i], .n_moe = n_moe, .k = k,
                                 .layers = layers, .experts = ids + at, .weights = w + at};
            stop = fn(&r, user) != 0;
        }
        i0 += (size_t)len;
    }
    m->tap_ids = NULL;
    m->tap_w = NULL;
    moe_free(layers);
    moe_free(ids);
    moe_free(w);
    moe_free(logits);
    return st;
}

moe_status moe_model_disable_expert(moe_model *m, int layer, int expert) {
    const moe_config *c = &m->cfg;
    if (layer < 0 || layer >= c->n_layers)
        return moe_error(MOE_ERR_INVALID_ARG, "layer %d is out of range (the model has layers 0..%d)", layer, c->n_layers - 1);
    if (m->plan[layer].ffn != FFN_MOE)
        return moe_error(MOE_ERR_INVALID_ARG, "layer %d is a dense layer: it has no experts to disable", layer);
    if (expert < 0 || expert >= c->n_experts)
        return moe_error(MOE_ERR_INVALID_ARG, "expert %d is out of range (layer %d has experts 0..%d)", expert, layer, c->n_experts - 1);
    if (!m->disabled && !(m->disabled = moe_calloc((size_t)c->n_layers * c->n_experts, 1)))
        return moe_error_prefix(MOE_ERR_NOMEM, "expert mask");
    m->disabled[(size_t)layer * c->n_experts + expert] = 1;
    return MOE_OK;
}

void moe_model_enable_experts(moe_model *m) {
    moe_free(m->disabled);
    m->disabled = NULL;
}
