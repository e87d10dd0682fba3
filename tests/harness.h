/* A small test harness of our own: CHECK records a failure and goes on;
 * TEST_SKIP ends a case as skipped, with its reason (never as passed);
 * TEST_MAIN_END prints "N passed, N failed, N skipped" and returns non-zero on
 * failure. tests/run.sh sums those lines over every test program. */
#ifndef MOE_HARNESS_H
#define MOE_HARNESS_H
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

static int th_passed, th_failed, th_skipped, th_case_failed;
static const char *th_case = "";

#define TEST_CASE(name) \
    do { th_case = (name); th_case_failed = 0; } while (0)
#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            th_case_failed = 1;                                               \
            printf("  FAIL %s (%s:%d): ", th_case, __FILE__, __LINE__);       \
            printf(__VA_ARGS__);                                              \
            printf("\n");                                                     \
        }                                                                     \
    } while (0)
/* Ends a case started with TEST_CASE: counts it once. */
#define TEST_END()                                                            \
    do {                                                                      \
        if (th_case_failed) { th_failed++; printf("FAIL %s\n", th_case); }    \
        else { th_passed++; printf("ok   %s\n", th_case); }                   \
        fflush(stdout);                                                       \
    } while (0)
/* Ends a case started with TEST_CASE as skipped: it counts neither as
 * passed nor as failed, and the reason is printed. */
#define TEST_SKIP(...)                                                        \
    do {                                                                      \
        th_skipped++;                                                         \
        printf("skip %s: ", th_case);                                         \
        printf(__VA_ARGS__);                                                  \
        printf("\n");                                                         \
        fflush(stdout);                                                       \
    } while (0)
/* Fails the current case and ends the program, summary line included, when
 * nothing after it could run (a setup allocation failed, say). */
#define TEST_FATAL(...)                                                       \
    do {                                                                      \
        CHECK(0, __VA_ARGS__);                                                \
        TEST_END();                                                           \
        printf("%d passed, %d failed, %d skipped\n", th_passed, th_failed,    \
               th_skipped);                                                   \
        exit(1);                                                              \
    } while (0)
#define TEST_MAIN_END()                                                       \
    do {                                                                      \
        printf("%d passed, %d failed, %d skipped\n", th_passed, th_failed,    \
               th_skipped);                                                   \
        return th_failed ? 1 : 0;                                             \
    } while (0)

/* max |a-b| / max(|b|, floor): relative error with an absolute floor */
static inline double th_max_rel_err(const float *a, const float *b, size_t n, double floor_) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        double s = fabs((double)b[i]);
        if (s < floor_) s = floor_;
        if (d / s > worst || d != d) worst = (d != d) ? INFINITY : d / s;
    }
    return worst;
}

/* A scratch file path under $TMPDIR (or /tmp), unique to this process. */
static inline const char *th_tmp_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("TMPDIR");
    snprintf(buf, cap, "%s/moe_%ld_%s", dir && *dir ? dir : "/tmp", (long)getpid(), name);
    return buf;
}

/* Writes a small synthetic corpus: docs documents of words_per_doc words from a
 * fixed list (two of them non-ASCII), separated by form-feed lines. */
static inline int th_write_word_text(const char *path, unsigned seed, int docs, int words_per_doc) {
    static const char *words[] = {"the", "expert", "router", "token", "sparse", "model", "learns", "a",
                                  "mixture", "of", "layers", "and", "gates", "choose", "two", "\xc3\x9c" "ber",
                                  "ni\xc3\xb1" "o"};
    const unsigned n_words = sizeof words / sizeof words[0];
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    for (int doc = 0; doc < docs; doc++) {
        for (int i = 0; i < words_per_doc; i++) {
            seed = seed * 1103515245u + 12345u;
            fprintf(f, "%s%s", words[(seed >> 16) % n_words], (seed >> 8) % 11 == 0 ? ".\n" : " ");
        }
        fprintf(f, "\n\f\n");
    }
    return fclose(f);
}

/* Runs a PyTorch reference checker ("/usr/bin/python3 SCRIPT check DUMP") and
 * turns each of its "ok ..." / "FAIL ..." lines into a case named
 * "LABEL: ..."; then one case that the checker ran at least min_checks checks
 * and exited 0. */
static inline void th_run_torch_checker(const char *script, const char *dump, const char *label,
                                        int min_checks) {
    char cmd[1024], line[1024], name[1400];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s check %s 2>&1", script, dump);
    FILE *p = popen(cmd, "r");
    int seen = 0;
    while (p && fgets(line, sizeof line, p)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "ok", 2) || !strncmp(line, "FAIL", 4)) {
            const char *rest = line + (line[0] == 'o' ? 2 : 4);
            snprintf(name, sizeof name, "%s: %s", label, rest + strspn(rest, " "));
            TEST_CASE(name);
            CHECK(line[0] == 'o', "%s", line);
            TEST_END();
            seen++;
        } else if (strstr(line, "passed,") == NULL) {
            printf("  | %s\n", line);
        }
    }
    int rc = p ? pclose(p) : -1;
    snprintf(name, sizeof name, "%s: PyTorch checker ran", label);
    TEST_CASE(name);
    CHECK(seen >= min_checks && rc == 0, "PyTorch checker ran %d checks, exit status %d", seen, rc);
    TEST_END();
}
#endif
