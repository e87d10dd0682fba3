/* core/dtype: the element types a tensor can have (ggml's numbering, as GGUF
 * stores them), one table of their traits, and the typed tensor view.
 *
 * A published model keeps its weights in the file mapping in their own type;
 * our training keeps fp32 views into its parameter buffer. Both are
 * moe_tensor. Block sizes live only in this table: the GGUF reader's size
 * checks ask it too.
 *
 * Quantised arithmetic follows llama.cpp's CPU path so that results match it,
 * not only "within a tolerance": activations are converted to the weight
 * type's dot type (Q8_0 for Q4_0 and Q8_0, Q8_K for the K-quants, F16 for F16,
 * BF16 for BF16) the way llama.cpp's x86 code converts them, then each output
 * is one vec_dot of a weight row with an activation row: integer dot products
 * per block, scales applied per block, summed in the SIMD lanes and the order
 * of llama.cpp's x86 kernels (emulated in scalar code; kernels/quant_avx512.c
 * computes the same bits). */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H
#include <stddef.h>
#include <stdint.h>

enum {
    DT_F32 = 0, DT_F16 = 1, DT_Q4_0 = 2, DT_Q4_1 = 3, DT_Q5_0 = 6, DT_Q5_1 = 7,
    DT_Q8_0 = 8, DT_Q8_1 = 9, DT_Q2_K = 10, DT_Q3_K = 11, DT_Q4_K = 12, DT_Q5_K = 13,
    DT_Q6_K = 14, DT_Q8_K = 15, DT_BF16 = 30,
    /* known for size checks only (no arithmetic) */
    DT_IQ2_XXS = 16, DT_IQ2_XS = 17, DT_IQ3_XXS = 18, DT_IQ1_S = 19, DT_IQ4_NL = 20,
    DT_IQ3_S = 21, DT_IQ2_S = 22, DT_IQ4_XS = 23, DT_I8 = 24, DT_I16 = 25, DT_I32 = 26,
    DT_I64 = 27, DT_F64 = 28, DT_IQ1_M = 29, DT_TQ1_0 = 34, DT_TQ2_0 = 35, DT_MXFP4 = 39,
    DT_COUNT = 40, /* numbers below this may name a type in a file; unknown ones have no traits */
    /* Engine-internal layouts, never in a file (the GGUF reader takes only
     * numbers below DT_COUNT): a weight type's rows regrouped, as the kernels
     * stream them (repacked once at load: model/repack.c), so that a tile of
     * rows reads one stream instead of one per row. Same bytes per row as
     * the type they hold; no to_float or vec_dot of a lone row (dtype_usable
     * says 0): see the dtype_repacked_* functions below.
     * Q8_0_R8: groups of 8 rows of nb blocks (nb * 272 bytes, the 8 rows'
     *   own bytes reordered): the fp16 scales [nb][8], then the quants
     *   [nb][8][32].
     * Q4_K_R4, Q5_K_R4, Q6_K_R4: groups of 4 rows, their super-blocks
     *   interleaved whole: block i of row r at (4 i + r) * block bytes. */
    DT_Q8_0_R8 = 64,
    DT_Q4_K_R4 = 65,
    DT_Q5_K_R4 = 66,
    DT_Q6_K_R4 = 67,
    DT_TABLE = 68
};

typedef struct {
    const char *name;          /* ggml's name: "f32", "q4_K", ...                 */
    int blck;                  /* elements per block (1 for f32, f16, bf16)        */
    size_t block_bytes;        /* bytes per block                                  */
    /* The rest is NULL / -1 where the type is known only for size checks. */
    /* dst[n] = the values of n elements (n a multiple of blck): the reference
     * dequantisation, checked block by block against hand-computed cases. */
    void (*to_float)(float *dst, const void *src, int64_t n);
    /* Quantises n floats into blocks of this type: the reference quantiser used
     * to write weight files (any valid rounding; llama.cpp's own may differ). */
    void (*from_float)(void *dst, const float *src, int64_t n);
    int dot_type;              /* activations' type for vec_dot (-1: none)         */
    /* Converts an activation row to this type (when it is some type's
     * dot_type) exactly as llama.cpp's x86 CPU path does; NULL otherwise. */
    void (*quantize_act)(void *dst, const float *src, int64_t n);
    /* sum_i w[i] * a[i] over n elements: w one row of this type, a one row of
     * dot_type as quantize_act made it. */
    float (*vec_dot)(const void *w, const void *a, int64_t n);
} dtype_traits;

