/* test_quant: the element-type table, fp16/bf16 conversions, dequantisation
 * against hand-computed blocks, quantiser round trips within derived bounds,
 * llama.cpp's activation conversion on hand cases (ties, zero blocks, sign of
 * the Q8_K scale), dot products against this file's own decoding of the
 * bytes, qmatmul against its reference twin and across thread counts, and
 * GGUF write/read of quantised tensors. */
#include "harness.h"
#include "core/core.h"
#include "core/dtype.h"
#include "io/gguf.h"
#include "kernels/kernels.h"
#include "kernels/qmatmul.h"

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

static const int weight_types[] = {DT_F32, DT_F16, DT_BF16, DT_Q4_0, DT_Q8_0,
                                   DT_Q4_K, DT_Q5_K, DT_Q6_K};
#define N_WEIGHT_TYPES (int)(sizeof weight_types / sizeof weight_types[0])

static uint16_t h16(float f) { return dtype_f32_to_f16(f); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static float f32_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* starts the case "<what> <type name>..." for one type of a loop over types */
static const dtype_traits *type_case(const char *what, int type, const char *rest) {
    static char name[128];
    const dtype_traits *t = dtype_traits_of(type);
    snprintf(name, sizeof name, "%s %s: %s", what, t->name, rest);
    TEST_CASE(name);
    return t;
}

static void fill_normal(float *x, int n, float scale, moe_rng *r) {
    for (int i = 0; i < n; i++) x[i] = scale * moe_rng_normal(r);
}

/* ------------------------------------------------------------------------ */
static void test_table(void) {
    TEST_CASE("table: block sizes, names, usable types, GGML_TYPE aliases");
    struct { int t, blck; size_t bytes; const char *name; } want[] = {
        {DT_F32, 1, 4, "f32"}, {DT_F16, 1, 2, "f16"}, {DT_BF16, 1, 2, "bf16"},
        {DT_Q4_0, 32, 18, "q4_0"}, {DT_Q4_1, 32, 20, "q4_1"}, {DT_Q5_0, 32, 22, "q5_0"},
        {DT_Q5_1, 32, 24, "q5_1"}, {DT_Q8_0, 32, 34, "q8_0"}, {DT_Q8_1, 32, 36, "q8_1"},
        {DT_Q2_K, 256, 84, "q2_K"}, {DT_Q3_K, 256, 110, "q3_K"}, {DT_Q4_K, 256, 144, "q4_K"},
        {DT_Q5_K, 256, 176, "q5_K"}, {DT_Q6_K, 256, 210, "q6_K"}, {DT_Q8_K, 256, 292, "q8_K"},
        {DT_IQ4_NL, 32, 18, "iq4_nl"}, {DT_IQ4_XS, 256, 136, "iq4_xs"}, {DT_MXFP4, 32, 17, "mxfp4"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const dtype_traits *t = dtype_traits_of(want[i].t);
        CHECK(t && t->blck == want[i].blck && t->block_bytes == want[i].bytes &&
                  !strcmp(t->name, want[i].name) && !strcmp(dtype_name(want[i].t), want[i].name),
              "type %d", want[i].t);
    }
    for (int i = 0; i < N_WEIGHT_TYPES; i++)
        CHECK(dtype_usable(weight_types[i]), "%s usable", dtype_name(weight_types[i]));
    CHECK(!dtype_usable(DT_Q8_K) && !dtype_usable(DT_Q4_1) && !dtype_usable(DT_Q2_K) &&
              !dtype_usable(-1) && !dtype_usable(DT_COUNT), "unusable types");
    CHECK(!dtype_traits_of(4) && !dtype_traits_of(5) && !dtype_traits_of(31) && !dtype_traits_of(-3) &&
              !dtype_traits_of(DT_COUNT) && !dtype_traits_of(1000), "numbers naming no type");
    CHECK(!strcmp(dtype_name(42), "type 42") && !strcmp(dtype_name(-1), "type -1"), "unknown names");
    struct { int dt, dot; } dots[] = {{DT_F32, DT_F32}, {DT_F16, DT_F16}, {DT_BF16, DT_BF16},
                                      {DT_Q4_0, DT_Q8_0}, {DT_Q8_0, DT_Q8_0}, {DT_Q4_K, DT_Q8_K},
                                      {DT_Q5_K, DT_Q8_K}, {DT_Q6_K, DT_Q8_K}};
    for (size_t i = 0; i < sizeof dots / sizeof dots[0]; i++)
        CHECK(dtype_traits_of(dots[i].dt)->dot_type == dots[i].dot, "dot type of %s",
              dtype_name(dots[i].dt));
    CHECK((int)GGML_TYPE_Q4_K == (int)DT_Q4_K && (int)GGML_TYPE_Q6_K == (int)DT_Q6_K &&
              (int)GGML_TYPE_BF16 == (int)DT_BF16 && (int)GGML_TYPE_Q8_0 == (int)DT_Q8_0 &&
              (int)GGML_TYPE_Q8_K == (int)DT_Q8_K, "one numbering");
    TEST_END();

    TEST_CASE("dtype_row_bytes: whole blocks, overflow, unknown types");
    size_t b = 7;
    CHECK(dtype_row_bytes(DT_Q4_K, 512, &b) == 0 && b == 288, "q4_K 512 -> %zu", b);
    CHECK(dtype_row_bytes(DT_Q8_0, 96, &b) == 0 && b == 102, "q8_0 96 -> %zu", b);
    CHECK(dtype_row_bytes(DT_F16, 3, &b) == 0 && b == 6, "f16 3");
    CHECK(dtype_row_bytes(DT_Q6_K, 0, &b) == 0 && b == 0, "zero elements");
    b = 7;
    CHECK(dtype_row_bytes(DT_Q4_K, 300, &b) == -1 && b == 7, "300 is not whole q4_K blocks");
    CHECK(dtype_row_bytes(DT_Q8_0, 33, &b) == -1, "33 is not whole q8_0 blocks");
    CHECK(dtype_row_bytes(DT_F32, -4, &b) == -1, "negative count");
    CHECK(dtype_row_bytes(4, 32, &b) == -1 && dtype_row_bytes(99, 32, &b) == -1, "unknown type");
    CHECK(dtype_row_bytes(DT_F64, INT64_MAX / 4, &b) == -1, "f64 size past INT64_MAX");
    CHECK(dtype_row_bytes(DT_Q8_K, (INT64_MAX / 256) * 256, &b) == -1, "q8_K size overflows");
    CHECK(dtype_row_bytes(DT_F32, ((int64_t)1 << 61) - 1, &b) == 0 &&
              b == (((size_t)1 << 61) - 1) * 4, "largest f32 size that fits");
    CHECK(dtype_row_bytes(DT_F32, (int64_t)1 << 62, &b) == -1, "f32 2^62 overflows");
    TEST_END();
}

/* ------------------------------------------------------------------------ */
static void test_fp16_bf16(void) {
    TEST_CASE("fp16: round to nearest even, overflow, subnormals, NaN (hand cases)");
    struct { uint32_t f; uint16_t h; } c[] = {
        {0x3f800000u, 0x3c00}, {0xbf800000u, 0xbc00}, {0x00000000u, 0x0000}, {0x80000000u, 0x8000},
        {0x477fe000u, 0x7bff},                      /* 65504, the largest half          */
        {0x477fefffu, 0x7bff}, {0x477ff000u, 0x7c00}, /* 65520 ties up to inf             */
        {0x7f800000u, 0x7c00}, {0xff800000u, 0xfc00},
        {0x3f801000u, 0x3c00},                      /* 1 + 2^-11: tie, to even 1.0       */
        {0x3f803000u, 0x3c02},                      /* 1 + 3 * 2^-11: tie, up to even   */
        {0x3f801001u, 0x3c01},                      /* just above the tie                */
        {0x38800000u, 0x0400},                      /* 2^-14, the smallest normal        */
        {0x33800000u, 0x0001},                      /* 2^-24, the smallest subnormal     */
        {0x33000000u, 0x0000},                      /* 2^-25: tie, to even zero          */
        {0x33000001u, 0x0001},                      /* above it                          */
        {0x33c00000u, 0x0002},                      /* 1.5 * 2^-24: tie, to even 2       */
        {0x38000000u, 0x0200},                      /* 2^-15                             */
        {0x387fc000u, 0x03ff},                      /* 1023 * 2^-24, the largest subnormal */
        {0x387fe000u, 0x0400},                      /* 1023.5 * 2^-24: tie, up into normals */
        {0x7fc00000u, 0x7e00}, {0x7f800001u, 0x7e00}, /* NaNs quiet                        */
        {0xffc02000u, 0xfe01},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        CHECK(dtype_f32_to_f16(f32_of(c[i].f)) == c[i].h, "%08x -> %04x, want %04x", c[i].f,
              dtype_f32_to_f16(f32_of(c[i].f)), c[i].h);
    CHECK(dtype_f16_to_f32(0x3c00) == 1.0f && dtype_f16_to_f32(0xc000) == -2.0f &&
              dtype_f16_to_f32(0x7bff) == 65504.0f && dtype_f16_to_f32(0x0001) == 0x1p-24f &&
              dtype_f16_to_f32(0x83ff) == -0x3ffp-24f && isinf(dtype_f16_to_f32(0x7c00)) &&
              isnan(dtype_f16_to_f32(0x7e00)) && bits_of(dtype_f16_to_f32(0x8000)) == 0x80000000u,
          "half to float");
    TEST_END();

#ifdef __F16C__
    TEST_CASE("fp16: equals the F16C instructions (all halves, 2M floats)");
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float hw = _cvtsh_ss((unsigned short)h), sw = dtype_f16_to_f32((uint16_t)h);
        if (bits_of(hw) != bits_of(sw)) bad++;
    }
    moe_rng r;
    moe_rng_seed(&r, 11);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)moe_rng_u64(&r);
        if (i & 1) u = (u & 0x8fffffffu) | 0x30000000u; /* bias towards the half range */
        float f = f32_of(u);
        if (_cvtss_sh(f, 0) != dtype_f32_to_f16(f)) bad++;
    }
    CHECK(bad == 0, "%d differences", bad);
    TEST_END();
#endif

    TEST_CASE("bf16: nearest even, subnormals kept, NaN quiet (hand cases)");
    struct { uint32_t f; uint16_t h; } b[] = {
        {0x3f800000u, 0x3f80}, {0x3f808000u, 0x3f80}, /* tie to even */
        {0x3f818000u, 0x3f82}, {0x3f808001u, 0x3f81},
        {0x00012345u, 0x0001},                      /* subnormal kept, not flushed */
        {0x80018000u, 0x8002}, {0x7f800000u, 0x7f80}, {0x7f7fffffu, 0x7f80}, /* rounds to inf */
        {0x7f800001u, 0x7fc0}, {0xff812345u, 0xffc1},
    };
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++)
        CHECK(dtype_f32_to_bf16(f32_of(b[i].f)) == b[i].h, "%08x -> %04x, want %04x", b[i].f,
              dtype_f32_to_bf16(f32_of(b[i].f)), b[i].h);
    CHECK(dtype_bf16_to_f32(0xc040) == -3.0f && dtype_bf16_to_f32(0x3f80) == 1.0f, "bf16 to float");
    TEST_END();
}

