/* route.c: moe route, the experts each token of a text chose in every MoE
 * layer, with their weights: a table (tokens coloured by their top expert
 * on a terminal) or JSON Lines. */
#include "cli.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/pretok.h"
#include "stats/jsonl.h"

/* 16 well-separated colours of the 256-colour palette; experts past 16 reuse them */
static const int palette[16] = {196, 46, 33, 226, 201, 51, 208, 129, 118, 39, 220, 162, 34, 99, 214, 45};
#define N_PALETTE 16

/* Tokens of the prompt (as generate reads one) or of the data files (each
 * file's text, files joined by the end-of-text token), in *out (free()). */
int route_tokens(const moe_tokenizer *tok, const char *prompt, const str_list *data, int32_t **out, size_t *n) {
    *out = NULL;
    *n = 0;
    if (!data || data->n == 0) {
        int32_t *ids;
        if (moe_tokenizer_encode_prompt(tok, prompt, strlen(prompt), 1, 1, &ids, n) != MOE_OK) return lib_fail("encoding the prompt");
        /* the caller frees with free(), as for the data below */
        if (*n && !(*out = malloc(*n * sizeof(int32_t)))) { moe_free(ids); return fail("out of memory"); }
        if (*n) memcpy(*out, ids, *n * sizeof(int32_t));
        moe_free(ids);
        return 0;
    }
    char **texts;
    size_t *lens;
    int n_texts;
    if (moe_read_texts(data->v, data->n, &texts, &lens, &n_texts) != MOE_OK) return lib_fail(NULL);
    size_t cap = 0;
    int32_t *all = NULL;
    int rc = 0;
    for (int i = 0; !rc && i < n_texts; i++) {
        int32_t *ids;
        size_t k;
        if (moe_tokenizer_encode(tok, texts[i], lens[i], &ids, &k) != MOE_OK) { rc = lib_fail("encoding the data"); break; }
        if (*n + k + 1 > cap) {
            cap = 2 * (*n + k + 1);
            int32_t *p = realloc(all, cap * sizeof(int32_t));
            if (!p) { moe_free(ids); rc = fail("out of memory reading the data"); break; }
            all = p;
        }
        memcpy(all + *n, ids, k * sizeof(int32_t));
        *n += k;
        if (i + 1 < n_texts && moe_tokenizer_eos(tok) >= 0) all[(*n)++] = moe_tokenizer_eos(tok);
        moe_free(ids);
    }
    moe_free_texts(texts, lens, n_texts);
    if (rc) { free(all); *n = 0; return rc; }
    *out = all;
    return 0;
}

/* Token bytes for a table: valid UTF-8 as it is, control characters and
 * stray bytes as escapes. */
static void put_display(FILE *f, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t l = u[i] >= 0x20 && u[i] != 0x7F ? utf8_seq(u + i, len - i, &cp) : 0;
        if (l) { fwrite(u + i, 1, l, f); i += l; continue; }
        if (u[i] == '\n') fputs("\\n", f);
        else if (u[i] == '\t') fputs("\\t", f);
        else if (u[i] == '\r') fputs("\\r", f);
        else fprintf(f, "\\x%02x", u[i]);
        i++;
    }
}

typedef struct {
    const moe_tokenizer *tok;
    int json, color;
    int only;         /* MoE layer index shown alone, -1: all     */
    int color_layer;  /* MoE layer index that colours the tokens   */
    size_t max;       /* tokens to show (0: all)                   */
    int write_failed;
} route_out;

static int on_route(const moe_token_route *r, void *user) {
    route_out *o = user;
    size_t len = 0;
    const char *text = moe_tokenizer_token(o->tok, r->token, &len);
    if (!text) len = 0;
    FILE *f = stdout;
    if (o->json) {
        fprintf(f, "{\"pos\":%zu,\"token\":%d,\"text\":", r->pos, r->token);
        json_string(f, text ? text : "", len);
        fputs(",\"layers\":", f);
        json_route_layers(f, r->layers, r->n_moe, r->k, r->experts, r->weights, o->only);
        fputs("}\n", f);
    } else {
        fprintf(f, "%6zu %7d  ", r->pos, r->token);
        const int top = r->n_moe ? r->experts[(size_t)o->color_layer * r->k] : -1;
        if (o->color && top >= 0) fprintf(f, "\x1b[1;38;5;%dm", palette[top % N_PALETTE]);
        fputc('"', f);
        put_display(f, text ? text : "", len);
        fputc('"', f);
        if (o->color && top >= 0) fputs("\x1b[0m", f);
        for (int i = 0; i < r->n_moe; i++) {
            if (o->only >= 0 && i != o->only) continue;
            fprintf(f, "  | L%d", r->layers[i]);
            for (int j = 0; j < r->k; j++) {
                const int e = r->experts[(size_t)i * r->k + j];
                if (e < 0) fputs("  -", f);
                else fprintf(f, "  %d:%.3f", e, r->weights[(size_t)i * r->k + j]);
            }
        }
        fputc('\n', f);
    }
    if (ferror(f)) o->write_failed = 1;
    return o->write_failed || (o->max && r->pos + 1 >= o->max);
}

