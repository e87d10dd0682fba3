/* A small test harness of our own: CHECK records a failure and goes on;
 * TEST_MAIN_END prints "N passed, N failed" and returns non-zero on failure.
 * tests/run.sh sums those lines over every test program. */
#ifndef MOE_HARNESS_H
#define MOE_HARNESS_H
#include <math.h>
#include <stdio.h>
#include <string.h>

static int th_passed, th_failed, th_case_failed;
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
#define TEST_MAIN_END()                                                       \
    do {                                                                      \
        printf("%d passed, %d failed\n", th_passed, th_failed);               \
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
#endif