/* ------------------------------------------------------------------------ */
/* dequantisation of hand-made blocks                                         */

/* sc = {1,2,3,4,17,33,50,63}, m = {0,1,2,3,20,40,60,63}, packed by hand:
 * bytes 0-3: sc0-3 | top2(sc4-7) << 6; bytes 4-7: m0-3 | top2(m4-7) << 6;
 * bytes 8-11: low4(sc4-7) | low4(m4-7) << 4 */
static const uint8_t k_scales[12] = {0x41, 0x82, 0xC3, 0xC4, 0x40, 0x81, 0xC2, 0xC3,
                                     0x41, 0x81, 0xC2, 0xFF};

static int same_floats(const float *a, const float *b, int n, int *at) {
    for (int i = 0; i < n; i++)
        if (bits_of(a[i]) != bits_of(b[i]) && !(a[i] == 0 && b[i] == 0)) { *at = i; return 0; }
    return 1;
}

static void test_dequant(void) {
    float y[256], want[256];
    int at = -1;

    TEST_CASE("to_float: q4_0 and q8_0 hand blocks");
    {
        uint8_t b[18];
        put16(b, 0x3800); /* 0.5 */
        for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(j | ((15 - j) << 4));
        /* element j: (j - 8) / 2; element 16 + j: (7 - j) / 2 */
        for (int j = 0; j < 16; j++) want[j] = (j - 8) * 0.5f, want[16 + j] = (7 - j) * 0.5f;
        dtype_traits_of(DT_Q4_0)->to_float(y, b, 32);
        CHECK(same_floats(y, want, 32, &at), "q4_0 element %d: %g vs %g", at, y[at], want[at]);
        CHECK(y[0] == -4.0f && y[15] == 3.5f && y[16] == 3.5f && y[31] == -4.0f, "q4_0 corners");
        uint8_t c[34];
        put16(c, 0xb400); /* -0.25 */
        const int8_t q[8] = {-128, 127, 0, 1, -1, 64, -64, 100};
        memset(c + 2, 0, 32);
        for (int j = 0; j < 8; j++) c[2 + j] = (uint8_t)q[j];
        dtype_traits_of(DT_Q8_0)->to_float(y, c, 32);
        CHECK(y[0] == 32.0f && y[1] == -31.75f && y[2] == 0 && y[3] == -0.25f && y[4] == 0.25f &&
                  y[5] == -16.0f && y[6] == 16.0f && y[7] == -25.0f && y[31] == 0, "q8_0 values");
    }
    TEST_END();

    TEST_CASE("to_float: q4_K hand block (6-bit scales with high bits, mins)");
    {
        uint8_t b[144];
        put16(b, 0x3c00);     /* d = 1 */
        put16(b + 2, 0x3800); /* dmin = 0.5 */
        memcpy(b + 4, k_scales, 12);
        memset(b + 16, 0xF0, 128); /* low nibbles 0, high nibbles 15 */
        /* sub-block j: even j take the low nibble (q = 0): -0.5 m_j; odd j the
         * high nibble (q = 15): 15 sc_j - 0.5 m_j */
        const float sb[8] = {0, 15 * 2 - 0.5f, -1, 15 * 4 - 1.5f, -10, 15 * 33 - 20, -30, 15 * 63 - 31.5f};
        for (int e = 0; e < 256; e++) want[e] = sb[e / 32];
        dtype_traits_of(DT_Q4_K)->to_float(y, b, 256);
        CHECK(same_floats(y, want, 256, &at), "element %d: %g vs %g", at, y[at], want[at]);
        /* nibble placement: byte 32c + l holds elements 64c + l (low) and 64c + 32 + l (high) */
        memset(b + 16, 0, 128);
        b[16 + 32 * 2 + 5] = 0x73; /* chunk 2: element 133 low = 3 (sb 4), element 165 high = 7 (sb 5) */
        dtype_traits_of(DT_Q4_K)->to_float(y, b, 256);
        CHECK(y[133] == 3 * 17 - 10 && y[165] == 7 * 33 - 20 && y[132] == -10 && y[166] == -20 &&
                  y[5] == 0, "nibble placement: %g %g", y[133], y[165]);
    }
    TEST_END();

    TEST_CASE("to_float: q5_K hand block (fifth bit)");
    {
        uint8_t b[176];
        put16(b, 0x3c00);
        put16(b + 2, 0x3800);
        memcpy(b + 4, k_scales, 12);
        memset(b + 16, 0x55, 32);   /* qh: bits 0, 2, 4, 6: the even sub-blocks get +16 */
        memset(b + 48, 0xF0, 128);
        const float sb[8] = {16 * 1 - 0.0f, 15 * 2 - 0.5f, 16 * 3 - 1, 15 * 4 - 1.5f,
                             16 * 17 - 10, 15 * 33 - 20, 16 * 50 - 30, 15 * 63 - 31.5f};
        for (int e = 0; e < 256; e++) want[e] = sb[e / 32];
        dtype_traits_of(DT_Q5_K)->to_float(y, b, 256);
        CHECK(same_floats(y, want, 256, &at), "element %d: %g vs %g", at, y[at], want[at]);
        memset(b + 16, 0, 32);
        b[16 + 9] = 0x80; /* bit 7 of qh[9]: element 64*3 + 32 + 9 = 233 */
        memset(b + 48, 0, 128);
        dtype_traits_of(DT_Q5_K)->to_float(y, b, 256);
        CHECK(y[233] == 16 * 63 - 31.5f && y[232] == -31.5f && y[201] == -30, "qh bit 7: %g", y[233]);
    }
    TEST_END();

    TEST_CASE("to_float: q6_K hand blocks (signed scales, 2 high bits)");
    {
        uint8_t b[210];
        memset(b, 0, 192); /* ql, qh zero: q = -32 */
        for (int j = 0; j < 16; j++) b[192 + j] = (uint8_t)(int8_t)(j - 8);
        put16(b + 208, 0x3800); /* d = 0.5 */
        /* 0.5 * (j - 8) * (-32) = 128 - 16 j for sub-block j = e / 16 */
        for (int e = 0; e < 256; e++) want[e] = 128.0f - 16.0f * (float)(e / 16);
        dtype_traits_of(DT_Q6_K)->to_float(y, b, 256);
        CHECK(same_floats(y, want, 256, &at), "zeros: element %d: %g vs %g", at, y[at], want[at]);
        memset(b, 0xFF, 192); /* q = 63 - 32 = 31 */
        for (int e = 0; e < 256; e++) want[e] = 0.5f * (float)(e / 16 - 8) * 31.0f;
        dtype_traits_of(DT_Q6_K)->to_float(y, b, 256);
        CHECK(same_floats(y, want, 256, &at), "ones: element %d: %g vs %g", at, y[at], want[at]);
        /* ql = 0x21, qh = 0b11100100, scales 1, d = 1: in each half, elements
         * l, l+32, l+64, l+96 are (1|0<<4), (1|1<<4), (2|2<<4), (2|3<<4) - 32 */
        memset(b, 0x21, 128);
        memset(b + 128, 0xE4, 64);
        memset(b + 192, 1, 16);
        put16(b + 208, 0x3c00);
        for (int e = 0; e < 256; e++) {
            const float v[4] = {-31, -15, 2, 18};
            want[e] = v[(e % 128) / 32];
        }
        dtype_traits_of(DT_Q6_K)->to_float(y, b, 256);
        CHECK(same_floats(y, want, 256, &at), "mixed: element %d: %g vs %g", at, y[at], want[at]);
    }
    TEST_END();

    TEST_CASE("to_float: q8_K, f16, bf16 hand rows");
    {
        dtype_q8_K_block k;
        memset(&k, 0, sizeof k);
        k.d = -0.5f;
        for (int e = 0; e < 256; e++) k.qs[e] = (int8_t)(e - 128);
        dtype_traits_of(DT_Q8_K)->to_float(y, &k, 256);
        CHECK(y[0] == 64.0f && y[128] == 0 && y[255] == -63.5f, "q8_K");
        uint8_t h[8] = {0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00};
        dtype_traits_of(DT_F16)->to_float(y, h, 4);
        CHECK(y[0] == 1 && y[1] == -2 && y[2] == 65504 && y[3] == 0x1p-24f, "f16");
        uint8_t g[4] = {0x80, 0x3f, 0x40, 0xc0};
        dtype_traits_of(DT_BF16)->to_float(y, g, 2);
        CHECK(y[0] == 1 && y[1] == -3, "bf16");
    }
    TEST_END();
}

