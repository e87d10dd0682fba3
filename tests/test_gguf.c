/* test_gguf: GGUF reader/writer round trip, atomic writes, and a pile of
 * broken files that must each fail cleanly (never crash, never leak).
 * Run with --write-seeds DIR to (re)generate the fuzzer seed files. */
#include "harness.h"
#include "io/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/test_gguf.XXXXXX";

/* ---- byte builder for hand-made files ---- */
typedef struct { uint8_t *p; size_t n, cap; } bb;
static void bb_put(bb *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void bb_u8(bb *b, uint8_t v) { bb_put(b, &v, 1); }
static void bb_u32(bb *b, uint32_t v) { uint8_t x[4]; for (int i = 0; i < 4; i++) x[i] = (uint8_t)(v >> 8 * i); bb_put(b, x, 4); }
static void bb_u64(bb *b, uint64_t v) { uint8_t x[8]; for (int i = 0; i < 8; i++) x[i] = (uint8_t)(v >> 8 * i); bb_put(b, x, 8); }
static void bb_str(bb *b, const char *s) { bb_u64(b, strlen(s)); bb_put(b, s, strlen(s)); }
static void bb_pad(bb *b, size_t a) { while (b->n % a) bb_u8(b, 0); }
static void bb_hdr(bb *b, uint32_t version, uint64_t n_t, uint64_t n_kv) {
    b->n = 0;
    bb_put(b, "GGUF", 4); bb_u32(b, version); bb_u64(b, n_t); bb_u64(b, n_kv);
}
static void bb_kv_u32(bb *b, const char *key, uint32_t v) { bb_str(b, key); bb_u32(b, GGUF_TYPE_UINT32); bb_u32(b, v); }
static void bb_tinfo(bb *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type, uint64_t off) {
    bb_str(b, name); bb_u32(b, nd);
    for (uint32_t d = 0; d < nd; d++) bb_u64(b, ne[d]);
    bb_u32(b, type); bb_u64(b, off);
}
/* one F32 tensor of n floats at offset off, data section of data_bytes zeros */
static void bb_one_tensor(bb *b, const char *name, uint64_t n, uint32_t type, uint64_t off, size_t data_bytes) {
    bb_hdr(b, 3, 1, 0);
    bb_tinfo(b, name, 1, &n, type, off);
    bb_pad(b, 32);
    for (size_t i = 0; i < data_bytes; i++) bb_u8(b, (uint8_t)i);
}

static int one_line(const char *m) { return m && *m && !strchr(m, '\n'); }

static int write_file(const char *path, const void *d, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(d, 1, n, f);
    return (fclose(f) == 0 && w == n) ? 0 : -1;
}

static uint8_t *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(sz > 0 ? (size_t)sz : 1);
    *n = fread(p, 1, (size_t)sz, f);
    fclose(f);
    return p;
}

/* Opens an exact-size copy (so ASan catches any over-read) and expects failure. */
static void expect_err(const char *what, const uint8_t *d, size_t len, moe_status want, const char *sub) {
    size_t before = moe_alloc_in_use();
    uint8_t *c = malloc(len ? len : 1);
    if (len) memcpy(c, d, len);
    gguf_ctx *ctx = (gguf_ctx *)&ctx; /* must be reset to NULL */
    moe_status st = gguf_open_buffer(&ctx, c, len);
    const char *m = moe_last_error();
    CHECK(st == want, "%s: got %d (%s), want %d", what, st, m, want);
    CHECK(ctx == NULL, "%s: ctx not NULL on failure", what);
    if (st == MOE_OK && ctx) gguf_close(ctx);
    if (st != MOE_OK) {
        CHECK(one_line(m), "%s: message not one line: '%s'", what, m);
        CHECK(strncmp(m, "gguf: ", 6) == 0, "%s: message '%s' lacks gguf prefix", what, m);
        if (sub) CHECK(strstr(m, sub) != NULL, "%s: message '%s' lacks '%s'", what, m, sub);
    }
    CHECK(moe_alloc_in_use() == before, "%s: leaked %zu bytes", what, moe_alloc_in_use() - before);
    free(c);
}
#define EXPECT_ERR(b, want, sub) expect_err(#want " " sub, (b)->p, (b)->n, want, sub)

/* ---- the sample file: every kv type and several tensors ---- */
static float t_embd[8 * 4], t_ffn[5 * 3 * 2], t_4d[2 * 1 * 3 * 2];
static uint8_t t_q8[2 * 34];
static uint16_t t_h[3];
static const uint8_t arr_u8[] = {0, 1, 255};
static const int16_t arr_i16[] = {-32768, 0, 32767, -1};
static const float arr_f32[] = {1.5f, -0.0f, 1e30f};
static const uint64_t arr_u64[] = {0, UINT64_MAX, 1ull << 40};
static const uint8_t arr_bool[] = {1, 0, 1, 1};
static const char *const arr_s[] = {"a", "", "h\xc3\xa9llo", "x\0y"};
static const size_t arr_slen[] = {1, 0, 6, 3};
#define SAMPLE_NKV 19
#define SAMPLE_NT 5

static void fill_sample_data(void) {
    for (size_t i = 0; i < sizeof t_embd / 4; i++) t_embd[i] = (float)i * 0.25f - 3.0f;
    for (size_t i = 0; i < sizeof t_ffn / 4; i++) t_ffn[i] = 1.0f / (float)(i + 1);
    for (size_t i = 0; i < sizeof t_4d / 4; i++) t_4d[i] = -(float)i;
    for (size_t i = 0; i < sizeof t_q8; i++) t_q8[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < 3; i++) t_h[i] = (uint16_t)(0x3c00 + i);
}

