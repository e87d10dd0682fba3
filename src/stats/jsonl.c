/* stats/jsonl: JSON strings and numbers out, numbers of the training log in. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "data/pretok.h"
#include "stats/jsonl.h"

void json_string(FILE *f, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    fputc('"', f);
    for (size_t i = 0; i < len;) {
        unsigned c = u[i];
        if (c == '"' || c == '\\') { fputc('\\', f); fputc((int)c, f); i++; continue; }
        if (c == '\n') { fputs("\\n", f); i++; continue; }
        if (c == '\t') { fputs("\\t", f); i++; continue; }
        if (c == '\r') { fputs("\\r", f); i++; continue; }
        if (c < 0x20 || c == 0x7F || c == '<' || c == '>' || c == '&') { fprintf(f, "\\u%04x", c); i++; continue; }
        uint32_t cp;
        size_t l = utf8_seq(u + i, len - i, &cp);
        if (!l) { fputs("\\ufffd", f); i++; continue; }
        fwrite(u + i, 1, l, f);
        i += l;
    }
    fputc('"', f);
}

void json_number(FILE *f, double v) {
    if (isfinite(v)) fprintf(f, "%.6g", v);
    else fputs("null", f);
}

void json_route_layers(FILE *f, const int *layers, int n_moe, int k, const int32_t *ids, const float *w, int only) {
    fputc('[', f);
    for (int i = 0, first = 1; i < n_moe; i++) {
        if (only >= 0 && i != only) continue;
        fprintf(f, "%s{\"layer\":%d,\"experts\":[", first ? "" : ",", layers[i]);
        first = 0;
        for (int j = 0; j < k; j++) fprintf(f, "%s%d", j ? "," : "", ids[(size_t)i * k + j]);
        fputs("],\"weights\":[", f);
        for (int j = 0; j < k; j++) {
            if (j) fputc(',', f);
            json_number(f, w[(size_t)i * k + j]);
        }
        fputs("]}", f);
    }
    fputc(']', f);
}

/* The value after "key": at the top level of line, or NULL. */
static const char *value_of(const char *line, const char *key) {
    const size_t kl = strlen(key);
    int depth = 0, in_str = 0;
    for (const char *p = line; *p; p++) {
        if (in_str) {
            if (*p == '\\' && p[1]) p++;
            else if (*p == '"') in_str = 0;
            continue;
        }
        if (*p == '{' || *p == '[') depth++;
        else if (*p == '}' || *p == ']') depth--;
        else if (*p == '"') {
            if (depth == 1 && !strncmp(p + 1, key, kl) && p[1 + kl] == '"') {
                const char *q = p + 2 + kl;
                while (*q == ' ') q++;
                if (*q == ':') {
                    q++;
                    while (*q == ' ') q++;
                    return q;
                }
            }
            in_str = 1;
        }
    }
    return NULL;
}

/* One number (or null) at p; the end in *end, NULL when neither. */
static int read_number(const char *p, double *v, const char **end) {
    if (!strncmp(p, "null", 4)) { *v = NAN; *end = p + 4; return 1; }
    char *e;
    double x = strtod(p, &e);
    if (e == p) return 0;
    *v = x;
    *end = e;
    return 1;
}

int jsonl_number(const char *line, const char *key, double *v) {
    const char *p = value_of(line, key), *end;
    return p && read_number(p, v, &end);
}

int jsonl_array(const char *line, const char *key, double *v, int cap) {
    const char *p = value_of(line, key), *end;
    if (!p || *p != '[') return -1;
    p++;
    int n = 0;
    for (;;) {
        while (*p == ' ') p++;
        if (*p == ']') return n < cap ? n : cap;
        double x;
        if (!read_number(p, &x, &end)) return -1;
        if (n < cap) v[n] = x;
        n++;
        p = end;
        while (*p == ' ') p++;
        if (*p == ',') p++;
        else if (*p != ']') return -1;
    }
}
