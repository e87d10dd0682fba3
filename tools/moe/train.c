/* train.c: moe train. Everything that can be checked cheaply (flags, config,
 * data paths, output paths) is checked before the tokenizer, dataset or model
 * is built, so bad input never costs time and never touches existing files. */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    moe_train_params p;
    const char *preset, *out, *resume, *log, *tokenizer;
    str_list sets, data;
    int force, profile;
} train_args;

/* ---- progress line ---- */
typedef struct {
    int tty, every, line_open, any_printed, printed_step, have;
    float val;
    double last_print;
    moe_train_progress last;
} progress;

static void format_line(const progress *s, const moe_train_progress *p, char *buf, size_t cap) {
    char val[32], tps[32], bal[48], eta[32];
    if (s->val >= 0) snprintf(val, sizeof val, "%.3f", (double)s->val);
    else snprintf(val, sizeof val, "-");
    double t = p->tokens_per_s;
    if (t >= 1e6) snprintf(tps, sizeof tps, "%.2fM", t / 1e6);
    else if (t >= 1e3) snprintf(tps, sizeof tps, "%.1fk", t / 1e3);
    else snprintf(tps, sizeof tps, "%.0f", t);
    if (p->balance > 0 && p->drop_rate > 0)
        snprintf(bal, sizeof bal, "%.2f (maxvio %.2f, drop %.1f%%)", (double)p->balance, (double)p->maxvio, 100.0 * p->drop_rate);
    else if (p->balance > 0) snprintf(bal, sizeof bal, "%.2f (maxvio %.2f)", (double)p->balance, (double)p->maxvio);
    else snprintf(bal, sizeof bal, "-");
    fmt_duration(eta, sizeof eta, p->eta_s);
    snprintf(buf, cap, "step %d/%d | loss %.3f | val %s | %s tok/s | lr %.1e | balance %s | eta %s",
             p->step, p->steps, (double)p->loss, val, tps, (double)p->lr, bal, eta);
}

static void print_line(progress *s, const moe_train_progress *p) {
    char line[256];
    format_line(s, p, line, sizeof line);
    status_line(s->tty, line, &s->line_open);
    if (s->line_open && p->evaluated) { fputc('\n', stderr); s->line_open = 0; } /* keep eval lines */
    s->any_printed = 1;
    s->printed_step = p->step;
    s->last_print = p->elapsed_s;
}

static void on_progress(const moe_train_progress *p, void *user) {
    progress *s = user;
    s->last = *p;
    s->have = 1;
    if (p->val_loss >= 0) s->val = p->val_loss;
    if (s->every <= 0) s->every = p->steps <= 20 ? 1 : p->steps / 20; /* ~20 lines when not a tty */
    int due = !s->any_printed || p->evaluated || p->step >= p->steps;
    if (s->tty) due = due || p->elapsed_s - s->last_print >= 0.1;
    else due = due || p->step % s->every == 0 || p->elapsed_s - s->last_print >= 30;
    if (due) print_line(s, p);
}

static void progress_finish(progress *s) {
    if (s->have && s->printed_step != s->last.step) print_line(s, &s->last);
    if (s->line_open) { fputc('\n', stderr); s->line_open = 0; }
}

/* ---- helpers ---- */
static char *concat(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    char *s = malloc(na + nb + 1);
    if (s) { memcpy(s, a, na); memcpy(s + na, b, nb + 1); }
    return s;
}

static int sets_vocab(const str_list *sets) {
    for (int i = 0; i < sets->n; i++)
        if (strncmp(sets->v[i], "vocab_size=", 11) == 0) return 1;
    return 0;
}

/* preset + --set + --tokenizer's vocabulary, validated */
static int build_config(const train_args *a, moe_config *cfg, moe_tokenizer **tok) {
    if (moe_config_preset(cfg, a->preset) != MOE_OK) {
        return lib_fail(NULL); /* names the known presets */
    }
    int rc = cli_apply_sets("train", &a->sets, cfg);
    if (rc) return rc;
    if (a->tokenizer) {
        if (!path_exists(a->tokenizer)) return fail("tokenizer file '%s' does not exist", a->tokenizer);
        if (moe_tokenizer_load(tok, a->tokenizer) != MOE_OK) return lib_fail_file(a->tokenizer);
        int v = moe_tokenizer_vocab_size(*tok);
        if (v != cfg->vocab_size) {
            if (sets_vocab(&a->sets))
                return fail("--set vocab_size=%d does not match the tokenizer '%s' (%d tokens)",
                            cfg->vocab_size, a->tokenizer, v);
            cfg->vocab_size = v; /* the tokenizer decides */
        }
    }
    if (moe_config_validate(cfg) != MOE_OK) return fail("invalid configuration: %s", moe_last_error());
    return 0;
}

