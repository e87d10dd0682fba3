/* io/file: whole-file reading, shared by the dataset loader and the moe
 * command (one growing buffer, overflow-checked, counted allocation), and
 * opening a file for reading by descriptor (the GGUF mapping, the expert
 * store's reads). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"

moe_status file_open_read(const char *path, int *fd, struct stat *sb) {
    int f;
    do f = open(path, O_RDONLY | O_CLOEXEC);
    while (f < 0 && errno == EINTR);
    if (f < 0) return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    if (fstat(f, sb) != 0) {
        int e = errno;
        close(f);
        return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(e));
    }
    *fd = f;
    return MOE_OK;
}

moe_status moe_read_stream(FILE *f, const char *name, char **out, size_t *len) {
    if (!f || !out || !len) return moe_error(MOE_ERR_INVALID_ARG, "moe_read_stream: NULL argument");
    if (!name) name = "input";
    *out = NULL;
    *len = 0;
    size_t cap = 1 << 16, n = 0;
    char *buf = moe_malloc(cap);
    if (!buf) return moe_error(MOE_ERR_NOMEM, "out of memory reading %s", name);
    for (;;) {
        if (cap - n < 2) { /* room for one more byte and the NUL */
            char *grown = cap > SIZE_MAX / 2 ? NULL : moe_realloc(buf, cap * 2);
            if (!grown) {
                moe_free(buf);
                return moe_error(MOE_ERR_NOMEM, "out of memory reading %s (%zu bytes so far)", name, n);
            }
            buf = grown;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        int e = errno;
        moe_free(buf);
        return moe_error(MOE_ERR_IO, "error reading %s: %s", name, strerror(e));
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return MOE_OK;
}

moe_status moe_read_file(const char *path, char **out, size_t *len) {
    if (!path) return moe_error(MOE_ERR_INVALID_ARG, "moe_read_file: NULL path");
    FILE *f = fopen(path, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    moe_status st = moe_read_stream(f, path, out, len);
    fclose(f);
    return st;
}