/* fills w with the sample content; returns 0 when every call succeeded */
static int fill_sample(gguf_writer *w, uint32_t align) {
    int bad = 0;
    uint8_t u8 = 200; int8_t i8 = -100; uint16_t u16 = 60000; int16_t i16 = -30000;
    int64_t i64 = -(1ll << 40); double f64 = 2.718281828459045;
    bad |= gguf_set_scalar(w, "t.u8", GGUF_TYPE_UINT8, &u8);
    bad |= gguf_set_scalar(w, "t.i8", GGUF_TYPE_INT8, &i8);
    bad |= gguf_set_scalar(w, "t.u16", GGUF_TYPE_UINT16, &u16);
    bad |= gguf_set_scalar(w, "t.i16", GGUF_TYPE_INT16, &i16);
    bad |= gguf_set_u32(w, "t.u32", 4000000000u);
    bad |= gguf_set_i32(w, "t.i32", -2000000000);
    bad |= gguf_set_f32(w, "t.f32", 3.25f);
    bad |= gguf_set_bool(w, "t.bool", 7);
    bad |= gguf_set_str(w, "t.str", "hello world", 11);
    bad |= gguf_set_str(w, "t.empty", "", 0);
    bad |= gguf_set_u64(w, "t.u64", (1ull << 40) + 7);
    bad |= gguf_set_scalar(w, "t.i64", GGUF_TYPE_INT64, &i64);
    bad |= gguf_set_scalar(w, "t.f64", GGUF_TYPE_FLOAT64, &f64);
    bad |= gguf_set_arr_data(w, "a.u8", GGUF_TYPE_UINT8, arr_u8, 3);
    bad |= gguf_set_arr_data(w, "a.i16", GGUF_TYPE_INT16, arr_i16, 4);
    bad |= gguf_set_arr_data(w, "a.f32", GGUF_TYPE_FLOAT32, arr_f32, 3);
    bad |= gguf_set_arr_data(w, "a.u64", GGUF_TYPE_UINT64, arr_u64, 3);
    bad |= gguf_set_arr_data(w, "a.bool", GGUF_TYPE_BOOL, arr_bool, 4);
    bad |= gguf_set_arr_str(w, "a.str", arr_s, arr_slen, 4);
    if (align) bad |= gguf_set_u32(w, "general.alignment", align);
    int64_t ne_e[] = {8, 4}, ne_f[] = {5, 3, 2}, ne_q[] = {32, 2}, ne_h[] = {3}, ne_4[] = {2, 1, 3, 2};
    bad |= gguf_add_tensor(w, "token_embd.weight", GGML_TYPE_F32, 2, ne_e, t_embd);
    bad |= gguf_add_tensor(w, "blk.0.ffn.weight", GGML_TYPE_F32, 3, ne_f, t_ffn);
    bad |= gguf_add_tensor(w, "q", GGML_TYPE_Q8_0, 2, ne_q, t_q8);
    bad |= gguf_add_tensor(w, "h", GGML_TYPE_F16, 1, ne_h, t_h);
    bad |= gguf_add_tensor(w, "four.d", GGML_TYPE_F32, 4, ne_4, t_4d);
    return bad;
}

static moe_status write_sample(const char *path, uint32_t align) {
    gguf_writer *w = gguf_writer_create();
    if (!w) return MOE_ERR_NOMEM;
    fill_sample(w, align);
    moe_status st = gguf_write_file(w, path);
    gguf_writer_free(w);
    return st;
}

