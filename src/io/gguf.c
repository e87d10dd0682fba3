/* io/gguf: GGUF v3 reader (mmap, validated for hostile input) and writer
 * (atomic). Layout: magic, version, tensor count, kv count, kvs, tensor infos,
 * padding to the alignment, data section. Everything is little-endian. */
#include "io/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGN 32
#define ALIGN_KEY "general.alignment"
/* smallest encodings, used to reject absurd counts before looping over them:
 * kv = key length (8) + type (4) + 1-byte value; tensor info = name length (8)
 * + n_dims (4) + one ne (8) + type (4) + offset (8) */
#define MIN_KV_BYTES 13
#define MIN_TENSOR_BYTES 32

/* ---- little-endian loads (byte-wise so unaligned and host-order safe) ---- */
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

/* ---- types ---- */
static size_t scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0; /* string, array, unknown */
    }
}

static const char *type_name(uint32_t t) {
    static const char *const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                        "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

/* block size (elements) and bytes per block from the dtype table; 0 for a
 * type it does not know */
static int ggml_type_info(uint32_t type, size_t *blk, size_t *bytes) {
    const dtype_traits *t = type < DT_COUNT ? dtype_traits_of((int)type) : NULL;
    if (!t) return 0;
    *blk = (size_t)t->blck;
    *bytes = t->block_bytes;
    return 1;
}

enum { SIZE_OK, SIZE_UNKNOWN_TYPE, SIZE_BLOCK, SIZE_OVERFLOW };
/* Byte size of a tensor; ne[] already checked >= 1. Rows are whole blocks. */
static int tensor_nbytes(uint32_t type, int n_dims, const uint64_t *ne, size_t *out, size_t *blk_out) {
    size_t blk, bpb, total;
    if (!ggml_type_info(type, &blk, &bpb)) return SIZE_UNKNOWN_TYPE;
    *blk_out = blk;
    if (ne[0] % blk) return SIZE_BLOCK;
    if (ne[0] / blk > SIZE_MAX || moe_mul_size((size_t)(ne[0] / blk), bpb, &total))
        return SIZE_OVERFLOW;
    for (int d = 1; d < n_dims; d++)
        if (ne[d] > SIZE_MAX || moe_mul_size(total, (size_t)ne[d], &total)) return SIZE_OVERFLOW;
    /* keep sizes well inside off_t / ssize_t and pointer arithmetic */
    if (total > (size_t)INT64_MAX) return SIZE_OVERFLOW;
    *out = total;
    return SIZE_OK;
}

/* Name safe to embed in a one-line message: control bytes become '?', long
 * names are cut. */
typedef struct { char s[80]; } pname;
static pname printable(const char *s, size_t n) {
    pname p;
    size_t m = n > 64 ? 64 : n, j = 0;
    for (size_t i = 0; i < m; i++) {
        unsigned char ch = (unsigned char)s[i];
        p.s[j++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    if (n > m) { memcpy(p.s + j, "...", 3); j += 3; }
    p.s[j] = 0;
    return p;
}

/* a caller's key, sanitised the same way (NULL-safe); valid within one call */
static pname pkey(const char *k) { return k ? printable(k, strlen(k)) : printable("(null)", 6); }
#define PK(k) (pkey(k).s)

/* ---- string hash table: slots hold index+1 into an array of records whose
 * first member is a strref, so the reader and writer share it ---- */
typedef struct { const char *s; size_t len; } strref;
typedef struct { uint32_t *slot; size_t cap, n; } htab;
#define REF_AT(base, stride, i) ((const strref *)((const char *)(base) + (size_t)(i) * (stride)))

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static long ht_find(const htab *h, const void *base, size_t stride, const char *s, size_t n) {
    if (!h->cap) return -1;
    size_t mask = h->cap - 1, i = (size_t)hash_bytes(s, n) & mask;
    for (;;) {
        uint32_t v = h->slot[i];
        if (!v) return -1;
        const strref *r = REF_AT(base, stride, v - 1);
        if (r->len == n && memcmp(r->s, s, n) == 0) return (long)(v - 1);
        i = (i + 1) & mask;
    }
}

static void ht_place(htab *h, const void *base, size_t stride, uint32_t idx) {
    const strref *r = REF_AT(base, stride, idx);
    size_t mask = h->cap - 1, i = (size_t)hash_bytes(r->s, r->len) & mask;
    while (h->slot[i]) i = (i + 1) & mask;
    h->slot[i] = idx + 1;
}

/* 0 inserted, 1 duplicate name (not inserted), -1 out of memory */
static int ht_insert(htab *h, const void *base, size_t stride, uint32_t idx) {
    const strref *r = REF_AT(base, stride, idx);
    if (ht_find(h, base, stride, r->s, r->len) >= 0) return 1;
    if ((h->n + 1) * 2 > h->cap) { /* keep load <= 1/2 so probes stay short */
        size_t cap = h->cap ? h->cap * 2 : 16;
        uint32_t *slot = moe_calloc(cap, sizeof *slot);
        if (!slot) return -1;
        htab g = {slot, cap, h->n};
        for (size_t i = 0; i < h->cap; i++)
            if (h->slot[i]) ht_place(&g, base, stride, h->slot[i] - 1);
        moe_free(h->slot);
        *h = g;
    }
    ht_place(h, base, stride, idx);
    h->n++;
    return 0;
}

/* grows *p (elements of size elem) so that index need-1 is valid */
static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 8, bytes;
    while (c < need) c *= 2;
    if (moe_mul_size(c, elem, &bytes)) return -1;
    void *q = moe_realloc(*p, bytes);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

/* ===================================================================== reader */
typedef struct {
    strref key;          /* into the buffer */
    uint32_t type, elem; /* elem: array element type */
    const uint8_t *val;  /* scalar bytes, string bytes or array elements */
    uint64_t n;          /* string length or array count */
    uint64_t *str_off;   /* string arrays: offset of each length prefix from val */
} kv_entry;

typedef struct {
    strref name; /* into the buffer */
    gguf_tensor pub;
    uint64_t offset;
} tensor_entry;

struct gguf_ctx {
    const uint8_t *base;
    size_t size;
    int mapped;
    uint32_t version;
    size_t alignment, data_off;
    kv_entry *kv;
    size_t n_kv, cap_kv;
    htab kv_ht;
    tensor_entry *t;
    size_t n_t, cap_t;
    htab t_ht;
    char *names; /* NUL-terminated tensor names, one block */
};

typedef struct { const uint8_t *p; size_t size, pos; } reader; /* pos <= size always */

static size_t left(const reader *r) { return r->size - r->pos; }

static moe_status truncated(const reader *r, const char *what) {
    return moe_error(MOE_ERR_FORMAT, "truncated file: %s at offset %zu runs past end (%zu bytes)",
                     what, r->pos, r->size);
}

static moe_status rd_u32(reader *r, uint32_t *v, const char *what) {
    if (left(r) < 4) return truncated(r, what);
    *v = le32(r->p + r->pos);
    r->pos += 4;
    return MOE_OK;
}

static moe_status rd_u64(reader *r, uint64_t *v, const char *what) {
    if (left(r) < 8) return truncated(r, what);
    *v = le64(r->p + r->pos);
    r->pos += 8;
    return MOE_OK;
}

/* gguf string: u64 length + bytes; the result points into the buffer */
static moe_status rd_str(reader *r, strref *out, const char *what) {
    uint64_t n = 0;
    size_t at = r->pos;
    moe_status st = rd_u64(r, &n, what);
    if (st) return st;
    if (n > left(r))
        return moe_error(MOE_ERR_FORMAT, "%s at offset %zu has length %" PRIu64
                         " past end of file (%zu bytes)", what, at, n, r->size);
    out->s = (const char *)r->p + r->pos;
    out->len = (size_t)n;
    r->pos += (size_t)n;
    return MOE_OK;
}

static moe_status check_bools(const uint8_t *p, uint64_t n, const strref *key) {
    for (uint64_t i = 0; i < n; i++)
        if (p[i] > 1)
            return moe_error(MOE_ERR_FORMAT, "key '%s' has invalid bool value %u",
                             printable(key->s, key->len).s, p[i]);
    return MOE_OK;
}

static moe_status parse_value(reader *r, kv_entry *e) {
    pname kp = printable(e->key.s, e->key.len); /* must outlive the calls below */
    const char *k = kp.s;
    moe_status st;
    size_t sz = scalar_size(e->type);
    if (sz) {
        if (left(r) < sz) return truncated(r, "value");
        e->val = r->p + r->pos;
        r->pos += sz;
        return e->type == GGUF_TYPE_BOOL ? check_bools(e->val, 1, &e->key) : MOE_OK;
    }
    if (e->type == GGUF_TYPE_STRING) {
        strref s;
        if ((st = rd_str(r, &s, "string value"))) return st;
        e->val = (const uint8_t *)s.s;
        e->n = s.len;
        return MOE_OK;
    }
    if (e->type != GGUF_TYPE_ARRAY)
        return moe_error(MOE_ERR_FORMAT, "key '%s' has unknown value type %u", k, e->type);

    if ((st = rd_u32(r, &e->elem, "array element type"))) return st;
    if ((st = rd_u64(r, &e->n, "array count"))) return st;
    e->val = r->p + r->pos;
    if (e->elem == GGUF_TYPE_ARRAY)
        return moe_error(MOE_ERR_UNSUPPORTED, "key '%s' is a nested array", k);
    sz = scalar_size(e->elem);
    if (sz) {
        if (e->n > left(r) / sz)
            return moe_error(MOE_ERR_FORMAT, "key '%s': array of %" PRIu64 " %s runs past end of file",
                             k, e->n, type_name(e->elem));
        r->pos += (size_t)e->n * sz;
        return e->elem == GGUF_TYPE_BOOL ? check_bools(e->val, e->n, &e->key) : MOE_OK;
    }
    if (e->elem != GGUF_TYPE_STRING)
        return moe_error(MOE_ERR_FORMAT, "key '%s' is an array of unknown type %u", k, e->elem);
    if (e->n > left(r) / 8)
        return moe_error(MOE_ERR_FORMAT, "key '%s': array of %" PRIu64 " strings runs past end of file",
                         k, e->n);
    /* walk once to validate, then allocate offsets sized by real content, so a
     * lying count cannot make us allocate more than the file holds */
    size_t start = r->pos;
    for (uint64_t i = 0; i < e->n; i++) {
        strref s;
        if ((st = rd_str(r, &s, "array string"))) return st;
    }
    if (e->n) {
        e->str_off = moe_calloc((size_t)e->n, sizeof *e->str_off);
        if (!e->str_off) return MOE_ERR_NOMEM;
        size_t pos = start;
        for (uint64_t i = 0; i < e->n; i++) {
            e->str_off[i] = pos - start;
            pos += 8 + (size_t)le64(r->p + pos);
        }
    }
    return MOE_OK;
}

static moe_status parse_kvs(gguf_ctx *c, reader *r, uint64_t n_kv) {
    moe_status st;
    if (n_kv > left(r) / MIN_KV_BYTES || n_kv > INT32_MAX)
        return moe_error(MOE_ERR_FORMAT, "kv count %" PRIu64 " is impossible for a file of %zu bytes",
                         n_kv, r->size);
    for (uint64_t i = 0; i < n_kv; i++) {
        if (grow((void **)&c->kv, &c->cap_kv, c->n_kv + 1, sizeof *c->kv)) return MOE_ERR_NOMEM;
        kv_entry *e = &c->kv[c->n_kv];
        memset(e, 0, sizeof *e);
        c->n_kv++; /* counted now so gguf_close frees str_off on failure */
        if ((st = rd_str(r, &e->key, "key"))) return st;
        if (e->key.len == 0)
            return moe_error(MOE_ERR_FORMAT, "key %" PRIu64 " has an empty name", i);
        if (memchr(e->key.s, 0, e->key.len))
            return moe_error(MOE_ERR_FORMAT, "key '%s' contains a NUL byte",
                             printable(e->key.s, e->key.len).s);
        if ((st = rd_u32(r, &e->type, "value type"))) return st;
        if ((st = parse_value(r, e))) return st;
        int dup = ht_insert(&c->kv_ht, c->kv, sizeof *c->kv, (uint32_t)(c->n_kv - 1));
        if (dup < 0) return MOE_ERR_NOMEM;
        if (dup) return moe_error(MOE_ERR_FORMAT, "duplicate key '%s'", printable(e->key.s, e->key.len).s);
    }
    return MOE_OK;
}

static const kv_entry *find_kv(const gguf_ctx *c, const char *key) {
    if (!c || !key) return NULL;
    long i = ht_find(&c->kv_ht, c->kv, sizeof *c->kv, key, strlen(key));
    return i < 0 ? NULL : &c->kv[i];
}

static moe_status parse_tensor_info(gguf_ctx *c, reader *r, uint64_t i) {
    moe_status st;
    if (grow((void **)&c->t, &c->cap_t, c->n_t + 1, sizeof *c->t)) return MOE_ERR_NOMEM;
    tensor_entry *t = &c->t[c->n_t];
    memset(t, 0, sizeof *t);
    if ((st = rd_str(r, &t->name, "tensor name"))) return st;
    pname np = printable(t->name.s, t->name.len);
    const char *nm = np.s;
    if (t->name.len == 0) return moe_error(MOE_ERR_FORMAT, "tensor %" PRIu64 " has an empty name", i);
    if (memchr(t->name.s, 0, t->name.len))
        return moe_error(MOE_ERR_FORMAT, "tensor '%s' name contains a NUL byte", nm);
    uint32_t nd, type;
    if ((st = rd_u32(r, &nd, "tensor n_dims"))) return st;
    if (nd < 1 || nd > 4)
        return moe_error(MOE_ERR_FORMAT, "tensor '%s' has %u dimensions (must be 1..4)", nm, nd);
    uint64_t ne[4] = {1, 1, 1, 1};
    for (uint32_t d = 0; d < nd; d++) {
        if ((st = rd_u64(r, &ne[d], "tensor shape"))) return st;
        if (ne[d] == 0 || ne[d] > (uint64_t)INT64_MAX)
            return moe_error(MOE_ERR_FORMAT, "tensor '%s' has invalid size %" PRIu64 " in dimension %u",
                             nm, ne[d], d);
    }
    if ((st = rd_u32(r, &type, "tensor type"))) return st;
    if ((st = rd_u64(r, &t->offset, "tensor offset"))) return st;
    size_t nbytes, blk = 1;
    switch (tensor_nbytes(type, (int)nd, ne, &nbytes, &blk)) {
    case SIZE_UNKNOWN_TYPE:
        return moe_error(MOE_ERR_UNSUPPORTED, "tensor '%s' has unknown type %u", nm, type);
    case SIZE_BLOCK:
        return moe_error(MOE_ERR_FORMAT, "tensor '%s' row length %" PRIu64
                         " is not a multiple of block size %zu", nm, ne[0], blk);
    case SIZE_OVERFLOW:
        return moe_error(MOE_ERR_FORMAT, "tensor '%s' shape overflows", nm);
    }
    t->pub.n_dims = (int)nd;
    for (int d = 0; d < 4; d++) t->pub.ne[d] = (int64_t)ne[d];
    t->pub.type = (int)type;
    t->pub.nbytes = nbytes;
    c->n_t++;
    int dup = ht_insert(&c->t_ht, c->t, sizeof *c->t, (uint32_t)(c->n_t - 1));
    if (dup < 0) return MOE_ERR_NOMEM;
    if (dup) return moe_error(MOE_ERR_FORMAT, "duplicate tensor name '%s'", nm);
    return MOE_OK;
}

static moe_status parse(gguf_ctx *c) {
    reader r = {c->base, c->size, 0};
    moe_status st;
    uint32_t magic;
    uint64_t n_t, n_kv;
    if (c->size == 0) return moe_error(MOE_ERR_FORMAT, "empty file");
    if (c->size >= 4 && le32(c->base) != GGUF_MAGIC) return moe_error(MOE_ERR_FORMAT, "bad magic (not a GGUF file)");
    if ((st = rd_u32(&r, &magic, "magic"))) return st;
    if ((st = rd_u32(&r, &c->version, "version"))) return st;
    if (c->version != 2 && c->version != 3)
        return moe_error(MOE_ERR_FORMAT, "unsupported version %u (expected 2 or 3)", c->version);
    if ((st = rd_u64(&r, &n_t, "tensor count"))) return st;
    if ((st = rd_u64(&r, &n_kv, "kv count"))) return st;
    if ((st = parse_kvs(c, &r, n_kv))) return st;

    c->alignment = GGUF_DEFAULT_ALIGN;
    const kv_entry *a = find_kv(c, ALIGN_KEY);
    if (a) {
        uint32_t v = a->type == GGUF_TYPE_UINT32 ? le32(a->val) : 0;
        if (a->type != GGUF_TYPE_UINT32 || v == 0 || (v & (v - 1)))
            return moe_error(MOE_ERR_FORMAT, ALIGN_KEY " must be a u32 power of two (got %s %u)",
                             type_name(a->type), v);
        c->alignment = v;
    }

    if (n_t > left(&r) / MIN_TENSOR_BYTES || n_t > INT32_MAX)
        return moe_error(MOE_ERR_FORMAT, "tensor count %" PRIu64 " is impossible for a file of %zu bytes",
                         n_t, r.size);
    for (uint64_t i = 0; i < n_t; i++)
        if ((st = parse_tensor_info(c, &r, i))) return st;

    /* r.pos <= size and alignment <= 2^31, so this cannot wrap */
    c->data_off = (r.pos + c->alignment - 1) & ~(c->alignment - 1);
    size_t name_bytes = 0;
    for (size_t i = 0; i < c->n_t; i++) {
        tensor_entry *t = &c->t[i];
        size_t nb = t->pub.nbytes;
        if (t->offset % c->alignment)
            return moe_error(MOE_ERR_FORMAT, "tensor '%s' data offset %" PRIu64
                             " is not a multiple of the alignment %zu",
                             printable(t->name.s, t->name.len).s, t->offset, c->alignment);
        if (c->data_off > c->size || t->offset > c->size - c->data_off ||
            nb > c->size - c->data_off - t->offset)
            return moe_error(MOE_ERR_FORMAT, "tensor '%s' data extends past end of file (offset %"
                             PRIu64 ", size %zu, file %zu)", printable(t->name.s, t->name.len).s,
                             t->offset, nb, c->size);
        t->pub.data = c->base + c->data_off + t->offset;
        name_bytes += t->name.len + 1; /* sum of in-file lengths: cannot wrap */
    }
    if (c->n_t) {
        char *p = c->names = moe_malloc(name_bytes);
        if (!p) return MOE_ERR_NOMEM;
        for (size_t i = 0; i < c->n_t; i++) {
            memcpy(p, c->t[i].name.s, c->t[i].name.len);
            p[c->t[i].name.len] = 0;
            c->t[i].pub.name = p;
            p += c->t[i].name.len + 1;
        }
    }
    return MOE_OK;
}

static moe_status open_mem(gguf_ctx **out, const void *buf, size_t len, int mapped) {
    gguf_ctx *c = moe_calloc(1, sizeof *c);
    if (!c) return MOE_ERR_NOMEM;
    c->base = buf;
    c->size = len;
    moe_status st = parse(c);
    if (st) {
        c->mapped = 0; /* the caller unmaps on failure */
        gguf_close(c);
        return st;
    }
    c->mapped = mapped;
    *out = c;
    return MOE_OK;
}

moe_status gguf_open_buffer(gguf_ctx **out, const void *buf, size_t len) {
    if (!out) return moe_error(MOE_ERR_INVALID_ARG, "gguf_open_buffer: NULL out");
    *out = NULL;
    if (!buf && len) return moe_error(MOE_ERR_INVALID_ARG, "gguf_open_buffer: NULL buffer");
    moe_status st = open_mem(out, buf, len, 0);
    return st ? moe_error_prefix(st, "gguf") : MOE_OK;
}

moe_status gguf_open(gguf_ctx **out, const char *path) {
    if (!out || !path) return moe_error(MOE_ERR_INVALID_ARG, "gguf_open: NULL argument");
    *out = NULL;
    int fd;
    struct stat sb;
    if (file_open_read(path, &fd, &sb)) return MOE_ERR_IO; /* the message says why */
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_error(MOE_ERR_IO, "cannot open %s: %s", path,
                         S_ISDIR(sb.st_mode) ? strerror(EISDIR) : "not a regular file");
    }
    if (sb.st_size == 0) {
        close(fd);
        return moe_error(MOE_ERR_FORMAT, "gguf: %s: empty file", path);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return moe_error(MOE_ERR_UNSUPPORTED, "gguf: %s: file too large to map", path);
    }
    size_t size = (size_t)sb.st_size;
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (m == MAP_FAILED) return moe_error(MOE_ERR_IO, "cannot map %s: %s", path, strerror(e));
    moe_status st = open_mem(out, m, size, 1);
    if (st) {
        munmap(m, size);
        return moe_error_prefix(st, "gguf: %s", path);
    }
    return MOE_OK;
}

void gguf_close(gguf_ctx *c) {
    if (!c) return;
    for (size_t i = 0; i < c->n_kv; i++) moe_free(c->kv[i].str_off);
    moe_free(c->kv);
    moe_free(c->kv_ht.slot);
    moe_free(c->t);
    moe_free(c->t_ht.slot);
    moe_free(c->names);
    if (c->mapped) munmap((void *)c->base, c->size);
    moe_free(c);
}

/* ---- metadata lookup ---- */
static moe_status lookup(const gguf_ctx *c, const char *key, const kv_entry **e) {
    if (!c || !key) return moe_error(MOE_ERR_INVALID_ARG, "gguf: NULL context or key");
    *e = find_kv(c, key);
    return *e ? MOE_OK : moe_error(MOE_ERR_FORMAT, "gguf: missing key '%s'", PK(key));
}

static moe_status wrong_type(const char *key, const kv_entry *e, const char *want) {
    return moe_error(MOE_ERR_FORMAT, "gguf: key '%s' is %s, expected %s", PK(key), type_name(e->type), want);
}

/* integer value as sign + magnitude so every type compares without overflow */
static moe_status get_int(const gguf_ctx *c, const char *key, int *neg, uint64_t *mag, int64_t *sval) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    int64_t s = 0;
    uint64_t u = 0;
    int is_signed = 1;
    switch (e->type) {
    case GGUF_TYPE_UINT8: u = e->val[0]; is_signed = 0; break;
    case GGUF_TYPE_UINT16: u = le16(e->val); is_signed = 0; break;
    case GGUF_TYPE_UINT32: u = le32(e->val); is_signed = 0; break;
    case GGUF_TYPE_UINT64: u = le64(e->val); is_signed = 0; break;
    case GGUF_TYPE_INT8: s = (int8_t)e->val[0]; break;
    case GGUF_TYPE_INT16: s = (int16_t)le16(e->val); break;
    case GGUF_TYPE_INT32: s = (int32_t)le32(e->val); break;
    case GGUF_TYPE_INT64: s = (int64_t)le64(e->val); break;
    default: return wrong_type(key, e, "an integer");
    }
    *neg = is_signed && s < 0;
    *mag = is_signed ? (s < 0 ? 0 : (uint64_t)s) : u;
    *sval = s;
    return MOE_OK;
}

static moe_status range_err(const char *key, int neg, uint64_t mag, int64_t s, const char *want) {
    if (neg) return moe_error(MOE_ERR_FORMAT, "gguf: key '%s' value %" PRId64 " does not fit in %s", PK(key), s, want);
    return moe_error(MOE_ERR_FORMAT, "gguf: key '%s' value %" PRIu64 " does not fit in %s", PK(key), mag, want);
}

moe_status gguf_get_u32(const gguf_ctx *c, const char *key, uint32_t *out) {
    int neg; uint64_t m; int64_t s;
    moe_status st = get_int(c, key, &neg, &m, &s);
    if (st) return st;
    if (neg || m > UINT32_MAX) return range_err(key, neg, m, s, "u32");
    *out = (uint32_t)m;
    return MOE_OK;
}

moe_status gguf_get_i32(const gguf_ctx *c, const char *key, int32_t *out) {
    int neg; uint64_t m; int64_t s;
    moe_status st = get_int(c, key, &neg, &m, &s);
    if (st) return st;
    if (neg ? s < INT32_MIN : m > INT32_MAX) return range_err(key, neg, m, s, "i32");
    *out = neg ? (int32_t)s : (int32_t)m;
    return MOE_OK;
}

moe_status gguf_get_u64(const gguf_ctx *c, const char *key, uint64_t *out) {
    int neg; uint64_t m; int64_t s;
    moe_status st = get_int(c, key, &neg, &m, &s);
    if (st) return st;
    if (neg) return range_err(key, neg, m, s, "u64");
    *out = m;
    return MOE_OK;
}

moe_status gguf_get_i64(const gguf_ctx *c, const char *key, int64_t *out) {
    int neg; uint64_t m; int64_t s;
    moe_status st = get_int(c, key, &neg, &m, &s);
    if (st) return st;
    if (!neg && m > (uint64_t)INT64_MAX) return range_err(key, neg, m, s, "i64");
    *out = neg ? s : (int64_t)m;
    return MOE_OK;
}

moe_status gguf_get_f64(const gguf_ctx *c, const char *key, double *out) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type == GGUF_TYPE_FLOAT32) {
        uint32_t b = le32(e->val);
        float f;
        memcpy(&f, &b, 4);
        *out = f;
    } else if (e->type == GGUF_TYPE_FLOAT64) {
        uint64_t b = le64(e->val);
        memcpy(out, &b, 8);
    } else {
        return wrong_type(key, e, "a float");
    }
    return MOE_OK;
}