/* ------------------------------------------------------------------------ */
/* weight quantiser round trips within bounds derived from the data alone    */

/* The largest error quantiser `type` may make on element i of x (n elements,
 * one row), from the format and the quantiser's stated rounding. */
static double err_bound(int type, const float *x, int i) {
    const double tiny = 0x1p-24; /* fp16's smallest step: the scales' floor */
    const double f16_rel = 0x1p-11, eps = 0x1p-22;
    int blk = dtype_traits_of(type)->blck, b0 = i / blk * blk;
    double amax = 0, maxv = 0;
    for (int j = b0; j < b0 + blk; j++)
        if (fabs(x[j]) > amax) amax = fabs(x[j]), maxv = x[j];
    double ax = fabs(x[i]);
    switch (type) {
    case DT_F32: return 0;
    case DT_F16: return ax >= 65520 ? INFINITY : ax * f16_rel + tiny / 2; /* overflow: inf */
    case DT_BF16: return ax * 0x1p-8;
    case DT_Q8_0: { /* q = round(x / d), d = amax / 127, value q * fp16(d) */
        double d = amax / 127, dh_err = fmax(d * f16_rel, tiny / 2);
        return d / 2 + 127 * dh_err + (ax + d) * eps;
    }
    case DT_Q4_0: { /* q - 8 = trunc(x / d + 8.5) - 8 capped at 7, d = max / -8 */
        double d = maxv / -8, ad = fabs(d), dh_err = fmax(ad * f16_rel, tiny / 2);
        double t = d != 0 ? x[i] / d : 0;
        return (t > 7.5 ? ad : ad / 2) + 8 * dh_err + (ax + ad) * eps;
    }
    case DT_Q4_K: case DT_Q5_K: { /* error <= dd_j / 2, dd_j < (range'_j + dmin) / qmax + d */
        double qmax = type == DT_Q4_K ? 15 : 31;
        int s0 = i / 32 * 32;
        double lo = 0, hi = -INFINITY;
        for (int j = s0; j < s0 + 32; j++) lo = fmin(lo, x[j]), hi = fmax(hi, x[j]);
        double dmin = amax / 63 * (1 + 2 * f16_rel) + tiny;
        double d = (2 * amax + dmin) / qmax / 63 * (1 + 2 * f16_rel) + tiny;
        double dd = (hi - lo + dmin) / qmax + d;
        return dd / 2 * (1 + eps) + (amax + dd) * 4 * eps;
    }
    case DT_Q6_K: { /* error <= dd_j / 2, dd_j < amax_j / 31 + d */
        int s0 = i / 16 * 16;
        double a = 0;
        for (int j = s0; j < s0 + 16; j++) a = fmax(a, fabs(x[j]));
        double d = amax / 31 / 127 * (1 + 2 * f16_rel) + tiny;
        double dd = a / 31 + d;
        return dd / 2 * (1 + eps) + (amax + dd) * 4 * eps;
    }
    }
    return -1;
}