static void check_sample(gguf_ctx *c, size_t align) {
    uint32_t u32; int32_t i32; uint64_t u64; int64_t i64; float f; double d; int b;
    const char *s; size_t len;
    CHECK(gguf_version(c) == 3, "version %u", gguf_version(c));
    CHECK(gguf_alignment(c) == align, "alignment %zu", gguf_alignment(c));
    CHECK(gguf_n_kv(c) == SAMPLE_NKV + (align != 32), "n_kv %d", gguf_n_kv(c));
    CHECK(gguf_get_u32(c, "t.u8", &u32) == MOE_OK && u32 == 200, "u8");
    CHECK(gguf_get_i32(c, "t.i8", &i32) == MOE_OK && i32 == -100, "i8");
    CHECK(gguf_get_u32(c, "t.i8", &u32) == MOE_ERR_FORMAT, "negative i8 as u32 must fail");
    CHECK(gguf_get_u32(c, "t.u16", &u32) == MOE_OK && u32 == 60000, "u16");
    CHECK(gguf_get_i32(c, "t.i16", &i32) == MOE_OK && i32 == -30000, "i16");
    CHECK(gguf_get_u32(c, "t.u32", &u32) == MOE_OK && u32 == 4000000000u, "u32");
    CHECK(gguf_get_i32(c, "t.u32", &i32) == MOE_ERR_FORMAT, "u32 4e9 as i32 must fail");
    CHECK(gguf_get_i64(c, "t.u32", &i64) == MOE_OK && i64 == 4000000000ll, "u32 as i64");
    CHECK(gguf_get_i32(c, "t.i32", &i32) == MOE_OK && i32 == -2000000000, "i32");
    CHECK(gguf_get_f32(c, "t.f32", &f) == MOE_OK && f == 3.25f, "f32");
    CHECK(gguf_get_bool(c, "t.bool", &b) == MOE_OK && b == 1, "bool");
    CHECK(gguf_get_str(c, "t.str", &s, &len) == MOE_OK && len == 11 && !memcmp(s, "hello world", 11), "str");
    CHECK(gguf_get_str(c, "t.empty", &s, &len) == MOE_OK && len == 0, "empty str");
    CHECK(gguf_get_u64(c, "t.u64", &u64) == MOE_OK && u64 == (1ull << 40) + 7, "u64");
    CHECK(gguf_get_u32(c, "t.u64", &u32) == MOE_ERR_FORMAT, "big u64 as u32 must fail");
    CHECK(gguf_get_i64(c, "t.i64", &i64) == MOE_OK && i64 == -(1ll << 40), "i64");
    CHECK(gguf_get_f64(c, "t.f64", &d) == MOE_OK && d == 2.718281828459045, "f64");
    CHECK(gguf_get_f64(c, "t.f32", &d) == MOE_OK && d == 3.25, "f32 as f64");
    CHECK(gguf_get_f32(c, "t.str", &f) == MOE_ERR_FORMAT, "string as f32 must fail");
    CHECK(gguf_get_u32(c, "t.f32", &u32) == MOE_ERR_FORMAT, "float as u32 must fail");
    CHECK(gguf_get_u32(c, "missing", &u32) == MOE_ERR_FORMAT && strstr(moe_last_error(), "missing"), "missing key");
    CHECK(gguf_has_key(c, "t.u8") && !gguf_has_key(c, "t.u") && !gguf_has_key(c, "t.u88"), "has_key");

    gguf_type et; uint64_t n; const void *data;
    CHECK(gguf_get_arr_data(c, "a.u8", &et, &n, &data) == MOE_OK && et == GGUF_TYPE_UINT8 && n == 3 &&
          !memcmp(data, arr_u8, 3), "arr u8");
    CHECK(gguf_get_arr_data(c, "a.i16", &et, &n, &data) == MOE_OK && et == GGUF_TYPE_INT16 && n == 4 &&
          !memcmp(data, arr_i16, sizeof arr_i16), "arr i16");
    CHECK(gguf_get_arr_data(c, "a.f32", &et, &n, &data) == MOE_OK && et == GGUF_TYPE_FLOAT32 && n == 3 &&
          !memcmp(data, arr_f32, sizeof arr_f32), "arr f32");
    CHECK(gguf_get_arr_data(c, "a.u64", &et, &n, &data) == MOE_OK && et == GGUF_TYPE_UINT64 && n == 3 &&
          !memcmp(data, arr_u64, sizeof arr_u64), "arr u64");
    CHECK(gguf_get_arr_data(c, "a.bool", &et, &n, &data) == MOE_OK && et == GGUF_TYPE_BOOL && n == 4 &&
          !memcmp(data, arr_bool, 4), "arr bool");
    CHECK(gguf_get_arr_info(c, "a.str", &et, &n) == MOE_OK && et == GGUF_TYPE_STRING && n == 4, "arr str info");
    CHECK(gguf_get_arr_data(c, "a.str", &et, &n, &data) == MOE_ERR_FORMAT, "string array as data must fail");
    for (uint64_t i = 0; i < 4; i++)
        CHECK(gguf_get_arr_str(c, "a.str", i, &s, &len) == MOE_OK && len == arr_slen[i] &&
              !memcmp(s, arr_s[i], len), "arr str %d", (int)i);
    CHECK(gguf_get_arr_str(c, "a.str", 4, &s, &len) == MOE_ERR_INVALID_ARG, "arr str out of range");
    CHECK(gguf_get_arr_str(c, "a.u8", 0, &s, &len) == MOE_ERR_FORMAT, "numeric array as strings");
    CHECK(gguf_get_arr_info(c, "t.u8", &et, &n) == MOE_ERR_FORMAT, "scalar as array");

    size_t klen; gguf_type kt;
    const char *k0 = gguf_key_at(c, 0, &klen, &kt);
    CHECK(k0 && klen == 4 && !memcmp(k0, "t.u8", 4) && kt == GGUF_TYPE_UINT8, "key_at 0");
    CHECK(gguf_key_at(c, -1, NULL, NULL) == NULL && gguf_key_at(c, gguf_n_kv(c), NULL, NULL) == NULL, "key_at range");

    struct { const char *name; int nd; int64_t ne[4]; int type; size_t nbytes; const void *data; } want[] = {
        {"token_embd.weight", 2, {8, 4, 1, 1}, GGML_TYPE_F32, sizeof t_embd, t_embd},
        {"blk.0.ffn.weight", 3, {5, 3, 2, 1}, GGML_TYPE_F32, sizeof t_ffn, t_ffn},
        {"q", 2, {32, 2, 1, 1}, GGML_TYPE_Q8_0, sizeof t_q8, t_q8},
        {"h", 1, {3, 1, 1, 1}, GGML_TYPE_F16, sizeof t_h, t_h},
        {"four.d", 4, {2, 1, 3, 2}, GGML_TYPE_F32, sizeof t_4d, t_4d},
    };
    CHECK(gguf_n_tensors(c) == SAMPLE_NT, "n_tensors %d", gguf_n_tensors(c));
    for (int i = 0; i < SAMPLE_NT && i < gguf_n_tensors(c); i++) {
        const gguf_tensor *t = gguf_tensor_at(c, i), *ft = gguf_find_tensor(c, want[i].name);
        CHECK(t == ft, "find_tensor %s", want[i].name);
        CHECK(!strcmp(t->name, want[i].name), "name %s", t->name);
        CHECK(t->n_dims == want[i].nd && !memcmp(t->ne, want[i].ne, sizeof t->ne), "shape of %s", t->name);
        CHECK(t->type == want[i].type && t->nbytes == want[i].nbytes, "type/size of %s", t->name);
        CHECK(!memcmp(t->data, want[i].data, t->nbytes), "data of %s not bit-exact", t->name);
        CHECK((uintptr_t)t->data % align == 0, "data of %s misaligned", t->name);
    }
    CHECK(gguf_find_tensor(c, "nope") == NULL && gguf_find_tensor(c, "") == NULL, "absent tensor");
    CHECK(gguf_tensor_at(c, -1) == NULL && gguf_tensor_at(c, SAMPLE_NT) == NULL, "tensor_at range");
}