moe_status gguf_get_f32(const gguf_ctx *c, const char *key, float *out) {
    double d;
    moe_status st = gguf_get_f64(c, key, &d);
    if (st) return st;
    *out = (float)d;
    return MOE_OK;
}

moe_status gguf_get_bool(const gguf_ctx *c, const char *key, int *out) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type != GGUF_TYPE_BOOL) return wrong_type(key, e, "bool");
    *out = e->val[0] != 0;
    return MOE_OK;
}

moe_status gguf_get_str(const gguf_ctx *c, const char *key, const char **s, size_t *len) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type != GGUF_TYPE_STRING) return wrong_type(key, e, "string");
    *s = (const char *)e->val;
    *len = (size_t)e->n;
    return MOE_OK;
}

int gguf_has_key(const gguf_ctx *c, const char *key) { return find_kv(c, key) != NULL; }

moe_status gguf_get_arr_info(const gguf_ctx *c, const char *key, gguf_type *elem, uint64_t *n) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type != GGUF_TYPE_ARRAY) return wrong_type(key, e, "array");
    if (elem) *elem = (gguf_type)e->elem;
    if (n) *n = e->n;
    return MOE_OK;
}

moe_status gguf_get_arr_data(const gguf_ctx *c, const char *key, gguf_type *elem, uint64_t *n,
                             const void **data) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type != GGUF_TYPE_ARRAY) return wrong_type(key, e, "array");
    if (e->elem == GGUF_TYPE_STRING)
        return moe_error(MOE_ERR_FORMAT, "gguf: key '%s' is a string array, expected numbers", PK(key));
    if (elem) *elem = (gguf_type)e->elem;
    if (n) *n = e->n;
    *data = e->val;
    return MOE_OK;
}

