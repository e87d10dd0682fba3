/* data/dataset: reading text, splitting documents, tokenising, sampling batches. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/hash.h"
#include "data/dataset.h"

typedef struct { char **paths; int n, cap; } file_list;

static moe_status list_add(file_list *fl, const char *path) {
    if (fl->n == fl->cap) {
        int cap = fl->cap ? 2 * fl->cap : 16;
        char **p = moe_realloc(fl->paths, sizeof(char *) * cap);
        if (!p) return MOE_ERR_NOMEM;
        fl->paths = p;
        fl->cap = cap;
    }
    if (!(fl->paths[fl->n] = moe_strdup(path))) return MOE_ERR_NOMEM;
    fl->n++;
    return MOE_OK;
}
static void list_free(file_list *fl) {
    for (int i = 0; i < fl->n; i++) moe_free(fl->paths[i]);
    moe_free(fl->paths);
}
static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Expands paths (files, or directories of regular non-hidden files) in order. */
static moe_status expand_paths(file_list *fl, const char *const *paths, int n_paths) {
    for (int i = 0; i < n_paths; i++) {
        struct stat st;
        if (stat(paths[i], &st) != 0)
            return moe_error(MOE_ERR_IO, "cannot read data path %s: %s", paths[i], strerror(errno));
        if (S_ISDIR(st.st_mode)) {
            DIR *dir = opendir(paths[i]);
            if (!dir) return moe_error(MOE_ERR_IO, "cannot open directory %s: %s", paths[i], strerror(errno));
            int first = fl->n;
            struct dirent *e;
            moe_status rc = MOE_OK;
            while (!rc && (e = readdir(dir))) {
                if (e->d_name[0] == '.') continue;
                char full[4096];
                snprintf(full, sizeof full, "%s/%s", paths[i], e->d_name);
                struct stat fs;
                if (stat(full, &fs) == 0 && S_ISREG(fs.st_mode)) rc = list_add(fl, full);
            }
            closedir(dir);
            if (rc) return moe_error(rc, "out of memory listing %s", paths[i]);
            qsort(fl->paths + first, (size_t)(fl->n - first), sizeof(char *), cmp_str);
            if (fl->n == first) return moe_error(MOE_ERR_INVALID_ARG, "data directory %s holds no files", paths[i]);
        } else if (S_ISREG(st.st_mode)) {
            if (list_add(fl, paths[i])) return moe_error(MOE_ERR_NOMEM, "out of memory");
        } else {
            return moe_error(MOE_ERR_INVALID_ARG, "data path %s is not a file or directory", paths[i]);
        }
    }
    return MOE_OK;
}