static void test_round_trip(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/sample.gguf", tmpdir);
    uint32_t aligns[] = {0, 64};
    for (int a = 0; a < 2; a++) {
        TEST_CASE(a == 0 ? "round trip, default alignment" : "round trip, general.alignment 64");
        size_t before = moe_alloc_in_use();
        moe_status st = write_sample(path, aligns[a]);
        CHECK(st == MOE_OK, "write: %s", moe_last_error());
        char tmp[600];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        CHECK(access(tmp, F_OK) != 0, "temp file left behind");
        gguf_ctx *c = NULL;
        st = gguf_open(&c, path);
        CHECK(st == MOE_OK, "open: %s", moe_last_error());
        if (c) check_sample(c, aligns[a] ? aligns[a] : 32);
        gguf_close(c);
        /* the same bytes through the buffer interface */
        size_t n = 0;
        uint8_t *raw = read_file(path, &n);
        void *al = NULL;
        CHECK(raw && posix_memalign(&al, 64, n) == 0, "read back");
        if (raw && al) {
            memcpy(al, raw, n);
            CHECK(gguf_open_buffer(&c, al, n) == MOE_OK, "open_buffer: %s", moe_last_error());
            if (c) check_sample(c, aligns[a] ? aligns[a] : 32);
            gguf_close(c);
        }
        free(al);
        free(raw);
        CHECK(moe_alloc_in_use() == before, "leaked %zu bytes", moe_alloc_in_use() - before);
        TEST_END();
    }

    TEST_CASE("writer replaces a key set twice");
    {
        gguf_writer *w = gguf_writer_create();
        gguf_set_u32(w, "k", 5);
        gguf_set_str(w, "k", "five", 4);
        gguf_set_u32(w, "other", 1);
        CHECK(gguf_write_file(w, path) == MOE_OK, "write: %s", moe_last_error());
        gguf_writer_free(w);
        gguf_ctx *c = NULL;
        CHECK(gguf_open(&c, path) == MOE_OK, "open: %s", moe_last_error());
        const char *s = NULL; size_t len = 0;
        CHECK(c && gguf_n_kv(c) == 2 && gguf_n_tensors(c) == 0, "counts");
        CHECK(c && gguf_get_str(c, "k", &s, &len) == MOE_OK && len == 4 && !memcmp(s, "five", 4), "last set wins");
        gguf_close(c);
    }
    TEST_END();

    TEST_CASE("string arrays: large vocabulary");
    {
        enum { NV = 3000 };
        static char bufs[NV][16];
        const char *strs[NV];
        for (int i = 0; i < NV; i++) { snprintf(bufs[i], sizeof bufs[i], "tok%d", i * 7); strs[i] = bufs[i]; }
        gguf_writer *w = gguf_writer_create();
        CHECK(gguf_set_arr_str(w, "tokenizer.ggml.tokens", strs, NULL, NV) == MOE_OK, "set");
        CHECK(gguf_set_arr_str(w, "empty.arr", NULL, NULL, 0) == MOE_OK, "set empty");
        CHECK(gguf_write_file(w, path) == MOE_OK, "write: %s", moe_last_error());
        gguf_writer_free(w);
        gguf_ctx *c = NULL;
        CHECK(gguf_open(&c, path) == MOE_OK, "open: %s", moe_last_error());
        uint64_t n = 0; gguf_type et;
        CHECK(c && gguf_get_arr_info(c, "tokenizer.ggml.tokens", &et, &n) == MOE_OK && n == NV, "count");
        int bad = 0;
        for (int i = 0; c && i < NV; i++) {
            const char *s; size_t len;
            if (gguf_get_arr_str(c, "tokenizer.ggml.tokens", (uint64_t)i, &s, &len) != MOE_OK ||
                len != strlen(strs[i]) || memcmp(s, strs[i], len)) bad++;
        }
        CHECK(bad == 0, "%d strings differ", bad);
        CHECK(c && gguf_get_arr_info(c, "empty.arr", &et, &n) == MOE_OK && n == 0 && et == GGUF_TYPE_STRING, "empty");
        gguf_close(c);
    }
    TEST_END();

    TEST_CASE("writer rejects bad tensors and reports the first failure on write");
    {
        gguf_writer *w = gguf_writer_create();
        float x[64] = {0};
        int64_t ne1[] = {4}, ne0[] = {0}, ne33[] = {33}, ne5[] = {1, 1, 1, 1, 1}, neneg[] = {-2};
        CHECK(gguf_add_tensor(w, "a", GGML_TYPE_F32, 1, ne1, x) == MOE_OK, "first add");
        CHECK(gguf_add_tensor(w, "a", GGML_TYPE_F32, 1, ne1, x) == MOE_ERR_INVALID_ARG, "duplicate");
        CHECK(strstr(moe_last_error(), "duplicate") != NULL, "message: %s", moe_last_error());
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_F32, 0, ne1, x) == MOE_ERR_INVALID_ARG, "n_dims 0");
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_F32, 5, ne5, x) == MOE_ERR_INVALID_ARG, "n_dims 5");
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_F32, 1, ne0, x) == MOE_ERR_INVALID_ARG, "ne 0");
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_F32, 1, neneg, x) == MOE_ERR_INVALID_ARG, "ne < 0");
        CHECK(gguf_add_tensor(w, "b", 4, 1, ne1, x) == MOE_ERR_UNSUPPORTED, "unknown type");
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_Q4_0, 1, ne33, x) == MOE_ERR_INVALID_ARG, "not whole blocks");
        CHECK(gguf_add_tensor(w, "b", GGML_TYPE_F32, 1, ne1, NULL) == MOE_ERR_INVALID_ARG, "NULL data");
        uint8_t twos[] = {0, 2};
        CHECK(gguf_set_arr_data(w, "bools", GGUF_TYPE_BOOL, twos, 2) == MOE_ERR_INVALID_ARG, "bool 2");
        CHECK(gguf_set_arr_data(w, "nested", GGUF_TYPE_ARRAY, twos, 1) == MOE_ERR_INVALID_ARG, "nested");
        CHECK(gguf_set_u32(w, "", 1) == MOE_ERR_INVALID_ARG, "empty key");
        CHECK(gguf_add_tensor(w, "c", GGML_TYPE_F32, 1, ne1, x) == MOE_OK, "writer still usable");
        char p2[600];
        snprintf(p2, sizeof p2, "%s/never.gguf", tmpdir);
        moe_status st = gguf_write_file(w, p2);
        CHECK(st == MOE_ERR_INVALID_ARG && strstr(moe_last_error(), "duplicate"), "write reports first error: %d %s",
              st, moe_last_error());
        CHECK(access(p2, F_OK) != 0, "file created despite error");
        gguf_writer_free(w);

        w = gguf_writer_create();
        gguf_set_u32(w, "general.alignment", 48);
        CHECK(gguf_write_file(w, p2) == MOE_ERR_INVALID_ARG, "alignment 48 accepted");
        CHECK(access(p2, F_OK) != 0, "file created despite error");
        gguf_writer_free(w);
    }
    TEST_END();
}

/* ---- atomic writes ---- */
static moe_status failing_writer(int fd, void *user) {
    (void)user;
    moe_status st = moe_write_all(fd, "partial", 7);
    return st ? st : moe_error(MOE_ERR_IO, "simulated failure");
}

static int file_is(const char *path, const char *content) {
    size_t n = 0;
    uint8_t *p = read_file(path, &n);
    int ok = p && n == strlen(content) && !memcmp(p, content, n);
    free(p);
    return ok;
}