moe_status gguf_get_arr_str(const gguf_ctx *c, const char *key, uint64_t i, const char **s,
                            size_t *len) {
    const kv_entry *e;
    moe_status st = lookup(c, key, &e);
    if (st) return st;
    if (e->type != GGUF_TYPE_ARRAY || e->elem != GGUF_TYPE_STRING)
        return moe_error(MOE_ERR_FORMAT, "gguf: key '%s' is not a string array", PK(key));
    if (i >= e->n)
        return moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': index %" PRIu64 " out of range (%" PRIu64
                         " strings)", PK(key), i, e->n);
    const uint8_t *p = e->val + e->str_off[i];
    *len = (size_t)le64(p);
    *s = (const char *)p + 8;
    return MOE_OK;
}

int gguf_n_kv(const gguf_ctx *c) { return c ? (int)c->n_kv : 0; }

const char *gguf_key_at(const gguf_ctx *c, int i, size_t *len, gguf_type *type) {
    if (!c || i < 0 || (size_t)i >= c->n_kv) return NULL;
    if (len) *len = c->kv[i].key.len;
    if (type) *type = (gguf_type)c->kv[i].type;
    return c->kv[i].key.s;
}

uint32_t gguf_version(const gguf_ctx *c) { return c ? c->version : 0; }
size_t gguf_alignment(const gguf_ctx *c) { return c ? c->alignment : 0; }
size_t gguf_data_offset(const gguf_ctx *c) { return c ? c->data_off : 0; }

