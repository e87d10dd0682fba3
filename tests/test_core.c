/* core: FNV-1a 64 against the published test vectors (Noll's FNV page), and
 * the allocation-failure injector's after/repeat counting. */
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

int main(void) {
    test_fnv();
    test_fail_config();
    TEST_MAIN_END();
}