static void test_atomic(void) {
    char path[512], tmp[600], dir[512];
    snprintf(path, sizeof path, "%s/keep.gguf", tmpdir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    write_file(path, "old contents", 12);

    TEST_CASE("atomic write: temp path unwritable leaves old file intact");
    {
        CHECK(mkdir(tmp, 0755) == 0, "mkdir %s", tmp); /* open(O_WRONLY) on a directory fails even for root */
        moe_status st = write_sample(path, 0);
        CHECK(st == MOE_ERR_IO, "got %d: %s", st, moe_last_error());
        CHECK(strstr(moe_last_error(), "cannot create") && one_line(moe_last_error()), "message: %s", moe_last_error());
        CHECK(file_is(path, "old contents"), "old file changed");
        rmdir(tmp);
    }
    TEST_END();

    TEST_CASE("atomic write: missing directory");
    {
        snprintf(dir, sizeof dir, "%s/no/such/dir/x.gguf", tmpdir);
        moe_status st = write_sample(dir, 0);
        CHECK(st == MOE_ERR_IO && strstr(moe_last_error(), "No such file"), "got %d: %s", st, moe_last_error());
    }
    TEST_END();

    TEST_CASE("atomic write: read-only directory");
    if (geteuid() == 0) {
        TEST_SKIP("running as root, whom directory permissions do not stop");
    } else {
        char ro[512], rop[600];
        snprintf(ro, sizeof ro, "%s/ro", tmpdir);
        snprintf(rop, sizeof rop, "%s/m.gguf", ro);
        mkdir(ro, 0755);
        write_file(rop, "old contents", 12);
        chmod(ro, 0555);
        moe_status st = write_sample(rop, 0);
        CHECK(st == MOE_ERR_IO, "got %d: %s", st, moe_last_error());
        CHECK(file_is(rop, "old contents"), "old file changed");
        chmod(ro, 0755);
        unlink(rop);
        rmdir(ro);
        TEST_END();
    }

    TEST_CASE("atomic write: failing writer removes temp file, keeps old file");
    {
        moe_status st = moe_write_atomic(path, failing_writer, NULL);
        const char *m = moe_last_error();
        CHECK(st == MOE_ERR_IO, "got %d", st);
        CHECK(strstr(m, "writing ") && strstr(m, "simulated failure") && one_line(m), "message: %s", m);
        CHECK(access(tmp, F_OK) != 0, "temp file left behind");
        CHECK(file_is(path, "old contents"), "old file changed");
    }
    TEST_END();

    TEST_CASE("atomic write: target is a directory");
    {
        snprintf(dir, sizeof dir, "%s/isdir", tmpdir);
        mkdir(dir, 0755);
        char dtmp[600];
        snprintf(dtmp, sizeof dtmp, "%s.tmp", dir);
        moe_status st = write_sample(dir, 0);
        CHECK(st == MOE_ERR_IO && one_line(moe_last_error()), "got %d: %s", st, moe_last_error());
        CHECK(access(dtmp, F_OK) != 0, "temp file left behind");
        rmdir(dir);
    }
    TEST_END();

    TEST_CASE("moe_write_all: full device is MOE_ERR_IO 'No space left on device'");
    {
        int fd = open("/dev/full", O_WRONLY);
        if (fd >= 0) {
            moe_status st = moe_write_all(fd, "x", 1);
            CHECK(st == MOE_ERR_IO && strstr(moe_last_error(), "No space left on device"), "got %d: %s", st,
                  moe_last_error());
            close(fd);
        }
    }
    TEST_END();

    TEST_CASE("atomic write: success replaces the old file");
    {
        CHECK(write_sample(path, 0) == MOE_OK, "write: %s", moe_last_error());
        CHECK(access(tmp, F_OK) != 0, "temp file left behind");
        gguf_ctx *c = NULL;
        CHECK(gguf_open(&c, path) == MOE_OK && gguf_n_tensors(c) == SAMPLE_NT, "reopen: %s", moe_last_error());
        gguf_close(c);
    }
    TEST_END();
}

/* ---- broken inputs ---- */
static void test_open_errors(void) {
    char path[512];
    TEST_CASE("open: missing file, directory, empty file");
    {
        gguf_ctx *c = NULL;
        snprintf(path, sizeof path, "%s/absent.gguf", tmpdir);
        moe_status st = gguf_open(&c, path);
        CHECK(st == MOE_ERR_IO && strstr(moe_last_error(), "cannot open") && strstr(moe_last_error(), "No such file"),
              "missing: %d %s", st, moe_last_error());
        st = gguf_open(&c, tmpdir);
        CHECK(st == MOE_ERR_IO && c == NULL, "directory: %d %s", st, moe_last_error());
        snprintf(path, sizeof path, "%s/empty.gguf", tmpdir);
        write_file(path, "", 0);
        st = gguf_open(&c, path);
        CHECK(st == MOE_ERR_FORMAT && c == NULL && one_line(moe_last_error()), "empty: %d %s", st, moe_last_error());
        expect_err("empty buffer", (const uint8_t *)"", 0, MOE_ERR_FORMAT, "empty");
        /* a broken file through the path interface names the file */
        write_file(path, "GGUX\3\0\0\0", 8);
        st = gguf_open(&c, path);
        CHECK(st == MOE_ERR_FORMAT && strstr(moe_last_error(), path) && strstr(moe_last_error(), "magic"),
              "bad magic file: %d %s", st, moe_last_error());
    }
    TEST_END();

    bb b = {0};
    uint64_t ne4 = 4, ne[4];

    TEST_CASE("header: magic, version, counts");
    {
        bb_hdr(&b, 3, 0, 0);
        b.p[3] = 'X';
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "magic");
        expect_err("2 bytes", (const uint8_t *)"GG", 2, MOE_ERR_FORMAT, "truncated");
        uint32_t bad_versions[] = {0, 1, 4, 0x03000000u};
        for (int i = 0; i < 4; i++) {
            bb_hdr(&b, bad_versions[i], 0, 0);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "version");
        }
        uint64_t huge[] = {UINT64_MAX, 1ull << 40, 1ull << 33, 2};
        for (int i = 0; i < 4; i++) {
            bb_hdr(&b, 3, 0, huge[i]);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "kv count");
            bb_hdr(&b, 3, huge[i], 0);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "tensor count");
        }
        /* minimal valid files: v3 and v2, nothing in them, no padding */
        gguf_ctx *c = NULL;
        bb_hdr(&b, 3, 0, 0);
        CHECK(gguf_open_buffer(&c, b.p, b.n) == MOE_OK && gguf_n_kv(c) == 0 && gguf_n_tensors(c) == 0,
              "empty v3: %s", moe_last_error());
        gguf_close(c);
        bb_hdr(&b, 2, 0, 1);
        bb_kv_u32(&b, "x", 9);
        uint32_t v = 0;
        CHECK(gguf_open_buffer(&c, b.p, b.n) == MOE_OK && gguf_get_u32(c, "x", &v) == MOE_OK && v == 9,
              "v2: %s", moe_last_error());
        gguf_close(c);
    }
    TEST_END();

    TEST_CASE("kv: strings, types, duplicates");
    {
        bb_hdr(&b, 3, 0, 1); bb_u64(&b, 1000); bb_put(&b, "abcdefghijklmnop", 16);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_u64(&b, UINT64_MAX); bb_put(&b, "abcdefghijklmnop", 16);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "k"); bb_u32(&b, GGUF_TYPE_STRING); bb_u64(&b, UINT64_MAX - 3);
        bb_put(&b, "abcdefghijklmnop", 16);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "k"); bb_u32(&b, GGUF_TYPE_STRING); bb_u64(&b, 17);
        bb_put(&b, "abcdefghijklmnop", 16);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 2); bb_kv_u32(&b, "dup.key", 1); bb_kv_u32(&b, "dup.key", 2);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "duplicate key 'dup.key'");
        uint32_t bad_types[] = {13, 0xFFFFFFFFu, 1000};
        for (int i = 0; i < 3; i++) {
            bb_hdr(&b, 3, 0, 1); bb_str(&b, "k"); bb_u32(&b, bad_types[i]); bb_u64(&b, 0);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "unknown value type");
        }
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "k"); bb_u32(&b, GGUF_TYPE_BOOL); bb_u8(&b, 2);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "bool");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, ""); bb_u32(&b, GGUF_TYPE_UINT8); bb_u8(&b, 2);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "empty name");
        bb_hdr(&b, 3, 0, 1); bb_u64(&b, 3); bb_put(&b, "a\0b", 3); bb_u32(&b, GGUF_TYPE_UINT8); bb_u8(&b, 2);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "NUL");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "k"); bb_u32(&b, GGUF_TYPE_UINT64); bb_u32(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "truncated");
        /* control characters in a key stay out of the one-line message */
        bb_hdr(&b, 3, 0, 2); bb_kv_u32(&b, "a\nb", 1); bb_kv_u32(&b, "a\nb", 1);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "duplicate key 'a?b'");
    }
    TEST_END();

    TEST_CASE("kv: arrays");
    {
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_UINT32);
        bb_u64(&b, 1ull << 62); bb_u32(&b, 1);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_FLOAT64);
        bb_u64(&b, 3); bb_u64(&b, 0); bb_u64(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_STRING);
        bb_u64(&b, UINT64_MAX); bb_str(&b, "x");
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_STRING);
        bb_u64(&b, 2); bb_str(&b, "x"); bb_u64(&b, 100); bb_put(&b, "yz", 2);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "past end");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_ARRAY);
        bb_u64(&b, 1); bb_u32(&b, GGUF_TYPE_UINT8); bb_u64(&b, 1); bb_u8(&b, 1);
        EXPECT_ERR(&b, MOE_ERR_UNSUPPORTED, "nested");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, 77); bb_u64(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "unknown type");
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_BOOL);
        bb_u64(&b, 3); bb_u8(&b, 1); bb_u8(&b, 0); bb_u8(&b, 9);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "bool");
    }
    TEST_END();

    TEST_CASE("general.alignment");
    {
        uint32_t bad[] = {0, 3, 48};
        for (int i = 0; i < 3; i++) {
            bb_hdr(&b, 3, 0, 1); bb_kv_u32(&b, "general.alignment", bad[i]);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "general.alignment");
        }
        bb_hdr(&b, 3, 0, 1); bb_str(&b, "general.alignment"); bb_u32(&b, GGUF_TYPE_UINT64); bb_u64(&b, 32);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "general.alignment");
        /* alignment 8: offset 8 is fine, data section at a multiple of 8 */
        bb_hdr(&b, 3, 1, 1); bb_kv_u32(&b, "general.alignment", 8);
        bb_tinfo(&b, "t", 1, &ne4, GGML_TYPE_F32, 8);
        bb_pad(&b, 8);
        for (int i = 0; i < 24; i++) bb_u8(&b, (uint8_t)i);
        gguf_ctx *c = NULL;
        CHECK(gguf_open_buffer(&c, b.p, b.n) == MOE_OK && gguf_alignment(c) == 8, "align 8: %s", moe_last_error());
        const gguf_tensor *t = gguf_find_tensor(c, "t");
        CHECK(t && (const uint8_t *)t->data == b.p + b.n - 16, "align 8 data pointer");
        gguf_close(c);
    }
    TEST_END();

    TEST_CASE("tensor infos");
    {
        bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, 0, 16);
        gguf_ctx *c = NULL;
        CHECK(gguf_open_buffer(&c, b.p, b.n) == MOE_OK, "baseline valid: %s", moe_last_error());
        gguf_close(c);
        bb_one_tensor(&b, "blk.0.attn_q.weight", 4, GGML_TYPE_F32, 0, 15);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "tensor 'blk.0.attn_q.weight' data extends past end of file");
        bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, 32, 40);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "extends past end");
        bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, UINT64_MAX - 31, 40);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "extends past end");
        bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, 4, 64);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "not a multiple of the alignment");
        bb_one_tensor(&b, "mystery", 4, 99, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_UNSUPPORTED, "tensor 'mystery' has unknown type 99");
        bb_one_tensor(&b, "old.q4_2", 32, 4, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_UNSUPPORTED, "old.q4_2");
        bb_one_tensor(&b, "q", 33, GGML_TYPE_Q4_0, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "block size");
        bb_one_tensor(&b, "z", 0, GGML_TYPE_F32, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "invalid size");
        bb_one_tensor(&b, "neg", 1ull << 63, GGML_TYPE_F32, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "invalid size");
        bb_one_tensor(&b, "", 4, GGML_TYPE_F32, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "empty name");
        bb_hdr(&b, 3, 1, 0); bb_u64(&b, 3); bb_put(&b, "a\0b", 3); bb_u32(&b, 1); bb_u64(&b, 4);
        bb_u32(&b, 0); bb_u64(&b, 0); bb_pad(&b, 32); bb_put(&b, ne, 16);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "NUL");
        uint32_t nds[] = {0, 5, 0xFFFFFFFFu};
        for (int i = 0; i < 3; i++) {
            bb_hdr(&b, 3, 1, 0); bb_str(&b, "t"); bb_u32(&b, nds[i]);
            for (int j = 0; j < 8; j++) bb_u64(&b, 1);
            EXPECT_ERR(&b, MOE_ERR_FORMAT, "dimensions");
        }
        /* 2^32 * 2^32 * 2^32 elements: the product overflows */
        ne[0] = ne[1] = ne[2] = 1ull << 32;
        bb_hdr(&b, 3, 1, 0); bb_tinfo(&b, "big", 3, ne, GGML_TYPE_F32, 0); bb_pad(&b, 32); bb_u64(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "overflows");
        /* 2^62 bytes does not overflow but is far past the end */
        ne[0] = 1ull << 30; ne[1] = 1ull << 30;
        bb_hdr(&b, 3, 1, 0); bb_tinfo(&b, "big", 2, ne, GGML_TYPE_F32, 0); bb_pad(&b, 32); bb_u64(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "extends past end");
        bb_hdr(&b, 3, 2, 0);
        bb_tinfo(&b, "same", 1, &ne4, GGML_TYPE_F32, 0);
        bb_tinfo(&b, "same", 1, &ne4, GGML_TYPE_F32, 32);
        bb_pad(&b, 32);
        for (int i = 0; i < 64; i++) bb_u8(&b, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "duplicate tensor name 'same'");
        /* tensor with data but the file stops before the data section */
        bb_hdr(&b, 3, 1, 0); bb_tinfo(&b, "t", 1, &ne4, GGML_TYPE_F32, 0);
        EXPECT_ERR(&b, MOE_ERR_FORMAT, "extends past end");
        /* a long name is cut in the message */
        char longname[300];
        memset(longname, 'n', sizeof longname - 1);
        longname[sizeof longname - 1] = 0;
        bb_one_tensor(&b, longname, 4, 99, 0, 64);
        EXPECT_ERR(&b, MOE_ERR_UNSUPPORTED, "...' has unknown type");
    }
    TEST_END();
    free(b.p);
}

