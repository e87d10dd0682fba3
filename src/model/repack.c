/* model/repack: a published model's Q8_0 and K-quant (Q4_K, Q5_K, Q6_K)
 * matrices copied once, at load, into the layouts the decode kernels stream
 * (DT_Q8_0_R8, DT_Q*_K_R4, core/dtype.h: rows regrouped by 8 or 4, so that a
 * tile of rows reads one stream instead of one per row).
 * Decode reads every active weight once per token from memory, and on the
 * CPUs measured (docs/performance.md) one long stream is read markedly
 * faster than 8 short ones. The arithmetic is the same, so the bits are too.
 *
 * m->w keeps the file's views (offloading reads the file by them, footprint
 * and `moe info` count them); m->run is what inference's kernels read: w with
 * the repacked matrices' views pointing at their copies. A view of run owns
 * its data exactly when it differs from w's. Not repacked: the token
 * embedding (looked up by rows), routers (small, read as rows), MLA's
 * per-head maps, experts read through the expert cache (offloading, expert
 * parallelism). MOE_REPACK=0 turns it
 * off (memory: the copies replace the mapping's pages, which the kernel may
 * drop, but while the file is in the page cache both are resident). Other
 * types (Q4_0, f16, bf16, ...) stay rows: their layouts are future work.
 * Where memory for a copy cannot be had, the remaining matrices stay rows:
 * a load never fails for want of a faster layout. */
#include "model/model.h"
#include "kernels/qmatmul.h"
#include "moe.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static int repack_wanted(void) {
    const char *e = getenv("MOE_REPACK");
    if (e && strcmp(e, "0") == 0) return 0;
    const char *k = getenv("MOE_KERNELS");
    if (k && strcmp(k, "portable") == 0) return 0;
    return qk_avx512_supported();
}

static int is_expert_slot(size_t slot) {
    return slot == offsetof(layer_weights, gate_exps) || slot == offsetof(layer_weights, up_exps) ||
           slot == offsetof(layer_weights, down_exps);
}

/* the matrices inference multiplies as rows (qmatmul), not looked up */
static int is_matmul_slot(const tensor_desc *d) {
    if (d->layer < 0) return d->slot == offsetof(model_weights, output);
    static const size_t slots[] = {
        offsetof(layer_weights, wq),       offsetof(layer_weights, wk),      offsetof(layer_weights, wv),
        offsetof(layer_weights, wo),       offsetof(layer_weights, wq_a),    offsetof(layer_weights, wq_b),
        offsetof(layer_weights, wkv_a),    offsetof(layer_weights, ffn_gate), offsetof(layer_weights, ffn_up),
        offsetof(layer_weights, ffn_down), offsetof(layer_weights, sh_gate), offsetof(layer_weights, sh_up),
        offsetof(layer_weights, sh_down)};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        if (d->slot == slots[i]) return 1;
    return is_expert_slot(d->slot);
}

static size_t tensor_bytes(const moe_tensor *t) {
    size_t rows = 1;
    for (int i = 1; i < t->n_dims; i++) rows *= (size_t)t->ne[i];
    return rows * t->row_bytes;
}

static int repackable(const moe_model *m, const tensor_desc *d, const moe_tensor *t) {
    const int rtype = dtype_repacked_type(t->type);
    if (!t->data || rtype < 0 || t->n_dims < 2 || t->n_dims > 3) return 0;
    if (t->ne[1] % dtype_group_rows(rtype) || !is_matmul_slot(d)) return 0;
    if (is_expert_slot(d->slot) && m->store) return 0; /* read as rows from the file */
    if (d->layer < 0 && t->data == m->w.token_embd.data) return 0; /* tied: also the embedding */
    return 1;
}

void model_repack_free(moe_model *m) {
    if (!m->run.layers) return;
    for (int i = 0; i < m->n_tensors; i++) {
        moe_tensor *r = model_tensor_slot(&m->run, &m->tensors[i]);
        if (r->data != model_tensor_slot(&m->w, &m->tensors[i])->data) moe_free(r->data);
    }
    moe_free(m->run.layers);
    memset(&m->run, 0, sizeof m->run);
    m->repacked_bytes = 0;
}

void model_repack_drop_experts(moe_model *m) {
    if (!m->run.layers) return;
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *d = &m->tensors[i];
        moe_tensor *r = model_tensor_slot(&m->run, d), *w = model_tensor_slot(&m->w, d);
        if (d->layer < 0 || !is_expert_slot(d->slot) || r->data == w->data) continue;
        m->repacked_bytes -= tensor_bytes(r);
        moe_free(r->data);
        *r = *w;
    }
}

void model_repack(moe_model *m) {
    model_repack_free(m);
    if (!m->file || !repack_wanted()) return;
    const int L = m->cfg.n_layers;
    m->run = m->w;
    m->run.layers = moe_malloc((size_t)L * sizeof(layer_weights));
    if (!m->run.layers) { memset(&m->run, 0, sizeof m->run); return; } /* rows, then */
    memcpy(m->run.layers, m->w.layers, (size_t)L * sizeof(layer_weights));
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_desc *d = &m->tensors[i];
        const moe_tensor *w = model_tensor_slot(&m->w, d);
        if (!repackable(m, d, w)) continue;
        const size_t bytes = tensor_bytes(w);
        void *buf = moe_malloc(bytes);
        if (!buf) break; /* no room for the copy: the rest stay rows, which work as well, slower */
        /* the stacked experts' matrices are ne[1] rows each, a whole number of
         * groups: packing all their rows at once packs each matrix on its own */
        const int64_t rows = (int64_t)(bytes / w->row_bytes);
        const int rtype = dtype_repacked_type(w->type);
        if (dtype_repack(rtype, buf, w->data, rows, w->ne[0])) { moe_free(buf); continue; }
        moe_tensor *r = model_tensor_slot(&m->run, d);
        r->data = buf;
        r->type = rtype;
        m->repacked_bytes += bytes;
    }
    if (!m->repacked_bytes) model_repack_free(m);
}

size_t moe_model_repacked_bytes(const moe_model *m) { return m ? m->repacked_bytes : 0; }
