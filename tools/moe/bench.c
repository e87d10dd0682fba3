/* bench.c: moe bench: prefill and decode speed of a model file, in the table
 * llama-bench users know, with decode set against the memory-bandwidth
 * roofline measured in the same run; and the synthetic published-layout
 * models make bench measures (--write-synthetic). docs/performance.md. */
#include "cli.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- synthetic models --------------------------------------------------------
 * The MoE: llama with experts, 16 layers, d_model 1024, 16 heads / 4 KV
 * heads, 64 experts top-8 of hidden 512, vocab 32000 (1.72B parameters); and
 * two dense models of its layout: one as wide as all its experts (the same
 * total parameters), one as wide as the k it runs (the same active ones). */
static void bench_moe_config(moe_config *c) {
    moe_config_preset(c, "default");
    c->vocab_size = 32000; c->d_model = 1024; c->n_layers = 16; c->n_heads = 16; c->n_kv_heads = 4;
    c->n_experts = 64; c->top_k = 8; c->d_expert = 512; c->d_ff = 512;
    c->max_seq = 4096; c->rope_base = 10000.0f; c->norm_eps = 1e-5f; c->renorm_topk = 1;
}

static const char *const synthetic_kinds[] = {"moe", "dense-total", "dense-active"};

static int write_synthetic(cli_cmd *cmd, const char *kind, const char *type, const char *out,
                           const str_list *sets, uint64_t seed, int force) {
    int k = -1;
    for (int i = 0; i < 3; i++)
        if (!strcmp(kind, synthetic_kinds[i])) k = i;
    if (k < 0)
        return cli_usage_error(cmd->name, "unknown model '%s' for --write-synthetic (known: moe, dense-total, dense-active)", kind);
    if (!out) return cli_usage_error(cmd->name, "--write-synthetic needs --out FILE");
    if (cli_check_sets(cmd->name, sets)) return EXIT_USAGE;
    if (check_out_path(out, NULL, force)) return EXIT_FAIL;
    moe_config c;
    bench_moe_config(&c);
    if (cli_apply_sets(cmd->name, sets, &c)) return EXIT_FAIL; /* --set shapes the MoE ... */
    if (k > 0) { /* ... and the dense models follow it */
        c.d_ff = (k == 1 ? c.n_experts : c.top_k) * c.d_expert;
        c.n_experts = 0;
        c.top_k = 0;
    }
    if (moe_config_validate(&c) != MOE_OK) return lib_fail("the synthetic model's configuration");
    const moe_param_counts pc = moe_config_param_counts(&c);
    char total[32], active[32];
    fmt_human(total, sizeof total, pc.total);
    fmt_human(active, sizeof active, pc.active);
    fprintf(stderr, "moe bench: writing %s (%s, %s weights, %s parameters)...\n", out, kind, type, total);
    const double t0 = cli_clock();
    if (moe_write_synthetic(out, &c, type, seed) != MOE_OK) return lib_fail_file(out);
    if (c.n_experts > 0)
        printf("wrote %s: llama layout, %d layers, %d experts top-%d of hidden %d, %s weights, %s parameters (%s active), %.0f s\n",
               out, c.n_layers, c.n_experts, c.top_k, c.d_expert, type, total, active, cli_clock() - t0);
    else
        printf("wrote %s: llama layout, %d dense layers of hidden %d, %s weights, %s parameters (%s active), %.0f s\n",
               out, c.n_layers, c.d_ff, type, total, active, cli_clock() - t0);
    return 0;
}

/* ---- measurement ---------------------------------------------------------------- */
typedef struct {
    int n_stop;             /* tokens to see before stopping (n_gen + 1)      */
    int seen;
    double t0, t_first, t_last;
} bench_timer;

/* The first token comes after the prompt; each later one after one decode step. */
static int on_bench_token(int32_t id, const char *bytes, size_t len, void *user) {
    bench_timer *t = user;
    (void)id; (void)bytes; (void)len;
    t->t_last = cli_clock();
    if (t->seen++ == 0) t->t_first = t->t_last;
    return t->seen >= t->n_stop;
}

/* One run: a prompt of n_prompt random ids (at least 1), then n_gen decoded
 * tokens. *pp and *tg get tokens/s (0 when not measured). */