/* ---- every prefix of a valid file, random mutations, allocation failures ---- */
static uint8_t *sample_bytes(size_t *n) {
    char path[512];
    snprintf(path, sizeof path, "%s/trunc.gguf", tmpdir);
    if (write_sample(path, 0) != MOE_OK) return NULL;
    return read_file(path, n);
}

static void test_truncation_and_mutation(void) {
    size_t n = 0;
    uint8_t *full = sample_bytes(&n);
    TEST_CASE("truncated at every byte offset");
    CHECK(full != NULL, "sample: %s", moe_last_error());
    if (full) {
        /* the end of the last tensor's data: shorter prefixes must fail, longer
         * ones only lose trailing padding and stay valid */
        gguf_ctx *c = NULL;
        size_t need = 0;
        CHECK(gguf_open_buffer(&c, full, n) == MOE_OK, "full: %s", moe_last_error());
        for (int i = 0; i < gguf_n_tensors(c); i++) {
            const gguf_tensor *t = gguf_tensor_at(c, i);
            size_t end = (size_t)((const uint8_t *)t->data - full) + t->nbytes;
            if (end > need) need = end;
        }
        gguf_close(c);
        CHECK(need > 0 && need <= n, "need %zu of %zu", need, n);
        size_t before = moe_alloc_in_use();
        int wrong = 0, multi = 0;
        for (size_t len = 0; len < n; len++) {
            uint8_t *p = malloc(len ? len : 1);
            memcpy(p, full, len);
            c = NULL;
            moe_status st = gguf_open_buffer(&c, p, len);
            moe_status want = len < need ? MOE_ERR_FORMAT : MOE_OK;
            if (st != want) {
                if (wrong++ < 5) printf("  prefix %zu: got %d (%s)\n", len, st, moe_last_error());
            }
            if (st && !one_line(moe_last_error())) multi++;
            gguf_close(c);
            free(p);
        }
        CHECK(wrong == 0, "%d prefixes gave the wrong status", wrong);
        CHECK(multi == 0, "%d messages not one line", multi);
        CHECK(moe_alloc_in_use() == before, "leaked %zu bytes", moe_alloc_in_use() - before);
    }
    TEST_END();

    TEST_CASE("random byte mutations fail cleanly or read consistently");
    if (full) {
        moe_rng rng;
        moe_rng_seed(&rng, 1234);
        size_t before = moe_alloc_in_use();
        int bad_status = 0, ok = 0;
        uint8_t *p = malloc(n);
        for (int it = 0; it < 3000; it++) {
            memcpy(p, full, n);
            int flips = 1 + (int)moe_rng_below(&rng, 4);
            for (int f = 0; f < flips; f++) {
                /* mostly the metadata part, where the structure is */
                size_t at = (size_t)moe_rng_below(&rng, it % 4 ? 700 : n) % n;
                switch (moe_rng_below(&rng, 3)) {
                case 0: p[at] ^= (uint8_t)(1u << moe_rng_below(&rng, 8)); break;
                case 1: p[at] = (uint8_t)moe_rng_u64(&rng); break;
                default: p[at] = moe_rng_below(&rng, 2) ? 0xFF : 0; break;
                }
            }
            gguf_ctx *c = NULL;
            moe_status st = gguf_open_buffer(&c, p, n);
            if (st == MOE_OK) {
                ok++;
                /* touch everything the context hands out */
                unsigned sum = 0;
                for (int i = 0; i < gguf_n_tensors(c); i++) {
                    const gguf_tensor *t = gguf_tensor_at(c, i);
                    for (size_t j = 0; j < t->nbytes; j++) sum += ((const uint8_t *)t->data)[j];
                    sum += (unsigned)strlen(t->name);
                    if (gguf_find_tensor(c, t->name) != t) bad_status++;
                }
                for (int i = 0; i < gguf_n_kv(c); i++) {
                    size_t kl; gguf_type kt;
                    const char *k = gguf_key_at(c, i, &kl, &kt);
                    char key[256];
                    if (kl >= sizeof key) continue;
                    memcpy(key, k, kl); key[kl] = 0;
                    gguf_type et; uint64_t cnt; const char *s; size_t sl;
                    if (kt == GGUF_TYPE_ARRAY && gguf_get_arr_info(c, key, &et, &cnt) == MOE_OK &&
                        et == GGUF_TYPE_STRING)
                        for (uint64_t j = 0; j < cnt; j++)
                            if (gguf_get_arr_str(c, key, j, &s, &sl) == MOE_OK)
                                for (size_t q = 0; q < sl; q++) sum += (unsigned char)s[q];
                    if (kt == GGUF_TYPE_STRING && gguf_get_str(c, key, &s, &sl) == MOE_OK)
                        for (size_t q = 0; q < sl; q++) sum += (unsigned char)s[q];
                }
                (void)sum;
                gguf_close(c);
            } else if ((st != MOE_ERR_FORMAT && st != MOE_ERR_UNSUPPORTED) || c != NULL ||
                       !one_line(moe_last_error())) {
                if (bad_status++ < 5) printf("  mutation %d: status %d (%s)\n", it, st, moe_last_error());
            }
        }
        free(p);
        CHECK(bad_status == 0, "%d unexpected results", bad_status);
        CHECK(ok > 0 && ok < 3000, "%d of 3000 mutants opened", ok);
        CHECK(moe_alloc_in_use() == before, "leaked %zu bytes", moe_alloc_in_use() - before);
    }
    TEST_END();

    TEST_CASE("allocation failures while reading and writing");
    if (full) {
        size_t before = moe_alloc_in_use();
        int opened = 0, wrong = 0;
        for (long k = 1; k < 200 && !opened; k++) {
            gguf_ctx *c = NULL;
            moe_alloc_fail_after(k);
            moe_status st = gguf_open_buffer(&c, full, n);
            moe_alloc_fail_after(0);
            if (st == MOE_OK) opened = 1;
            else if (st != MOE_ERR_NOMEM || c) wrong++;
            gguf_close(c);
            if (moe_alloc_in_use() != before) wrong++;
        }
        CHECK(opened && wrong == 0, "reader: opened %d, wrong %d", opened, wrong);
        char path[512];
        snprintf(path, sizeof path, "%s/oom.gguf", tmpdir);
        int written = 0;
        wrong = 0;
        for (long k = 1; k < 400 && !written; k++) {
            moe_alloc_fail_after(k);
            gguf_writer *w = gguf_writer_create();
            moe_status st = MOE_ERR_NOMEM;
            if (w) {
                fill_sample(w, 0);
                st = gguf_write_file(w, path);
            }
            moe_alloc_fail_after(0);
            gguf_writer_free(w);
            if (st == MOE_OK) written = 1;
            else if (st != MOE_ERR_NOMEM) wrong++;
            if (moe_alloc_in_use() != before) wrong++;
        }
        CHECK(written && wrong == 0, "writer: written %d, wrong %d", written, wrong);
        gguf_ctx *c = NULL;
        CHECK(gguf_open(&c, path) == MOE_OK && gguf_n_tensors(c) == SAMPLE_NT, "reopen after oom loop");
        if (c) check_sample(c, 32);
        gguf_close(c);
    }
    TEST_END();
    free(full);
}

