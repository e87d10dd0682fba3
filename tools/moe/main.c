/* moe: the command-line front end of libmoe.
 *   moe train | generate | eval | info | tokenizer (train|encode|decode) | convert | bench
 *       | route | report
 * Each command lives in its own file and describes its options in a table
 * read by the shared parser in opts.c. */
#include "cli.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "dist/dist.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"train", cmd_train, "train a model (or continue one with --resume)"},
    {"generate", cmd_generate, "sample text from a model"},
    {"eval", cmd_eval, "measure a model's loss and perplexity on text"},
    {"info", cmd_info, "show a configuration and its parameter counts"},
    {"tokenizer", cmd_tokenizer, "train a tokenizer, or encode/decode with one"},
    {"convert", cmd_convert, "write a model in the GGUF layout llama.cpp runs"},
    {"bench", cmd_bench, "measure prefill and decode speed against the memory roofline"},
    {"route", cmd_route, "show which experts each token is routed to"},
    {"report", cmd_report, "write an HTML report of a model's routing"},
};
#define N_COMMANDS ((int)(sizeof commands / sizeof commands[0]))

static void usage(FILE *f) {
    fprintf(f,
            "Usage: moe COMMAND [options]\n\n"
            "moe trains, samples and inspects Mixture-of-Experts transformer language models.\n\n"
            "Commands:\n");
    for (int i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-11s %s\n", commands[i].name, commands[i].help);
    fprintf(f,
            "  %-11s %s\n\n"
            "Options:\n"
            "  -h, --help  show this help and exit\n"
            "  --version   print the version and exit\n\n"
            "Run 'moe COMMAND --help' for the options of a command. A first run:\n"
            "  make corpus-small && moe train && moe generate --model model.gguf\n",
            "help", "show help for a command: moe help train");
}

static int find_command(const char *name) {
    for (int i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0) return i;
    return -1;
}

/* A command under mpirun: rank 0 speaks for the job (the other ranks'
 * stdout is dropped; their errors still reach stderr); a failure on one rank
 * aborts the job, since its peers may be waiting for it. */
static int run_distributed(int (*run)(int, char **), int argc, char **argv) {
    if (dist_init(&argc, &argv) != MOE_OK) {
        fprintf(stderr, "moe: error: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    if (dist_world()->rank != 0 && !freopen("/dev/null", "w", stdout)) return EXIT_FAIL;
    int rc = run(argc - 2, argv + 2);
    dist_finalize(rc == EXIT_FAIL);
    return rc;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN); /* a closed pipe becomes a write error, not a kill */
    signal(SIGXFSZ, SIG_IGN); /* past a file-size limit write() fails with EFBIG: a clear error */
    if (argc < 2) {
        fprintf(stderr, "moe: missing command: train, generate, eval, info, route, report, bench, tokenizer or convert (see 'moe --help')\n");
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("moe %s\n", MOE_CLI_VERSION);
        return 0;
    }
    if (strcmp(cmd, "help") == 0) {
        if (argc < 3) { usage(stdout); return 0; }
        int c = find_command(argv[2]);
        if (c < 0) {
            fprintf(stderr, "moe: unknown command '%s' (see 'moe --help')\n", argv[2]);
            return EXIT_USAGE;
        }
        /* "moe help tokenizer encode" -> "moe tokenizer encode --help" */
        char *args[3] = {argc > 3 ? argv[3] : "--help", "--help", NULL};
        return commands[c].run(argc > 3 ? 2 : 1, args);
    }
    if (cmd[0] == '-') {
        fprintf(stderr, "moe: unknown option '%s' (see 'moe --help')\n", cmd);
        return EXIT_USAGE;
    }
    int c = find_command(cmd);
    if (c < 0) {
        fprintf(stderr, "moe: unknown command '%s' (see 'moe --help')\n", cmd);
        return EXIT_USAGE;
    }
    if (dist_is_mpi() && (strcmp(cmd, "train") == 0 || strcmp(cmd, "generate") == 0 || strcmp(cmd, "eval") == 0))
        /* the distributed build (make MPI=1) */
        return run_distributed(commands[c].run, argc, argv);
    return commands[c].run(argc - 2, argv + 2);
}