static int train_tokenizer(const train_args *a, int vocab, moe_tokenizer **tok) {
    char **texts = NULL;
    size_t *lens = NULL;
    int n = 0;
    if (moe_read_texts(a->data.v, a->data.n, &texts, &lens, &n) != MOE_OK) return lib_fail(NULL);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += lens[i];
    int rc = 0;
    if (total == 0) {
        rc = fail("no text found in the data");
    } else {
        fprintf(stderr, "training tokenizer (vocab %d) on %.1f %s of text...\n", vocab,
                total >= 1000000 ? (double)total / 1e6 : (double)total / 1e3, total >= 1000000 ? "MB" : "KB");
        if (moe_tokenizer_train(tok, (const char *const *)texts, lens, n, vocab) != MOE_OK) rc = lib_fail(NULL);
    }
    moe_free_texts(texts, lens, n);
    return rc;
}

static void print_summary(const train_args *a, const progress *s, int data_defaulted, double elapsed) {
    char dur[32];
    fmt_duration(dur, sizeof dur, elapsed);
    /* moe_train succeeded, so it ran at least one step: a finished run is
     * caught before training (moe_train_resume_point) */
    const moe_train_progress *p = &s->last;
    if (p->step < p->steps) {
        printf("paused at step %d/%d after %s; saved %s\ncontinue with: moe train --resume %s",
               p->step, p->steps, dur, a->out, a->out);
        for (int i = 0; !data_defaulted && i < a->data.n; i++) printf(" --data %s", a->data.v[i]);
        printf("\n");
        return;
    }
    printf("trained %d steps in %s: loss %.3f", p->steps, dur, (double)p->loss);
    if (s->val >= 0) printf(", val %.3f (perplexity %.1f)", (double)s->val, exp((double)s->val));
    printf("; saved %s\n", a->out);
}

