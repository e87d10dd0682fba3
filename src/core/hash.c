/* core/hash: FNV-1a 64 (Fowler, Noll, Vo): xor in a byte, multiply by the prime. */
#include "core/hash.h"

uint64_t moe_fnv1a64(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull; /* FNV prime 2^40 + 2^8 + 0xb3 */
    return h;
}
