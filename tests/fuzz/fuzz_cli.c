/* Fuzz target: the moe command line. Input: NUL-separated words. They go
 * (1) through cli_parse with a table holding every option kind (a copy of
 * `moe train`'s options), and (2) to `moe info` as its arguments, which parses,
 * applies --preset/--set and validates. Words naming a model file are
 * dropped so the fuzzer never makes `info` read arbitrary paths. */
#define FUZZ_HAS_INIT
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "cli.h"

#define MAX_WORDS 64

static void fuzz_init(void) {
    /* help text and results go to stdout: keep the fuzzer's output readable */
    if (!freopen("/dev/null", "w", stdout)) abort();
}

static void parse_train_table(int argc, char **argv) {
    moe_train_params p;
    moe_train_params_default(&p);
    const char *preset = "default", *out = NULL, *resume = NULL, *log = NULL, *tokenizer = NULL,
               *prompt = "";
    str_list sets = {0}, data = {0}, positional = {0};
    int force = 0;
    cli_opt opts[] = {
        {"preset", OPT_STR, &preset, R_ANY, "NAME", "preset", NULL, 0},
        {"set", OPT_LIST, &sets, R_ANY, "KEY=VALUE", "override", "none", 0},
        {"data", OPT_LIST, &data, R_ANY, "PATH", "data", "data/corpus-small", 0},
        {"steps", OPT_INT, &p.steps, R_POS, "N", "steps", NULL, 0},
        {"seq", OPT_INT, &p.seq, R_GT1, "T", "seq", NULL, 0},
        {"lr", OPT_FLOAT, &p.lr, R_POS, "X", "lr", NULL, 0},
        {"warmup", OPT_INT, &p.warmup, R_NONNEG, "N", "warmup", NULL, 0},
        {"top-p", OPT_FLOAT, &p.min_lr_frac, R_UNIT, "P", "unit range", NULL, 0},
        {"seed", OPT_U64, &p.seed, R_ANY, "S", "seed", NULL, 0},
        {"out", OPT_STR, &out, R_ANY, "FILE", "out", NULL, 0},
        {"resume", OPT_STR, &resume, R_ANY, "FILE", "resume", NULL, 0},
        {"log", OPT_STR, &log, R_ANY, "FILE", "log", NULL, 0},
        {"tokenizer", OPT_STR, &tokenizer, R_ANY, "FILE", "tokenizer", NULL, 0},
        {"prompt", OPT_TEXT, &prompt, R_ANY, "TEXT", "prompt", NULL, 0},
        {"force", OPT_FLAG, &force, R_ANY, NULL, "force", NULL, 0},
    };
    cli_cmd cmd = {"fuzz", "[options] [FILE...]", "fuzzing", opts, CLI_NOPTS(opts),
                   argc % 2 ? &positional : NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) {
        /* what was parsed must be usable */
        for (int i = 0; i < sets.n; i++) if (!sets.v[i] || !*sets.v[i]) abort();
        for (int i = 0; i < data.n; i++) if (!data.v[i] || !*data.v[i]) abort();
        if (out && !*out) abort();
        if (cli_given(&cmd, "steps") && p.steps <= 0) abort();
        if (cli_given(&cmd, "lr") && !(p.lr > 0)) abort();
        if (cli_given(&cmd, "top-p") && !(p.min_lr_frac > 0 && p.min_lr_frac <= 1)) abort();
    }
    cli_free(&cmd);
}

static void fuzz_one(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 1);
    if (!buf) return;
    memcpy(buf, data, size);
    buf[size] = 0;
    char *words[MAX_WORDS + 1];
    int n = 0;
    for (size_t i = 0; i < size && n < MAX_WORDS; i += strlen(buf + i) + 1) words[n++] = buf + i;
    words[n] = NULL;
    parse_train_table(n, words);
    int safe = 1;
    for (int i = 0; i < n; i++) if (strstr(words[i], "model")) safe = 0;
    if (safe) cmd_info(n, words);
    free(buf);
}

static int fuzz_write_seeds(const char *dir) {
#define S(name, lit) {name, lit, sizeof(lit) - 1}
    static const struct { const char *name, *text; size_t len; } seeds[] = {
        S("info_preset", "--preset\0tiny"),
        S("info_sets", "--preset=tiny\0--set\0n_experts=2\0--set\0top_k=1"),
        S("info_bad_set", "--set\0n_heads\0--set\0=3\0--set\0d_model=7"),
        S("help", "--steps\0--help"),
        S("numbers", "--steps\0" "10\0--lr\0" "1e-3\0--seed\0" "18446744073709551615\0--top-p\0" "1\0--warmup=0"),
        S("bad_numbers", "--steps\0-1\0--lr\0nan\0--seed\0-5\0--top-p\0" "1.5\0--seq\0" "1"),
        S("end_of_options", "--force\0--\0--steps\0file"),
        S("missing_value", "--out\0--force\0--prompt"),
        S("flag_value", "--force=1\0-x\0--\0"),
        S("empty_values", "--out=\0--prompt=\0--data\0"),
    };
#undef S
    int bad = 0;
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++)
        bad |= fuzz_put(dir, seeds[i].name, seeds[i].text, seeds[i].len);
    return bad;
}
