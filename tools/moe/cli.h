/* cli.h: private to the moe command. One small table-driven option parser
 * shared by every subcommand, plus helpers for messages, files and numbers.
 *
 * Exit codes: 0 success, 1 failure while doing the work (library errors,
 * missing files, refused overwrites), 2 bad command line. */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include <stdint.h>
#include <stdio.h>
#include "moe.h"

#define MOE_CLI_VERSION "0.1.0"

enum { EXIT_FAIL = 1, EXIT_USAGE = 2 }; /* a signal: CLI_SIGNAL_STATUS (128 + its number) */


/* ---- option parser -------------------------------------------------------- */
typedef enum {
    OPT_FLAG,   /* int*: set to 1, takes no value                          */
    OPT_INT,    /* int*                                                    */
    OPT_U64,    /* uint64_t*                                               */
    OPT_FLOAT,  /* float*                                                  */
    OPT_STR,    /* const char**: non-empty string (paths, names)           */
    OPT_TEXT,   /* const char**: any string, may be empty (prompts)        */
    OPT_LIST,   /* str_list*: repeatable non-empty string                  */
} opt_kind;

typedef enum { R_ANY, R_POS, R_NONNEG, R_GT1, R_UNIT } opt_range; /* >0 >=0 >1 (0,1] */

typedef struct { const char **v; int n; } str_list;

typedef struct {
    const char *name;    /* without the dashes: "steps" for --steps        */
    opt_kind kind;
    void *dst;
    opt_range range;     /* numbers only                                    */
    const char *metavar; /* "N", "FILE"; NULL for flags                     */
    const char *help;    /* one line                                        */
    const char *def;     /* default as shown in help; NULL = value of *dst  */
    int given;           /* set by cli_parse: how many times it appeared    */
} cli_opt;

typedef struct {
    const char *name;     /* "train", "tokenizer encode": used in messages  */
    const char *args;     /* synopsis after "moe NAME", e.g. "[options]"    */
    const char *summary;  /* a paragraph under the usage line               */
    cli_opt *opts;
    int n_opts;
    str_list *positional; /* NULL: positional arguments are rejected        */
    void (*footer)(FILE *f); /* extra help text, or NULL                    */
} cli_cmd;

#define CLI_NOPTS(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* Parses argv[0..argc) (the arguments after the command name).
 * Returns -1 to go on, or an exit code: 0 after printing --help, EXIT_USAGE
 * after printing an error. Lists and positionals are allocated; cli_free. */
