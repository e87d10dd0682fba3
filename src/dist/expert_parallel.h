/* dist/expert_parallel: the moe_exchange that moves an MoE layer's rows to
 * the ranks owning their experts and back (dist.h has the layout).
 * Forward: the row counts per expert go first (an all-to-all of E/EP ints
 * per peer), then the rows (an all-to-all of rows x d floats), the owner
 * runs its experts over everyone's rows, the outputs travel back. Backward
 * moves the output gradients out and the input gradients back the same way.
 * Rows are grouped by expert, and a peer's experts are consecutive, so
 * every block sent is one contiguous slice of the cache.
 *
 * Inference (EP_SAME_TOKENS): every rank of the group runs the same tokens
 * (everything outside the experts replicated), so each already has every
 * row. It runs its own experts over their rows, then an all-gather gives
 * every rank all the experts' outputs, in place in the cache; the combine
 * then sums each token's experts in the order one process does. */
#ifndef MOE_EXPERT_PARALLEL_H
#define MOE_EXPERT_PARALLEL_H
#include "moe/moe_layer.h"

typedef struct expert_parallel expert_parallel;

typedef enum {
    EP_SHARDED_TOKENS = 0, /* training: each rank its own tokens, rows to the owners and back */
    EP_SAME_TOKENS = 1     /* inference: the same tokens on every rank, outputs gathered (forward only) */
} expert_parallel_mode;

/* One exchange per MoE layer (n_moe of them) of a model with E experts. */
moe_status expert_parallel_create(expert_parallel **out, int n_moe, int E, expert_parallel_mode mode);
void expert_parallel_free(expert_parallel *x);
/* The exchange of the k-th MoE layer. */
moe_exchange *expert_parallel_layer(expert_parallel *x, int k);
/* The first communication error since creation (sticky: the layer's outputs
 * after it are zeros, and the caller must stop), or MOE_OK. */
moe_status expert_parallel_status(const expert_parallel *x);
/* Rows this rank sent to other ranks' experts in forward calls since the
 * last reset (each also comes back, and goes again in the backward); with
 * EP_SAME_TOKENS, the rows its own experts computed and sent to the peers. */
int64_t expert_parallel_rows_out(const expert_parallel *x);
void expert_parallel_reset(expert_parallel *x);
#endif