static void test_round_trips(void) {
    enum { N = 2048 };
    static float x[N], y[N];
    static uint8_t q[N * 4];
    moe_rng r;
    moe_rng_seed(&r, 5);
    for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        int type = weight_types[ti];
        const dtype_traits *t = type_case("round trip", type, "random, zero, huge, tiny, one-signed");
        /* eight 256-element regions of different character */
        fill_normal(x, N, 1.0f, &r);
        memset(x + 256, 0, 256 * sizeof(float));                         /* zero blocks     */
        for (int i = 512; i < 768; i++) x[i] *= 1e5f;                      /* huge            */
        for (int i = 768; i < 1024; i++) x[i] *= 1e-6f;                    /* tiny            */
        for (int i = 1024; i < 1280; i++) x[i] = fabsf(x[i]) + 3.0f;       /* all positive    */
        for (int i = 1280; i < 1536; i++) x[i] = -fabsf(x[i]) - 0.5f;      /* all negative    */
        for (int i = 1536; i < 1792; i++) x[i] = (i % 7 == 0) ? 50.0f : x[i] * 0.01f; /* spikes */
        x[1800] = 0; /* and a lone zero among normals */
        t->from_float(q, x, N);
        t->to_float(y, q, N);
        int bad = 0;
        double worst = 0;
        for (int i = 0; i < N; i++) {
            double e = fabs((double)y[i] - x[i]), bnd = err_bound(type, x, i);
            if (!(e <= bnd)) {
                if (bad++ < 3) printf("  element %d: x %g y %g err %g bound %g\n", i, x[i], y[i], e, bnd);
            }
            if (bnd > 0) worst = fmax(worst, e / bnd);
        }
        CHECK(bad == 0, "%d elements over the bound", bad);
        for (int i = 256; i < 512; i++) CHECK(y[i] == 0, "zero block element %d is %g", i, y[i]);
        if (type == DT_F16)
            for (int i = 512; i < 768; i++)
                if (fabsf(x[i]) >= 65520) CHECK(isinf(y[i]) && (y[i] > 0) == (x[i] > 0), "f16 overflow");
        if (type != DT_F32) CHECK(worst > 0.05, "bound far from tight (%.3f): suspicious", worst);
        TEST_END();
    }
}

