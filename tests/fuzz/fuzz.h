/* tests/fuzz/fuzz.h: shared by every fuzz target.
 *
 * A target defines   static void fuzz_one(const uint8_t *data, size_t size)
 * and optionally     static void fuzz_init(void)   (set FUZZ_HAS_INIT first),
 * then includes this header, which supplies libFuzzer's entry points. The same
 * file links either with -fsanitize=fuzzer (make fuzz) or with replay.c, a
 * plain main that feeds it every file of the directories it is given
 * (make test replays the seed corpora that way).
 *
 * Every input must leave the engine's allocation counter where it found it:
 * a leak through moe_malloc aborts, which both libFuzzer and the replayer
 * report as a failure with the input that caused it. */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/core.h"

static void fuzz_one(const uint8_t *data, size_t size);
#ifdef FUZZ_HAS_INIT
static void fuzz_init(void);
#endif

/* A path naming a file that holds exactly data[0..size): one memfd per
 * process, rewritten on every call ("/proc/self/fd/N"). Library readers that
 * only take a path are fuzzed through it without touching the disk. */
static inline const char *fuzz_file(const void *data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("moe-fuzz", MFD_CLOEXEC);
        if (fd < 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0) { perror("ftruncate"); abort(); }
    const uint8_t *p = data;
    size_t left = size;
    off_t off = 0;
    while (left) {
        ssize_t n = pwrite(fd, p, left, off);
        if (n <= 0) { perror("pwrite"); abort(); }
        p += n; left -= (size_t)n; off += n;
    }
    return path;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int fuzz_write_seeds_entry(const char *dir);

/* "replay --write-seeds DIR": a target that defines FUZZ_HAS_SEEDS writes its
 * generated seed files (static int fuzz_write_seeds(const char *dir)). */
#ifdef FUZZ_HAS_SEEDS
static int fuzz_write_seeds(const char *dir);
int fuzz_write_seeds_entry(const char *dir) { return fuzz_write_seeds(dir); }
#else
int fuzz_write_seeds_entry(const char *dir) { (void)dir; return -1; }
#endif

/* writes a seed file; 0 on success */
static inline int fuzz_put(const char *dir, const char *name, const void *p, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return -1; }
    int bad = n && fwrite(p, 1, n, f) != n;
    bad |= fclose(f) != 0;
    return bad ? -1 : 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    moe_set_threads(1); /* fuzzing is about input handling, not speed */
#ifdef FUZZ_HAS_INIT
    fuzz_init();
#endif
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t before = moe_alloc_in_use();
    fuzz_one(data, size);
    size_t after = moe_alloc_in_use();
    if (after != before) {
        fprintf(stderr, "fuzz: %zu bytes allocated through moe_malloc were not freed\n",
                after - before);
        abort();
    }
    return 0;
}
#endif