size_t gguf_file_offset(const gguf_ctx *c, const void *p) { return (size_t)((const uint8_t *)p - c->base); }

size_t gguf_data_size(const gguf_ctx *c) {
    return c && c->size > c->data_off ? c->size - c->data_off : 0;
}

int gguf_n_tensors(const gguf_ctx *c) { return c ? (int)c->n_t : 0; }

const gguf_tensor *gguf_tensor_at(const gguf_ctx *c, int i) {
    if (!c || i < 0 || (size_t)i >= c->n_t) return NULL;
    return &c->t[i].pub;
}

const gguf_tensor *gguf_find_tensor(const gguf_ctx *c, const char *name) {
    if (!c || !name) return NULL;
    long i = ht_find(&c->t_ht, c->t, sizeof *c->t, name, strlen(name));
    return i < 0 ? NULL : &c->t[i].pub;
}

/* ===================================================================== writer */
typedef struct {
    strref key; /* s is an owned copy */
    uint32_t type;
    uint8_t *val; /* encoded value exactly as it goes after the type field */
    size_t val_len;
} wkv;

typedef struct {
    strref name; /* s is an owned copy */
    uint32_t type;
    int n_dims;
    uint64_t ne[4];
    size_t nbytes;
    const void *data; /* borrowed */
    uint64_t offset;
} wtensor;

