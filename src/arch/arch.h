/* arch: the MoE architectures people publish as GGUF files, read into our
 * config and layer plan. Each family's hyperparameters come from its
 * "{arch}.*" metadata keys, with the semantics llama.cpp gives them (routing
 * normalisation, RoPE layout, norms); tensors are then bound by the model's
 * one tensor list (model/plan.c), whose names are llama.cpp's. */
#ifndef MOE_ARCH_H
#define MOE_ARCH_H
#include "io/gguf.h"
#include "moe.h"

/* Names the architectures we run ("llama, olmoe, ..."): for messages. */
const char *arch_supported_list(void);
/* Fills cfg from the file's metadata for its general.architecture (copied
 * into arch[cap]); MOE_ERR_UNSUPPORTED for other architectures, naming it,
 * MOE_ERR_FORMAT for missing or impossible keys, naming the key. The
 * vocabulary size and whether the output head is tied come from the
 * tensors. */
moe_status arch_read_config(const gguf_ctx *g, moe_config *cfg, char *arch, size_t cap);
/* Writes the "general.*" and "{arch}.*" metadata of cfg in architecture
 * arch's layout, as llama.cpp reads it; name goes to general.name. */
moe_status arch_put_metadata(gguf_writer *w, const char *arch, const moe_config *c, const char *name);
/* Writes a random-weight model of cfg's shapes in architecture arch's layout
 * (names, shapes, metadata as llama.cpp reads them); every matrix of element
 * type wtype (a matrix whose rows are not whole blocks of it falls back to
 * q8_0, then f32, as llama.cpp's quantiser does), 1-D tensors f32; with tok's
 * vocabulary when tok is non-NULL.
 * For tests and benchmarks: reading it back gives cfg again. */
/* Adds the tensors of m (our own model: fp32 parameters) to w in the
 * rule of arch_write_random: 1-D tensors and routers f32, every other
 * matrix of type wtype, falling back to q8_0 then f32 when its rows are not
 * whole blocks, quantised by the type's reference quantiser into a buffer
 * *qbuf that must outlive the writing (moe_free it after). */
moe_status arch_add_tensors(gguf_writer *w, const moe_model *m, int wtype, char **qbuf);
/* Bytes of the tensor data arch_add_tensors writes for wtype. */
size_t arch_tensor_bytes(const moe_model *m, int wtype);
moe_status arch_write_random(const char *path, const char *arch, const moe_config *cfg, int wtype,
                             const moe_tokenizer *tok, uint64_t seed);
#endif
