/* generate.c: moe generate (stream sampled text) and moe eval (loss, perplexity). */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dist/dist.h"

/* What stopped a run early: this process's signal, else (expert
 * parallelism: the ranks agree on stopping) one that reached another rank. */
static const char *stop_cause(int sig) {
    return sig == SIGTERM ? "SIGTERM" : sig ? "SIGINT" : "a signal to another rank";
}

/* ---- generate ---- */
typedef struct {
    int write_failed;
    int peer_stop;        /* the ranks agreed to stop for another rank's reason */
    int dist_failed;      /* the agreement itself failed: a rank died or hangs */
    int n_gen;            /* tokens streamed so far                     */
    double t0, t_first, t_last; /* start, first and last token (--stats) */
} stream_state;

static int on_token(int32_t id, const char *bytes, size_t len, void *user) {
    stream_state *s = user;
    (void)id;
    s->t_last = cli_clock();
    if (s->n_gen++ == 0) s->t_first = s->t_last;
    if (bytes && len && fwrite(bytes, 1, len, stdout) != len) s->write_failed = 1;
    if (fflush(stdout) != 0) s->write_failed = 1;
    /* stop when nobody reads any more, or on Ctrl-C / SIGTERM (after this token:
     * the text so far stays printed; a second signal ends it at once) */
    const int mine = s->write_failed || cli_stop_signal();
    int stop = mine;
    /* expert parallelism: the ranks decode in step, so they stop after the same
     * token (rank 0 alone writes; a signal may reach one rank only) */
    if (dist_world()->ep > 1 && dist_any(&stop)) s->dist_failed = stop = 1; /* the message is set; the job aborts */
    s->peer_stop = stop && !mine && !s->dist_failed;
    return stop;
}