moe_status moe_read_texts(const char *const *paths, int n_paths, char ***texts, size_t **lens,
                          int *n_texts) {
    file_list fl = {0};
    *texts = NULL; *lens = NULL; *n_texts = 0;
    moe_status st = n_paths > 0 ? expand_paths(&fl, paths, n_paths)
                                : moe_error(MOE_ERR_INVALID_ARG, "no data paths given");
    if (!st) {
        *texts = moe_calloc((size_t)fl.n, sizeof(char *));
        *lens = moe_calloc((size_t)fl.n, sizeof(size_t));
        if (!*texts || !*lens) st = moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    size_t total = 0;
    for (int i = 0; !st && i < fl.n; i++) {
        st = moe_read_file(fl.paths[i], &(*texts)[i], &(*lens)[i]);
        if (!st) { total += (*lens)[i]; *n_texts = i + 1; }
    }
    if (!st && total == 0) st = moe_error(MOE_ERR_INVALID_ARG, "the data holds no text (all files are empty)");
    list_free(&fl);
    if (st) { moe_free_texts(*texts, *lens, *n_texts); *texts = NULL; *lens = NULL; *n_texts = 0; }
    return st;
}

void moe_free_texts(char **texts, size_t *lens, int n_texts) {
    if (texts) for (int i = 0; i < n_texts; i++) moe_free(texts[i]);
    moe_free(texts);
    moe_free(lens);
}

/* ---- documents ---- */
#define DOC_SPLIT 16384   /* documents longer than this are cut ...   */
#define DOC_PIECE 8192    /* ... into pieces of about this many bytes */

typedef struct { const char *p; size_t len; } span;

/* Calls fn on every document of text (form-feed lines separate documents). */
static moe_status for_each_doc(const char *text, size_t len, moe_status (*fn)(span, void *), void *u) {
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        int sep = i < len && text[i] == '\f' && (i == 0 || text[i - 1] == '\n') && (i + 1 == len || text[i + 1] == '\n');
        if (i < len && !sep) continue;
        size_t end = i;
        /* cut long documents at a blank line near DOC_PIECE */
        while (end > start && end - start > DOC_SPLIT) {
            size_t cut = start + DOC_PIECE;
            const char *para = NULL;
            for (size_t j = cut; j + 1 < end && j < start + DOC_SPLIT; j++)
                if (text[j] == '\n' && text[j + 1] == '\n') { para = text + j + 2; break; }
            size_t at = para ? (size_t)(para - text) : cut;
            moe_status st = fn((span){text + start, at - start}, u);
            if (st) return st;
            start = at;
        }
        if (end > start) {
            moe_status st = fn((span){text + start, end - start}, u);
            if (st) return st;
        }
        start = (i < len) ? i + 2 : i; /* skip "\f\n" */
        if (i < len) i++;
    }
    return MOE_OK;
}

typedef struct { span *docs; int *dom; int n, cap; int cur_domain; } doc_list;

static moe_status collect(span s, void *u) {
    doc_list *dl = u;
    if (dl->n == dl->cap) {
        int cap = dl->cap ? dl->cap * 2 : 256;
        span *d = moe_realloc(dl->docs, sizeof(span) * cap);
        if (!d) return MOE_ERR_NOMEM;
        dl->docs = d;
        int *o = moe_realloc(dl->dom, sizeof(int) * cap);
        if (!o) return MOE_ERR_NOMEM;
        dl->dom = o;
        dl->cap = cap;
    }
    dl->docs[dl->n] = s;
    dl->dom[dl->n++] = dl->cur_domain;
    return MOE_OK;
}

static moe_status append(moe_dataset *d, int split, const int32_t *ids, size_t n, int dom, size_t *cap) {
    if (d->n[split] + n > cap[split]) {
        size_t nc = MOE_MAX(cap[split] * 2, d->n[split] + n + 1024);
        int32_t *t = moe_realloc(d->tokens[split], nc * sizeof(int32_t));
        if (!t) return MOE_ERR_NOMEM;
        d->tokens[split] = t;
        uint8_t *g = moe_realloc(d->domain[split], nc);
        if (!g) return MOE_ERR_NOMEM;
        d->domain[split] = g;
        cap[split] = nc;
    }
    memcpy(d->tokens[split] + d->n[split], ids, n * sizeof(int32_t));
    memset(d->domain[split] + d->n[split], dom, n);
    d->n[split] += n;
    return MOE_OK;
}

static char *domain_name(const char *path) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    char *s = moe_strdup(base);
    if (s) { char *dot = strrchr(s, '.'); if (dot && dot != s) *dot = 0; }
    return s;
}

