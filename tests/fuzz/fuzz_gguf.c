/* Fuzz target: the GGUF reader (gguf_open_buffer) and every lookup on what
 * it accepts. Seeds: tests/fuzz/gguf/ (written by test_gguf --write-seeds). */
#include "fuzz.h"
#include "io/gguf.h"

static volatile uint64_t sink;

static void fuzz_one(const uint8_t *data, size_t size) {
    gguf_ctx *g = NULL;
    if (gguf_open_buffer(&g, data, size) != MOE_OK) return;
    sink += gguf_version(g) + gguf_alignment(g) + gguf_data_offset(g);
    char key[512];
    for (int i = 0; i < gguf_n_kv(g); i++) {
        size_t len;
        gguf_type type;
        const char *k = gguf_key_at(g, i, &len, &type);
        if (!k || len >= sizeof key) continue;
        memcpy(key, k, len);
        key[len] = 0;
        if (!gguf_has_key(g, key)) continue; /* keys with a NUL inside */
        uint32_t u32; int32_t i32; uint64_t u64; int64_t i64; float f; double d; int b;
        const char *s; size_t sl;
        if (!gguf_get_u32(g, key, &u32)) sink += u32;
        if (!gguf_get_i32(g, key, &i32)) sink += (uint64_t)i32;
        if (!gguf_get_u64(g, key, &u64)) sink += u64;
        if (!gguf_get_i64(g, key, &i64)) sink += (uint64_t)i64;
        if (!gguf_get_f32(g, key, &f)) sink += (uint64_t)(f == f);
        if (!gguf_get_f64(g, key, &d)) sink += (uint64_t)(d == d);
        if (!gguf_get_bool(g, key, &b)) sink += (uint64_t)b;
        if (!gguf_get_str(g, key, &s, &sl) && sl) sink += (uint8_t)s[0] + (uint8_t)s[sl - 1];
        gguf_type elem;
        uint64_t n;
        const void *arr;
        if (!gguf_get_arr_info(g, key, &elem, &n)) {
            if (!gguf_get_arr_data(g, key, &elem, &n, &arr) && n) sink += ((const uint8_t *)arr)[0];
            for (uint64_t j = 0; j < n && j < 64; j++)
                if (!gguf_get_arr_str(g, key, j, &s, &sl) && sl) sink += (uint8_t)s[sl - 1];
            if (n > 64 && !gguf_get_arr_str(g, key, n - 1, &s, &sl) && sl) sink += (uint8_t)s[0];
            gguf_get_arr_str(g, key, n, &s, &sl); /* one past the end: must fail */
        }
    }
    for (int i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        if (gguf_find_tensor(g, t->name) != t) abort(); /* names are unique */
        if (t->nbytes) sink += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
    }
    if (gguf_tensor_at(g, gguf_n_tensors(g)) != NULL) abort();
    gguf_close(g);
}
