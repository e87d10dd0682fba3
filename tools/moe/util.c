/* util.c: messages, file checks and number formatting for the moe command. */
#include "cli.h"

#include "dist/dist.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int fail(const char *fmt, ...) {
    va_list ap;
    fputs("moe: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return EXIT_FAIL;
}

int lib_fail(const char *context) {
    if (context && *context) return fail("%s: %s", context, moe_last_error());
    return fail("%s", moe_last_error());
}

int lib_fail_file(const char *path) {
    return lib_fail(strstr(moe_last_error(), path) ? NULL : path);
}

/* ---- files ---- */
int path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int same_file(const char *a, const char *b) {
    struct stat sa, sb;
    if (!a || !b || stat(a, &sa) != 0 || stat(b, &sb) != 0) return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* 1 if dir directly holds a non-empty regular, non-hidden file (what the
 * library reads from a data directory; subdirectories are not read) */
static int dir_has_text(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[PATH_MAX];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= sizeof path) continue;
        struct stat st;
        found = stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0;
    }
    closedir(d);
    return found;
}

int check_data_paths(const str_list *paths) {
    if (paths->n == 0) return fail("no data given (use --data PATH)");
    for (int i = 0; i < paths->n; i++) {
        const char *p = paths->v[i];
        struct stat st;
        if (stat(p, &st) != 0) return fail("data path '%s': %s", p, strerror(errno));
        if (S_ISREG(st.st_mode)) {
            if (st.st_size == 0) return fail("data file '%s' is empty", p);
            if (access(p, R_OK) != 0) return fail("data file '%s': %s", p, strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            if (access(p, R_OK | X_OK) != 0) return fail("data directory '%s': %s", p, strerror(errno));
            if (!dir_has_text(p)) return fail("data directory '%s' holds no non-empty files", p);
        } else {
            return fail("data path '%s' is not a file or directory", p);
        }
    }
    return 0;
}

int check_out_path(const char *out, const char *allowed, int force) {
    struct stat st;
    if (stat(out, &st) == 0) {
        if (S_ISDIR(st.st_mode)) return fail("output '%s' is a directory", out);
        if (!force && !(allowed && same_file(out, allowed)))
            return fail("refusing to overwrite %s (use --force)", out);
    }
    size_t n = strlen(out);
    char *copy = malloc(n + 1);
    if (!copy) return fail("out of memory");
    memcpy(copy, out, n + 1);
    const char *dir = dirname(copy);
    int rc = 0;
    if (!is_dir(dir)) rc = fail("cannot write '%s': directory '%s' does not exist", out, dir);
    else if (access(dir, W_OK) != 0) rc = fail("cannot write '%s': %s", out, strerror(errno));
    free(copy);
    return rc;
}

const char *default_corpus(void) {
    static char buf[PATH_MAX];
    const char *rel = "data/corpus-small";
    if (is_dir(rel)) return rel;
    /* next to the binary: <root>/build/moe -> <root>/data/corpus-small */
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return NULL;
    exe[n] = 0;
    char *root = dirname(dirname(exe));
    if ((size_t)snprintf(buf, sizeof buf, "%s/%s", root, rel) >= sizeof buf) return NULL;
    return is_dir(buf) ? buf : NULL;
}

int open_model(const char *path, moe_model **m) { return open_model_with(path, NULL, m); }

int open_model_with(const char *path, const moe_load_options *opts, moe_model **m) {
    struct stat st;
    *m = NULL;
    if (stat(path, &st) != 0) return fail("model file '%s': %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) return fail("model file '%s' is a directory", path);
    if (moe_model_load_with(m, path, opts) != MOE_OK) return lib_fail_file(path);
    return 0;
}

int load_model(const char *path, moe_model **m) { return load_model_with(path, NULL, m); }

int load_model_with(const char *path, const moe_load_options *opts, moe_model **m) {
    if (open_model_with(path, opts, m)) return EXIT_FAIL;
    if (!moe_model_tokenizer(*m)) {
        moe_model_free(*m);
        *m = NULL;
        return fail("model '%s' has no tokenizer", path);
    }
    return 0;
}

/* one line: hit rate, bytes read per token, what the cache holds */
void print_offload_stats(const char *cmd, const moe_model *m) {
    moe_offload_stats s;
    moe_model_offload_stats(m, &s);
    if (!s.budget) return;
    const double uses = (double)(s.hits + s.misses), mib = 1024.0 * 1024.0;
    fprintf(stderr, "moe %s: experts: hit rate %.1f%% (%lld hits, %lld misses), %.2f MiB read per token; cache %.1f MiB "
            "of a %.1f MiB budget (%.0f%% of the experts' %.1f MiB), %d of %d experts\n", cmd,
            uses ? 100.0 * (double)s.hits / uses : 0.0, (long long)s.hits, (long long)s.misses,
            s.tokens ? (double)s.bytes_read / (double)s.tokens / mib : 0.0, (double)s.cache_bytes / mib,
            (double)s.budget / mib, 100.0 * (double)s.budget / (double)s.expert_bytes, (double)s.expert_bytes / mib,
            s.slots, s.units);
    if (s.prefetched)
        fprintf(stderr, "moe %s: prefetch: %.2f experts read ahead per token, %.0f%% of them used; %lld misses on experts "
                "a prefetch evicted\n", cmd, s.tokens ? (double)s.prefetched / (double)s.tokens : 0.0,
                100.0 * (double)s.prefetch_used / (double)s.prefetched, (long long)s.prefetch_harm);
}

int cli_check_inference_ep(cli_cmd *cmd, int ep) {
    const moe_dist *w = dist_world();
    if (ep > 1 && !dist_is_mpi())
        return cli_usage_error(cmd->name, "--expert-parallel needs the distributed build (make MPI=1) under mpirun -np %d", ep);
    if (w->size > 1 && ep != w->size) /* every rank refuses alike; rank 0 says why */
        return w->rank ? EXIT_USAGE : cli_usage_error(cmd->name, "under mpirun -np %d give --expert-parallel %d: every rank runs "
                                                      "the same tokens, and the experts are what is split (got %d)", w->size, w->size, ep);
    if (ep > 1 && w->size != ep)
        return cli_usage_error(cmd->name, "--expert-parallel %d needs %d ranks: mpirun -np %d build-mpi/moe %s ...", ep, ep, ep, cmd->name);
    return 0;
}

void print_rank_stats(const char *cmd, const moe_model *m) {
    const moe_dist *w = dist_world();
    if (w->ep <= 1) return;
    moe_offload_stats s;
    moe_model_offload_stats(m, &s);
    const int E = moe_model_config(m)->n_experts, per = E / w->ep;
    fprintf(stderr, "moe %s: rank %d of %d: experts %d..%d of each MoE layer; read %lld expert bytes of its %lld; "
            "exchanged %lld bytes out, %lld in, %.3f s\n", cmd, w->rank, w->size, w->ep_rank * per, w->ep_rank * per + per - 1,
            (long long)s.bytes_read, (long long)s.expert_bytes, (long long)w->a2a_sent, (long long)w->a2a_recv, w->t_a2a);
}

int cli_apply_routing(cli_cmd *cmd, const cli_routing *r, moe_model *m) {
    if (cli_given(cmd, "min-experts") && !cli_given(cmd, "expert-threshold"))
        return cli_usage_error(cmd->name, "--min-experts only counts with --expert-threshold");
    if (!cli_given(cmd, "active-experts") && !cli_given(cmd, "expert-threshold")) return 0;
    if (moe_model_set_routing(m, r->active, r->threshold, r->min) != MOE_OK) return lib_fail(NULL);
    return 0;
}

double cli_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- formatting ---- */
void fmt_human(char *buf, size_t cap, int64_t n) {
    static const char *unit[] = {"", "K", "M", "B", "T"};
    double v = (double)n;
    int u = 0;
    while (u < 4 && (v >= 999.95 || v <= -999.95)) { v /= 1000.0; u++; }
    if (u == 0) snprintf(buf, cap, "%" PRId64, n);
    else snprintf(buf, cap, "%.1f%s", v, unit[u]);
}

void fmt_commas(char *buf, size_t cap, int64_t n) {
    char digits[32];
    snprintf(digits, sizeof digits, "%" PRIu64, n < 0 ? (uint64_t)0 - (uint64_t)n : (uint64_t)n);
    char tmp[48];
    size_t len = strlen(digits), j = 0;
    if (n < 0) tmp[j++] = '-';
    for (size_t i = 0; i < len; i++) {
        if (i > 0 && (len - i) % 3 == 0) tmp[j++] = ',';
        tmp[j++] = digits[i];
    }
    tmp[j] = 0;
    snprintf(buf, cap, "%s", tmp);
}

void status_line(int tty, const char *line, int *open) {
    if (tty) {
        fprintf(stderr, "\r%s\033[K", line);
        *open = 1;
    } else {
        fprintf(stderr, "%s\n", line);
    }
    fflush(stderr);
}

void fmt_duration(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e9) { snprintf(buf, cap, "-"); return; }
    long t = (long)(s + 0.5);
    if (t < 60) snprintf(buf, cap, "%lds", t);
    else if (t < 3600) snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, cap, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
}

/* "Presets:", then a line per preset: its name and what it is */
void print_presets(FILE *f, const char *indent) {
    const char *const *names = moe_preset_names();
    int width = 0;
    for (int i = 0; names && names[i]; i++)
        if ((int)strlen(names[i]) > width) width = (int)strlen(names[i]);
    fprintf(f, "%sPresets:\n", indent);
    for (int i = 0; names && names[i]; i++) {
        const char *about = moe_preset_about(names[i]);
        fprintf(f, "%s  %-*s  %s\n", indent, width, names[i], about ? about : "");
    }
}

/* The keys --set understands: the left sides of moe_config_describe's lines. */
void print_config_keys(FILE *f) {
    moe_config cfg;
    if (moe_config_preset(&cfg, "default") != MOE_OK) return;
    char buf[8192];
    moe_config_describe(&cfg, buf, sizeof buf);
    fputs("Config keys for --set:\n ", f);
    int col = 1;
    for (char *line = buf; *line;) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        size_t k = 0;
        while (k < len && line[k] == ' ') k++;
        size_t start = k;
        while (k < len && line[k] != ' ' && line[k] != '=') k++;
        if (k > start) {
            if (col + (int)(k - start) + 1 > 78) { fputs("\n ", f); col = 1; }
            fprintf(f, " %.*s", (int)(k - start), line + start);
            col += (int)(k - start) + 1;
        }
        if (!nl) break;
        line = nl + 1;
    }
    fputs("\n", f);
}