struct gguf_writer {
    wkv *kv;
    size_t n_kv, cap_kv;
    htab kv_ht;
    wtensor *t;
    size_t n_t, cap_t;
    htab t_ht;
    moe_status err; /* first failure of a setter, reported again on write */
    char errmsg[256];
};

gguf_writer *gguf_writer_create(void) { return moe_calloc(1, sizeof(gguf_writer)); }

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        moe_free((void *)w->kv[i].key.s);
        moe_free(w->kv[i].val);
    }
    for (size_t i = 0; i < w->n_t; i++) moe_free((void *)w->t[i].name.s);
    moe_free(w->kv);
    moe_free(w->t);
    moe_free(w->kv_ht.slot);
    moe_free(w->t_ht.slot);
    moe_free(w);
}

static moe_status remember(gguf_writer *w, moe_status st) {
    if (st && w && !w->err) {
        w->err = st;
        snprintf(w->errmsg, sizeof w->errmsg, "%s", moe_last_error());
    }
    return st;
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static char *dup_bytes(const char *s, size_t n) {
    char *d = moe_malloc(n + 1);
    if (d) { memcpy(d, s, n); d[n] = 0; }
    return d;
}

/* Takes ownership of val (freed on failure). Replaces the value of an
 * existing key, so the last set wins and the old value survives a failure. */
static moe_status set_kv(gguf_writer *w, const char *key, uint32_t type, uint8_t *val, size_t val_len) {
    if (!w || !key || !*key) {
        moe_free(val);
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: NULL writer or empty key"));
    }
    size_t klen = strlen(key);
    long i = ht_find(&w->kv_ht, w->kv, sizeof *w->kv, key, klen);
    if (i >= 0) {
        moe_free(w->kv[i].val);
        w->kv[i].type = type;
        w->kv[i].val = val;
        w->kv[i].val_len = val_len;
        return MOE_OK;
    }
    char *k = NULL;
    if (grow((void **)&w->kv, &w->cap_kv, w->n_kv + 1, sizeof *w->kv) || !(k = dup_bytes(key, klen))) {
        moe_free(val);
        return remember(w, MOE_ERR_NOMEM);
    }
    w->kv[w->n_kv] = (wkv){{k, klen}, type, val, val_len};
    if (ht_insert(&w->kv_ht, w->kv, sizeof *w->kv, (uint32_t)w->n_kv) < 0) {
        moe_free(k);
        moe_free(val);
        return remember(w, MOE_ERR_NOMEM);
    }
    w->n_kv++;
    return MOE_OK;
}

/* value bytes: a native scalar of the given type, stored little-endian */
static moe_status set_scalar(gguf_writer *w, const char *key, uint32_t type, uint64_t bits) {
    size_t sz = scalar_size(type);
    if (!sz) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': type %u is not a scalar",
                                          PK(key), type));
    uint8_t *v = moe_malloc(sz);
    if (!v) return remember(w, MOE_ERR_NOMEM);
    for (size_t i = 0; i < sz; i++) v[i] = (uint8_t)(bits >> (8 * i));
    return set_kv(w, key, type, v, sz);
}