/* ---- seed files for a fuzzer (tests/fuzz/gguf/) ---- */
static int write_seeds(const char *dir) {
    char path[1024];
    int bad = 0;
    bb b = {0};
    uint64_t ne4 = 4, nested_n = 1;
#define SEED(name) (snprintf(path, sizeof path, "%s/%s", dir, name), bad |= write_file(path, b.p, b.n))
    /* a small valid file: a few kv types, a string array, two tensors */
    {
        gguf_writer *w = gguf_writer_create();
        const char *toks[] = {"a", "b", "ab"};
        float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        int64_t ne[] = {4, 2}, ne1[] = {3};
        gguf_set_str(w, "general.architecture", "moe", 3);
        gguf_set_u32(w, "moe.block_count", 2);
        gguf_set_f32(w, "moe.rope.freq_base", 10000.0f);
        gguf_set_bool(w, "moe.flag", 1);
        gguf_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 3);
        gguf_set_arr_data(w, "moe.ints", GGUF_TYPE_INT32, (int32_t[]){1, -2, 3}, 3);
        gguf_add_tensor(w, "token_embd.weight", GGML_TYPE_F32, 2, ne, x);
        gguf_add_tensor(w, "output_norm.weight", GGML_TYPE_F32, 1, ne1, x);
        snprintf(path, sizeof path, "%s/valid.gguf", dir);
        bad |= gguf_write_file(w, path) != MOE_OK;
        gguf_writer_free(w);
        size_t n = 0;
        free(b.p);
        b.p = read_file(path, &n);
        b.n = b.cap = n;
        if (!b.p) return 1;
        b.n = n / 2;
        SEED("truncated.gguf");
        b.n = n;
        b.p[0] = 'X';
        SEED("bad_magic.gguf");
        b.p[0] = 'G';
    }
    bb_hdr(&b, 3, 0, 0); SEED("empty_v3.gguf");
    bb_hdr(&b, 3, 0, UINT64_MAX); SEED("huge_kv_count.gguf");
    bb_hdr(&b, 3, 0, 2); bb_kv_u32(&b, "dup", 1); bb_kv_u32(&b, "dup", 2); SEED("dup_key.gguf");
    bb_hdr(&b, 3, 0, 1); bb_str(&b, "a"); bb_u32(&b, GGUF_TYPE_ARRAY); bb_u32(&b, GGUF_TYPE_ARRAY);
    bb_u64(&b, nested_n); bb_u32(&b, GGUF_TYPE_UINT8); bb_u64(&b, 1); bb_u8(&b, 1); SEED("nested_array.gguf");
    bb_hdr(&b, 3, 0, 1); bb_str(&b, "s"); bb_u32(&b, GGUF_TYPE_STRING); bb_u64(&b, 1000); bb_put(&b, "abc", 3);
    SEED("string_past_end.gguf");
    bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, 32, 40); SEED("offset_past_end.gguf");
    bb_one_tensor(&b, "t", 4, GGML_TYPE_F32, 4, 64); SEED("misaligned.gguf");
    bb_one_tensor(&b, "t", 4, 99, 0, 64); SEED("unknown_tensor_type.gguf");
    bb_hdr(&b, 3, 2, 0); bb_tinfo(&b, "same", 1, &ne4, GGML_TYPE_F32, 0);
    bb_tinfo(&b, "same", 1, &ne4, GGML_TYPE_F32, 32); bb_pad(&b, 32);
    for (int i = 0; i < 64; i++) bb_u8(&b, 0);
    SEED("dup_tensor.gguf");
    /* the K-quant types, two rows of one super-block each (bytes random:
     * the reader checks sizes only), and a Q5_K row of half a block */
    {
        static const int kt[] = {GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
        static const size_t kb[] = {144, 176, 210}; /* bytes per 256-element block */
        static const char *kn[] = {"blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight", "output.weight"};
        uint64_t ne2[] = {256, 2}, off = 0, half[] = {128, 2};
        bb_hdr(&b, 3, 3, 0);
        for (int i = 0; i < 3; i++) {
            bb_tinfo(&b, kn[i], 2, ne2, kt[i], off);
            off += (2 * kb[i] + 31) / 32 * 32;
        }
        bb_pad(&b, 32);
        for (uint64_t i = 0; i < off; i++) bb_u8(&b, (uint8_t)(i * 37 + 11));
        SEED("kquant_tensors.gguf");
        bb_hdr(&b, 3, 1, 0);
        bb_tinfo(&b, "t", 2, half, GGML_TYPE_Q5_K, 0);
        bb_pad(&b, 32);
        for (int i = 0; i < 2 * 176; i++) bb_u8(&b, (uint8_t)i);
        SEED("kquant_partial_block.gguf");
    }
#undef SEED
    free(b.p);
    return bad;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write-seeds")) {
        mkdir(argv[2], 0755); /* may exist already */
        fill_sample_data();
        int bad = write_seeds(argv[2]);
        printf("seeds %s\n", bad ? "FAILED" : "written");
        return bad;
    }
    if (!mkdtemp(tmpdir)) {
        printf("cannot create temp dir: %s\n", strerror(errno));
        return 1;
    }
    fill_sample_data();
    test_round_trip();
    test_atomic();
    test_open_errors();
    test_truncation_and_mutation();
    /* clean up the temp dir (best effort) */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) printf("note: could not remove %s\n", tmpdir);
    TEST_MAIN_END();
}