/* ------------------------------------------------------------------------ */
/* activation conversion                                                      */

static void test_quantize_act(void) {
    const dtype_traits *q80 = dtype_traits_of(DT_Q8_0), *q8k = dtype_traits_of(DT_Q8_K);

    TEST_CASE("q8_0 act: nearest-even ties, 127/amax multiplier, fp16 d, zero block");
    {
        float x[64] = {0};
        /* block 0: amax 127 -> multiplier 1; ties 2.5 -> 2, -2.5 -> -2, 0.5 -> 0,
         * 1.5 -> 2, -3.5 -> -4 (roundf would give 3, -3, 1, 2, -4) */
        float v[] = {127, 2.5f, -2.5f, 0.5f, 1.5f, -3.5f, 126.4f, -127, 0.49f};
        memcpy(x, v, sizeof v);
        /* block 1 stays zero */
        uint8_t b[68];
        memset(b, 0xAA, sizeof b);
        q80->quantize_act(b, x, 64);
        int8_t *qs = (int8_t *)(b + 2);
        CHECK(get16(b) == 0x3c00, "d = 1 (fp16 %04x)", get16(b));
        CHECK(qs[0] == 127 && qs[1] == 2 && qs[2] == -2 && qs[3] == 0 && qs[4] == 2 && qs[5] == -4 &&
                  qs[6] == 126 && qs[7] == -127 && qs[8] == 0 && qs[9] == 0,
              "quants %d %d %d %d %d %d %d %d %d", qs[0], qs[1], qs[2], qs[3], qs[4], qs[5], qs[6],
              qs[7], qs[8]);
        int zero = get16(b + 34) == 0;
        for (int j = 0; j < 32; j++) zero &= b[36 + j] == 0;
        CHECK(zero, "zero block: d 0, quants 0");
        /* amax 3: d = fp16(3/127), multiplier 127/3 (not 1/fp16(d)):
         * x = 1 -> 42.333 -> 42; x = -1.5 -> -63.5 -> tie -> -64 */
        float w[32] = {3, 1, -1.5f};
        q80->quantize_act(b, w, 32);
        CHECK(get16(b) == h16(3.0f / 127.0f) && qs[0] == 127 && qs[1] == 42 && qs[2] == -64,
              "amax 3: d %04x q %d %d %d", get16(b), qs[0], qs[1], qs[2]);
        /* multiplier 127/amax differs from 1/d: amax = 0.7, x = 0.35 gives exactly 63.5 * (1 +- ulp) */
        for (int j = 0; j < 32; j++) w[j] = 0.7f * (float)(j - 16) / 16.0f;
        q80->quantize_act(b, w, 32);
        int ok = 1;
        float id = 127.0f / 0.7f;
        for (int j = 0; j < 32; j++) ok &= qs[j] == (int8_t)lrintf(w[j] * id);
        CHECK(ok, "quants = nearest-even(x * (127 / amax))");
    }
    TEST_END();

    TEST_CASE("q8_K act: sign of d, nearest-even ties, bsums, zero block");
    {
        static float x[512];
        memset(x, 0, sizeof x);
        /* block 0: largest magnitude is negative (-127): iscale = -127/-127 = 1,
         * d = 1; ties 2.5 -> 2, -3.5 -> -4, 0.5 -> 0 */
        x[0] = 2.5f, x[1] = -3.5f, x[2] = 0.5f, x[3] = -127, x[4] = 127, x[17] = 10, x[255] = -1;
        /* block 1: largest magnitude positive (64): iscale = -127/64, d = -64/127,
         * and the largest element maps to -127 */
        x[256] = 64, x[257] = -32, x[258] = 1, x[511] = -64;
        dtype_q8_K_block b[3];
        memset(b, 0x55, sizeof b);
        q8k->quantize_act(b, x, 512);
        CHECK(b[0].d == 1.0f, "block 0 d %g", b[0].d);
        CHECK(b[0].qs[0] == 2 && b[0].qs[1] == -4 && b[0].qs[2] == 0 && b[0].qs[3] == -127 &&
                  b[0].qs[4] == 127 && b[0].qs[17] == 10 && b[0].qs[255] == -1 && b[0].qs[5] == 0,
              "block 0 quants %d %d %d %d %d", b[0].qs[0], b[0].qs[1], b[0].qs[2], b[0].qs[3],
              b[0].qs[4]);
        CHECK(b[0].bsums[0] == 2 - 4 + 0 - 127 + 127 && b[0].bsums[1] == 10 && b[0].bsums[15] == -1 &&
                  b[0].bsums[7] == 0, "block 0 bsums %d %d %d", b[0].bsums[0], b[0].bsums[1],
              b[0].bsums[15]);
        float is = -127.0f / 64.0f;
        CHECK(b[1].d == 1.0f / is && b[1].d < 0, "block 1 d %g", b[1].d);
        /* -32 * -127/64 = 63.5: a tie, to even 64; 1 * -127/64 = -1.98 -> -2;
         * -64 -> 127 (the cap is 127; nothing reaches 128) */
        CHECK(b[1].qs[0] == -127 && b[1].qs[1] == 64 && b[1].qs[2] == -2 && b[1].qs[255] == 127,
              "block 1 quants %d %d %d %d", b[1].qs[0], b[1].qs[1], b[1].qs[2], b[1].qs[255]);
        CHECK(b[1].bsums[0] == -127 + 64 - 2 && b[1].bsums[15] == 127, "block 1 bsums");
        float z[256] = {0};
        q8k->quantize_act(&b[2], z, 256);
        int zero = b[2].d == 0;
        for (int j = 0; j < 256; j++) zero &= b[2].qs[j] == 0;
        for (int g = 0; g < 16; g++) zero &= b[2].bsums[g] == 0;
        CHECK(zero, "zero block: d, quants and bsums 0");
        /* on random data: every bsum is the sum of its 16 quants, |q| <= 127 */
        moe_rng r;
        moe_rng_seed(&r, 3);
        fill_normal(x, 512, 2.0f, &r);
        q8k->quantize_act(b, x, 512);
        int ok = 1;
        for (int k = 0; k < 2; k++)
            for (int g = 0; g < 16; g++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += b[k].qs[16 * g + l], ok &= abs(b[k].qs[16 * g + l]) <= 127;
                ok &= s == b[k].bsums[g];
            }
        CHECK(ok, "bsums on random data");
    }
    TEST_END();

    TEST_CASE("f16/bf16 act: element-wise nearest-even conversions");
    {
        float x[4] = {1.0f + 0x1p-11f, 0x1p-25f, 3.0f, -0.0f};
        uint8_t b[8];
        dtype_traits_of(DT_F16)->quantize_act(b, x, 4);
        CHECK(get16(b) == 0x3c00 && get16(b + 2) == 0 && get16(b + 4) == 0x4200 && get16(b + 6) == 0x8000,
              "f16 act");
        float y[2] = {f32_of(0x00012345u), f32_of(0x3f808000u)};
        dtype_traits_of(DT_BF16)->quantize_act(b, y, 2);
        CHECK(get16(b) == 0x0001 && get16(b + 2) == 0x3f80, "bf16 act keeps subnormals");
    }
    TEST_END();
}

