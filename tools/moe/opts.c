/* opts.c: the one option parser of the moe command.
 * Accepts "--flag value" and "--flag=value", "--" to end options, rejects
 * unknown flags, converts numbers strictly and checks their ranges. */
#include "cli.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int cli_usage_error(const char *cmd_name, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "moe %s: ", cmd_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see 'moe %s --help')\n", cmd_name);
    return EXIT_USAGE;
}

/* ---- strict numbers ---- */
int parse_int(const char *s, int *out) {
    if (!s || !*s || !(s[0] == '-' || s[0] == '+' || (s[0] >= '0' && s[0] <= '9'))) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < INT32_MIN || v > INT32_MAX) return -1;
    *out = (int)v;
    return 0;
}

int parse_u64(const char *s, uint64_t *out) {
    if (!s || !(s[0] >= '0' && s[0] <= '9')) return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s) return -1;
    *out = (uint64_t)v;
    return 0;
}

int parse_float(const char *s, float *out) {
    if (!s || !*s) return -1;
    char c = s[0];
    if (!(c == '-' || c == '+' || c == '.' || (c >= '0' && c <= '9'))) return -1; /* no "nan", "inf", " 1" */
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno == ERANGE && fabs(v) > 1.0) return -1;  /* overflow (underflow to ~0 is fine) */
    if (*end || end == s || !isfinite(v) || fabs(v) > FLT_MAX) return -1;
    *out = (float)v;
    return 0;
}

static const char *range_text(opt_range r) {
    switch (r) {
    case R_POS: return "> 0";
    case R_NONNEG: return ">= 0";
    case R_GT1: return "> 1";
    case R_UNIT: return "in (0, 1]";
    default: return "";
    }
}

static int in_range(double v, opt_range r) {
    switch (r) {
    case R_POS: return v > 0;
    case R_NONNEG: return v >= 0;
    case R_GT1: return v > 1;
    case R_UNIT: return v > 0 && v <= 1;
    default: return 1;
    }
}

cli_opt *cli_opt_find(cli_cmd *cmd, const char *name) {
    for (int i = 0; i < cmd->n_opts; i++)
        if (strcmp(cmd->opts[i].name, name) == 0) return &cmd->opts[i];
    return NULL;
}

int cli_given(cli_cmd *cmd, const char *name) {
    cli_opt *o = cli_opt_find(cmd, name);
    return o ? o->given : 0;
}

static cli_opt *find_n(cli_cmd *cmd, const char *name, size_t len) {
    for (int i = 0; i < cmd->n_opts; i++)
        if (strlen(cmd->opts[i].name) == len && strncmp(cmd->opts[i].name, name, len) == 0)
            return &cmd->opts[i];
    return NULL;
}

/* Converts and stores one value; returns -1 to go on or EXIT_USAGE. */
static int set_value(cli_cmd *cmd, cli_opt *o, const char *val) {
    double num = 0;
    const char *what = NULL;
    switch (o->kind) {
    case OPT_INT: {
        int v;
        if (parse_int(val, &v)) { what = "an integer"; break; }
        *(int *)o->dst = v; num = v;
        break;
    }
    case OPT_U64: {
        uint64_t v;
        if (parse_u64(val, &v)) { what = "a non-negative integer"; break; }
        *(uint64_t *)o->dst = v; num = (double)v;
        break;
    }
    case OPT_FLOAT: {
        float v;
        if (parse_float(val, &v)) { what = "a number"; break; }
        *(float *)o->dst = v; num = v;
        break;
    }
    case OPT_STR:
        if (!*val) return cli_usage_error(cmd->name, "option '--%s' needs a non-empty value", o->name);
        *(const char **)o->dst = val;
        return -1;
    case OPT_TEXT:
        *(const char **)o->dst = val;
        return -1;
    case OPT_LIST: {
        if (!*val) return cli_usage_error(cmd->name, "option '--%s' needs a non-empty value", o->name);
        str_list *l = o->dst;
        l->v[l->n++] = val;
        return -1;
    }
    case OPT_FLAG:
        return -1;
    }
    if (what) return cli_usage_error(cmd->name, "option '--%s' expects %s, got '%s'", o->name, what, val);
    if (!in_range(num, o->range))
        return cli_usage_error(cmd->name, "option '--%s' must be %s, got '%s'", o->name,
                               range_text(o->range), val);
    return -1;
}

static int is_help(const char *a) { return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0; }

