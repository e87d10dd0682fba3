/* core: FNV-1a 64 against the published test vectors (Noll's FNV page), and
 * the allocation-failure injector's after/repeat counting, and whole-file
 * reading (moe_read_file / moe_read_stream). */
#include "harness.h"
#include "core/core.h"
#include "core/hash.h"

static void test_fnv(void) {
    TEST_CASE("FNV-1a 64: published vectors");
    static const struct { const char *s; uint64_t h; } v[] = {
        {"", 0xcbf29ce484222325ull},
        {"a", 0xaf63dc4c8601ec8cull},
        {"foobar", 0x85944171f73967e8ull},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        uint64_t h = moe_fnv1a64(MOE_FNV1A64_BASIS, v[i].s, strlen(v[i].s));
        CHECK(h == v[i].h, "\"%s\": %016llx, expected %016llx", v[i].s, (unsigned long long)h,
              (unsigned long long)v[i].h);
    }
    TEST_END();

    TEST_CASE("FNV-1a 64: chained pieces hash as one run");
    uint64_t whole = moe_fnv1a64(MOE_FNV1A64_BASIS, "foobar", 6);
    uint64_t parts = moe_fnv1a64(moe_fnv1a64(MOE_FNV1A64_BASIS, "foo", 3), "bar", 3);
    CHECK(whole == parts, "%016llx vs %016llx", (unsigned long long)whole, (unsigned long long)parts);
    TEST_END();
}

/* which of n allocations fail under the current configuration: a bit each */
static unsigned failing(int n) {
    unsigned mask = 0;
    for (int i = 0; i < n; i++) {
        void *p = moe_malloc(8);
        if (!p) mask |= 1u << i;
        moe_free(p);
    }
    return mask;
}

static void test_fail_config(void) {
    static const struct { long after, repeat; unsigned want; long count; } c[] = {
        {3, 1, 0x04u, 1},   /* only the third */
        {2, 3, 0x0eu, 3},   /* second, third, fourth */
        {4, -1, 0xf8u, 5},  /* fourth and every later one */
        {0, 5, 0x00u, 0},   /* after 0: off */
        {2, 0, 0x00u, 0},   /* repeat 0: off */
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "alloc fail config: after %ld, repeat %ld", c[i].after, c[i].repeat);
        TEST_CASE(name);
        size_t before = moe_alloc_in_use();
        moe_alloc_fail_config(c[i].after, c[i].repeat);
        unsigned got = failing(8);
        long count = moe_alloc_fail_config(0, 0);
        CHECK(got == c[i].want, "failing allocations (bit i = allocation i+1) %#x, expected %#x", got,
              c[i].want);
        CHECK(count == c[i].count, "reported %ld failures, expected %ld", count, c[i].count);
        CHECK(moe_alloc_in_use() == before, "counter moved by %zu", moe_alloc_in_use() - before);
        TEST_END();
    }
    TEST_CASE("alloc fail after n is persistent");
    moe_alloc_fail_after(2);
    unsigned got = failing(6);
    moe_alloc_fail_after(0);
    CHECK(got == 0x3eu, "failing allocations %#x, expected 0x3e", got);
    CHECK(failing(4) == 0, "still failing after reset");
    TEST_END();
}

/* writes n bytes of a known pattern to path; reads them back */
static void test_read_file(void) {
    char path[256];
    th_tmp_path(path, sizeof path, "read_file.bin");
    static const size_t sizes[] = {0, 1, 65534, 65535, 65536, 200000};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        char name[64];
        snprintf(name, sizeof name, "read file of %zu bytes", n);
        TEST_CASE(name);
        FILE *f = fopen(path, "wb");
        for (size_t i = 0; f && i < n; i++) fputc((int)((i * 131 + 7) & 0xff), f);
        CHECK(f && fclose(f) == 0, "cannot write %s", path);
        size_t before = moe_alloc_in_use();
        char *buf = NULL;
        size_t len = 12345;
        moe_status st = moe_read_file(path, &buf, &len);
        CHECK(st == MOE_OK, "status %s: %s", moe_status_str(st), moe_last_error());
        CHECK(len == n, "read %zu bytes, wrote %zu", len, n);
        size_t bad = n;
        for (size_t i = 0; buf && i < n && i < len; i++)
            if ((unsigned char)buf[i] != ((i * 131 + 7) & 0xff)) { bad = i; break; }
        CHECK(buf && bad == n, "byte %zu differs", bad);
        CHECK(buf && buf[len] == 0, "no NUL after the data");
        moe_free(buf);
        CHECK(moe_alloc_in_use() == before, "leaked %zu bytes", moe_alloc_in_use() - before);
        TEST_END();
    }
    remove(path);

    TEST_CASE("read file: a missing file is an I/O error naming it");
    char *buf = (char *)1;
    size_t len = 1;
    moe_status st = moe_read_file(path, &buf, &len);
    CHECK(st == MOE_ERR_IO, "status %s", moe_status_str(st));
    CHECK(strstr(moe_last_error(), path) != NULL, "message '%s' does not name the file", moe_last_error());
    TEST_END();

    TEST_CASE("read file: out of memory is reported and frees what it had");
    FILE *f = fopen(path, "wb");
    for (int i = 0; f && i < 100000; i++) fputc('x', f);
    if (f) fclose(f);
    size_t before = moe_alloc_in_use();
    moe_alloc_fail_config(2, 1); /* the first growth of the buffer */
    st = moe_read_file(path, &buf, &len);
    long injected = moe_alloc_fail_config(0, 0);
    CHECK(injected == 1 && st == MOE_ERR_NOMEM, "%ld injected, status %s", injected, moe_status_str(st));
    CHECK(moe_alloc_in_use() == before, "leaked %zu bytes", moe_alloc_in_use() - before);
    remove(path);
    TEST_END();
}

int main(void) {
    test_fnv();
    test_fail_config();
    test_read_file();
    TEST_MAIN_END();
}