/* ------------------------------------------------------------------------ */
/* dot products against this file's own decoding                              */

/* The integer value and the (scale, min) pair of element e of a weight block,
 * decoded straight from the format: x = scale * q - min. */
static void decode_elem(int type, const uint8_t *b, int e, int *q, double *scale, double *min) {
    int c = e / 64, hi = (e / 32) & 1, l = e % 32, j = e / 32;
    *q = 0, *scale = 0, *min = 0;
    switch (type) {
    case DT_Q4_0:
        *q = ((b[2 + e % 16] >> (4 * (e / 16))) & 15) - 8;
        *scale = dtype_f16_to_f32(get16(b));
        return;
    case DT_Q8_0:
        *q = (int8_t)b[2 + e];
        *scale = dtype_f16_to_f32(get16(b));
        return;
    case DT_Q4_K: case DT_Q5_K: {
        const uint8_t *s = b + 4;
        int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        const uint8_t *qs = b + (type == DT_Q4_K ? 16 : 48);
        *q = (qs[32 * c + l] >> (4 * hi)) & 15;
        if (type == DT_Q5_K) *q += ((b[16 + l] >> (2 * c + hi)) & 1) * 16;
        *scale = (double)dtype_f16_to_f32(get16(b)) * sc;
        *min = (double)dtype_f16_to_f32(get16(b + 2)) * mn;
        return;
    }
    case DT_Q6_K: {
        int h = e / 128, r = e % 128, quarter = r / 32, ll = r % 32;
        uint8_t qlb = b[64 * h + ll + 32 * (quarter & 1)];
        int low = quarter < 2 ? qlb & 15 : qlb >> 4;
        int top = (b[128 + 32 * h + ll] >> (2 * quarter)) & 3;
        *q = (low | (top << 4)) - 32;
        *scale = (double)dtype_f16_to_f32(get16(b + 208)) * (int8_t)b[192 + e / 16];
        return;
    }
    }
}

/* Random block bytes with finite, moderate fp16 scales. */
static void random_blocks(int type, uint8_t *w, int nblk, moe_rng *r) {
    const dtype_traits *t = dtype_traits_of(type);
    for (size_t i = 0; i < (size_t)nblk * t->block_bytes; i++) w[i] = (uint8_t)moe_rng_u64(r);
    for (int k = 0; k < nblk; k++) {
        uint8_t *b = w + (size_t)k * t->block_bytes;
        float d = 0.001f + 0.01f * moe_rng_uniform(r), dm = 0.01f * moe_rng_uniform(r);
        if (type == DT_Q4_0 || type == DT_Q8_0) put16(b, h16(k % 2 ? -d : d));
        if (type == DT_Q4_K || type == DT_Q5_K) put16(b, h16(d)), put16(b + 2, h16(dm));
        if (type == DT_Q6_K) put16(b + 208, h16(d));
    }
}