static int train_run(cli_cmd *cmd, train_args *a) {
    /* ---- command-line consistency ---- */
    if (a->resume && (cli_given(cmd, "preset") || a->sets.n))
        return cli_usage_error(cmd->name, "--preset and --set cannot be used with --resume "
                                          "(the configuration comes from the model file)");
    if (a->resume && a->tokenizer)
        return cli_usage_error(cmd->name, "--tokenizer cannot be used with --resume "
                                          "(the model file has its tokenizer)");
    if (a->p.lr >= 10) return cli_usage_error(cmd->name, "option '--lr' must be below 10, got %g", (double)a->p.lr);
    int bad_sets = cli_check_sets(cmd->name, &a->sets);
    if (bad_sets) return bad_sets;
    if (!a->out) a->out = a->resume ? a->resume : "model.gguf";
    int data_defaulted = 0;
    if (a->data.n == 0) {
        const char *c = default_corpus();
        if (!c)
            return fail("no --data given and the built-in corpus data/corpus-small is missing: "
                        "run 'make corpus-small' first (or pass --data PATH)");
        a->data.v[a->data.n++] = c;
        data_defaulted = 1;
    }
    if (cli_given(cmd, "threads")) moe_set_threads(a->p.threads);
    if (a->resume) { /* the stored run decides its own schedule */
        static const char *const fixed[] = {"steps", "batch", "seq", "lr", "warmup", "grad-accum", "seed"};
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
            if (cli_given(cmd, fixed[i]))
                fprintf(stderr, "moe train: note: --%s is ignored with --resume (the run keeps its settings)\n",
                        fixed[i]);
    }

    int rc = EXIT_FAIL;
    moe_model *m = NULL;
    moe_tokenizer *tok = NULL;
    moe_dataset *d = NULL;
    char *state_in = NULL, *state_out = NULL;
    moe_config cfg;

    /* ---- configuration ---- */
    if (a->resume) {
        state_in = concat(a->resume, ".state");
        if (!state_in) { rc = fail("out of memory"); goto done; }
        if (!path_exists(a->resume)) { rc = fail("cannot resume: '%s' does not exist", a->resume); goto done; }
        char *state_tmp = concat(state_in, ".tmp"); /* a save interrupted between its renames */
        int have_tmp = state_tmp && path_exists(state_tmp);
        free(state_tmp);
        if (!path_exists(state_in) && !have_tmp) {
            rc = fail("cannot resume: training state '%s' is missing", state_in);
            goto done;
        }
        if (moe_model_load(&m, a->resume) != MOE_OK) { rc = lib_fail_file(a->resume); goto done; }
        cfg = *moe_model_config(m);
        if (!moe_model_tokenizer(m)) { rc = fail("model '%s' has no tokenizer", a->resume); goto done; }
        int step, steps;
        if (moe_train_resume_point(m, state_in, &step, &steps) != MOE_OK) { rc = lib_fail_file(state_in); goto done; }
        if (step >= steps) { /* before the data is read: nothing would use it */
            printf("nothing to train: the run is already complete (step %d of %d); model in %s\n", step,
                   steps, a->resume);
            rc = 0;
            goto done;
        }
    } else if (build_config(a, &cfg, &tok)) {
        goto done;
    }
    if (!a->resume && a->p.seq > cfg.max_seq) {
        rc = fail("--seq %d is longer than the model's context (max_seq = %d)", a->p.seq, cfg.max_seq);
        goto done;
    }
    /* ---- files ---- */
    if (check_data_paths(&a->data)) goto done;
    if (check_out_path(a->out, a->resume, a->force)) goto done;
    state_out = concat(a->out, ".state");
    if (!state_out) { rc = fail("out of memory"); goto done; }
    if (path_exists(state_out) && !a->force && !(state_in && same_file(state_in, state_out))) {
        rc = fail("refusing to overwrite %s (use --force)", state_out);
        goto done;
    }
    if (a->log && check_out_path(a->log, NULL, 1)) goto done;

    /* ---- the expensive part ---- */
    if (!a->resume && !tok && train_tokenizer(a, cfg.vocab_size, &tok)) goto done;
    const moe_tokenizer *t = a->resume ? moe_model_tokenizer(m) : tok;
    if (moe_tokenizer_vocab_size(t) > cfg.vocab_size) {
        rc = fail("the tokenizer has %d tokens but the model's vocab_size is %d",
                  moe_tokenizer_vocab_size(t), cfg.vocab_size);
        goto done;
    }
    if (moe_dataset_load_text(&d, t, a->data.v, a->data.n) != MOE_OK) { rc = lib_fail(NULL); goto done; }
    size_t n_train = moe_dataset_tokens(d, 0), n_val = moe_dataset_tokens(d, 1);
    if (!a->resume && n_train < (size_t)a->p.seq + 1) {
        rc = fail("not enough training data: %zu tokens, need at least --seq + 1 = %d",
                  n_train, a->p.seq + 1);
        goto done;
    }
    char s1[32], s2[32], s3[32], s4[32];
    fmt_commas(s1, sizeof s1, (int64_t)n_train);
    fmt_commas(s2, sizeof s2, (int64_t)n_val);
    fprintf(stderr, "data: %s training tokens, %s validation tokens\n", s1, s2);
    if (!a->resume) {
        if (moe_model_create(&m, &cfg, a->p.seed) != MOE_OK) { rc = lib_fail(NULL); goto done; }
        moe_model_set_tokenizer(m, tok);
        tok = NULL; /* the model owns it now */
    }
    moe_param_counts pc = moe_config_param_counts(&cfg);
    fmt_human(s3, sizeof s3, pc.total);
    fmt_human(s4, sizeof s4, pc.active);
    char kind[64];
    if (cfg.n_experts > 0) snprintf(kind, sizeof kind, "%d experts, top %d", cfg.n_experts, cfg.top_k);
    else snprintf(kind, sizeof kind, "dense");
    fprintf(stderr, "model: %s parameters, %s active per token (%s)%s\n", s3, s4, kind,
            a->resume ? "; resuming" : "");

    {
        const moe_config *mc = moe_model_config(m);
        if (mc->n_experts > 0 && mc->routing == MOE_ROUTING_EXPERT)
            fprintf(stderr, "moe train: warning: expert-choice routing picks each expert's tokens from the whole batch,\n"
                            "  so a token's output depends on later tokens: the causal model sees the future in\n"
                            "  training, and generation falls back to token choice (docs/routing.md)\n");
        if (mc->n_experts > 0 && mc->routing == MOE_ROUTING_SEQUENCE)
            fprintf(stderr, "moe train: warning: sequence-level routing chooses experts from the mean scores of the\n"
                            "  whole sequence, so early tokens see later ones in training; generation uses the\n"
                            "  mean over the prefix so far (docs/routing.md)\n");
    }
    a->p.out_path = a->out;
    a->p.log_path = a->log;
    progress prog = {0};
    prog.tty = isatty(fileno(stderr));
    prog.val = -1;
    if (a->profile) moe_profile(1);
    moe_status st = moe_train(m, d, &a->p, state_in, on_progress, &prog);
    progress_finish(&prog);
    if (st != MOE_OK) { rc = lib_fail(NULL); goto done; }
    print_summary(a, &prog, data_defaulted, prog.have ? prog.last.elapsed_s : 0);
    if (a->profile) {
        static char report[8192];
        moe_profile_report(report, sizeof report);
        moe_profile(0);
        printf("matmul backend: %s (fp32 matmuls: %s, bf16: %s)\n",
               moe_matmul_backend(cfg.matmul == MOE_MATMUL_BF16), moe_matmul_backend(0),
               moe_matmul_backend(1));
        printf("time per phase over the training steps (evaluation and saving excluded):\n%s", report);
    }
    rc = 0;
done:
    moe_dataset_free(d);
    moe_model_free(m);
    moe_tokenizer_free(tok);
    free(state_in);
    free(state_out);
    return rc;
}