static int bench_once(moe_model *m, int n_prompt, int n_gen, uint64_t seed, double *pp, double *tg) {
    const int V = moe_model_config(m)->vocab_size, np = n_prompt > 0 ? n_prompt : 1;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)np);
    if (!ids) return fail("out of memory");
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1; /* random ids within the vocabulary, as llama-bench */
    for (int i = 0; i < np; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        ids[i] = (int32_t)(s % (uint64_t)V);
    }
    /* greedy and no end-of-generation token: every run decodes all n_gen */
    moe_sample_params sp = {.max_tokens = n_gen + 1, .temperature = 0, .top_k = 0, .top_p = 1, .seed = seed, .ignore_eos = 1};
    bench_timer t = {.n_stop = n_gen + 1};
    t.t0 = cli_clock();
    moe_status st = moe_generate(m, ids, (size_t)np, &sp, on_bench_token, &t);
    free(ids);
    if (st != MOE_OK) return lib_fail(NULL);
    if (t.seen < t.n_stop) return fail("the model stopped after %d of %d tokens", t.seen, t.n_stop);
    *pp = n_prompt > 0 && t.t_first > t.t0 ? n_prompt / (t.t_first - t.t0) : 0;
    *tg = n_gen > 0 && t.t_last > t.t_first ? n_gen / (t.t_last - t.t_first) : 0;
    return 0;
}

typedef struct { double mean, sd, median; } bench_stats;