static int generate_run(cli_cmd *cmd, const char *model, const char *prompt, moe_sample_params *sp,
                        int threads, int echo, int n_ctx, int stats, moe_load_options lo,
                        const cli_routing *rt) {
    if (!model) return cli_usage_error(cmd->name, "--model FILE is required");
    int rc_ep = cli_check_inference_ep(cmd, lo.expert_parallel);
    if (rc_ep) return rc_ep;
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    moe_model *m = NULL;
    lo.n_ctx = cli_given(cmd, "ctx") ? n_ctx : 0;
    if (load_model_with(model, &lo, &m)) return EXIT_FAIL;
    if (!moe_model_tokenizer(m)) {
        moe_model_free(m);
        return fail("%s has no tokenizer (tokenizer.ggml.* metadata), so there is no text to generate", model);
    }
    int rc_rt = cli_apply_routing(cmd, rt, m);
    if (rc_rt) {
        moe_model_free(m);
        return rc_rt;
    }
    const moe_tokenizer *tok = moe_model_tokenizer(m);
    int rc = EXIT_FAIL;
    int32_t *ids = NULL, eos;
    size_t n = 0;
    /* as llama.cpp reads a prompt: BOS when the vocabulary asks for it, and
     * special-token text (e.g. "<|im_start|>") as that token */
    if (moe_tokenizer_encode_prompt(tok, prompt, strlen(prompt), 1, 1, &ids, &n) != MOE_OK) {
        rc = lib_fail("encoding the prompt");
        goto done;
    }
    const int32_t *use = ids;
    int ctx = moe_model_context(m);
    if (ctx > 1 && n > (size_t)ctx - 1) { /* keep the end of a long prompt, leave room to generate */
        fprintf(stderr, "moe generate: note: the prompt has %zu tokens; keeping its last %d (context %d)\n",
                n, ctx - 1, ctx);
        use = ids + (n - (size_t)(ctx - 1));
        n = (size_t)ctx - 1;
    }
    if (n == 0) { /* an empty prompt starts a fresh document */
        eos = moe_tokenizer_eos(tok);
        use = &eos;
        n = 1;
    }
    stream_state st = {0};
    if (echo) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    st.t0 = cli_clock();
    cli_catch_stop_signals(NULL, NULL);
    moe_status s = moe_generate(m, use, n, sp, on_token, &st);
    cli_release_stop_signals();
    const int sig = cli_stop_signal();
    if (!st.write_failed) {
        putchar('\n');
        if (fflush(stdout) != 0) st.write_failed = 1;
    }
    if (s != MOE_OK || st.dist_failed) { rc = lib_fail(NULL); goto done; }
    if (stats) print_rank_stats("generate", m);
    if (stats && dist_world()->rank == 0) { /* the first token comes after the prompt; each later one after one decode step */
        const double tp = st.n_gen ? st.t_first - st.t0 : cli_clock() - st.t0, tg = st.t_last - st.t_first;
        fprintf(stderr, "moe generate: prompt %zu tokens, %.1f tokens/s; generation %d tokens, %.1f tokens/s\n",
                n, tp > 0 ? (double)n / tp : 0.0, st.n_gen, st.n_gen > 1 && tg > 0 ? (st.n_gen - 1) / tg : 0.0);
        char units[512];
        moe_cpu_describe(units, sizeof units);
        fprintf(stderr, "moe generate: %s\n", units);
        if (moe_model_repacked_bytes(m))
            fprintf(stderr, "moe generate: %.2f GiB of weights repacked at load for the kernels (MOE_REPACK=0: off)\n",
                    (double)moe_model_repacked_bytes(m) / (1024.0 * 1024 * 1024));
        print_offload_stats("generate", m);
        if (moe_model_config(m)->n_experts > 0)
            fprintf(stderr, "moe generate: %.2f experts per token and MoE layer\n", moe_model_experts_per_token(m, 0));
    }
    if (sig || st.peer_stop) { /* rank 0 speaks for the job; every rank exits alike */
        if (dist_world()->rank == 0) fprintf(stderr, "moe generate: interrupted (%s)\n", stop_cause(sig));
        rc = CLI_SIGNAL_STATUS(sig ? sig : SIGTERM);
        goto done;
    }
    rc = st.write_failed ? fail("writing the output failed") : 0;
done:
    moe_free(ids);
    moe_model_free(m);
    return rc;
}

int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompt = "";
    moe_load_options lo = {.expert_parallel = 1};
    int threads = 0, echo = 0, n_ctx = 0, stats = 0;
    moe_sample_params sp = {.max_tokens = 200, .temperature = 0.8f, .top_k = 0, .top_p = 0.95f, .seed = 1};
    cli_routing rt = {0};
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "model GGUF to sample from", "required", 0},
        {"prompt", OPT_TEXT, &prompt, R_ANY, "TEXT", "text to continue; empty = start a new document", NULL, 0},
        {"tokens", OPT_INT, &sp.max_tokens, R_POS, "N", "number of tokens to generate", NULL, 0},
        {"temperature", OPT_FLOAT, &sp.temperature, R_NONNEG, "X", "sampling temperature, 0 = greedy", NULL, 0},
        {"top-k", OPT_INT, &sp.top_k, R_NONNEG, "K", "sample among the K likeliest tokens, 0 = off", NULL, 0},
        {"top-p", OPT_FLOAT, &sp.top_p, R_UNIT, "P", "nucleus sampling mass in (0, 1], 1 = off", NULL, 0},
        {"seed", OPT_U64, &sp.seed, R_ANY, "S", "sampling seed", NULL, 0},
        THREADS_OPT(threads),
        {"echo", OPT_FLAG, &echo, R_ANY, NULL, "print the prompt before the generated text", NULL, 0},
        {"ignore-eos", OPT_FLAG, &sp.ignore_eos, R_ANY, NULL, "never sample an end-of-generation token", NULL, 0},
        {"stats", OPT_FLAG, &stats, R_ANY, NULL,
         "print prompt and generation tokens/s, the kernel path (and the expert cache's hit rate) on stderr", NULL, 0},
        {"ctx", OPT_INT, &n_ctx, R_POS, "N", "positions the KV cache holds",
         "the model's context, at most 4096 for published models", 0},
        OFFLOAD_OPTS(lo),
        CLI_ROUTING_OPTS(rt),
        EXPERT_PARALLEL_OPT(lo.expert_parallel),
    };
    cli_cmd cmd = {"generate", "--model FILE [options]",
                   "Samples text from a model and streams it to stdout as it is generated.\n"
                   "Ctrl-C (or SIGTERM) stops after the current token, keeping the text so far;\n"
                   "exit status 130 (143). With the distributed build, 'mpirun -np N build-mpi/moe\n"
                   "generate --expert-parallel N ...' splits the experts over N ranks (the same tokens\n"
                   "as one process; docs/distributed.md).",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = generate_run(&cmd, model, prompt, &sp, threads, echo, n_ctx, stats, lo, &rt);
    cli_free(&cmd);
    return rc;
}

