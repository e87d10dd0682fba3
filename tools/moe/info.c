/* info.c: moe info: a configuration (from a model file or a preset) and its
 * parameter counts. */
#include "cli.h"

#include <string.h>

static void print_count(const char *label, int64_t n, const char *note) {
    char h[32], c[48];
    fmt_human(h, sizeof h, n);
    fmt_commas(c, sizeof c, n);
    printf("  %-10s %s (%s)%s\n", label, h, c, note);
}

static void print_info(const moe_config *cfg) {
    char buf[8192];
    moe_config_describe(cfg, buf, sizeof buf);
    printf("config:\n");
    for (char *line = buf; *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (*line) printf("  %s\n", line);
        if (!nl) break;
        line = nl + 1;
    }
    int n_moe = moe_config_n_moe_layers(cfg);
    printf("layers: %d (%d MoE, %d dense)\n", cfg->n_layers, n_moe, cfg->n_layers - n_moe);
    moe_param_counts pc = moe_config_param_counts(cfg);
    printf("parameters:\n");
    print_count("total", pc.total, "");
    print_count("active", pc.active, " per token");
    print_count("embedding", pc.embedding, "");
    print_count("experts", pc.experts, " routed");
    if (pc.shared) print_count("shared", pc.shared, " shared experts (every token)");
    double ratio = pc.total > 0 ? (double)pc.active / (double)pc.total : 0.0;
    printf("  %-10s %.3f (%.1f%% of the parameters are used per token)\n", "active/total", ratio, 100 * ratio);
}

/* the weights' memory in each form moe convert --quant writes */
static void print_forms(const moe_model *m) {
    static const char *forms[] = {"f32", "q8_0", "q4_0", "q4_k"};
    printf("weights in each form (moe convert --quant):\n");
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        uint64_t b = 0;
        if (moe_model_quant_bytes(m, forms[i], &b) != MOE_OK) continue;
        printf("  %-10s %8.2f MiB\n", forms[i], b / 1048576.0);
    }
}

static int info_run(cli_cmd *cmd, const char *model, const char *preset, const str_list *sets, int n_ctx) {
    if (model && (cli_given(cmd, "preset") || sets->n))
        return cli_usage_error(cmd->name, "use either --model or --preset/--set, not both");
    if (model) {
        moe_model *m = NULL;
        if (load_model(model, &m)) return EXIT_FAIL;
        const moe_tokenizer *tok = moe_model_tokenizer(m);
        if (cli_given(cmd, "ctx") && moe_model_set_context(m, n_ctx) != MOE_OK) { moe_model_free(m); return lib_fail(NULL); }
        char desc[4096];
        moe_model_describe(m, desc, sizeof desc);
        printf("model: %s\n%s", model, desc);
        print_info(moe_model_config(m));
        print_forms(m);
        if (tok)
            printf("tokenizer: vocab %d (bos %d, eos %d)\n", moe_tokenizer_vocab_size(tok), moe_tokenizer_bos(tok),
                   moe_tokenizer_eos(tok));
        else
            printf("tokenizer: none in the file\n");
        moe_model_free(m);
        return 0;
    }
    moe_config cfg;
    if (moe_config_preset(&cfg, preset) != MOE_OK) {
        return lib_fail(NULL); /* names the known presets */
    }
    int cpu_bf16 = cli_default_matmul(&cfg);
    int rc = cli_apply_sets(cmd->name, sets, &cfg);
    if (rc) return rc;
    if (moe_config_validate(&cfg) != MOE_OK) return fail("invalid configuration: %s", moe_last_error());
    printf("preset: %s%s\n", preset, sets->n ? " (with --set overrides)" : "");
    print_info(&cfg);
    printf("matmul backend on this CPU: %s (fp32 matmuls: %s, bf16: %s)\n",
           moe_matmul_backend(cfg.matmul == MOE_MATMUL_BF16), moe_matmul_backend(0),
           moe_matmul_backend(1));
    if (cpu_bf16)
        printf("training precision default on this CPU: bf16 matmul inputs (%s), fp32 weights and "
               "sums%s\n", cli_bf16_unit(), cfg.matmul == MOE_MATMUL_BF16 ? "" : " (overridden by --set matmul=fp32)");
    return 0;
}

static void info_footer(FILE *f) {
    print_presets(f, "");
    print_config_keys(f);
}

int cmd_info(int argc, char **argv) {
    const char *model = NULL, *preset = "default";
    int n_ctx = 0;
    str_list sets = {0};
    cli_opt opts[] = {
        {"model", OPT_STR, &model, R_ANY, "FILE", "describe this model GGUF", NULL, 0},
        {"preset", OPT_STR, &preset, R_ANY, "NAME", "describe this preset (when no --model)", NULL, 0},
        {"set", OPT_LIST, &sets, R_ANY, "KEY=VALUE", "override one config field of the preset; repeatable",
         "none", 0},
        {"ctx", OPT_INT, &n_ctx, R_POS, "N", "context to give the memory needed for (with --model)",
         "the model's context, at most 4096 for published models", 0},
    };
    cli_cmd cmd = {"info", "--model FILE | --preset NAME [--set KEY=VALUE ...]",
                   "Prints a configuration and its parameter counts: total, active per token,\n"
                   "embedding and routed experts.",
                   opts, CLI_NOPTS(opts), NULL, info_footer};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = info_run(&cmd, model, preset, &sets, n_ctx);
    cli_free(&cmd);
    return rc;
}