static int cmp_dbl(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static bench_stats stats_of(const double *v, int n) {
    bench_stats s = {0, 0, 0};
    if (n <= 0) return s;
    double sorted[64];
    for (int i = 0; i < n; i++) { s.mean += v[i]; sorted[i] = v[i]; }
    s.mean /= n;
    for (int i = 0; i < n; i++) s.sd += (v[i] - s.mean) * (v[i] - s.mean);
    s.sd = n > 1 ? sqrt(s.sd / (n - 1)) : 0; /* sample deviation, as llama-bench */
    qsort(sorted, (size_t)n, sizeof(double), cmp_dbl);
    s.median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    return s;
}

/* "llama" and the matrices' type ("q8_0") from the model's description */
static void model_label(const moe_model *m, char *arch, size_t acap, char *type, size_t tcap) {
    static char desc[8192];
    moe_model_describe(m, desc, sizeof desc);
    snprintf(arch, acap, "?");
    snprintf(type, tcap, "f32");
    const char *a = strstr(desc, "architecture: ");
    if (a) snprintf(arch, acap, "%.*s", (int)strcspn(a + 14, " \n"), a + 14);
    const char *t = strstr(desc, "tensor types:");
    int best = -1;
    /* " q8_0 x113 (1.7 GiB)": the type most tensors have, beside f32 norms */
    for (const char *p = t ? strchr(t, ' ') : NULL; p && *p == ' ';) {
        const char *name = p + 1, *x = strstr(name, " x");
        const char *end = strchr(name, '\n');
        if (!x || (end && x > end)) break;
        const int count = atoi(x + 2);
        const int is_f32 = (size_t)(x - name) == 3 && !strncmp(name, "f32", 3);
        if (!is_f32 && count > best) { best = count; snprintf(type, tcap, "%.*s", (int)(x - name), name); }
        p = strchr(x, ')');
        if (p) p++;
    }
}

/* One markdown row as llama-bench prints them (rule: the line under the
 * header, ':' marking right-aligned columns); widths count UTF-8 characters. */
static void table_row(const char *const cell[8], int rule) {
    static const int width[8] = {24, 10, 8, 22, 7, 14, 20, 8}, right[8] = {0, 1, 1, 0, 1, 1, 1, 1};
    for (int i = 0; i < 8; i++) {
        int chars = 0;
        for (const char *p = cell[i]; *p; p++) chars += ((unsigned char)*p & 0xC0) != 0x80;
        const int pad = width[i] > chars ? width[i] - chars : 0;
        if (rule) {
            printf("| ");
            for (int j = 0; j < width[i] - right[i]; j++) putchar('-');
            printf("%s ", right[i] ? ":" : "");
        } else {
            printf("| %*s%s%*s ", right[i] ? pad : 0, "", cell[i], right[i] ? 0 : pad, "");
        }
    }
    printf("|\n");
}

static void json_samples(const double *v, int n) {
    printf("[");
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", v[i]);
    printf("]");
}

static int bench_run(cli_cmd *cmd, const char *path, int n_prompt, int n_gen, int reps, int threads,
                     int json, const moe_load_options *lo) {
    if (!path) return cli_usage_error(cmd->name, "--model FILE is required (or --write-synthetic KIND, --machine)");
    if (n_prompt == 0 && n_gen == 0) return cli_usage_error(cmd->name, "nothing to measure: -p and -n are both 0");
    if (reps > 64) return cli_usage_error(cmd->name, "-r must be at most 64, got %d", reps);
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    const int n_threads = omp_get_max_threads();
    moe_model *m = NULL;
    if (open_model_with(path, lo, &m)) return EXIT_FAIL;
    int rc = EXIT_FAIL;
    const moe_config *c = moe_model_config(m);
    /* the KV cache for just this run: the prompt, then n_gen decode steps */
    if ((int64_t)n_prompt + n_gen + 1 > c->max_seq) {
        rc = fail("-p %d and -n %d need %d positions; the model's context length is %d", n_prompt, n_gen,
                  n_prompt + n_gen + 1, c->max_seq);
        goto done;
    }
    if (moe_model_set_context(m, (n_prompt > 0 ? n_prompt : 1) + n_gen + 1) != MOE_OK) {
        rc = lib_fail(NULL);
        goto done;
    }
    char arch[32], type[32], units[512], total_s[32];
    model_label(m, arch, sizeof arch, type, sizeof type);
    moe_cpu_describe(units, sizeof units);
    /* the path this model's matrices take: f32 ones the matmul's, the others
     * the quantised kernels' (f16 and bf16 included) */
    const char *kernels = !strcmp(type, "f32") ? moe_matmul_backend(0) : moe_cpu_kernels();
    const moe_param_counts pc = moe_config_param_counts(c);
    const moe_weight_bytes wb = moe_model_weight_bytes(m);
    fmt_human(total_s, sizeof total_s, pc.total);
    char label[96];
    snprintf(label, sizeof label, "%s %s %s", arch, total_s, type);

    /* a warm-up run as llama-bench makes one: pages the mapped weights in,
     * allocates the KV cache and scratch */
    fprintf(stderr, "moe bench: %s, %d threads: warm-up...\n", path, n_threads);
    double pp[64], tg[64], dummy_pp, dummy_tg;
    if (bench_once(m, n_prompt, n_gen > 0 ? 1 : 0, 0, &dummy_pp, &dummy_tg)) goto done;
    for (int r = 0; r < reps; r++) {
        if (bench_once(m, n_prompt, n_gen, (uint64_t)r + 1, &pp[r], &tg[r])) goto done;
        fprintf(stderr, "moe bench: run %d/%d: pp %.2f tokens/s, tg %.2f tokens/s\n", r + 1, reps, pp[r], tg[r]);
    }
    fprintf(stderr, "moe bench: measuring memory bandwidth...\n");
    double gbs = 0;
    if (moe_measure_bandwidth(0, 0, &gbs) != MOE_OK) { rc = lib_fail("measuring the memory bandwidth"); goto done; }
    const bench_stats sp = stats_of(pp, reps), st = stats_of(tg, reps);
    /* decode's ceiling: every token streams its weights from memory once */
    const double roof = wb.per_token > 0 ? gbs * 1e9 / (double)wb.per_token : 0;
    const double frac = roof > 0 ? st.mean / roof : 0, frac_med = roof > 0 ? st.median / roof : 0;
    char pp_name[32], tg_name[48];
    snprintf(pp_name, sizeof pp_name, "pp%d", n_prompt);
    if (n_prompt > 0) snprintf(tg_name, sizeof tg_name, "tg%d @ d%d", n_gen, n_prompt);
    else snprintf(tg_name, sizeof tg_name, "tg%d", n_gen);
    if (json) {
        printf("{\"model\": \"%s\", \"arch\": \"%s\", \"type\": \"%s\", \"size_bytes\": %lld, \"params\": %lld, "
               "\"active_params\": %lld, \"backend\": \"CPU\", \"kernels\": \"%s\", \"cpu\": \"%s\", \"threads\": %d, "
               "\"bandwidth_gbs\": %.3f, \"bytes_per_token\": %lld, \"roofline_ts\": %.3f, \"tests\": [",
               label, arch, type, (long long)wb.total, (long long)pc.total, (long long)pc.active, kernels, units,
               n_threads, gbs, (long long)wb.per_token, roof);
        int first = 1;
        if (n_prompt > 0) {
            printf("{\"test\": \"%s\", \"n_prompt\": %d, \"n_gen\": 0, \"samples_ts\": ", pp_name, n_prompt);
            json_samples(pp, reps);
            printf(", \"avg_ts\": %.3f, \"stddev_ts\": %.3f, \"median_ts\": %.3f}", sp.mean, sp.sd, sp.median);
            first = 0;
        }
        if (n_gen > 0) {
            printf("%s{\"test\": \"tg%d\", \"n_prompt\": 0, \"n_gen\": %d, \"n_depth\": %d, \"samples_ts\": ",
                   first ? "" : ", ", n_gen, n_gen, n_prompt);
            json_samples(tg, reps);
            printf(", \"avg_ts\": %.3f, \"stddev_ts\": %.3f, \"median_ts\": %.3f, \"roofline_fraction\": %.4f, "
                   "\"roofline_fraction_median\": %.4f}", st.mean, st.sd, st.median, frac, frac_med);
        }
        printf("]}\n");
    } else {
        char size_s[32], roof_s[32], backend[64], ts[48], thr[16];
        if (wb.total >= (1 << 30)) snprintf(size_s, sizeof size_s, "%.2f GiB", (double)wb.total / (1 << 30));
        else snprintf(size_s, sizeof size_s, "%.2f MiB", (double)wb.total / (1 << 20));
        snprintf(backend, sizeof backend, "CPU %s%s", kernels, moe_model_repacked_bytes(m) ? "+repack" : "");
        snprintf(thr, sizeof thr, "%d", n_threads);
        const char *head[8] = {"model", "size", "params", "backend", "threads", "test", "t/s", "roofline"};
        table_row(head, 0);
        table_row(head, 1);
        if (n_prompt > 0) {
            snprintf(ts, sizeof ts, "%.2f ± %.2f", sp.mean, sp.sd);
            const char *row[8] = {label, size_s, total_s, backend, thr, pp_name, ts, "-"};
            table_row(row, 0);
        }
        if (n_gen > 0) {
            snprintf(ts, sizeof ts, "%.2f ± %.2f", st.mean, st.sd);
            snprintf(roof_s, sizeof roof_s, "%.1f%%", 100 * frac);
            const char *row[8] = {label, size_s, total_s, backend, thr, tg_name, ts, roof_s};
            table_row(row, 0);
        }
        printf("\nmemory bandwidth %.1f GB/s (streaming read, median of 7); decode reads %.1f MB of weights per "
               "token, so the roofline is %.1f tokens/s\n%s\n", gbs, wb.per_token / 1e6, roof, units);
    }
    print_offload_stats("bench", m);
    rc = fflush(stdout) == 0 ? 0 : fail("writing the output failed");
done:
    moe_model_free(m);
    return rc;
}

static int machine_run(cli_cmd *cmd, int threads, int json) {
    if (cli_given(cmd, "threads")) moe_set_threads(threads);
    char units[512];
    moe_cpu_describe(units, sizeof units);
    double gbs = 0;
    if (moe_measure_bandwidth(0, 0, &gbs) != MOE_OK) return lib_fail("measuring the memory bandwidth");
    if (json)
        printf("{\"cpu\": \"%s\", \"threads\": %d, \"bandwidth_gbs\": %.3f}\n", units, omp_get_max_threads(), gbs);
    else
        printf("%s\nthreads %d, memory bandwidth %.1f GB/s (streaming read, median of 7)\n", units,
               omp_get_max_threads(), gbs);
    return 0;
}

static void bench_footer(FILE *f) {
    fprintf(f,
            "-p, -n, -r and -t are short for --n-prompt, --n-gen, --repetitions and --threads,\n"
            "as llama-bench spells them. Each run feeds a prompt of random token ids, then\n"
            "decodes greedily; the prompt's tokens/s is pp, the decode's (after the prompt,\n"
            "llama-bench's \"@ d\") tg, mean ± sample deviation over the runs, after one\n"
            "warm-up run. roofline: tg over the tokens/s the measured streaming-read\n"
            "bandwidth allows when each token reads its weights once (every weight outside\n"
            "the routed experts, k of the E experts per MoE layer, the output matrix).\n\n"
            "--write-synthetic moe|dense-total|dense-active --out FILE [--type T] writes\n"
            "the benchmark's random-weight models in the llama layout: the MoE (16 layers,\n"
            "d_model 1024, 16/4 heads, 64 experts top-8 of hidden 512, vocab 32000, 1.72B\n"
            "parameters), a dense model of its total parameters (d_ff 64 x 512) and one of\n"
            "its active parameters (d_ff 8 x 512); --set KEY=VALUE changes the MoE's shape\n"
            "first. --machine prints the CPU's units, the kernel path and the bandwidth.\n");
}

int cmd_bench(int argc, char **argv) {
    moe_load_options lo = {0};
    const char *model = NULL, *synth = NULL, *type = "q8_0", *out = NULL;
    int n_prompt = 256, n_gen = 128, reps = 3, threads = 0, json = 0, force = 0, machine = 0;
    uint64_t seed = 1;
    str_list sets = {0};
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "model GGUF to measure", "required", 0},
        {"n-prompt", OPT_INT, &n_prompt, R_NONNEG, "N", "prompt tokens (-p), 0 = no prefill test", NULL, 0},
        {"n-gen", OPT_INT, &n_gen, R_NONNEG, "N", "tokens decoded after the prompt (-n), 0 = none", NULL, 0},
        {"repetitions", OPT_INT, &reps, R_POS, "N", "measured runs (-r), after one warm-up", NULL, 0},
        {"threads", OPT_INT, &threads, R_NONNEG, "N", "worker threads (-t), 0 = all cores", "all cores", 0},
        {"json", OPT_FLAG, &json, R_ANY, NULL, "print one JSON object instead of the table", NULL, 0},
        {"machine", OPT_FLAG, &machine, R_ANY, NULL, "only the CPU units, kernel path and bandwidth", NULL, 0},
        {"write-synthetic", OPT_STR, &synth, R_ANY, "KIND", "write a model: moe, dense-total or dense-active", "none", 0},
        {"type", OPT_STR, &type, R_ANY, "T", "--write-synthetic: matrix type (q8_0, q4_K, bf16, f32, ...)", NULL, 0},
        {"out", OPT_STR, &out, R_ANY, "FILE", "--write-synthetic: the file to write", "none", 0},
        {"set", OPT_LIST, &sets, R_ANY, "KEY=VALUE", "--write-synthetic: change the MoE's shape; repeatable", NULL, 0},
        {"seed", OPT_U64, &seed, R_ANY, "S", "--write-synthetic: weight seed", NULL, 0},
        {"force", OPT_FLAG, &force, R_ANY, NULL, "--write-synthetic: overwrite --out", NULL, 0},
        OFFLOAD_OPTS(lo),
    };
    cli_cmd cmd = {"bench", "--model FILE [-p 256] [-n 128] [-r 3] [-t N] [--json]",
                   "Measures prefill and decode speed of a model file and prints a table in\n"
                   "llama-bench's form, with decode as a fraction of the memory roofline.",
                   opts, CLI_NOPTS(opts), NULL, bench_footer};
    /* llama-bench's short spellings */
    static const char *const shorts[][2] = {{"-p", "--n-prompt"}, {"-n", "--n-gen"}, {"-r", "--repetitions"}, {"-t", "--threads"}};
    char **args = calloc((size_t)argc + 1, sizeof *args);
    if (!args) return fail("out of memory");
    for (int i = 0, ended = 0; i < argc; i++) { /* not after "--" */
        args[i] = argv[i];
        ended |= !strcmp(argv[i], "--");
        for (int s = 0; !ended && s < 4; s++)
            if (!strcmp(argv[i], shorts[s][0])) args[i] = (char *)shorts[s][1];
    }
    int rc = cli_parse(&cmd, argc, args);
    if (rc < 0) {
        if (synth) rc = model ? cli_usage_error(cmd.name, "--write-synthetic writes a model; give --model separately")
                              : write_synthetic(&cmd, synth, type, out, &sets, seed, force);
        else if (out || sets.n || cli_given(&cmd, "type"))
            rc = cli_usage_error(cmd.name, "--out, --type and --set go with --write-synthetic");
        else if (machine) rc = machine_run(&cmd, threads, json);
        else rc = bench_run(&cmd, model, n_prompt, n_gen, reps, threads, json, &lo);
    }
    cli_free(&cmd);
    free(args);
    return rc;
}