/* ---- eval ---- */

/* ---- progress of moe eval: a live line on a terminal, a line per 10% otherwise ---- */
typedef struct { int tty, open, last_decile; double t0, last; FILE *blocks; } eval_line;

/* --block-losses: each block's loss sum and target count, one line each */
static void on_eval_block(double loss_sum, size_t targets, void *user) {
    eval_line *e = user;
    if (e->blocks && dist_world()->rank == 0) fprintf(e->blocks, "%.17g %zu\n", loss_sum, targets);
}

static void on_eval_progress(size_t done, size_t total, void *user) {
    eval_line *e = user;
    if (dist_world()->rank) return; /* rank 0 speaks for the job */
    double t = cli_clock(), el = t - e->t0;
    int decile = total ? (int)(10 * done / total) : 10;
    if (e->tty ? t - e->last < 0.2 && done < total : decile == e->last_decile) return;
    e->last = t;
    e->last_decile = decile;
    char eta[32];
    fmt_duration(eta, sizeof eta, done ? el * (double)(total - done) / (double)done : 0);
    char line[160];
    snprintf(line, sizeof line, "eval %zu/%zu tokens (%d%%) | %.0f tok/s | eta %s", done, total,
             total ? (int)(100 * done / total) : 100, el > 0 ? (double)done / el : 0.0, eta);
    status_line(e->tty, line, &e->open);
}

#define MOE_CLI_MIN(a, b) ((a) < (b) ? (a) : (b))
/* "LAYER:EXPERT" as two non-negative numbers; 0 if well formed. */
static int parse_expert_spec(const char *s, int *layer, int *expert) {
    const char *colon = strchr(s, ':');
    char buf[32];
    if (!colon || (size_t)(colon - s) >= sizeof buf) return -1;
    memcpy(buf, s, (size_t)(colon - s));
    buf[colon - s] = 0;
    return parse_int(buf, layer) || parse_int(colon + 1, expert) || *layer < 0 || *expert < 0 ? -1 : 0;
}

