/* convert.c: moe convert --to gguf IN OUT: a model moe trained, written in
 * the published GGUF layout other engines (llama.cpp) run; --quant TYPE
 * writes it with quantised matrices. */
#include "cli.h"

#include <string.h>

static int convert_run(cli_cmd *cmd, const char *to, const char *quant, const str_list *paths, int force) {
    if (!cli_given(cmd, "to") && !cli_given(cmd, "quant"))
        return cli_usage_error(cmd->name, "--to FORMAT is required (gguf), or --quant TYPE");
    if (cli_given(cmd, "to") && strcmp(to, "gguf") != 0)
        return cli_usage_error(cmd->name, "unknown format '%s' for --to (known: gguf)", to);
    uint64_t bytes = 0;
    if (moe_model_quant_bytes(NULL, quant, &bytes) != MOE_OK) /* the name only */
        return cli_usage_error(cmd->name, "%s", moe_last_error());
    if (paths->n != 2)
        return cli_usage_error(cmd->name, "expects two files, IN and OUT, got %d", paths->n);
    const char *in = paths->v[0], *out = paths->v[1];
    if (same_file(in, out)) return fail("IN and OUT are the same file (%s): write the converted model elsewhere", out);
    if (check_out_path(out, NULL, force)) return EXIT_FAIL;
    moe_model *m = NULL;
    if (load_model(in, &m)) return EXIT_FAIL;
    int rc = 0;
    if (moe_model_convert_quant(m, out, quant) != MOE_OK) {
        char ctx[512];
        snprintf(ctx, sizeof ctx, "cannot convert %s", in);
        rc = lib_fail(ctx);
    } else {
        const moe_config *c = moe_model_config(m);
        const char *layout = c->attn == MOE_ATTN_MLA ? "deepseek2" : "llama";
        moe_model_quant_bytes(m, quant, &bytes);
        if (c->n_experts > 0)
            printf("wrote %s: %s layout, %d layers, %d experts top-%d, %s weights (%.2f MiB)\n", out, layout,
                   c->n_layers, c->n_experts, c->top_k, quant, bytes / 1048576.0);
        else
            printf("wrote %s: %s layout, %d dense layers, %s weights (%.2f MiB)\n", out, layout, c->n_layers, quant,
                   bytes / 1048576.0);
        if (c->matmul == MOE_MATMUL_BF16)
            fprintf(stderr, "moe convert: note: %s rounds matmul inputs to bfloat16; the converted file runs "
                    "them in fp32, as llama.cpp runs f32 weights\n", in);
    }
    moe_model_free(m);
    return rc;
}

static void convert_footer(FILE *f) {
    fprintf(f,
            "The llama layout (as Mixtral) expresses: softmax routing over all experts,\n"
            "top-k renormalised over the k, experts in every layer (or a dense model),\n"
            "RoPE on adjacent pairs, tied or untied output. Models with sigmoid routing,\n"
            "shared experts, a selection bias, expert groups, a routed scale, no top-k\n"
            "renormalisation, mixed dense and MoE layers, expert-choice or sequence\n"
            "routing, or a capacity at evaluation are refused with the reason.\n"
            "Models with MLA attention (attn=mla, the deepseek presets) are written in\n"
            "the deepseek2 layout: softmax or sigmoid scores, selection bias, expert\n"
            "groups, routed scale, renormalisation on or off, leading dense layers and\n"
            "shared experts as wide as the routed ones.\n"
            "--quant q8_0|q4_0|q4_k quantises the matrices (attention, experts, dense FFN,\n"
            "output, token embedding) with the reference quantisers; a matrix whose rows\n"
            "are not whole blocks of the type falls back to q8_0, then f32. Norms,\n"
            "routers and biases stay f32. 'moe info --model IN' lists each form's size.\n");
}

int cmd_convert(int argc, char **argv) {
    const char *to = NULL, *quant = "f32";
    int force = 0;
    str_list paths = {0};
    cli_opt opts[] = {
        {"to", OPT_STR, &to, R_ANY, "FORMAT", "the layout to write: gguf (llama.cpp's)", "required", 0},
        {"quant", OPT_STR, &quant, R_ANY, "TYPE", "weight type: f32, q8_0, q4_0 or q4_k (implies --to gguf)", NULL, 0},
        {"force", OPT_FLAG, &force, R_ANY, NULL, "overwrite OUT if it exists", NULL, 0},
    };
    cli_cmd cmd = {"convert", "--to gguf IN OUT | --quant TYPE IN OUT",
                   "Writes the model IN (a moe model file) to OUT in a published GGUF layout that\n"
                   "llama.cpp runs with the same greedy tokens: the llama architecture, f32\n"
                   "weights (or quantised ones, --quant), the tokenizer, no moe.* keys. moe runs\n"
                   "OUT too.",
                   opts, CLI_NOPTS(opts), &paths, convert_footer};
    int rc = cli_parse(&cmd, argc, argv);
    if (rc < 0) rc = convert_run(&cmd, to, quant, &paths, force);
    cli_free(&cmd);
    return rc;
}
