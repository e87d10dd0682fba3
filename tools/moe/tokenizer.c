/* tokenizer.c: moe tokenizer train | encode | decode. A tokenizer file is the
 * GGUF moe_tokenizer_save writes; a model GGUF works wherever one is read. */
#include "cli.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

static int load_tokenizer(const char *path, moe_tokenizer **tok) {
    *tok = NULL;
    if (!path_exists(path)) return fail("tokenizer file '%s' does not exist", path);
    if (is_dir(path)) return fail("tokenizer file '%s' is a directory", path);
    if (moe_tokenizer_load(tok, path) != MOE_OK) return lib_fail_file(path);
    return 0;
}

/* ---- train ---- */
static int tok_train_run(cli_cmd *cmd, const str_list *data, int vocab, const char *out, int force) {
    if (data->n == 0) return cli_usage_error(cmd->name, "--data PATH is required");
    if (!out) return cli_usage_error(cmd->name, "--out FILE is required");
    if (check_data_paths(data) || check_out_path(out, NULL, force)) return EXIT_FAIL;
    char **texts = NULL;
    size_t *lens = NULL;
    int n = 0;
    if (moe_read_texts(data->v, data->n, &texts, &lens, &n) != MOE_OK) return lib_fail(NULL);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += lens[i];
    int rc = EXIT_FAIL;
    moe_tokenizer *tok = NULL;
    if (total == 0) {
        rc = fail("no text found in the data");
    } else {
        fprintf(stderr, "training tokenizer (vocab %d) on %.1f %s of text...\n", vocab,
                total >= 1000000 ? (double)total / 1e6 : (double)total / 1e3, total >= 1000000 ? "MB" : "KB");
        if (moe_tokenizer_train(&tok, (const char *const *)texts, lens, n, vocab) != MOE_OK) rc = lib_fail(NULL);
        else if (moe_tokenizer_save(tok, out) != MOE_OK) rc = lib_fail_file(out);
        else {
            printf("saved %s (vocab %d)\n", out, moe_tokenizer_vocab_size(tok));
            rc = 0;
        }
    }
    moe_tokenizer_free(tok);
    moe_free_texts(texts, lens, n);
    return rc;
}