moe_status gguf_set_u32(gguf_writer *w, const char *key, uint32_t v) { return set_scalar(w, key, GGUF_TYPE_UINT32, v); }
moe_status gguf_set_i32(gguf_writer *w, const char *key, int32_t v) { return set_scalar(w, key, GGUF_TYPE_INT32, (uint32_t)v); }
moe_status gguf_set_u64(gguf_writer *w, const char *key, uint64_t v) { return set_scalar(w, key, GGUF_TYPE_UINT64, v); }
moe_status gguf_set_bool(gguf_writer *w, const char *key, int v) { return set_scalar(w, key, GGUF_TYPE_BOOL, v != 0); }
moe_status gguf_set_f32(gguf_writer *w, const char *key, float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return set_scalar(w, key, GGUF_TYPE_FLOAT32, b);
}

moe_status gguf_set_scalar(gguf_writer *w, const char *key, gguf_type type, const void *value) {
    size_t sz = scalar_size(type);
    if (!value || !sz)
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': bad scalar type %u or NULL value",
                                     PK(key), (unsigned)type));
    uint64_t bits = 0;
    switch (sz) {
    case 1: { uint8_t x; memcpy(&x, value, 1); bits = x; break; }
    case 2: { uint16_t x; memcpy(&x, value, 2); bits = x; break; }
    case 4: { uint32_t x; memcpy(&x, value, 4); bits = x; break; }
    default: memcpy(&bits, value, 8); break;
    }
    if (type == GGUF_TYPE_BOOL) bits = bits != 0;
    return set_scalar(w, key, type, bits);
}

