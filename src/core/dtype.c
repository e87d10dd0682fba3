/* core/dtype: placeholder until the type table lands (F32 only). */
#include "core/dtype.h"
const dtype_traits *dtype_traits_of(int type) { (void)type; return NULL; }
const char *dtype_name(int type) { return type == DT_F32 ? "f32" : "unknown"; }
int dtype_usable(int type) { return type == DT_F32; }
int dtype_row_bytes(int type, int64_t n, size_t *out) {
    if (type != DT_F32 || n < 0) return -1;
    *out = (size_t)n * 4;
    return 0;
}