int cli_parse(cli_cmd *cmd, int argc, char **argv);
void cli_free(cli_cmd *cmd);
void cli_help(const cli_cmd *cmd, FILE *f);
cli_opt *cli_opt_find(cli_cmd *cmd, const char *name);
int cli_given(cli_cmd *cmd, const char *name);
/* "moe NAME: <msg> (see 'moe NAME --help')" on stderr; returns EXIT_USAGE. */
int cli_usage_error(const char *cmd_name, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* --set KEY=VALUE lists: cli_check_sets only checks the spelling (a usage
 * error, EXIT_USAGE); cli_apply_sets checks, then sets each field of cfg
 * (EXIT_FAIL naming the bad one). Both print their error; 0 if fine. */
int cli_check_sets(const char *cmd_name, const str_list *sets);
int cli_apply_sets(const char *cmd_name, const str_list *sets, moe_config *cfg);
/* This CPU's training precision, set into a preset's cfg before --set applies:
 * bf16 matmul inputs (fp32 weights, sums and optimizer state) where they are
 * faster (moe_bf16_matmul_pays: AMX tiles, measured 1.7x the fp32 step on
 * Sapphire Rapids; VDPBF16PS at full rate, 1.2-1.5x on Zen 4 and Zen 5), with
 * the validation loss after 600 steps within 1% of fp32's (docs/performance.md);
 * fp32 elsewhere, and with MOE_REFERENCE=1. Returns 1 when it chose bf16. */
int cli_default_matmul(moe_config *cfg);
/* The unit that makes bf16 the default here, for messages. */
const char *cli_bf16_unit(void);
/* Strict number parsing: 0 on success. */
int parse_int(const char *s, int *out);
int parse_u64(const char *s, uint64_t *out);
int parse_float(const char *s, float *out);

/* ---- messages --------------------------------------------------------------- */
/* "moe: error: <msg>" on stderr; returns EXIT_FAIL. */
int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "moe: error: [context: ]moe_last_error()"; returns EXIT_FAIL. */
int lib_fail(const char *context);
/* lib_fail naming path, unless the library's message already does. */
int lib_fail_file(const char *path);

/* ---- files -------------------------------------------------------------------- */
int path_exists(const char *path);
int is_dir(const char *path);
int same_file(const char *a, const char *b);
/* Each data path must exist and hold some text. Prints the error; 0 if fine. */
int check_data_paths(const str_list *paths);
/* out may be written: not a directory, its directory is writable, and it does
 * not exist unless it is `allowed` (may be NULL) or force. Prints; 0 if fine. */
int check_out_path(const char *out, const char *allowed, int force);
/* The built-in corpus (data/corpus-small here or next to the binary), or NULL. */
const char *default_corpus(void);
/* Loads a model GGUF (open_model: with or without a tokenizer; load_model:
 * it must have one). Print the error; 0 if fine. */
int open_model(const char *path, moe_model **m);
int load_model(const char *path, moe_model **m);
/* the same, settling offloading and the context before the load's memory check */
int open_model_with(const char *path, const moe_load_options *opts, moe_model **m);
int load_model_with(const char *path, const moe_load_options *opts, moe_model **m);
/* --mem-budget, --offload-policy, --offload-prefetch and --offload-warm, alike in generate,
 * eval and bench, into a moe_load_options */
#define OFFLOAD_OPTS(lo)                                                                                     \
    {"mem-budget", OPT_STR, &(lo).mem_budget, R_ANY, "SIZE",                                                 \
     "keep routed experts on disk, cached in SIZE bytes (512M, 2G) or a share of their bytes (50%)", "0 = all in memory", 0}, \
    {"offload-policy", OPT_STR, &(lo).offload_policy, R_ANY, "NAME", "expert cache eviction: lru, lfu or lrfu", "lfu", 0}, \
    {"offload-prefetch", OPT_STR, &(lo).offload_prefetch, R_ANY, "on|off",                                  \
     "read the next layer's predicted experts ahead, in a thread", "off", 0},                          \
    {"offload-warm", OPT_STR, &(lo).offload_warm, R_ANY, "FILE",                                            \
     "fill the cache first with the experts a routing trace (moe route --json > FILE) uses most", "none", 0}
/* after a run with a budget: the expert cache's hit rate, bytes read per
 * token and what it holds, one line on stderr (nothing without a budget) */
void print_offload_stats(const char *cmd, const moe_model *m);

/* --expert-parallel N of generate and eval: refuses, before any loading, a
 * launch that cannot work (N must be the job's rank count; the library then
 * checks that N divides the experts); 0 or an exit status. */
int cli_check_inference_ep(cli_cmd *cmd, int ep);
/* after a run with --expert-parallel: this rank's experts, the bytes it read
 * of them and what it exchanged, one line on stderr (every rank prints its own) */
void print_rank_stats(const char *cmd, const moe_model *m);
/* --threads N of the inference commands (0 = all cores) */
#define THREADS_OPT(t) \
    {"threads", OPT_INT, &(t), R_NONNEG, "N", "worker threads, 0 = all cores", "all cores", 0}
#define EXPERT_PARALLEL_OPT(ep)                                                                       \
    {"expert-parallel", OPT_INT, &(ep), R_POS, "N",                                                   \
     "under mpirun -np N: split the experts over the N ranks, each holding and reading only its own", \
     "1: every expert here", 0}

/* ---- run-time routing: --active-experts, --expert-threshold, --min-experts
 * for generate, eval and bench: CLI_ROUTING_OPTS(r) in the option table,
 * cli_apply_routing after loading the model. ---- */
typedef struct { int active, min; float threshold; } cli_routing;
#define CLI_ROUTING_OPTS(r)                                                                          \
    {"active-experts", OPT_INT, &(r).active, R_POS, "N",                                             \
     "experts per token instead of the model's top-k (1..n_experts)", "the model's top-k", 0},       \
    {"expert-threshold", OPT_FLOAT, &(r).threshold, R_UNIT, "F",                                     \
     "keep a chosen expert only if its weight is >= F times the best one's", "off", 0},              \
    {"min-experts", OPT_INT, &(r).min, R_POS, "M", "with --expert-threshold: keep at least M", "1", 0}
/* Sets the routing of m from the options (none given: nothing). Prints the
 * error; 0 if fine. */
int cli_apply_routing(cli_cmd *cmd, const cli_routing *r, moe_model *m);

/* ---- formatting ---------------------------------------------------------------- */
void fmt_human(char *buf, size_t cap, int64_t n);  /* 46.7B */
void fmt_commas(char *buf, size_t cap, int64_t n); /* 46,702,792,704 */
void fmt_duration(char *buf, size_t cap, double s); /* 1m32s */
double cli_clock(void); /* monotonic seconds, for rates and progress */
/* One progress line on stderr: rewritten in place on a terminal (*open is then
 * set until a newline ends it), one line each otherwise. */
void status_line(int tty, const char *line, int *open);
void print_presets(FILE *f, const char *indent);
void print_config_keys(FILE *f);

/* ---- stop signals (main.c) ------------------------------------------------------ */
/* From cli_catch_stop_signals until cli_release_stop_signals, the first SIGINT
 * or SIGTERM is recorded (cli_stop_signal) and asks the library to stop at its
 * next safe point (moe_request_stop), writing `note` (may be NULL) on stderr; a
 * second one writes `second` (may be NULL) and ends the process at once with
 * exit status 128 + its number. Both texts must outlive the catching. */
void cli_catch_stop_signals(const char *note, const char *second);
void cli_release_stop_signals(void);
int cli_stop_signal(void); /* 0, or the first signal caught */
#define CLI_SIGNAL_STATUS(sig) (128 + (sig)) /* as shells report a signal: 130 SIGINT, 143 SIGTERM */

/* ---- commands ------------------------------------------------------------------ */
int cmd_train(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_tokenizer(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_route(int argc, char **argv);
int cmd_report(int argc, char **argv);
/* route.c, shared with report.c: the tokens of a prompt or of data files
 * (free()); the MoE layer index of model layer l (-1 after a message) */
int route_tokens(const moe_tokenizer *tok, const char *prompt, const str_list *data, int32_t **out, size_t *n);
int moe_layer_index(const moe_config *c, int l);

#endif