moe_status moe_dataset_load_text(moe_dataset **out, const moe_tokenizer *tok,
                                 const char *const *paths, int n_paths) {
    *out = NULL;
    file_list fl = {0};
    moe_status st = n_paths > 0 ? expand_paths(&fl, paths, n_paths)
                                : moe_error(MOE_ERR_INVALID_ARG, "no data paths given");
    if (st) { list_free(&fl); return st; }
    if (fl.n > 255) { list_free(&fl); return moe_error(MOE_ERR_INVALID_ARG, "at most 255 data files (domains) are supported"); }
    moe_dataset *d = moe_calloc(1, sizeof *d);
    char **texts = moe_calloc((size_t)fl.n, sizeof(char *));
    size_t *lens = moe_calloc((size_t)fl.n, sizeof(size_t));
    if (d) d->domain_names = moe_calloc((size_t)fl.n, sizeof(char *));
    doc_list dl = {0};
    if (!d || !texts || !lens || !d->domain_names) st = moe_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; !st && i < fl.n; i++) {
        st = moe_read_file(fl.paths[i], &texts[i], &lens[i]);
        if (st) break;
        d->domain_names[i] = domain_name(fl.paths[i]);
        d->n_domains = i + 1;
        dl.cur_domain = i;
        st = for_each_doc(texts[i], lens[i], collect, &dl);
        if (st == MOE_ERR_NOMEM) moe_error(st, "out of memory splitting documents");
    }
    if (!st && dl.n == 0) st = moe_error(MOE_ERR_INVALID_ARG, "the data holds no text (all files are empty)");
    size_t cap[2] = {0, 0};
    const int eos = tok ? moe_tokenizer_eos(tok) : 0;
    for (int i = 0; !st && i < dl.n; i++) {
        int32_t *ids = NULL;
        size_t n = 0;
        st = moe_tokenizer_encode(tok, dl.docs[i].p, dl.docs[i].len, &ids, &n);
        if (st) break;
        int split = (dl.n >= 10 && i % 10 == 9) ? 1 : 0;
        st = append(d, split, ids, n, dl.dom[i], cap);
        if (!st) st = append(d, split, (const int32_t *)&eos, 1, dl.dom[i], cap);
        moe_free(ids);
        if (st) moe_error(st, "out of memory tokenising");
    }
    if (!st && d->n[1] == 0 && d->n[0] >= 20) { /* few documents: hold out the last 10% of tokens */
        size_t nv = d->n[0] / 10, start = d->n[0] - nv;
        st = append(d, 1, d->tokens[0] + start, nv, 0, cap);
        if (!st) { memcpy(d->domain[1], d->domain[0] + start, nv); d->n[0] = start; }
    }
    if (!st) {
        d->fingerprint = moe_fnv1a64(MOE_FNV1A64_BASIS, d->tokens[0], d->n[0] * sizeof(int32_t)) ^ d->n[0];
    }
    for (int i = 0; i < fl.n; i++) if (texts) moe_free(texts[i]);
    moe_free(texts); moe_free(lens); moe_free(dl.docs); moe_free(dl.dom);
    list_free(&fl);
    if (st) { moe_dataset_free(d); return st; }
    *out = d;
    return MOE_OK;
}

void moe_dataset_free(moe_dataset *d) {
    if (!d) return;
    for (int s = 0; s < 2; s++) { moe_free(d->tokens[s]); moe_free(d->domain[s]); }
    if (d->domain_names) for (int i = 0; i < d->n_domains; i++) moe_free(d->domain_names[i]);
    moe_free(d->domain_names);
    moe_free(d);
}

size_t moe_dataset_tokens(const moe_dataset *d, int validation) { return d->n[validation ? 1 : 0]; }
int moe_dataset_n_domains(const moe_dataset *d) { return d->n_domains; }
const char *moe_dataset_domain_name(const moe_dataset *d, int i) {
    return i >= 0 && i < d->n_domains ? d->domain_names[i] : NULL;
}

moe_status dataset_sample(const moe_dataset *d, int split, moe_rng *rng, int B, int T,
                          int32_t *tokens, int32_t *targets) {
    size_t n = d->n[split];
    if (n < (size_t)T + 1)
        return moe_error(MOE_ERR_INVALID_ARG, "the %s split has %zu tokens; sequences of %d need at least %d",
                         split ? "validation" : "training", n, T, T + 1);
    for (int b = 0; b < B; b++) {
        size_t off = (size_t)moe_rng_below(rng, n - (size_t)T);
        memcpy(tokens + (size_t)b * T, d->tokens[split] + off, sizeof(int32_t) * T);
        memcpy(targets + (size_t)b * T, d->tokens[split] + off + 1, sizeof(int32_t) * T);
    }
    return MOE_OK;
}