moe_status gguf_set_str(gguf_writer *w, const char *key, const char *s, size_t len) {
    if (!s && len) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': NULL string", PK(key)));
    if (len > SIZE_MAX - 8) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: string too long"));
    uint8_t *v = moe_malloc(8 + len);
    if (!v) return remember(w, MOE_ERR_NOMEM);
    put64(v, len);
    if (len) memcpy(v + 8, s, len);
    return set_kv(w, key, GGUF_TYPE_STRING, v, 8 + len);
}

moe_status gguf_set_arr_data(gguf_writer *w, const char *key, gguf_type elem, const void *data, uint64_t n) {
    pname kp = pkey(key); /* outlives the calls below */
    const char *k = kp.s;
    size_t sz = scalar_size(elem), bytes;
    if (!sz)
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': array element type %u is not numeric",
                                     k, (unsigned)elem));
    if (n > SIZE_MAX || moe_mul_size((size_t)n, sz, &bytes) || bytes > SIZE_MAX - 12)
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': array too large", k));
    if (!data && n) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': NULL array data", k));
    if (elem == GGUF_TYPE_BOOL)
        for (uint64_t i = 0; i < n; i++)
            if (((const uint8_t *)data)[i] > 1)
                return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': bool array holds %u",
                                             k, ((const uint8_t *)data)[i]));
    uint8_t *v = moe_malloc(12 + bytes);
    if (!v) return remember(w, MOE_ERR_NOMEM);
    put32(v, elem);
    put64(v + 4, n);
    /* elements are native; convert to little-endian one by one */
    const uint8_t *src = data;
    for (size_t i = 0; i < (size_t)n; i++) {
        uint64_t x = 0;
        switch (sz) {
        case 1: x = src[i]; break;
        case 2: { uint16_t y; memcpy(&y, src + 2 * i, 2); x = y; break; }
        case 4: { uint32_t y; memcpy(&y, src + 4 * i, 4); x = y; break; }
        default: memcpy(&x, src + 8 * i, 8); break;
        }
        for (size_t b = 0; b < sz; b++) v[12 + i * sz + b] = (uint8_t)(x >> (8 * b));
    }
    return set_kv(w, key, GGUF_TYPE_ARRAY, v, 12 + bytes);
}

moe_status gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *strs, const size_t *lens,
                            uint64_t n) {
    pname kp = pkey(key); /* outlives the calls below */
    const char *k = kp.s;
    if (n && !strs) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': NULL strings", k));
    size_t total = 12;
    for (uint64_t i = 0; i < n; i++) {
        size_t l = lens ? lens[i] : (strs[i] ? strlen(strs[i]) : 0);
        if (!strs[i] && l)
            return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': string %" PRIu64 " is NULL", k, i));
        if (l > SIZE_MAX - 8 - total)
            return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: key '%s': array too large", k));
        total += 8 + l;
    }
    uint8_t *v = moe_malloc(total), *p = v + 12;
    if (!v) return remember(w, MOE_ERR_NOMEM);
    put32(v, GGUF_TYPE_STRING);
    put64(v + 4, n);
    for (uint64_t i = 0; i < n; i++) {
        size_t l = lens ? lens[i] : (strs[i] ? strlen(strs[i]) : 0);
        put64(p, l);
        if (l) memcpy(p + 8, strs[i], l);
        p += 8 + l;
    }
    return set_kv(w, key, GGUF_TYPE_ARRAY, v, total);
}

moe_status gguf_add_tensor(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                           const void *data) {
    if (!w || !name || !*name) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: NULL writer or empty tensor name"));
    size_t nlen = strlen(name);
    pname np = printable(name, nlen);
    const char *nm = np.s;
    if (n_dims < 1 || n_dims > 4 || !ne)
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: tensor '%s' has %d dimensions (must be 1..4)",
                                     nm, n_dims));
    uint64_t une[4] = {1, 1, 1, 1};
    for (int d = 0; d < n_dims; d++) {
        if (ne[d] < 1)
            return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: tensor '%s' has size %" PRId64
                                         " in dimension %d", nm, ne[d], d));
        une[d] = (uint64_t)ne[d];
    }
    size_t nbytes = 0, blk = 1;
    switch (type < 0 ? SIZE_UNKNOWN_TYPE : tensor_nbytes((uint32_t)type, n_dims, une, &nbytes, &blk)) {
    case SIZE_UNKNOWN_TYPE:
        return remember(w, moe_error(MOE_ERR_UNSUPPORTED, "gguf: tensor '%s' has unknown type %d", nm, type));
    case SIZE_BLOCK:
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: tensor '%s' row length %" PRId64
                                     " is not a multiple of block size %zu", nm, ne[0], blk));
    case SIZE_OVERFLOW:
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: tensor '%s' shape overflows", nm));
    }
    if (!data) return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: tensor '%s' has NULL data", nm));
    if (ht_find(&w->t_ht, w->t, sizeof *w->t, name, nlen) >= 0)
        return remember(w, moe_error(MOE_ERR_INVALID_ARG, "gguf: duplicate tensor name '%s'", nm));
    char *copy = NULL;
    if (grow((void **)&w->t, &w->cap_t, w->n_t + 1, sizeof *w->t) || !(copy = dup_bytes(name, nlen)))
        return remember(w, MOE_ERR_NOMEM);
    wtensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    t->name = (strref){copy, nlen};
    t->type = (uint32_t)type;
    t->n_dims = n_dims;
    memcpy(t->ne, une, sizeof une);
    t->nbytes = nbytes;
    t->data = data;
    if (ht_insert(&w->t_ht, w->t, sizeof *w->t, (uint32_t)w->n_t) < 0) {
        moe_free(copy);
        return remember(w, MOE_ERR_NOMEM);
    }
    w->n_t++;
    return MOE_OK;
}