static void test_vec_dot(void) {
    enum { C = 1024 };
    static float a[C], wf[C], af[C];
    static uint8_t w[C * 4], act[C * 4]; /* room for f32 rows */
    const int qtypes[] = {DT_Q4_0, DT_Q8_0, DT_Q4_K, DT_Q5_K, DT_Q6_K};
    moe_rng r;
    moe_rng_seed(&r, 9);
    for (size_t ti = 0; ti < sizeof qtypes / sizeof qtypes[0]; ti++) {
        int type = qtypes[ti];
        const dtype_traits *t = type_case("vec_dot", type, "vs own decoding (exact ints, double), vs to_float");
        const dtype_traits *at = dtype_traits_of(t->dot_type);
        int nblk = C / t->blck, worst_bad = 0;
        double worst = 0, worst2 = 0;
        for (int trial = 0; trial < 20; trial++) {
            random_blocks(type, w, nblk, &r);
            if (trial % 2) t->from_float(w, (fill_normal(wf, C, 0.3f, &r), wf), C);
            fill_normal(a, C, trial % 3 ? 1.0f : 1e-3f, &r);
            at->quantize_act(act, a, C);
            float got = t->vec_dot(w, act, C);
            /* the oracle: sum over blocks of  sum_e (scale_e q_e - min_e) * (da qa_e)
             * with the integer products exact in int64 and all else in double */
            double want = 0, mag = 0;
            for (int k = 0; k < nblk; k++) {
                const uint8_t *b = w + (size_t)k * t->block_bytes;
                for (int e = 0; e < t->blck; e++) {
                    int q, qa;
                    double sc, mn, da;
                    decode_elem(type, b, e, &q, &sc, &mn);
                    if (t->dot_type == DT_Q8_0) {
                        const uint8_t *ab = act + (size_t)(k * t->blck + e) / 32 * 34;
                        da = dtype_f16_to_f32(get16(ab)), qa = (int8_t)ab[2 + e % 32];
                    } else {
                        const dtype_q8_K_block *ab = (const dtype_q8_K_block *)act + k;
                        da = ab->d, qa = ab->qs[e];
                    }
                    want += (sc * (double)((int64_t)q * qa) - mn * qa) * da;
                    mag += (fabs(sc * q) + fabs(mn)) * fabs(qa * da);
                }
            }
            /* float rounding: a few roundings per block term and one per add */
            double bound = 0x1p-22 * (nblk + 8) * mag;
            double err = fabs(got - want);
            if (!(err <= bound)) worst_bad++;
            worst = fmax(worst, err / (bound > 0 ? bound : 1));
            /* and against the dequantised rows summed in double */
            t->to_float(wf, w, C);
            at->to_float(af, act, C);
            double dd = 0;
            for (int i = 0; i < C; i++) dd += (double)wf[i] * af[i];
            double err2 = fabs(got - dd);
            if (!(err2 <= 2 * bound)) worst_bad++;
            worst2 = fmax(worst2, err2 / (bound > 0 ? bound : 1));
        }
        CHECK(worst_bad == 0, "%d trials over the bound (worst %.3g, %.3g of it)", worst_bad, worst, worst2);
        TEST_END();
    }

    TEST_CASE("vec_dot f32/f16/bf16: vs exact products summed in double");
    {
        const int ft[] = {DT_F32, DT_F16, DT_BF16};
        int bad = 0;
        for (int k = 0; k < 3; k++) {
            const dtype_traits *t = dtype_traits_of(ft[k]);
            fill_normal(wf, C - 3, 1.0f, &r);
            fill_normal(a, C - 3, 1.0f, &r);
            t->from_float(w, wf, C - 3);
            t->quantize_act(act, a, C - 3);
            t->to_float(wf, w, C - 3);
            t->to_float(af, act, C - 3);
            double s = 0, m = 0;
            for (int i = 0; i < C - 3; i++) s += (double)wf[i] * af[i], m += fabs((double)wf[i] * af[i]);
            float got = t->vec_dot(w, act, C - 3);
            /* f32: products rounded once, summed in double. f16/bf16 (as
             * llama.cpp's x86 vec_dot): exact products summed in float lanes,
             * C / 64 adds per lane then 6 in the reductions, one rounding
             * each; the tail in double. */
            double bound = fabs(s) * 0x1p-24 +
                           (ft[k] == DT_F32 ? m * 0x1p-24 : m * 0x1p-24 * (C / 64 + 7));
            if (!(fabs(got - s) <= bound)) bad++, printf("  %s: %g vs %g\n", t->name, got, s);
        }
        CHECK(bad == 0, "float dots");
    }
    TEST_END();
}

