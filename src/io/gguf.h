/* io/gguf: read and write GGUF (version 3) files.
 * The reader memory-maps the file and validates everything before handing out
 * a pointer: every count, string length, shape product and tensor offset is
 * checked against the file size with overflow-safe arithmetic. Duplicate key
 * or tensor names, unknown value types, bad magic/version or misaligned data
 * are MOE_ERR_FORMAT with a message naming the problem.
 * The writer collects metadata and borrowed tensor pointers and writes the file
 * atomically (path.tmp, fsync, rename); an existing file at path is untouched
 * on failure. */
#ifndef MOE_GGUF_H
#define MOE_GGUF_H
#include <stddef.h>
#include <stdint.h>
#include "core/core.h"
#include "core/dtype.h"

typedef enum {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
} gguf_type;

/* tensor element types: the DT_* numbering of core/dtype.h (ggml's), whose
 * table also holds every block size the reader checks */
enum { GGML_TYPE_F32 = DT_F32, GGML_TYPE_F16 = DT_F16, GGML_TYPE_Q4_0 = DT_Q4_0,
       GGML_TYPE_Q4_1 = DT_Q4_1, GGML_TYPE_Q5_0 = DT_Q5_0, GGML_TYPE_Q5_1 = DT_Q5_1,
       GGML_TYPE_Q8_0 = DT_Q8_0, GGML_TYPE_Q8_1 = DT_Q8_1, GGML_TYPE_Q2_K = DT_Q2_K,
       GGML_TYPE_Q3_K = DT_Q3_K, GGML_TYPE_Q4_K = DT_Q4_K, GGML_TYPE_Q5_K = DT_Q5_K,
       GGML_TYPE_Q6_K = DT_Q6_K, GGML_TYPE_Q8_K = DT_Q8_K, GGML_TYPE_BF16 = DT_BF16 };

typedef struct {
    const char *name;      /* NUL-terminated copy owned by the context */
    int n_dims;            /* 1..4 */
    int64_t ne[4];         /* ne[0] is the fastest-varying (row length)   */
    int type;              /* GGML_TYPE_* */
    size_t nbytes;
    const void *data;      /* into the mapping, aligned to general.alignment */
} gguf_tensor;

typedef struct gguf_ctx gguf_ctx;
moe_status gguf_open(gguf_ctx **out, const char *path);
/* Same, from a caller-owned buffer (used by fuzzers and tests); buf must stay
 * valid while ctx lives. */
moe_status gguf_open_buffer(gguf_ctx **out, const void *buf, size_t len);
void gguf_close(gguf_ctx *ctx);

/* metadata lookup: MOE_ERR_FORMAT if the key is missing or of another type
 * (integer getters accept any integer type whose value fits). */
int gguf_has_key(const gguf_ctx *ctx, const char *key);
moe_status gguf_get_u32(const gguf_ctx *ctx, const char *key, uint32_t *out);
moe_status gguf_get_i32(const gguf_ctx *ctx, const char *key, int32_t *out);
moe_status gguf_get_u64(const gguf_ctx *ctx, const char *key, uint64_t *out);
moe_status gguf_get_f32(const gguf_ctx *ctx, const char *key, float *out);
moe_status gguf_get_bool(const gguf_ctx *ctx, const char *key, int *out);
moe_status gguf_get_i64(const gguf_ctx *ctx, const char *key, int64_t *out);
moe_status gguf_get_f64(const gguf_ctx *ctx, const char *key, double *out); /* f32 or f64 */
/* string: pointer into the mapping, NOT NUL-terminated */
moe_status gguf_get_str(const gguf_ctx *ctx, const char *key, const char **s, size_t *len);
/* arrays */
moe_status gguf_get_arr_info(const gguf_ctx *ctx, const char *key, gguf_type *elem,
                             uint64_t *n);
/* numeric array data (elements packed little-endian, possibly unaligned: memcpy) */
moe_status gguf_get_arr_data(const gguf_ctx *ctx, const char *key, gguf_type *elem,
                             uint64_t *n, const void **data);
/* i-th string of a string array */
moe_status gguf_get_arr_str(const gguf_ctx *ctx, const char *key, uint64_t i, const char **s,
                            size_t *len);

/* enumeration (for dump tools): key bytes point into the mapping, not
 * NUL-terminated; NULL when i is out of range */
int gguf_n_kv(const gguf_ctx *ctx);
const char *gguf_key_at(const gguf_ctx *ctx, int i, size_t *len, gguf_type *type);
uint32_t gguf_version(const gguf_ctx *ctx);
size_t gguf_alignment(const gguf_ctx *ctx);
size_t gguf_data_offset(const gguf_ctx *ctx); /* file offset of the data section */
size_t gguf_data_size(const gguf_ctx *ctx);   /* bytes from there to the end of the file */
/* file offset of p, a pointer into the mapping (a tensor's data) */
size_t gguf_file_offset(const gguf_ctx *ctx, const void *p);

int gguf_n_tensors(const gguf_ctx *ctx);
const gguf_tensor *gguf_tensor_at(const gguf_ctx *ctx, int i);
const gguf_tensor *gguf_find_tensor(const gguf_ctx *ctx, const char *name); /* NULL if absent */

/* ---- writer ---- */
typedef struct gguf_writer gguf_writer;
gguf_writer *gguf_writer_create(void);   /* NULL on allocation failure */
void gguf_writer_free(gguf_writer *w);
/* Setters copy key and value. A failed setter leaves the writer usable and the
 * failure is reported again by gguf_write_file. */
moe_status gguf_set_u32(gguf_writer *w, const char *key, uint32_t v);
moe_status gguf_set_i32(gguf_writer *w, const char *key, int32_t v);
moe_status gguf_set_u64(gguf_writer *w, const char *key, uint64_t v);
moe_status gguf_set_f32(gguf_writer *w, const char *key, float v);
moe_status gguf_set_bool(gguf_writer *w, const char *key, int v);
moe_status gguf_set_str(gguf_writer *w, const char *key, const char *s, size_t len);
/* any scalar type (u8..f64, bool); value points to a native value of that type */
moe_status gguf_set_scalar(gguf_writer *w, const char *key, gguf_type type, const void *value);
moe_status gguf_set_arr_data(gguf_writer *w, const char *key, gguf_type elem, const void *data,
                             uint64_t n);
moe_status gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *strs,
                            const size_t *lens, uint64_t n);
/* data is borrowed until gguf_write_file returns. ne[0] fastest. */
moe_status gguf_add_tensor(gguf_writer *w, const char *name, int type, int n_dims,
                           const int64_t *ne, const void *data);
moe_status gguf_write_file(gguf_writer *w, const char *path); /* atomic */

/* Atomic whole-file write used for every file we save (GGUF and training
 * state): writes path.tmp, fsyncs, renames over path, fsyncs the directory. */
moe_status moe_write_atomic(const char *path,
                            moe_status (*write_fn)(int fd, void *user), void *user);
/* write(2) loop that reports short writes/ENOSPC as MOE_ERR_IO */
moe_status moe_write_all(int fd, const void *buf, size_t len);
#endif
