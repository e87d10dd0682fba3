/* report.c: moe report, one self-contained HTML page (inline SVG and
 * script, nothing fetched) about a model's routing, plus report.json with
 * the same numbers. The numbers come from stats/route_stats.c; this file
 * only lays them out. */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "data/pretok.h"
#include "stats/jsonl.h"
#include "stats/route_stats.h"

enum { N_TOP = 6, VIEW_TOKENS = 64 };

/* ---- what the report shows, computed once, written twice ---- */
typedef struct {
    int n_moe, E, k, nd;
    const int *layers;
    double *load;            /* [n_moe][E]       */
    double *share;           /* [n_moe][nd][E]   */
    size_t *dom_tokens;      /* [nd]             */
    const char **dom_names;  /* [nd]             */
    double *coact;           /* [n_moe][E][E]    */
    double *fav;             /* [n_moe]          */
    size_t *fav_n;           /* [n_moe]          */
    route_vocab_entry *top;  /* [n_moe][E][N_TOP] */
    double *overlap;         /* [n_moe] or NULL  */
    const char *compare;
    /* the training log: S steps, per layer series */
    int S;
    double *steps, *series[4]; /* maxvio, entropy, dead, drop: [n_moe][S] */
    size_t n_tokens;
} report;
static const char *const series_key[4] = {"maxvio", "entropy", "dead", "drop"};
static const char *const series_title[4] = {"MaxVio (max load - mean) / mean", "load entropy / log E",
                                            "dead experts (share under 0.1/E)", "drop rate (capacity)"};

/* ---- progress on stderr ---- */
/* a live line on a terminal (at most 5 a second), else a line per 10% */
typedef struct { int tty, open, last_decile; double last; const char *what; } progress;
static void on_progress(size_t done, size_t total, void *user) {
    progress *p = user;
    const int decile = total ? (int)(10 * done / total) : 10;
    const double now = cli_clock();
    if (p->tty ? now - p->last < 0.2 && done < total : decile == p->last_decile) return;
    p->last = now;
    p->last_decile = decile;
    char line[160];
    snprintf(line, sizeof line, "report: %s %zu/%zu tokens", p->what, done, total);
    status_line(p->tty, line, &p->open);
}

/* ---- the training log ---- */
/* Lines of a moe train log with per-layer routing metrics (evaluation lines have none). */
static int log_pass(FILE *f, report *r, double *v) {
    char *line = NULL;
    size_t cap = 0;
    int S = 0;
    rewind(f);
    while (getline(&line, &cap, f) > 0) {
        double step;
        if (!jsonl_number(line, "step", &step) || jsonl_array(line, "maxvio", v, r->n_moe) < 0) continue;
        if (r->steps) {
            r->steps[S] = step;
            for (int q = 0; q < 4; q++) {
                for (int km = 0; km < r->n_moe; km++) v[km] = NAN;
                jsonl_array(line, series_key[q], v, r->n_moe);
                for (int km = 0; km < r->n_moe; km++) r->series[q][(size_t)km * r->S + S] = v[km];
            }
        }
        S++;
        if (r->steps && S == r->S) break;
    }
    free(line);
    return S;
}

static int read_log(const char *path, report *r) {
    FILE *f = fopen(path, "r");
    if (!f) return fail("cannot open the log %s", path);
    double *v = malloc(sizeof(double) * (size_t)r->n_moe);
    int rc = v ? 0 : fail("out of memory");
    if (!rc && (r->S = log_pass(f, r, v)) > 0) { /* count, then fill */
        r->steps = malloc(sizeof(double) * r->S);
        for (int q = 0; q < 4; q++) r->series[q] = malloc(sizeof(double) * r->S * r->n_moe);
        if (!r->steps || !r->series[0] || !r->series[1] || !r->series[2] || !r->series[3]) rc = fail("out of memory reading %s", path);
        else log_pass(f, r, v);
    }
    if (!rc && r->S == 0) fprintf(stderr, "moe report: note: %s holds no training steps with routing metrics\n", path);
    if (rc) r->S = 0;
    free(v);
    fclose(f);
    return rc;
}

