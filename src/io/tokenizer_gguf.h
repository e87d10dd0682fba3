/* io/tokenizer_gguf.h: tokenizers in GGUF (see tokenizer_gguf.c). */
#ifndef MOE_TOKENIZER_GGUF_H
#define MOE_TOKENIZER_GGUF_H
#include "io/gguf.h"
#include "moe.h"

/* Our own vocabulary only (MOE_ERR_UNSUPPORTED for a published one). */
moe_status tokenizer_write_gguf(const moe_tokenizer *tok, gguf_writer *w);
/* Our own or a published vocabulary (tokenizer.ggml.model llama / gpt2). */
moe_status tokenizer_read_gguf(moe_tokenizer **out, const gguf_ctx *ctx);
#endif