typedef struct {
    const gguf_writer *w;
    const uint8_t *hdr;
    size_t hdr_len; /* including padding */
    size_t align;
} write_job;

static moe_status write_zeros(int fd, size_t n) {
    static const uint8_t zeros[4096];
    while (n) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        moe_status st = moe_write_all(fd, zeros, k);
        if (st) return st;
        n -= k;
    }
    return MOE_OK;
}

static moe_status write_body(int fd, void *user) {
    const write_job *j = user;
    moe_status st = moe_write_all(fd, j->hdr, j->hdr_len);
    for (size_t i = 0; !st && i < j->w->n_t; i++) {
        const wtensor *t = &j->w->t[i];
        st = moe_write_all(fd, t->data, t->nbytes);
        /* pad after every tensor (including the last), as other readers expect */
        if (!st) st = write_zeros(fd, (j->align - t->nbytes % j->align) % j->align);
    }
    return st;
}

moe_status gguf_write_file(gguf_writer *w, const char *path) {
    if (!w || !path) return moe_error(MOE_ERR_INVALID_ARG, "gguf_write_file: NULL argument");
    if (w->err) return moe_error(w->err, "gguf: an earlier call failed: %s", w->errmsg);
    size_t align = GGUF_DEFAULT_ALIGN;
    long ai = ht_find(&w->kv_ht, w->kv, sizeof *w->kv, ALIGN_KEY, strlen(ALIGN_KEY));
    if (ai >= 0) {
        const wkv *a = &w->kv[ai];
        uint32_t v = a->type == GGUF_TYPE_UINT32 ? le32(a->val) : 0;
        if (!v || (v & (v - 1)))
            return moe_error(MOE_ERR_INVALID_ARG, "gguf: " ALIGN_KEY " must be a u32 power of two");
        align = v;
    }
    /* header size, then tensor offsets; sizes all come from memory we hold,
     * but the padded sum can still overflow in principle */
    size_t hdr = 24, off = 0;
    for (size_t i = 0; i < w->n_kv; i++) hdr += 8 + w->kv[i].key.len + 4 + w->kv[i].val_len;
    for (size_t i = 0; i < w->n_t; i++) {
        wtensor *t = &w->t[i];
        hdr += 8 + t->name.len + 4 + 8 * (size_t)t->n_dims + 4 + 8;
        t->offset = off;
        size_t padded = t->nbytes + (align - t->nbytes % align) % align;
        if (padded < t->nbytes || off > SIZE_MAX - padded)
            return moe_error(MOE_ERR_INVALID_ARG, "gguf: total tensor size overflows");
        off += padded;
    }
    size_t hdr_len = (hdr + align - 1) & ~(align - 1);
    uint8_t *h = moe_calloc(1, hdr_len), *p = h;
    if (!h) return MOE_ERR_NOMEM;
    put32(p, GGUF_MAGIC); put32(p + 4, GGUF_VERSION);
    put64(p + 8, w->n_t); put64(p + 16, w->n_kv);
    p += 24;
    for (size_t i = 0; i < w->n_kv; i++) {
        const wkv *e = &w->kv[i];
        put64(p, e->key.len); memcpy(p + 8, e->key.s, e->key.len); p += 8 + e->key.len;
        put32(p, e->type); p += 4;
        memcpy(p, e->val, e->val_len); p += e->val_len;
    }
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        put64(p, t->name.len); memcpy(p + 8, t->name.s, t->name.len); p += 8 + t->name.len;
        put32(p, (uint32_t)t->n_dims); p += 4;
        for (int d = 0; d < t->n_dims; d++) { put64(p, t->ne[d]); p += 8; }
        put32(p, t->type); put64(p + 4, t->offset); p += 12;
    }
    write_job job = {w, h, hdr_len, align};
    moe_status st = moe_write_atomic(path, write_body, &job);
    moe_free(h);
    return st;
}

/* ============================================================ atomic writes */
moe_status moe_write_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        size_t chunk = len > ((size_t)1 << 30) ? (size_t)1 << 30 : len;
        ssize_t n = write(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            return moe_error(MOE_ERR_IO, "%s", strerror(errno));
        }
        /* a write that makes no progress means the device is full */
        if (n == 0) return moe_error(MOE_ERR_IO, "%s", strerror(ENOSPC));
        p += n;
        len -= (size_t)n;
    }
    return MOE_OK;
}

/* Best effort: the rename is already done, and some filesystems refuse to
 * fsync a directory; failing here would report a save that did happen. */
static void fsync_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash) {
        strcpy(dir, ".");
    } else {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        if (n >= sizeof dir) return;
        memcpy(dir, path, n);
        dir[n] = 0;
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}

moe_status moe_write_atomic(const char *path, moe_status (*write_fn)(int fd, void *user), void *user) {
    if (!path || !*path || !write_fn) return moe_error(MOE_ERR_INVALID_ARG, "moe_write_atomic: bad argument");
    size_t n = strlen(path);
    char *tmp = moe_malloc(n + 5);
    if (!tmp) return MOE_ERR_NOMEM;
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    moe_status st = MOE_OK;
    int fd;
    do fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        /* not ours to remove: it may be something else entirely */
        st = moe_error(MOE_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        goto out;
    }
    if ((st = write_fn(fd, user))) {
        moe_error_prefix(st, "writing %s", path);
        goto fail;
    }
    if (fsync(fd) != 0) {
        st = moe_error(MOE_ERR_IO, "writing %s: %s", path, strerror(errno));
        goto fail;
    }
    int rc = close(fd); /* on NFS a late write error shows up here */
    fd = -1;
    if (rc != 0) {
        st = moe_error(MOE_ERR_IO, "writing %s: %s", path, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        st = moe_error(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto fail;
    }
    fsync_parent(path);
    goto out;
fail:
    if (fd >= 0) close(fd);
    unlink(tmp);
out:
    moe_free(tmp);
    return st;
}
