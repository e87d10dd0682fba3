/* core/hash: the one FNV-1a (64-bit) of the library, for checksums and
 * fingerprints, and for hash tables keyed by short strings. It is chained:
 * start from MOE_FNV1A64_BASIS and feed the result back in to hash several
 * pieces as if they were one run of bytes. */
#ifndef MOE_HASH_H
#define MOE_HASH_H
#include <stddef.h>
#include <stdint.h>

/* the FNV-1a 64 offset basis, 14695981039346656037. The copies this replaces
 * started from 1469598103934665603 (the same digits, one short): a fine seed,
 * but not FNV-1a, and test_core's published vectors would fail with it. */
#define MOE_FNV1A64_BASIS 0xcbf29ce484222325ull
uint64_t moe_fnv1a64(uint64_t h, const void *p, size_t n);

#endif