/* The MoE layer index of model layer l, or -1 (messages printed). */
int moe_layer_index(const moe_config *c, int l) {
    if (l < 0 || l >= c->n_layers) {
        fail("--layer %d is out of range: the model has layers 0..%d", l, c->n_layers - 1);
        return -1;
    }
    if (!moe_config_layer_is_moe(c, l)) {
        fail("--layer %d is a dense layer: it has no experts (MoE layers start at %d)", l, c->moe_first_dense);
        return -1;
    }
    int k = 0;
    for (int j = 0; j < l; j++) k += moe_config_layer_is_moe(c, j);
    return k;
}

static int route_run(cli_cmd *cmd, const char *model, const char *prompt, const str_list *data, int layer,
                     int json, int max_tokens, int threads) {
    if (!model) return cli_usage_error(cmd->name, "--model FILE is required");
    if (cli_given(cmd, "prompt") && data->n) return cli_usage_error(cmd->name, "give --prompt or --data, not both");
    if (!cli_given(cmd, "prompt") && !data->n) return cli_usage_error(cmd->name, "--prompt TEXT or --data PATH is required");
    if (data->n && check_data_paths(data)) return EXIT_FAIL;
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    moe_model *m = NULL;
    if (load_model(model, &m)) return EXIT_FAIL;
    const moe_config *c = moe_model_config(m);
    const moe_tokenizer *tok = moe_model_tokenizer(m);
    int rc = EXIT_FAIL;
    int32_t *ids = NULL;
    size_t n = 0;
    route_out o = {.tok = tok, .json = json, .only = -1, .color_layer = 0, .max = (size_t)max_tokens};
    if (!tok) { rc = fail("%s has no tokenizer (tokenizer.ggml.* metadata): there is no way to read text", model); goto done; }
    if (moe_config_n_moe_layers(c) == 0) { rc = fail("%s is a dense model: it has no experts to route to", model); goto done; }
    if (cli_given(cmd, "layer")) {
        if ((o.only = moe_layer_index(c, layer)) < 0) goto done;
        o.color_layer = o.only;
    }
    if ((rc = route_tokens(tok, prompt, data, &ids, &n))) goto done;
    rc = EXIT_FAIL;
    if (n == 0) { rc = fail("the text holds no tokens"); goto done; }
    const char *nc = getenv("NO_COLOR");
    o.color = !json && isatty(fileno(stdout)) && !(nc && *nc);
    moe_status st = moe_model_route(m, ids, o.max && o.max < n ? o.max : n, on_route, &o);
    if (fflush(stdout) != 0) o.write_failed = 1;
    if (st != MOE_OK) { rc = lib_fail(NULL); goto done; }
    if (o.write_failed) { rc = fail("writing the output failed"); goto done; }
    if (o.color) { /* which colour is which expert */
        const int E = c->n_experts;
        int l = 0;
        for (int k = 0; l < c->n_layers; l++) /* the model layer of MoE layer color_layer */
            if (moe_config_layer_is_moe(c, l) && k++ == o.color_layer) break;
        printf("colour = top expert of layer %d:", l);
        for (int e = 0; e < E && e < N_PALETTE; e++) printf(" \x1b[1;38;5;%dm%d\x1b[0m", palette[e], e);
        if (E > N_PALETTE) printf(" (experts from %d on repeat the colours)", N_PALETTE);
        putchar('\n');
    }
    rc = 0;
done:
    free(ids);
    moe_model_free(m);
    return rc;
}

int cmd_route(int argc, char **argv) {
    const char *model = NULL, *prompt = "";
    str_list data = {0};
    int layer = 0, json = 0, max_tokens = 0, threads = 0;
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "model GGUF (our own or a published one)", "required", 0},
        {"prompt", OPT_TEXT, &prompt, R_ANY, "TEXT", "text to route (read as generate reads a prompt)", NULL, 0},
        {"data", OPT_LIST, &data, R_ANY, "PATH", "text file or directory to route instead; repeatable", NULL, 0},
        {"layer", OPT_INT, &layer, R_NONNEG, "L", "show only layer L (and colour by it)", "all MoE layers, colour by the first", 0},
        {"json", OPT_FLAG, &json, R_ANY, NULL, "JSON Lines, one object per token (see README)", NULL, 0},
        {"max-tokens", OPT_INT, &max_tokens, R_NONNEG, "N", "route at most N tokens, 0 = all", NULL, 0},
        THREADS_OPT(threads),
    };
    cli_cmd cmd = {"route", "--model FILE (--prompt TEXT | --data PATH ...) [options]",
                   "Shows, for every token and every MoE layer, the experts the router chose and their weights. "
                   "On a terminal the tokens are coloured by their top expert (plain text when stdout is not a "
                   "terminal or NO_COLOR is set).",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = route_run(&cmd, model, prompt, &data, layer, json, max_tokens, threads);
    cli_free(&cmd);
    return rc;
}