/* ---- HTML pieces ---- */
static void html_text(FILE *f, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t l = utf8_seq(u + i, len - i, &cp);
        if (!l) { fputs("&#xfffd;", f); i++; continue; }
        if (u[i] == '<') fputs("&lt;", f);
        else if (u[i] == '>') fputs("&gt;", f);
        else if (u[i] == '&') fputs("&amp;", f);
        else if (u[i] == '"') fputs("&quot;", f);
        else if (u[i] == '\n') fputs("&#x21b5;", f);
        else if (u[i] < 0x20 || u[i] == 0x7F) fprintf(f, "&#x%x;", 0x2400 + (u[i] == 0x7F ? 0x21 : u[i]));
        else fwrite(u + i, 1, l, f);
        i += l;
    }
}
static void html_token(FILE *f, const moe_tokenizer *tok, int32_t id) {
    size_t len = 0;
    const char *s = moe_tokenizer_token(tok, id, &len);
    html_text(f, s ? s : "", s ? len : 0);
}

/* colour of expert e of E */
static void expert_color(char *buf, size_t cap, int e, int E) {
    snprintf(buf, cap, "hsl(%d,70%%,%d%%)", (int)(360.0 * e / (E > 0 ? E : 1)), e % 2 ? 62 : 48);
}

/* heat colour of v in [0, 1]: white to deep blue; diverging: 0.5 white, below blue, above red */
static void heat(char *buf, size_t cap, double v, int diverging) {
    if (!isfinite(v)) v = 0;
    v = v < 0 ? 0 : v > 1 ? 1 : v;
    if (!diverging) { int c = (int)(255 - 200 * v); snprintf(buf, cap, "rgb(%d,%d,255)", c, c); return; }
    if (v < 0.5) { int c = (int)(255 - 400 * (0.5 - v)); snprintf(buf, cap, "rgb(%d,%d,255)", c, c); }
    else { int c = (int)(255 - 400 * (v - 0.5)); snprintf(buf, cap, "rgb(255,%d,%d)", c, c); }
}

/* A rows x cols heat map of vals; labels of rows and columns; value text
 * when it fits. ratio_base > 0: the colour shows vals / ratio_base on a
 * log scale from 1/4 to 4 (diverging), else vals / vmax. */
static void svg_heatmap(FILE *f, int rows, int cols, const double *vals, const char *const *row_labels,
                        double vmax, double ratio_base, const char *cls) {
    const int cell = cols > 32 ? 10 : 34, left = 110, topm = 22;
    const int W = left + cols * cell + 10, H = topm + rows * cell + 10;
    fprintf(f, "<svg class=\"%s\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\">", cls, W, H, W, H);
    for (int c = 0; c < cols && cell >= 20; c++)
        fprintf(f, "<text x=\"%d\" y=\"15\" class=\"lab\" text-anchor=\"middle\">%d</text>", left + c * cell + cell / 2, c);
    for (int r = 0; r < rows; r++) {
        fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"lab\" text-anchor=\"end\">", left - 6, topm + r * cell + cell / 2 + 4);
        if (row_labels) html_text(f, row_labels[r], strlen(row_labels[r]));
        else fprintf(f, "%d", r);
        fputs("</text>", f);
        for (int c = 0; c < cols; c++) {
            const double v = vals[(size_t)r * cols + c];
            double u = ratio_base > 0 ? 0.5 + log(fmax(v / ratio_base, 1e-9)) / (2 * log(4.0)) : (vmax > 0 ? v / vmax : 0);
            char col[40];
            heat(col, sizeof col, u, ratio_base > 0);
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"><title>%d, %d: %.4f</title></rect>",
                    left + c * cell, topm + r * cell, cell - 1, cell - 1, col, r, c, v);
            if (cell >= 30)
                fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"val\" text-anchor=\"middle\">%.2f</text>", left + c * cell + cell / 2,
                        topm + r * cell + cell / 2 + 4, v);
        }
    }
    fputs("</svg>\n", f);
}

