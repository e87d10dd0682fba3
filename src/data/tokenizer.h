/* data/tokenizer: byte-level BPE with GPT-2 style pre-tokenisation.
 * Ids 0..255 are the raw bytes; merges follow in the order learned; the last
 * id is the end-of-text special token "<|endoftext|>". In GGUF the vocabulary
 * is stored the way GPT-2 tokenizers are (tokenizer.ggml.model = "gpt2",
 * tokens as byte-to-unicode mapped strings, merges as "left right"), so other
 * GGUF tools tokenise our models' text the same way. */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H
#include "moe.h"
#include "io/gguf.h"

moe_status tokenizer_write_gguf(const moe_tokenizer *tok, gguf_writer *w);
moe_status tokenizer_read_gguf(moe_tokenizer **out, const gguf_ctx *ctx);
#endif