/* ------------------------------------------------------------------------ */
static void test_qmatmul(void) {
    const int Ns[] = {0, 1, 15, 16, 17, 33}, OCs[] = {1, 7, 64}, Cs[] = {256, 512};
    enum { MAXN = 33, MAXOC = 64, MAXC = 512 };
    static float in[MAXN * MAXC], wsrc[MAXOC * MAXC], out[MAXN * MAXOC], ref[MAXN * MAXOC],
        out2[MAXN * MAXOC], wf[MAXC], af[MAXC];
    static uint8_t w[MAXOC * MAXC * 4];
    moe_rng r;
    moe_rng_seed(&r, 21);
    int saved_threads = omp_get_max_threads();
    for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        int type = weight_types[ti];
        const dtype_traits *t = type_case("qmatmul", type, "vs ref on ragged shapes, 1 vs 2 threads");
        int bad = 0, diff_threads = 0;
        for (size_t ci = 0; ci < 2; ci++)
            for (size_t oi = 0; oi < 3; oi++)
                for (size_t ni = 0; ni < 6; ni++) {
                    int C = Cs[ci], OC = OCs[oi], N = Ns[ni];
                    size_t rb;
                    dtype_row_bytes(type, C, &rb);
                    fill_normal(wsrc, OC * C, 0.5f, &r);
                    fill_normal(in, MAXN * C, 1.0f, &r);
                    for (int o = 0; o < OC; o++) t->from_float(w + o * rb, wsrc + (size_t)o * C, C);
                    size_t wsb = qmatmul_workspace(type, N, C);
                    void *ws = wsb ? moe_malloc(wsb) : NULL;
                    omp_set_num_threads(1);
                    qmatmul_forward(out, in, w, type, N, C, OC, ws);
                    omp_set_num_threads(2);
                    for (int i = 0; i < N * OC; i++) out2[i] = -1;
                    qmatmul_forward(out2, in, w, type, N, C, OC, ws);
                    if (N && memcmp(out, out2, (size_t)N * OC * sizeof(float))) diff_threads++;
                    qmatmul_forward_ref(ref, in, w, type, N, C, OC);
                    for (int n = 0; n < N; n++) {
                        if (type != DT_F32) {
                            const dtype_traits *at = dtype_traits_of(t->dot_type);
                            uint8_t abuf[MAXC * 4];
                            at->quantize_act(abuf, in + (size_t)n * C, C);
                            at->to_float(af, abuf, C);
                        } else {
                            memcpy(af, in + (size_t)n * C, C * sizeof(float));
                        }
                        for (int o = 0; o < OC; o++) {
                            t->to_float(wf, w + o * rb, C);
                            double mag = 0, wmax = 0;
                            for (int k = 0; k < C; k++) wmax = fmax(wmax, fabs(wf[k]));
                            for (int k = 0; k < C; k++) mag += (fabs(wf[k]) + 2 * wmax) * fabs(af[k]);
                            double bound = 0x1p-22 * (C / 32 + 8) * mag;
                            double e = fabs((double)out[n * OC + o] - ref[n * OC + o]);
                            if (!(e <= bound)) {
                                if (bad++ < 3)
                                    printf("  N %d C %d OC %d [%d][%d]: %g vs %g\n", N, C, OC, n, o,
                                           out[n * OC + o], ref[n * OC + o]);
                            }
                        }
                    }
                    moe_free(ws);
                }
        omp_set_num_threads(saved_threads);
        CHECK(bad == 0, "%d outputs off the reference", bad);
        CHECK(diff_threads == 0, "%d shapes differ between 1 and 2 threads", diff_threads);
        TEST_END();
    }

    TEST_CASE("qmatmul f32: equals matmul_forward bit for bit; workspace sizes");
    {
        int N = 17, C = 256, OC = 7;
        fill_normal(wsrc, OC * C, 0.5f, &r);
        fill_normal(in, N * C, 1.0f, &r);
        qmatmul_forward(out, in, wsrc, DT_F32, N, C, OC, NULL);
        matmul_forward(ref, in, wsrc, NULL, N, C, OC, MATMUL_FP32);
        CHECK(!memcmp(out, ref, (size_t)N * OC * sizeof(float)), "f32 path");
        CHECK(qmatmul_workspace(DT_F32, 33, 512) == 0, "f32 needs none");
        CHECK(qmatmul_workspace(DT_Q4_K, 3, 512) == 3 * 2 * 292, "q4_K: 3 Q8_K rows");
        CHECK(qmatmul_workspace(DT_Q4_0, 2, 64) == 2 * 2 * 34, "q4_0: 2 Q8_0 rows");
        CHECK(qmatmul_workspace(DT_BF16, 2, 10) == 40, "bf16");
        CHECK(qmatmul_workspace(DT_Q4_K, 1, 100) == SIZE_MAX && qmatmul_workspace(DT_Q2_K, 1, 256) == SIZE_MAX &&
                  qmatmul_workspace(77, 1, 256) == SIZE_MAX, "unusable shape or type");
        float o1[7];
        qmatmul_forward(o1, in, w, DT_Q4_K, 1, 100, 7, NULL); /* not whole blocks */
        CHECK(isnan(o1[0]) && isnan(o1[6]), "bad shape gives NaN, not a crash");
    }
    TEST_END();
}

/* ------------------------------------------------------------------------ */
static void test_gguf_quant(void) {
    TEST_CASE("gguf: q4_K, q6_K, q8_0 tensors written and read back");
    char dir[] = "/tmp/test_quant.XXXXXX", path[256];
    if (!mkdtemp(dir)) { CHECK(0, "mkdtemp"); TEST_END(); return; }
    snprintf(path, sizeof path, "%s/q.gguf", dir);
    enum { C = 512, R = 3 };
    static float src[R * C];
    static uint8_t a[R * 2 * 144], b[R * 2 * 210], c[R * 16 * 34];
    moe_rng r;
    moe_rng_seed(&r, 4);
    fill_normal(src, R * C, 1.0f, &r);
    dtype_traits_of(DT_Q4_K)->from_float(a, src, R * C);
    dtype_traits_of(DT_Q6_K)->from_float(b, src, R * C);
    dtype_traits_of(DT_Q8_0)->from_float(c, src, R * C);
    gguf_writer *w = gguf_writer_create();
    int64_t ne[2] = {C, R}, bad_ne[2] = {C + 32, R};
    CHECK(w && gguf_add_tensor(w, "a", DT_Q4_K, 2, ne, a) == MOE_OK &&
              gguf_add_tensor(w, "b", DT_Q6_K, 2, ne, b) == MOE_OK &&
              gguf_add_tensor(w, "c", DT_Q8_0, 2, ne, c) == MOE_OK, "add");
    CHECK(gguf_add_tensor(w, "d", DT_Q4_K, 2, bad_ne, a) == MOE_ERR_INVALID_ARG,
          "a row of 544 is not whole q4_K blocks");
    moe_status st = gguf_write_file(w, path);
    CHECK(st == MOE_ERR_INVALID_ARG, "the failed add is reported again by the write");
    gguf_writer_free(w);
    w = gguf_writer_create();
    gguf_add_tensor(w, "a", DT_Q4_K, 2, ne, a);
    gguf_add_tensor(w, "b", DT_Q6_K, 2, ne, b);
    gguf_add_tensor(w, "c", DT_Q8_0, 2, ne, c);
    CHECK(gguf_write_file(w, path) == MOE_OK, "write");
    gguf_writer_free(w);
    gguf_ctx *g = NULL;
    CHECK(gguf_open(&g, path) == MOE_OK, "open");
    if (g) {
        const struct { const char *n; int type; const void *d; size_t bytes; } want[] = {
            {"a", DT_Q4_K, a, sizeof a}, {"b", DT_Q6_K, b, sizeof b}, {"c", DT_Q8_0, c, sizeof c}};
        for (int i = 0; i < 3; i++) {
            const gguf_tensor *t = gguf_find_tensor(g, want[i].n);
            CHECK(t && t->type == want[i].type && t->nbytes == want[i].bytes && t->ne[0] == C &&
                      t->ne[1] == R && !memcmp(t->data, want[i].d, want[i].bytes),
                  "tensor %s", want[i].n);
        }
        gguf_close(g);
    }
    unlink(path);
    rmdir(dir);
    TEST_END();
}

int main(void) {
    test_table();
    test_fp16_bf16();
    test_dequant();
    test_round_trips();
    test_quantize_act();
    test_vec_dot();
    test_qmatmul();
    test_gguf_quant();
    TEST_MAIN_END();
}
