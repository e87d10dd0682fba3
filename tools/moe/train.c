/* train.c: moe train. Everything that can be checked cheaply (flags, config,
 * data paths, output paths) is checked before the tokenizer, dataset or model
 * is built, so bad input never costs time and never touches existing files. */
#include "cli.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist/dist.h"

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
    char val[32], tps[32], bal[48], eta[32], comm[96] = "";
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
    if (p->ranks > 1) /* rank 0's share of the step */
        snprintf(comm, sizeof comm, " | %d ranks: a2a %.2f MB %.0f ms, reduce %.0f ms, compute %.0f ms",
                 p->ranks, p->a2a_bytes / 1e6, 1e3 * p->a2a_s, 1e3 * p->reduce_s, 1e3 * p->compute_s);
    snprintf(buf, cap, "step %d/%d | loss %.3f | val %s | %s tok/s | lr %.1e | balance %s | eta %s%s",
             p->step, p->steps, (double)p->loss, val, tps, (double)p->lr, bal, eta, comm);
}

static void print_line(progress *s, const moe_train_progress *p) {
    char line[384];
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
    int cpu_bf16 = cli_default_matmul(cfg);
    if (dist_world()->size > 1) { /* one precision per job: bf16 by default only where every rank has it */
        int lacks = !cpu_bf16;
        if (dist_any(&lacks) != MOE_OK) return lib_fail(NULL);
        if (lacks && cpu_bf16) {
            cfg->matmul = MOE_MATMUL_FP32;
            cpu_bf16 = 0;
        }
    }
    int rc = cli_apply_sets("train", &a->sets, cfg);
    if (rc) return rc;
    if (cpu_bf16 && cfg->matmul == MOE_MATMUL_BF16 && dist_world()->rank == 0)
        fprintf(stderr, "precision: bf16 matmul inputs, fp32 weights and sums (this CPU's default: %s; "
                        "--set matmul=fp32 for fp32)\n", cli_bf16_unit());
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

/* w as one shell word: as it is when it has nothing a shell would read, else in single quotes */
static void print_shell_word(FILE *f, const char *w) {
    if (*w && strspn(w, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=.,/:@%") == strlen(w)) {
        fputs(w, f);
        return;
    }
    fputc('\'', f);
    for (; *w; w++) {
        if (*w == '\'') fputs("'\\''", f);
        else fputc(*w, f);
    }
    fputc('\'', f);
}

/* The command that continues this run from its checkpoint: the data (unless
 * it was the default) and the options the state file does not keep, as given. */
static void print_resume_command(FILE *f, cli_cmd *cmd, const train_args *a, int data_defaulted) {
    if (dist_world()->size > 1) fprintf(f, "mpirun -np %d ", dist_world()->size); /* or srun: any rank count resumes */
    fputs("moe train --resume ", f);
    print_shell_word(f, a->out);
    for (int i = 0; !data_defaulted && i < a->data.n; i++) {
        fputs(" --data ", f);
        print_shell_word(f, a->data.v[i]);
    }
    static const char *const kept[] = {"log", "eval-every", "save-every", "save-minutes", "threads",
                                           "expert-parallel"};
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++) {
        cli_opt *o = cli_opt_find(cmd, kept[i]);
        if (!o || !o->given) continue;
        fprintf(f, " --%s ", kept[i]);
        if (o->kind == OPT_STR) print_shell_word(f, *(const char **)o->dst);
        else if (o->kind == OPT_INT) fprintf(f, "%d", *(const int *)o->dst);
        else fprintf(f, "%g", (double)*(const float *)o->dst);
    }
    fputc('\n', f);
}

/* where and how often checkpoints go, said once before the first step */
static void print_checkpoint_plan(const train_args *a) {
    char every[96] = "";
    if (a->p.save_minutes > 0) snprintf(every, sizeof every, "every %g min, ", (double)a->p.save_minutes);
    if (a->p.save_every > 0)
        snprintf(every + strlen(every), sizeof every - strlen(every), "every %d steps, ", a->p.save_every);
    fprintf(stderr, "checkpoints: %sat the end and on Ctrl-C/SIGTERM, to %s (state in %s.state)\n", every,
            a->out, a->out);
}

/* After moe_train stopped on a signal: what was saved and how to go on. */
static int report_interrupted(cli_cmd *cmd, const train_args *a, const progress *s, int data_defaulted) {
    /* a rank that saw no signal of its own stopped because another rank did
     * (training agrees on the step): it reports like the others, as SIGTERM,
     * the signal mpirun and Slurm forward */
    const int sig = cli_stop_signal() ? cli_stop_signal() : dist_world()->size > 1 ? SIGTERM : SIGINT;
    const char *name = sig == SIGTERM ? "SIGTERM" : "SIGINT";
    if (dist_world()->rank != 0) return CLI_SIGNAL_STATUS(sig); /* rank 0 speaks for the job */
    if (!s->have) {
        fprintf(stderr, "moe train: interrupted (%s) before the first step; nothing saved%s%s\n", name,
                a->resume ? ", the checkpoint is as it was: " : "", a->resume ? a->resume : "");
        return CLI_SIGNAL_STATUS(sig);
    }
    char dur[32];
    fmt_duration(dur, sizeof dur, s->last.elapsed_s);
    fprintf(stderr, "moe train: interrupted (%s) after step %d/%d (%s); saved %s and %s.state\nresume with: ", name,
            s->last.step, s->last.steps, dur, a->out, a->out);
    print_resume_command(stderr, cmd, a, data_defaulted);
    return CLI_SIGNAL_STATUS(sig);
}

static void print_summary(cli_cmd *cmd, const train_args *a, const progress *s, int data_defaulted, double elapsed) {
    char dur[32];
    fmt_duration(dur, sizeof dur, elapsed);
    /* moe_train succeeded, so it ran at least one step: a finished run is
     * caught before training (moe_train_resume_point) */
    const moe_train_progress *p = &s->last;
    if (p->step < p->steps) {
        printf("paused at step %d/%d after %s; saved %s\ncontinue with: ", p->step, p->steps, dur, a->out);
        print_resume_command(stdout, cmd, a, data_defaulted);
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
    { /* a distributed launch that cannot split is refused before any work */
        const moe_dist *w = dist_world();
        int ep = a->p.expert_parallel > 0 ? a->p.expert_parallel : 1;
        if (ep > 1 && !dist_is_mpi()) {
            rc = cli_usage_error(cmd->name, "--expert-parallel needs the distributed build (make MPI=1) under mpirun");
            goto done;
        }
        /* every rank refuses alike; rank 0 says why */
        if (dist_check_expert_parallel(ep, w->size, cfg.n_experts) != MOE_OK) {
            rc = w->rank ? EXIT_USAGE : cli_usage_error(cmd->name, "%s", moe_last_error());
            goto done;
        }
        int batch = a->resume ? 0 : a->p.batch; /* a resumed run's batch is checked by moe_train */
        if (batch % w->size) {
            rc = w->rank ? EXIT_USAGE : cli_usage_error(cmd->name, "--batch %d does not split over the %d ranks of the job "
                                 "(each rank takes batch / ranks sequences)", batch, w->size);
            goto done;
        }
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
    if (dist_world()->rank == 0)
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
    if (dist_world()->rank == 0)
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
    if (dist_world()->rank == 0) print_checkpoint_plan(a);
    /* the first Ctrl-C or SIGTERM: the library finishes the step and saves;
     * a second: out at once, the last checkpoint (atomic saves) intact */
    cli_catch_stop_signals(prog.tty ? "\nmoe train: stopping after this step to save (again: stop at once, no save)\n"
                                    : "moe train: stopping after this step to save (again: stop at once, no save)\n",
                           "\nmoe train: stopped at once, not saved; the last checkpoint is kept\n");
    moe_status st = moe_train(m, d, &a->p, state_in, on_progress, &prog);
    cli_release_stop_signals();
    progress_finish(&prog);
    if (st == MOE_ERR_INTERRUPTED) { rc = report_interrupted(cmd, a, &prog, data_defaulted); goto done; }
    if (st != MOE_OK) { rc = lib_fail(NULL); goto done; }
    print_summary(cmd, a, &prog, data_defaulted, prog.have ? prog.last.elapsed_s : 0);
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
            "  moe train --resume model.gguf              (keeps the run's --steps, --lr, ...)\n"
            "\nInterruptions:\n"
            "  Ctrl-C or SIGTERM finishes the current step, saves the checkpoint and its state\n"
            "  (atomically: a file is replaced only once it is complete), prints the command that\n"
            "  resumes the run, and exits with status 130 (SIGINT) or 143 (SIGTERM). A second\n"
            "  signal stops at once without saving; the last checkpoint stays intact. A kill -9\n"
            "  loses at most the steps since the last checkpoint (--save-minutes, --save-every).\n"
            "  Resuming continues bit-identically, as if the run had not stopped.\n");
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
        {"save-every", OPT_INT, &a.p.save_every, R_NONNEG, "N", "checkpoint every N steps, 0 = off", NULL, 0},
        {"save-minutes", OPT_FLOAT, &a.p.save_minutes, R_NONNEG, "M",
         "also checkpoint every M minutes (fractions allowed), 0 = off", NULL, 0},
        {"stop-after", OPT_INT, &a.p.stop_after, R_NONNEG, "K",
         "pause after K steps of this process, 0 = run to --steps", NULL, 0},
        {"tokenizer", OPT_STR, &a.tokenizer, R_ANY, "FILE", "tokenizer GGUF to use instead of training one",
         "train one on the data", 0},
        {"force", OPT_FLAG, &a.force, R_ANY, NULL, "allow overwriting an existing --out file", NULL, 0},
        {"profile", OPT_FLAG, &a.profile, R_ANY, NULL, "print the time spent per phase at the end", NULL, 0},
        {"expert-parallel", OPT_INT, &a.p.expert_parallel, R_POS, "EP",
         "under mpirun (make MPI=1): split the experts over groups of EP ranks", "1", 0},
    };
    cli_cmd cmd = {"train", "[options]",
                   "Trains a Mixture-of-Experts language model on text and saves it as GGUF.\n"
                   "Without options: preset 'default' on data/corpus-small, saved to model.gguf.",
                   opts, CLI_NOPTS(opts), NULL, train_footer};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0 && a.p.save_minutes > 1e7f) rc = cli_usage_error(cmd.name, "option '--save-minutes' must be at most 1e7");
    if (rc < 0) rc = train_run(&cmd, &a);
    cli_free(&cmd);
    return rc;
}