int cli_parse(cli_cmd *cmd, int argc, char **argv) {
    /* --help anywhere wins (skipping option values, so "--prompt --help" is a prompt) */
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) break;
        if (is_help(a)) { cli_help(cmd, stdout); return 0; }
        if (a[0] == '-' && a[1] == '-' && !strchr(a, '=')) {
            cli_opt *o = find_n(cmd, a + 2, strlen(a + 2));
            if (o && o->kind != OPT_FLAG) i++;
        }
    }
    for (int i = 0; i < cmd->n_opts; i++) {
        cli_opt *o = &cmd->opts[i];
        o->given = 0;
        if (o->kind == OPT_LIST) {
            str_list *l = o->dst;
            l->n = 0;
            l->v = calloc((size_t)argc + 1, sizeof *l->v);
            if (!l->v) return fail("out of memory");
        }
    }
    if (cmd->positional) {
        cmd->positional->n = 0;
        cmd->positional->v = calloc((size_t)argc + 1, sizeof *cmd->positional->v);
        if (!cmd->positional->v) return fail("out of memory");
    }
    int only_positional = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!only_positional && strcmp(a, "--") == 0) { only_positional = 1; continue; }
        if (!only_positional && a[0] == '-' && a[1] != '\0') {
            if (a[1] != '-') return cli_usage_error(cmd->name, "unknown option '%s'", a);
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            cli_opt *o = find_n(cmd, name, len);
            if (!o) return cli_usage_error(cmd->name, "unknown option '--%.*s'", (int)len, name);
            o->given++;
            if (o->kind == OPT_FLAG) {
                if (eq) return cli_usage_error(cmd->name, "option '--%s' takes no value", o->name);
                *(int *)o->dst = 1;
                continue;
            }
            const char *val;
            if (eq) {
                val = eq + 1;
            } else {
                /* the next word is the value, unless it is another of our options */
                const char *nx = i + 1 < argc ? argv[i + 1] : NULL;
                int next_is_opt = nx && nx[0] == '-' && nx[1] == '-' &&
                                  (find_n(cmd, nx + 2, strcspn(nx + 2, "=")) || is_help(nx));
                if (!nx || next_is_opt)
                    return cli_usage_error(cmd->name, "option '--%s' needs a value (--%s %s)",
                                           o->name, o->name, o->metavar ? o->metavar : "VALUE");
                val = argv[++i];
            }
            int rc = set_value(cmd, o, val);
            if (rc >= 0) return rc;
            continue;
        }
        if (!cmd->positional) return cli_usage_error(cmd->name, "unexpected argument '%s'", a);
        cmd->positional->v[cmd->positional->n++] = a;
    }
    return -1;
}

void cli_free(cli_cmd *cmd) {
    for (int i = 0; i < cmd->n_opts; i++) {
        if (cmd->opts[i].kind == OPT_LIST) {
            str_list *l = cmd->opts[i].dst;
            free(l->v);
            l->v = NULL;
            l->n = 0;
        }
    }
    if (cmd->positional) {
        free(cmd->positional->v);
        cmd->positional->v = NULL;
        cmd->positional->n = 0;
    }
}

/* ---- --set KEY=VALUE ---- */
int cli_check_sets(const char *cmd_name, const str_list *sets) {
    for (int i = 0; i < sets->n; i++) {
        const char *eq = strchr(sets->v[i], '=');
        if (!eq || eq == sets->v[i])
            return cli_usage_error(cmd_name, "--set expects KEY=VALUE, got '%s'", sets->v[i]);
    }
    return 0;
}

int cli_apply_sets(const char *cmd_name, const str_list *sets, moe_config *cfg) {
    int rc = cli_check_sets(cmd_name, sets);
    for (int i = 0; !rc && i < sets->n; i++) {
        const char *kv = sets->v[i], *eq = strchr(kv, '=');
        char key[128];
        size_t klen = (size_t)(eq - kv);
        if (klen >= sizeof key) return fail("--set %s: key too long", kv);
        memcpy(key, kv, klen);
        key[klen] = 0;
        if (moe_config_set(cfg, key, eq + 1) != MOE_OK) return fail("--set %s: %s", kv, moe_last_error());
    }
    return rc;
}

int cli_default_matmul(moe_config *cfg) {
    if (!moe_bf16_matmul_pays()) return 0;
    cfg->matmul = MOE_MATMUL_BF16;
    return 1;
}

const char *cli_bf16_unit(void) {
    return strcmp(moe_matmul_backend(1), "amx_bf16") == 0 ? "AMX tiles" : "AVX512_BF16 at the FMA's rate";
}

static void default_text(const cli_opt *o, char *buf, size_t cap) {
    if (o->def) { snprintf(buf, cap, "%s", o->def); return; }
    switch (o->kind) {
    case OPT_FLAG: snprintf(buf, cap, "off"); break;
    case OPT_INT: snprintf(buf, cap, "%d", *(const int *)o->dst); break;
    case OPT_U64: snprintf(buf, cap, "%" PRIu64, *(const uint64_t *)o->dst); break;
    case OPT_FLOAT: snprintf(buf, cap, "%g", (double)*(const float *)o->dst); break;
    case OPT_STR:
    case OPT_TEXT: {
        const char *s = *(const char *const *)o->dst;
        snprintf(buf, cap, s ? (*s ? "%s" : "\"%s\"") : "none", s ? s : "");
        break;
    }
    case OPT_LIST: snprintf(buf, cap, "none"); break;
    }
}

void cli_help(const cli_cmd *cmd, FILE *f) {
    fprintf(f, "Usage: moe %s %s\n\n%s\n\nOptions:\n", cmd->name, cmd->args, cmd->summary);
    for (int i = 0; i < cmd->n_opts; i++) {
        const cli_opt *o = &cmd->opts[i];
        char left[64], def[128];
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->metavar ? " " : "",
                 o->metavar ? o->metavar : "");
        default_text(o, def, sizeof def);
        if (strlen(left) > 20) fprintf(f, "  %s\n  %-20s  ", left, "");
        else fprintf(f, "  %-20s  ", left);
        if (strcmp(def, "required") == 0) fprintf(f, "%s (required)\n", o->help);
        else fprintf(f, "%s (default: %s)\n", o->help, def);
    }
    fprintf(f, "  %-20s  %s\n", "-h, --help", "show this help and exit");
    if (cmd->footer) {
        fputc('\n', f);
        cmd->footer(f);
    }
}