static int eval_run(cli_cmd *cmd, const char *model, const str_list *data, int seq, int threads, int stats,
                    const moe_load_options *lo, const str_list *disable, int domains,
                    int validation, const cli_routing *rt, const char *blocks_path) {
    if (!model) return cli_usage_error(cmd->name, "--model FILE is required");
    int rc_ep = cli_check_inference_ep(cmd, lo->expert_parallel);
    if (rc_ep) return rc_ep;
    if (data->n == 0) return cli_usage_error(cmd->name, "--data PATH is required");
    for (int i = 0; i < disable->n; i++) {
        int l, e;
        if (parse_expert_spec(disable->v[i], &l, &e))
            return cli_usage_error(cmd->name, "--disable-expert '%s' is not LAYER:EXPERT (two numbers, e.g. 1:3)", disable->v[i]);
    }
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    if (check_data_paths(data)) return EXIT_FAIL;
    moe_model *m = NULL;
    if (load_model_with(model, lo, &m)) return EXIT_FAIL;
    const moe_config *cfg = moe_model_config(m);
    int rc = EXIT_FAIL;
    moe_dataset *d = NULL;
    double *dom_loss = NULL;
    size_t *dom_tokens = NULL;
    const int ctx = moe_model_context(m); /* a published model: at most 4096 by default */
    if (seq == 0) seq = MOE_CLI_MIN(ctx, cfg->max_seq);
    if (seq > ctx) {
        rc = fail("--seq %d is longer than the model's context (%d)", seq, ctx);
        goto done;
    }
    if (!moe_model_tokenizer(m)) {
        rc = fail("%s has no tokenizer (tokenizer.ggml.* metadata): there is no way to read text", model);
        goto done;
    }
    for (int i = 0; i < disable->n; i++) {
        int l, e;
        parse_expert_spec(disable->v[i], &l, &e);
        if (moe_model_disable_expert(m, l, e) != MOE_OK) {
            rc = fail("--disable-expert %s: %s", disable->v[i], moe_last_error());
            goto done;
        }
    }
    if ((rc = cli_apply_routing(cmd, rt, m))) goto done;
    rc = EXIT_FAIL;
    if (moe_dataset_load_text(&d, moe_model_tokenizer(m), data->v, data->n) != MOE_OK) {
        rc = lib_fail(NULL);
        goto done;
    }
    double loss = 0;
    size_t tokens = 0;
    const int nd = moe_dataset_n_domains(d);
    domains = domains || disable->n > 0;
    if (domains && (!(dom_loss = calloc((size_t)nd, sizeof(double))) || !(dom_tokens = calloc((size_t)nd, sizeof(size_t))))) {
        rc = fail("out of memory");
        goto done;
    }
    eval_line el = {.tty = isatty(fileno(stderr)), .t0 = cli_clock()};
    if (blocks_path && dist_world()->rank == 0 && !(el.blocks = fopen(blocks_path, "w"))) {
        rc = fail("--block-losses %s: cannot open it for writing: %s", blocks_path, strerror(errno));
        goto done;
    }
    /* Ctrl-C or SIGTERM: stop after the current batch and report what was measured */
    cli_catch_stop_signals(NULL, NULL);
    moe_eval_result res;
    moe_status st = moe_evaluate_full(m, d, seq, !validation, &res, domains ? dom_loss : NULL, domains ? dom_tokens : NULL,
                                      on_eval_progress, on_eval_block, &el);
    loss = res.loss;
    tokens = res.tokens;
    cli_release_stop_signals();
    if (el.blocks) {
        const int bad = ferror(el.blocks) | fclose(el.blocks);
        el.blocks = NULL;
        if (bad && !st) { rc = fail("--block-losses %s: write failed", blocks_path); goto done; }
    }
    if (el.open) fputc('\n', stderr);
    const int sig = cli_stop_signal();
    if (st == MOE_ERR_INTERRUPTED && (sig || dist_world()->ep > 1)) { /* expert parallelism: maybe a peer's signal */
        if (tokens) printf("loss %.3f  perplexity %.1f  tokens %zu  (partial: interrupted)\n", loss, exp(loss), tokens);
        if (dist_world()->rank == 0)
            fprintf(stderr, "moe eval: interrupted (%s) after %zu tokens; %s\n", stop_cause(sig), tokens,
                    tokens ? "the result above covers only those" : "nothing was measured");
        rc = CLI_SIGNAL_STATUS(sig ? sig : SIGTERM);
        goto done;
    }
    if (st != MOE_OK) { rc = lib_fail(NULL); goto done; }
    if (tokens == 0) { rc = fail("the data is too short to evaluate (need more than %d tokens)", seq); goto done; }
    printf("loss %.3f  perplexity %.1f  tokens %zu", loss, exp(loss), tokens);
    if (cli_given(cmd, "active-experts") || cli_given(cmd, "expert-threshold"))
        printf("  experts/token %.2f", moe_model_experts_per_token(m, 0));
    printf("\n");
    if (res.blocks >= 2) /* the sampling error of the loss (moe.h: moe_eval_result) */
        printf("standard error %.4f over %zu blocks of %zu positions (%.4f over blocks of %zu)\n", res.se_block,
               res.blocks, res.block_tokens, res.se_wide, res.wide_tokens);
    if (stats) print_rank_stats("eval", m);
    if (stats && dist_world()->rank == 0) {
        const double dt = cli_clock() - el.t0;
        fprintf(stderr, "moe eval: %zu tokens in %.2f s, %.1f tokens/s; loss %.17g (every digit, to compare runs)\n", tokens, dt,
                dt > 0 ? (double)tokens / dt : 0.0, loss);
        print_offload_stats("eval", m);
    }
    if (disable->n) {
        printf("disabled experts (layer:expert):");
        for (int i = 0; i < disable->n; i++) printf(" %s", disable->v[i]);
        putchar('\n');
    }
    for (int i = 0; domains && i < nd; i++)
        printf("domain %-16s loss %.4f  perplexity %.2f  tokens %zu\n", moe_dataset_domain_name(d, i), dom_loss[i],
               exp(dom_loss[i]), dom_tokens[i]);
    rc = 0;
done:
    free(dom_loss);
    free(dom_tokens);
    moe_dataset_free(d);
    moe_model_free(m);
    return rc;
}