/* bars of share[E] with a dashed line at the uniform share */
static void svg_bars(FILE *f, int E, const double *share, double uniform) {
    const int bw = E > 64 ? 3 : E > 16 ? 8 : 24, H = 120, left = 40, Wd = left + E * bw + 10;
    double mx = uniform * 2;
    for (int e = 0; e < E; e++) mx = fmax(mx, share[e]);
    fprintf(f, "<svg class=\"bars\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\">", Wd, H + 20, Wd, H + 20);
    for (int e = 0; e < E; e++) {
        const double h = H * share[e] / mx;
        char col[40];
        expert_color(col, sizeof col, e, E);
        fprintf(f, "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"%s\"><title>expert %d: %.4f</title></rect>",
                left + e * bw, H - h, bw - 1, h, col, e, share[e]);
    }
    const double yu = H - H * uniform / mx;
    fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>", left, Wd - 10, yu, yu);
    fprintf(f, "<text x=\"2\" y=\"%.1f\" class=\"lab\">%.3f</text><text x=\"2\" y=\"12\" class=\"lab\">%.3f</text>", yu + 4, uniform, mx);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"lab\">expert 0 .. %d</text></svg>\n", left, H + 15, E - 1);
}

/* one line per layer over the training steps */
static void svg_lines(FILE *f, int S, const double *x, int n, const double *y, const int *layers) {
    const int Wd = 520, H = 160, left = 50, bottom = 20;
    double lo = INFINITY, hi = -INFINITY;
    for (size_t i = 0; i < (size_t)S * n; i++)
        if (isfinite(y[i])) { lo = fmin(lo, y[i]); hi = fmax(hi, y[i]); }
    if (!isfinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { hi = lo + 1e-3; }
    fprintf(f, "<svg class=\"lines\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\">", Wd, H + bottom, Wd, H + bottom);
    fprintf(f, "<text x=\"2\" y=\"12\" class=\"lab\">%.3g</text><text x=\"2\" y=\"%d\" class=\"lab\">%.3g</text>", hi, H, lo);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"lab\">step %.0f .. %.0f</text>", left, H + 15, x[0], x[S - 1]);
    const double x0 = x[0], x1 = x[S - 1] > x0 ? x[S - 1] : x0 + 1;
    for (int km = 0; km < n; km++) {
        char col[40];
        expert_color(col, sizeof col, km, n);
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", col);
        for (int s = 0; s < S; s++) {
            const double v = y[(size_t)km * S + s];
            if (!isfinite(v)) continue;
            fprintf(f, "%.1f,%.1f ", left + (Wd - left - 10) * (x[s] - x0) / (x1 - x0), 5 + (H - 10) * (1 - (v - lo) / (hi - lo)));
        }
        fprintf(f, "\"><title>layer %d</title></polyline>", layers[km]);
    }
    fputs("</svg>\n", f);
}

/* ---- report.json ---- */
static void json_doubles(FILE *f, const double *v, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++) { if (i) fputc(',', f); json_number(f, v[i]); }
    fputc(']', f);
}
static void json_rows(FILE *f, const double *v, size_t rows, size_t cols) {
    fputc('[', f);
    for (size_t r = 0; r < rows; r++) { if (r) fputc(',', f); json_doubles(f, v + r * cols, cols); }
    fputc(']', f);
}
static void json_token_text(FILE *f, const moe_tokenizer *tok, int32_t id) {
    size_t len = 0;
    const char *s = moe_tokenizer_token(tok, id, &len);
    json_string(f, s ? s : "", s ? len : 0);
}
/* the per-token view: [{"token":id,"text":"..","layers":[[experts],[weights]]...}] */
static void json_view(FILE *f, const route_trace *v, const moe_tokenizer *tok) {
    const int per = v->n_moe * v->k;
    fputc('[', f);
    for (size_t i = 0; i < v->n; i++) {
        fprintf(f, "%s{\"token\":%d,\"text\":", i ? "," : "", v->tokens[i]);
        json_token_text(f, tok, v->tokens[i]);
        fputs(",\"layers\":", f);
        json_route_layers(f, v->layers, v->n_moe, v->k, v->ids + i * per, v->w + i * per, -1);
        fputc('}', f);
    }
    fputc(']', f);
}