/* NULL for a number that names no type we know. */
const dtype_traits *dtype_traits_of(int type);
const char *dtype_name(int type);          /* "type 42" style text for unknown numbers */
/* 1 when tensors of this type can be used as weights (to_float and vec_dot). */
int dtype_usable(int type);
/* Bytes of n elements of type; -1 when n is negative or not a multiple of the
 * block size, the type is unknown or the size exceeds INT64_MAX. */
int dtype_row_bytes(int type, int64_t n, size_t *out);

/* The repacked layouts (above). repacked_type: the layout a weight type is
 * repacked into, or -1 when it has none; base_type: the type whose
 * arithmetic a layout holds (a file type is its own); group_rows: rows per
 * group (1 for file types). repack: rows (a multiple of group_rows) x C
 * rows of the base type into the layout; -1 for other shapes or types.
 * row: row r of a repacked matrix back in the base type's layout.
 * vec_dot: the base type's vec_dot of row r of the group at `group`, the
 * same bits. */
int dtype_repacked_type(int type);
int dtype_base_type(int type);
int dtype_group_rows(int type);
int dtype_repack(int rtype, void *dst, const void *src, int64_t rows, int64_t C);
void dtype_repacked_row(int rtype, void *dst, const void *src, int64_t r, int64_t C);
float dtype_repacked_vec_dot(int rtype, const void *group, int r, const void *a, int64_t C);

/* fp16 and bf16 conversions (round to nearest even), shared by every path. */
/* both exactly as F16C's VCVTPH2PS / VCVTPS2PH (what llama.cpp uses on x86):
 * subnormals kept, overflow to inf, NaN made quiet */
float dtype_f16_to_f32(uint16_t h);
uint16_t dtype_f32_to_f16(float f);
float dtype_bf16_to_f32(uint16_t h);
/* as llama.cpp's GGML_FP32_TO_BF16: subnormals kept (kernels.h's
 * bf16_from_float flushes them, as VCVTNEPS2BF16 does), NaN made quiet */
uint16_t dtype_f32_to_bf16(float f);

/* The 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K
 * super-block, from its 12 packed bytes: bytes 0-3 hold scales 0-3 in their
 * low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 the low 4 bits of scale (low
 * nibble) and min (high nibble) 4-7, whose top 2 bits sit in bits 6-7 of
 * bytes 0-3 (scales) and 4-7 (mins). Inline: the fast kernels unpack it
 * once per super-block and row. */
static inline void dtype_k_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0xf) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* The Q8_K activation block (ggml's block_q8_K): x = d * qs, bsums[g] the sum
 * of qs[16g .. 16g+15]. Unlike the weight blocks it holds a float, so Q8_K
 * rows (qmatmul's workspace) must be 4-byte aligned. */
typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[16];
} dtype_q8_K_block;

/* A typed tensor view. ne[0] is the row length (ggml order); rows are
 * row_bytes apart; a 3-D tensor [ne2][ne1][ne0] (stacked experts) is ne2
 * matrices of ne1 rows. data points into a parameter buffer or a file
 * mapping; the view owns nothing. */
typedef struct {
    void *data;
    int type;          /* DT_* */
    int n_dims;
    int64_t ne[4];
    size_t row_bytes;  /* dtype_row_bytes(type, ne[0]) */
} moe_tensor;

/* The fp32 data of t, or NULL when t is absent or of another type. */
static inline float *tensor_f32(const moe_tensor *t) {
    return t->data && t->type == DT_F32 ? (float *)t->data : NULL;
}
/* Matrix i of a 3-D tensor (expert i of stacked experts). */
static inline const void *tensor_matrix(const moe_tensor *t, int64_t i) {
    return (const char *)t->data + (size_t)i * (size_t)t->ne[1] * t->row_bytes;
}
#endif