int cmd_eval(int argc, char **argv) {
    const char *model = NULL;
    moe_load_options lo = {.expert_parallel = 1};
    str_list data = {0}, disable = {0};
    int seq = 0, threads = 0, stats = 0, domains = 0, validation = 0;
    const char *blocks_path = NULL;
    cli_routing rt = {0};
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "model GGUF to evaluate", "required", 0},
        {"data", OPT_LIST, &data, R_ANY, "PATH", "text file or directory; repeatable", "required", 0},
        {"seq", OPT_INT, &seq, R_GT1, "T", "tokens per sequence", "the model's max_seq", 0},
        THREADS_OPT(threads),
        {"stats", OPT_FLAG, &stats, R_ANY, NULL, "print tokens/s (and the expert cache's hit rate) on stderr", NULL, 0},
        OFFLOAD_OPTS(lo),
        {"domains", OPT_FLAG, &domains, R_ANY, NULL, "also the loss of each domain (data file)", NULL, 0},
        {"disable-expert", OPT_LIST, &disable, R_ANY, "L:E",
         "switch expert E of layer L off (its weight goes to no one); repeatable; implies --domains", NULL, 0},
        {"validation", OPT_FLAG, &validation, R_ANY, NULL,
         "only the validation split moe train holds out of the same data", NULL, 0},
        {"block-losses", OPT_STR, &blocks_path, R_ANY, "FILE",
         "write each block's loss sum and target count (8 windows of --seq positions), one line each: "
         "the same blocks for any model with the same tokenizer, to pair two models' losses", NULL, 0},
        CLI_ROUTING_OPTS(rt),
        EXPERT_PARALLEL_OPT(lo.expert_parallel),
    };
    cli_cmd cmd = {"eval", "--model FILE --data PATH [options]",
                   "Computes a model's mean per-token loss and perplexity on all of the given text.\n"
                   "Ctrl-C (or SIGTERM) stops after the current batch, prints the result so far\n"
                   "marked partial, and exits with status 130 (143). Under mpirun, --expert-parallel N\n"
                   "splits the experts over the N ranks (the same loss as one process).",
                   opts, CLI_NOPTS(opts), NULL, NULL};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = eval_run(&cmd, model, &data, seq, threads, stats, &lo, &disable, domains, validation, &rt, blocks_path);
    cli_free(&cmd);
    return rc;
}