static void write_json(FILE *f, const report *r, const char *model, const moe_tokenizer *tok, const route_trace *view) {
    const int n = r->n_moe, E = r->E;
    fputs("{\"model\":", f);
    json_string(f, model, strlen(model));
    fprintf(f, ",\"tokens\":%zu,\"n_experts\":%d,\"top_k\":%d,\"uniform\":", r->n_tokens, E, r->k);
    json_number(f, (double)r->k / E);
    fputs(",\"layers\":[", f);
    for (int km = 0; km < n; km++) fprintf(f, "%s%d", km ? "," : "", r->layers[km]);
    fputs("],\"load\":", f);
    json_rows(f, r->load, (size_t)n, (size_t)E);
    fputs(",\"domains\":[", f);
    for (int d = 0; d < r->nd; d++) {
        if (d) fputc(',', f);
        json_string(f, r->dom_names[d], strlen(r->dom_names[d]));
    }
    fputs("],\"domain_tokens\":[", f);
    for (int d = 0; d < r->nd; d++) fprintf(f, "%s%zu", d ? "," : "", r->dom_tokens[d]);
    fputs("],\"domain_share\":[", f);
    for (int km = 0; km < n; km++) {
        if (km) fputc(',', f);
        json_rows(f, r->share + (size_t)km * r->nd * E, (size_t)r->nd, (size_t)E);
    }
    fputs("],\"coactivation\":[", f);
    for (int km = 0; km < n; km++) {
        if (km) fputc(',', f);
        json_rows(f, r->coact + (size_t)km * E * E, (size_t)E, (size_t)E);
    }
    fputs("],\"vocabulary\":{\"favourite_share\":", f);
    json_doubles(f, r->fav, (size_t)n);
    fputs(",\"tokens_counted\":[", f);
    for (int km = 0; km < n; km++) fprintf(f, "%s%zu", km ? "," : "", r->fav_n[km]);
    fputs("],\"top\":[", f);
    for (int km = 0; km < n; km++) {
        fputs(km ? ",[" : "[", f);
        for (int e = 0; e < E; e++) {
            fputs(e ? ",[" : "[", f);
            const route_vocab_entry *t = r->top + ((size_t)km * E + e) * N_TOP;
            for (int j = 0, first = 1; j < N_TOP; j++) {
                if (t[j].token < 0) continue;
                fprintf(f, "%s{\"token\":%d,\"text\":", first ? "" : ",", t[j].token);
                first = 0;
                json_token_text(f, tok, t[j].token);
                fprintf(f, ",\"count\":%lld,\"occurrences\":%lld}", (long long)t[j].count, (long long)t[j].occurrences);
            }
            fputc(']', f);
        }
        fputc(']', f);
    }
    fputs("]},\"saturation\":", f);
    if (r->overlap) {
        fputs("{\"compare\":", f);
        json_string(f, r->compare, strlen(r->compare));
        fputs(",\"overlap\":", f);
        json_doubles(f, r->overlap, (size_t)n);
        fputc('}', f);
    } else fputs("null", f);
    fputs(",\"training\":", f);
    if (r->S) {
        fputs("{\"step\":", f);
        json_doubles(f, r->steps, (size_t)r->S);
        for (int q = 0; q < 4; q++) {
            fprintf(f, ",\"%s\":", series_key[q]);
            json_rows(f, r->series[q], (size_t)n, (size_t)r->S);
        }
        fputc('}', f);
    } else fputs("null", f);
    fputs(",\"view\":", f);
    json_view(f, view, tok);
    fputs("}\n", f);
}

/* ---- report.html ---- */
static const char *const css =
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}"
    "h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}"
    "svg{margin:4px 12px 4px 0;vertical-align:top}.lab{font-size:11px;fill:#444}.val{font-size:9px;fill:#111}"
    "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}"
    ".tok{padding:1px 0;border-radius:2px;cursor:default;white-space:pre}.tok:hover{outline:2px solid #000}"
    "#info{position:sticky;top:0;background:#f6f6f6;padding:8px;min-height:3em;border:1px solid #ddd;margin:8px 0}"
    ".note{color:#666}.key{border-left:14px solid;padding:0 10px 0 4px;margin-right:6px}";

