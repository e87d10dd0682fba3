/* The benchmark's library parts (moe bench, make bench):
 *  - moe_write_synthetic writes a llama-layout file with a vocabulary of
 *    exactly the model's size, which loads back with that config;
 *  - moe_model_weight_bytes against sizes computed by hand from the GGUF
 *    block layouts (q8_0: 34 bytes per 32 elements; bf16: 2 bytes);
 *  - moe_measure_bandwidth measures something and refuses nonsense. */
#include <stdint.h>

#include "harness.h"
#include "moe.h"

static moe_config tiny(void) {
    moe_config c;
    moe_config_preset(&c, "default");
    c.vocab_size = 300; c.d_model = 64; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2;
    c.n_experts = 4; c.top_k = 2; c.d_expert = 64; c.d_ff = 64; c.max_seq = 64;
    return c;
}

/* By hand: per layer two f32 norms of d, q and o of d rows, k and v of
 * kv_heads * head_dim rows, the f32 router [E][d], and the experts:
 * gate and up of F rows, down of d rows, each E times; rows of d (or F)
 * elements of row_bytes. Plus embedding and output (V rows each) and the
 * final norm. A token reads one embedding row and k of the E experts. */
static void check_sizes(const char *type, int64_t row_bytes) {
    char name[96], path[256];
    snprintf(name, sizeof name, "weight bytes of a %s model, by hand", type);
    TEST_CASE(name);
    th_tmp_path(path, sizeof path, "bench_synth.gguf");
    moe_config c = tiny();
    moe_model *m = NULL;
    CHECK(moe_write_synthetic(path, &c, type, 5) == MOE_OK, "write: %s", moe_last_error());
    CHECK(moe_model_load(&m, path) == MOE_OK, "load: %s", moe_last_error());
    if (!m) { TEST_END(); return; }
    const moe_config *r = moe_model_config(m);
    CHECK(r->vocab_size == 300 && r->n_experts == 4 && r->top_k == 2 && r->d_expert == 64 && r->n_layers == 2,
          "config read back: V %d E %d k %d F %d L %d", r->vocab_size, r->n_experts, r->top_k, r->d_expert, r->n_layers);
    CHECK(moe_tokenizer_vocab_size(moe_model_tokenizer(m)) == 300, "vocabulary of %d tokens",
          moe_tokenizer_vocab_size(moe_model_tokenizer(m)));
    CHECK(moe_tokenizer_eos(moe_model_tokenizer(m)) == 299, "eos %d", moe_tokenizer_eos(moe_model_tokenizer(m)));
    size_t len = 0;
    const char *t = moe_tokenizer_token(moe_model_tokenizer(m), 256 + 42, &len); /* merge 42 = (42 / 256, 42 % 256) */
    CHECK(t && len == 2 && t[0] == 0 && t[1] == 42, "token 298 is the byte pair (0, 42)");
    const int64_t norm = 64 * 4, router = 4 * 64 * 4;
    const int64_t attn = (64 + 32 + 32 + 64) * row_bytes, experts = 3 * 4 * 64 * row_bytes;
    const int64_t total = 2 * 300 * row_bytes + norm + 2 * (2 * norm + attn + router + experts);
    const int64_t per_token = row_bytes + 300 * row_bytes + norm + 2 * (2 * norm + attn + router + experts / 2);
    moe_weight_bytes wb = moe_model_weight_bytes(m);
    CHECK(wb.total == total, "total %lld, by hand %lld", (long long)wb.total, (long long)total);
    CHECK(wb.per_token == per_token, "per token %lld, by hand %lld", (long long)wb.per_token, (long long)per_token);
    moe_model_free(m);
    TEST_END();
}

int main(void) {
    check_sizes("q8_0", 2 * 34); /* 64 elements: two blocks */
    check_sizes("bf16", 64 * 2);
    check_sizes("Q8_0", 2 * 34); /* the type name in any case */

    TEST_CASE("weight bytes of a tied model: the whole embedding per token");
    {
        moe_config c = tiny();
        c.tied_embeddings = 1;
        c.n_experts = 0; c.top_k = 0; c.d_ff = 128;
        moe_model *m = NULL;
        CHECK(moe_model_create(&m, &c, 1) == MOE_OK, "%s", moe_last_error());
        if (m) {
            const int64_t norm = 64 * 4, attn = (64 + 32 + 32 + 64) * 64 * 4, ffn = 3 * 128 * 64 * 4;
            const int64_t total = 300 * 64 * 4 + norm + 2 * (2 * norm + attn + ffn);
            moe_weight_bytes wb = moe_model_weight_bytes(m);
            CHECK(wb.total == total && wb.per_token == total, "total %lld, per token %lld, by hand %lld both",
                  (long long)wb.total, (long long)wb.per_token, (long long)total);
        }
        moe_model_free(m);
    }
    TEST_END();

    TEST_CASE("moe_write_synthetic refuses an unknown type and a vocabulary it cannot fill");
    {
        char path[256];
        th_tmp_path(path, sizeof path, "bench_bad.gguf");
        moe_config c = tiny();
        CHECK(moe_write_synthetic(path, &c, "q3_x", 1) == MOE_ERR_INVALID_ARG &&
              strstr(moe_last_error(), "q3_x") && strstr(moe_last_error(), "q4_K"), "%s", moe_last_error());
        c.vocab_size = 70000;
        CHECK(moe_write_synthetic(path, &c, "q8_0", 1) == MOE_ERR_INVALID_ARG &&
              strstr(moe_last_error(), "synthetic vocabulary"), "%s", moe_last_error());
        CHECK(access(path, F_OK) != 0, "nothing written");
    }
    TEST_END();

    TEST_CASE("moe_measure_bandwidth");
    {
        double gbs = -1;
        CHECK(moe_measure_bandwidth((size_t)16 << 20, 3, &gbs) == MOE_OK && gbs > 0.01 && gbs < 1e5, "%g GB/s: %s", gbs,
              moe_last_error());
        CHECK(moe_measure_bandwidth(100, 3, &gbs) == MOE_ERR_INVALID_ARG, "a 100-byte buffer is refused");
        CHECK(moe_measure_bandwidth(0, 3, NULL) == MOE_ERR_INVALID_ARG, "NULL result refused");
    }
    TEST_END();

    TEST_CASE("moe_cpu_describe names the kernel path");
    {
        char buf[512];
        moe_cpu_describe(buf, sizeof buf);
        CHECK(!strncmp(buf, "units:", 6) && strstr(buf, "; kernels: "), "'%s'", buf);
        char small[12];
        moe_cpu_describe(small, sizeof small); /* truncated, still terminated */
        CHECK(strlen(small) < sizeof small, "truncated to %zu", strlen(small));
    }
    TEST_END();
    TEST_MAIN_END();
}