static void train_footer(FILE *f) {
    print_presets(f, "");
    print_config_keys(f);
    fprintf(f,
            "\nExamples:\n"
            "  moe train                                  default preset on data/corpus-small\n"
            "  moe train --preset tiny --steps 200 --out tiny.gguf\n"
            "  moe train --set n_experts=4 --set top_k=1 --data notes.txt\n"
            "  moe train --steps 1000 --stop-after 100    pause after 100 steps, then:\n"
            "  moe train --resume model.gguf              (keeps the run's --steps, --lr, ...)\n");
}

int cmd_train(int argc, char **argv) {
    train_args a = {0};
    moe_train_params_default(&a.p);
    a.preset = "default";
    cli_opt opts[] = {
        {"preset", OPT_STR, &a.preset, R_ANY, "NAME", "model configuration preset (list below)", NULL, 0},
        {"set", OPT_LIST, &a.sets, R_ANY, "KEY=VALUE", "override one config field; repeatable", "none", 0},
        {"data", OPT_LIST, &a.data, R_ANY, "PATH", "text file or directory of text files; repeatable",
         "data/corpus-small", 0},
        {"steps", OPT_INT, &a.p.steps, R_POS, "N", "optimizer steps of the whole run (schedule horizon)", NULL, 0},
        {"batch", OPT_INT, &a.p.batch, R_POS, "B", "sequences per micro-batch", NULL, 0},
        {"seq", OPT_INT, &a.p.seq, R_GT1, "T", "tokens per sequence, at most max_seq", NULL, 0},
        {"lr", OPT_FLOAT, &a.p.lr, R_POS, "X", "peak learning rate (cosine schedule)", NULL, 0},
        {"warmup", OPT_INT, &a.p.warmup, R_NONNEG, "N", "learning-rate warmup steps", "min(100, steps/10)", 0},
        {"grad-accum", OPT_INT, &a.p.grad_accum, R_POS, "N", "micro-batches per optimizer step", NULL, 0},
        {"seed", OPT_U64, &a.p.seed, R_ANY, "S", "seed for initialisation and data order", NULL, 0},
        {"threads", OPT_INT, &a.p.threads, R_NONNEG, "N", "worker threads, 0 = all cores", NULL, 0},
        {"out", OPT_STR, &a.out, R_ANY, "FILE.gguf", "output model; training state goes to FILE.gguf.state",
         "model.gguf, or the --resume file", 0},
        {"resume", OPT_STR, &a.resume, R_ANY, "FILE.gguf", "continue FILE.gguf from FILE.gguf.state",
         NULL, 0},
        {"log", OPT_STR, &a.log, R_ANY, "FILE.jsonl", "write training metrics as JSON lines", NULL, 0},
        {"eval-every", OPT_INT, &a.p.eval_every, R_NONNEG, "N", "validate every N steps, 0 = only at the end",
         NULL, 0},
        {"save-every", OPT_INT, &a.p.save_every, R_NONNEG, "N", "checkpoint every N steps, 0 = only at the end",
         NULL, 0},
        {"stop-after", OPT_INT, &a.p.stop_after, R_NONNEG, "K",
         "pause after K steps of this process, 0 = run to --steps", NULL, 0},
        {"tokenizer", OPT_STR, &a.tokenizer, R_ANY, "FILE", "tokenizer GGUF to use instead of training one",
         "train one on the data", 0},
        {"force", OPT_FLAG, &a.force, R_ANY, NULL, "allow overwriting an existing --out file", NULL, 0},
        {"profile", OPT_FLAG, &a.profile, R_ANY, NULL, "print the time spent per phase at the end", NULL, 0},
    };
    cli_cmd cmd = {"train", "[options]",
                   "Trains a Mixture-of-Experts language model on text and saves it as GGUF.\n"
                   "Without options: preset 'default' on data/corpus-small, saved to model.gguf.",
                   opts, CLI_NOPTS(opts), NULL, train_footer};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = train_run(&cmd, &a);
    cli_free(&cmd);
    return rc;
}