static const char *const view_script =
    "(function(){var D=JSON.parse(document.getElementById('view-data').textContent);"
    "var info=document.getElementById('info');"
    "function show(i){var t=D[i],h='<b>token '+t.token+'</b> (position '+i+')<table><tr><th>layer</th><th>experts (weight)</th></tr>';"
    "t.layers.forEach(function(l){h+='<tr><td>'+l.layer+'</td><td>'+l.experts.map(function(e,j){"
    "return e<0?'-':e+' ('+l.weights[j].toFixed(3)+')';}).join(', ')+'</td></tr>';});"
    "info.innerHTML=h+'</table>';}"
    "document.querySelectorAll('.tok').forEach(function(s){s.addEventListener('mouseover',function(){"
    "show(+s.getAttribute('data-i'));});});})();";

static void write_html(FILE *f, const report *r, const char *model, const moe_tokenizer *tok, const route_trace *view) {
    const int n = r->n_moe, E = r->E;
    const double uniform = (double)r->k / E;
    fprintf(f, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>moe routing report</title><style>%s</style></head><body>\n", css);
    fputs("<h1>Routing report: ", f);
    html_text(f, model, strlen(model));
    fprintf(f, "</h1>\n<p>%d MoE layers, %d experts, top-%d; %zu tokens traced (uniform share k/E = %.3f).</p>\n", n, E, r->k,
            r->n_tokens, uniform);

    fputs("<section id=\"load\"><h2>Expert load per layer</h2><p class=\"note\">Share of each layer's assignments per expert; "
          "the dashed line is the uniform 1/E.</p>\n", f);
    for (int km = 0; km < n; km++) {
        fprintf(f, "<div style=\"display:inline-block\"><div>layer %d</div>", r->layers[km]);
        svg_bars(f, E, r->load + (size_t)km * E, 1.0 / E);
        fputs("</div>\n", f);
    }
    fputs("</section>\n<section id=\"training\"><h2>Balance over training</h2>\n", f);
    if (!r->S) fputs("<p class=\"note\">No training log given (--log train.jsonl), or it holds no routing metrics.</p>\n", f);
    else { /* the legend: which colour is which layer, in every chart of the section */
        fputs("<p class=\"legend\">", f);
        for (int km = 0; km < n; km++) {
            char col[40];
            expert_color(col, sizeof col, km, n);
            fprintf(f, "<span class=\"key\" style=\"border-color:%s\">layer %d</span>", col, r->layers[km]);
        }
        fputs("</p>\n", f);
    }
    for (int q = 0; q < 4 && r->S; q++) {
        fprintf(f, "<div style=\"display:inline-block\"><div>%s, one line per layer</div>", series_title[q]);
        svg_lines(f, r->S, r->steps, n, r->series[q], r->layers);
        fputs("</div>\n", f);
    }
    fputs("</section>\n<section id=\"domains\"><h2>Domain &times; expert specialisation</h2><p class=\"note\">Share of a domain's "
          "tokens routed to each expert, coloured against the uniform k/E (white: uniform; red: up to 4&times; more; blue: "
          "up to 4&times; less). Rows: domains; columns: experts.</p>\n", f);
    for (int km = 0; km < n && r->nd; km++) {
        fprintf(f, "<div style=\"display:inline-block\"><div>layer %d</div>", r->layers[km]);
        svg_heatmap(f, r->nd, E, r->share + (size_t)km * r->nd * E, r->dom_names, 1, uniform, "heat domain");
        fputs("</div>\n", f);
    }
    fputs("</section>\n<section id=\"vocabulary\"><h2>Vocabulary specialisation</h2>\n<p class=\"note\">Favourite share: of a token's "
          "occurrences, the part routed to the expert it goes to most (tokens seen at least 4 times; uniform routing would "
          "give about k/E).</p><table><tr><th>layer</th><th>favourite share</th><th>tokens</th></tr>\n", f);
    for (int km = 0; km < n; km++) fprintf(f, "<tr><td>%d</td><td>%.3f</td><td>%zu</td></tr>\n", r->layers[km], r->fav[km], r->fav_n[km]);
    fputs("</table>\n", f);
    for (int km = 0; km < n; km++) {
        fprintf(f, "<h3>layer %d: the tokens each expert takes most</h3><table><tr><th>expert</th><th>tokens (routed / seen)</th></tr>\n", r->layers[km]);
        for (int e = 0; e < E; e++) {
            fprintf(f, "<tr><td>%d</td><td>", e);
            const route_vocab_entry *t = r->top + ((size_t)km * E + e) * N_TOP;
            for (int j = 0; j < N_TOP && t[j].token >= 0; j++) {
                fputs("<code>", f);
                html_token(f, tok, t[j].token);
                fprintf(f, "</code> %lld/%lld&nbsp; ", (long long)t[j].count, (long long)t[j].occurrences);
            }
            fputs("</td></tr>\n", f);
        }
        fputs("</table>\n", f);
    }
    fputs("</section>\n<section id=\"coactivation\"><h2>Co-activation</h2><p class=\"note\">P(j chosen | i chosen): row i, column j.</p>\n", f);
    for (int km = 0; km < n; km++) {
        fprintf(f, "<div style=\"display:inline-block\"><div>layer %d</div>", r->layers[km]);
        svg_heatmap(f, E, E, r->coact + (size_t)km * E * E, NULL, 1.0, 0, "heat coact");
        fputs("</div>\n", f);
    }
    fputs("</section>\n<section id=\"saturation\"><h2>Router saturation</h2>\n", f);
    if (r->overlap) {
        fputs("<p class=\"note\">Mean over the tokens of |top-k now &cap; top-k of ", f);
        html_text(f, r->compare, strlen(r->compare));
        fputs("| / k (1: the older checkpoint already routed as the model does now).</p><table><tr><th>layer</th><th>overlap</th></tr>\n", f);
        for (int km = 0; km < n; km++) fprintf(f, "<tr><td>%d</td><td>%.3f</td></tr>\n", r->layers[km], r->overlap[km]);
        fputs("</table>\n", f);
    } else fputs("<p class=\"note\">No older checkpoint given (--compare OLDER.gguf).</p>\n", f);
    fprintf(f, "</section>\n<section id=\"tokens\"><h2>Per-token routing</h2><p class=\"note\">Coloured by the top expert of layer %d; "
            "hover a token to see its experts in every layer.</p><div id=\"info\">hover a token</div><div id=\"view\">", r->layers[0]);
    for (size_t i = 0; i < view->n; i++) {
        const int top = view->ids[i * view->n_moe * view->k];
        char col[40];
        expert_color(col, sizeof col, top < 0 ? 0 : top, E);
        fprintf(f, "<span class=\"tok\" data-i=\"%zu\" style=\"background:%s\">", i, top < 0 ? "#ddd" : col);
        html_token(f, tok, view->tokens[i]);
        fputs("</span>", f);
    }
    fputs("</div></section>\n<script type=\"application/json\" id=\"view-data\">", f);
    json_view(f, view, tok); /* json_string escapes '<': safe inside the script element */
    fprintf(f, "</script>\n<script>%s</script>\n</body></html>\n", view_script);
}

/* ---- the command ---- */
static int trace_model(moe_model *m, const moe_dataset *d, size_t max_tokens, route_trace *t, const char *what) {
    progress p = {.tty = isatty(fileno(stderr)), .last_decile = -1, .what = what};
    moe_status st = route_trace_dataset(t, m, d, max_tokens, on_progress, &p);
    if (p.open) fputc('\n', stderr);
    return st ? lib_fail(what) : 0;
}

/* out.html -> out.json beside it */
static char *json_path(const char *out) {
    size_t n = strlen(out);
    const char *dot = strrchr(out, '.'), *slash = strrchr(out, '/');
    if (dot && (!slash || dot > slash)) n = (size_t)(dot - out);
    char *p = malloc(n + 6);
    if (p) { memcpy(p, out, n); strcpy(p + n, ".json"); }
    return p;
}

static int report_run(cli_cmd *cmd, const char *model, const str_list *data_in, const char *log, const char *compare,
                      int max_tokens, const char *out, const char *prompt, int force, int threads) {
    if (!model) return cli_usage_error(cmd->name, "--model FILE is required");
    if (!out) return cli_usage_error(cmd->name, "--out FILE.html is required");
    str_list data = *data_in;
    const char *corpus = data.n ? NULL : default_corpus();
    if (!data.n && !corpus) return cli_usage_error(cmd->name, "--data PATH is required (no built-in corpus found)");
    if (!data.n) { data.v = &corpus; data.n = 1; }
    if (check_data_paths(&data)) return EXIT_FAIL;
    char *jpath = json_path(out);
    if (!jpath) return fail("out of memory");
    if (check_out_path(out, NULL, force) || check_out_path(jpath, NULL, force)) { free(jpath); return EXIT_FAIL; }
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    int rc = EXIT_FAIL;
    moe_model *m = NULL, *old = NULL;
    moe_dataset *d = NULL;
    route_trace t = {0}, to = {0}, view = {0};
    report r = {0};
    FILE *fh = NULL, *fj = NULL;
    int32_t *pids = NULL;
    if (load_model(model, &m)) goto done;
    const moe_config *c = moe_model_config(m);
    const moe_tokenizer *tok = moe_model_tokenizer(m);
    if (!tok) { fail("%s has no tokenizer: there is no way to read text", model); goto done; }
    if (!moe_config_n_moe_layers(c)) { fail("%s is a dense model: it has no routing to report", model); goto done; }
    if (compare) {
        if (load_model(compare, &old)) goto done;
        const moe_config *oc = moe_model_config(old);
        if (oc->n_experts != c->n_experts || oc->top_k != c->top_k || moe_config_n_moe_layers(oc) != moe_config_n_moe_layers(c) ||
            oc->vocab_size != c->vocab_size) {
            fail("--compare %s has a different shape (experts, top_k, MoE layers or vocabulary) from %s", compare, model);
            goto done;
        }
    }
    r.n_moe = moe_config_n_moe_layers(c);
    if (log && read_log(log, &r)) goto done; /* before the long part */
    if (moe_dataset_load_text(&d, tok, data.v, data.n) != MOE_OK) { lib_fail(NULL); goto done; }
    const size_t all = moe_dataset_tokens(d, 0) + moe_dataset_tokens(d, 1);
    const size_t cap = max_tokens > 0 && (size_t)max_tokens < all ? (size_t)max_tokens : all;
    if (route_trace_init(&t, c, cap) || (old && route_trace_init(&to, moe_model_config(old), cap))) { lib_fail(NULL); goto done; }
    if (trace_model(m, d, cap, &t, "routing") || (old && trace_model(old, d, cap, &to, "routing the older checkpoint"))) goto done;
    /* the numbers */
    const int n = t.n_moe, E = t.E, nd = moe_dataset_n_domains(d);
    r.n_moe = n; r.E = E; r.k = t.k; r.nd = nd; r.layers = t.layers; r.n_tokens = t.n; r.compare = compare;
    r.load = calloc((size_t)n * E, sizeof(double));
    r.share = calloc((size_t)n * nd * E, sizeof(double));
    r.dom_tokens = calloc((size_t)nd, sizeof(size_t));
    r.dom_names = calloc((size_t)nd, sizeof(char *));
    r.coact = calloc((size_t)n * E * E, sizeof(double));
    r.fav = calloc((size_t)n, sizeof(double));
    r.fav_n = calloc((size_t)n, sizeof(size_t));
    r.top = calloc((size_t)n * E * N_TOP, sizeof(route_vocab_entry));
    r.overlap = old ? calloc((size_t)n, sizeof(double)) : NULL;
    if (!r.load || !r.share || !r.dom_tokens || !r.dom_names || !r.coact || !r.fav || !r.fav_n || !r.top || (old && !r.overlap)) {
        fail("out of memory");
        goto done;
    }
    for (int i = 0; i < nd; i++) r.dom_names[i] = moe_dataset_domain_name(d, i);
    for (int km = 0; km < n; km++) {
        route_load(&t, km, r.load + (size_t)km * E);
        route_domain_share(&t, km, nd, r.share + (size_t)km * nd * E, r.dom_tokens);
        route_coactivation(&t, km, r.coact + (size_t)km * E * E);
        if (route_vocab(&t, km, N_TOP, 4, r.top + (size_t)km * E * N_TOP, &r.fav[km], &r.fav_n[km])) { lib_fail(NULL); goto done; }
        if (old) r.overlap[km] = route_overlap(&t, &to, km);
    }
    /* the per-token view: the prompt, or the first tokens traced */
    size_t np = 0;
    if (cli_given(cmd, "prompt") && route_tokens(tok, prompt, NULL, &pids, &np)) goto done;
    if (route_trace_init(&view, c, pids ? np : (t.n < VIEW_TOKENS ? t.n : (size_t)VIEW_TOKENS))) { lib_fail(NULL); goto done; }
    if (moe_model_route(m, pids ? pids : t.tokens, view.cap, route_trace_add, &view) != MOE_OK) { lib_fail("routing the prompt"); goto done; }
    /* write both files */
    if (!(fh = fopen(out, "w")) || !(fj = fopen(jpath, "w"))) { fail("cannot write %s", fh ? jpath : out); goto done; }
    write_html(fh, &r, model, tok, &view);
    write_json(fj, &r, model, tok, &view);
    int bad = ferror(fh) | ferror(fj);
    bad |= fclose(fh) != 0;
    bad |= fclose(fj) != 0;
    fh = fj = NULL;
    if (bad) { fail("writing %s failed", out); goto done; }
    fprintf(stderr, "moe report: %zu tokens traced; wrote %s and %s\n", t.n, out, jpath);
    rc = 0;
done:
    if (fh) fclose(fh);
    if (fj) fclose(fj);
    free(pids);
    free(r.load); free(r.share); free(r.dom_tokens); free(r.dom_names); free(r.coact); free(r.fav); free(r.fav_n);
    free(r.top); free(r.overlap); free(r.steps);
    for (int q = 0; q < 4; q++) free(r.series[q]);
    route_trace_free(&t);
    route_trace_free(&to);
    route_trace_free(&view);
    moe_dataset_free(d);
    moe_model_free(m);
    moe_model_free(old);
    free(jpath);
    return rc;
}

int cmd_report(int argc, char **argv) {
    const char *model = NULL, *log = NULL, *compare = NULL, *out = NULL, *prompt = "";
    str_list data = {0};
    int max_tokens = 20000, force = 0, threads = 0;
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "model GGUF (our own or a published one)", "required", 0},
        {"data", OPT_LIST, &data, R_ANY, "PATH", "text file or directory (each file one domain); repeatable", "the built-in corpus", 0},
        {"log", OPT_STR, &log, R_ANY, "FILE", "moe train's JSONL log: balance over training", NULL, 0},
        {"compare", OPT_STR, &compare, R_ANY, "FILE", "an older checkpoint: top-k overlap with it (router saturation)", NULL, 0},
        {"max-tokens", OPT_INT, &max_tokens, R_NONNEG, "N", "trace at most N tokens, spread over the data; 0 = all", NULL, 0},
        {"prompt", OPT_TEXT, &prompt, R_ANY, "TEXT", "text of the per-token view", "the first traced tokens", 0},
        {"out", OPT_STR, &out, R_ANY, "FILE", "the HTML report; FILE with .json instead of .html gets the numbers", "required", 0},
        {"force", OPT_FLAG, &force, R_ANY, NULL, "overwrite existing files", NULL, 0},
        THREADS_OPT(threads),
    };
    cli_cmd cmd = {"report", "--model FILE [--data PATH ...] [--log FILE] [--compare FILE] --out report.html",
                   "Writes one self-contained HTML page (inline SVG and script, nothing fetched) about a model's routing: "
                   "expert load, balance over training, domain and vocabulary specialisation, co-activation, router "
                   "saturation and a per-token view; and a JSON file beside it with the same numbers.",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = report_run(&cmd, model, &data, log, compare, max_tokens, out, prompt, force, threads);
    cli_free(&cmd);
    return rc;
}