static int tok_train(int argc, char **argv) {
    str_list data = {0};
    const char *out = NULL;
    int vocab = 0, force = 0;
    moe_config cfg;
    if (moe_config_preset(&cfg, "default") == MOE_OK) vocab = cfg.vocab_size;
    cli_opt opts[] = {
        {"data", OPT_LIST, &data, R_ANY, "PATH", "text file or directory to learn from; repeatable",
         "required", 0},
        {"vocab", OPT_INT, &vocab, R_POS, "N", "vocabulary size: 256 bytes + merges + end-of-text", NULL, 0},
        {"out", OPT_STR, &out, R_ANY, "FILE", "where to save the tokenizer GGUF", "required", 0},
        {"force", OPT_FLAG, &force, R_ANY, NULL, "allow overwriting an existing --out file", NULL, 0},
    };
    cli_cmd cmd = {"tokenizer train", "--data PATH --vocab N --out FILE",
                   "Learns a byte-level BPE tokenizer from text and saves it as GGUF.",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = tok_train_run(&cmd, &data, vocab, out, force);
    cli_free(&cmd);
    return rc;
}

/* ---- encode ---- */
static int tok_encode_run(cli_cmd *cmd, const char *path, const char *text) {
    if (!path) return cli_usage_error(cmd->name, "--tokenizer FILE is required");
    moe_tokenizer *tok;
    if (load_tokenizer(path, &tok)) return EXIT_FAIL;
    size_t len = 0;
    char *owned = NULL;
    if (text) {
        len = strlen(text);
    } else {
        if (moe_read_stream(stdin, "standard input", &owned, &len) != MOE_OK) {
            moe_tokenizer_free(tok);
            return lib_fail(NULL);
        }
        text = owned;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 0;
    if (moe_tokenizer_encode(tok, text, len, &ids, &n) != MOE_OK) {
        rc = lib_fail(NULL);
    } else {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
        putchar('\n');
        if (fflush(stdout) != 0) rc = fail("writing the output failed");
    }
    moe_free(ids);
    moe_free(owned);
    moe_tokenizer_free(tok);
    return rc;
}

static int tok_encode(int argc, char **argv) {
    const char *path = NULL, *text = NULL;
    cli_opt opts[] = {
        {"tokenizer", OPT_STR, &path, R_ANY, "FILE", "tokenizer or model GGUF", "required", 0},
        {"text", OPT_TEXT, &text, R_ANY, "TEXT", "text to encode", "read standard input", 0},
    };
    cli_cmd cmd = {"tokenizer encode", "--tokenizer FILE [--text TEXT]",
                   "Prints the token ids of a text (or of standard input, byte for byte), space-separated.",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = tok_encode_run(&cmd, path, text);
    cli_free(&cmd);
    return rc;
}

/* ---- decode ---- */
typedef struct { char *p; size_t n, cap; } bytes;

static int bytes_add(bytes *b, const char *s, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

/* Appends the bytes of one id written as text; prints the error, 0 if fine. */
static int decode_one(cli_cmd *cmd, const moe_tokenizer *tok, const char *word, bytes *out) {
    int id;
    if (parse_int(word, &id) || id < 0) return cli_usage_error(cmd->name, "invalid token id '%s'", word);
    size_t len = 0;
    const char *s = moe_tokenizer_token(tok, id, &len);
    if (!s) return fail("token id %d is out of range (vocab %d)", id, moe_tokenizer_vocab_size(tok));
    if (bytes_add(out, s, len)) return fail("out of memory");
    return 0;
}

static int tok_decode_run(cli_cmd *cmd, const char *path, const str_list *ids) {
    if (!path) return cli_usage_error(cmd->name, "--tokenizer FILE is required");
    /* check the ids' spelling before loading anything */
    for (int i = 0; i < ids->n; i++) {
        int id;
        if (parse_int(ids->v[i], &id) || id < 0)
            return cli_usage_error(cmd->name, "invalid token id '%s'", ids->v[i]);
    }
    moe_tokenizer *tok;
    if (load_tokenizer(path, &tok)) return EXIT_FAIL;
    bytes out = {0};
    char *in = NULL;
    int rc = 0;
    if (ids->n) {
        for (int i = 0; i < ids->n && !rc; i++) rc = decode_one(cmd, tok, ids->v[i], &out);
    } else {
        size_t len;
        if (moe_read_stream(stdin, "standard input", &in, &len) != MOE_OK) rc = lib_fail(NULL);
        for (char *p = in; !rc && p && *p;) {
            while (*p && isspace((unsigned char)*p)) p++;
            if (!*p) break;
            char *w = p;
            while (*p && !isspace((unsigned char)*p)) p++;
            char save = *p;
            *p = 0;
            rc = decode_one(cmd, tok, w, &out);
            *p = save;
        }
    }
    /* all or nothing: the bytes are written only when every id was valid */
    if (!rc && out.n && fwrite(out.p, 1, out.n, stdout) != out.n) rc = fail("writing the output failed");
    if (!rc && fflush(stdout) != 0) rc = fail("writing the output failed");
    free(out.p);
    moe_free(in);
    moe_tokenizer_free(tok);
    return rc;
}

static int tok_decode(int argc, char **argv) {
    const char *path = NULL;
    str_list ids = {0};
    cli_opt opts[] = {
        {"tokenizer", OPT_STR, &path, R_ANY, "FILE", "tokenizer or model GGUF", "required", 0},
    };
    cli_cmd cmd = {"tokenizer decode", "--tokenizer FILE [ID ...]",
                   "Writes the exact bytes of the given token ids (or of the ids read from standard\n"
                   "input), with nothing added.",
                   opts, CLI_NOPTS(opts), &ids, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = tok_decode_run(&cmd, path, &ids);
    cli_free(&cmd);
    return rc;
}

/* ---- dispatch ---- */
static void tokenizer_usage(FILE *f) {
    fprintf(f,
            "Usage: moe tokenizer SUBCOMMAND [options]\n\n"
            "Byte-level BPE tokenizers, stored as GGUF (a model GGUF works too).\n\n"
            "Subcommands:\n"
            "  train    learn a tokenizer: --data PATH --vocab N --out FILE\n"
            "  encode   print the ids of a text: --tokenizer FILE [--text TEXT]\n"
            "  decode   write the bytes of ids: --tokenizer FILE [ID ...]\n\n"
            "Options:\n"
            "  -h, --help  show this help and exit\n\n"
            "Run 'moe tokenizer SUBCOMMAND --help' for the options of a subcommand.\n");
}

int cmd_tokenizer(int argc, char **argv) {
    if (argc < 1) {
        fprintf(stderr, "moe tokenizer: missing subcommand: train, encode or decode (see 'moe tokenizer --help')\n");
        return EXIT_USAGE;
    }
    const char *sub = argv[0];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
        tokenizer_usage(stdout);
        return 0;
    }
    if (strcmp(sub, "train") == 0) return tok_train(argc - 1, argv + 1);
    if (strcmp(sub, "encode") == 0) return tok_encode(argc - 1, argv + 1);
    if (strcmp(sub, "decode") == 0) return tok_decode(argc - 1, argv + 1);
    if (sub[0] == '-')
        fprintf(stderr, "moe tokenizer: unknown option '%s' (see 'moe tokenizer --help')\n", sub);
    else
        fprintf(stderr, "moe tokenizer: unknown subcommand '%s' (see 'moe tokenizer --help')\n", sub);
    return EXIT_USAGE;
}
