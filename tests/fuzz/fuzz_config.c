/* Fuzz target: configuration text (moe_config_preset, moe_config_set,
 * moe_config_validate, and everything that takes a validated config:
 * describe, parameter counts, and creating the model when it is small).
 * Input: the first line names a preset, every further line is KEY=VALUE. */
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "model/model.h"

static volatile int64_t sink;

static void fuzz_one(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return;
    memcpy(text, data, size);
    text[size] = 0;
    char *save = NULL, *line = strtok_r(text, "\n", &save);
    moe_config c;
    if (!line || moe_config_preset(&c, line) != MOE_OK) moe_config_preset(&c, "tiny");
    while ((line = strtok_r(NULL, "\n", &save))) {
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        moe_config_set(&c, line, eq + 1);
    }
    if (moe_config_validate(&c) == MOE_OK) {
        char buf[4096];
        moe_config_describe(&c, buf, sizeof buf);
        moe_config_describe(&c, buf, 7); /* truncated */
        moe_param_counts pc = moe_config_param_counts(&c);
        if (pc.total <= 0 || pc.active <= 0 || pc.active > pc.total || pc.experts > pc.total) abort();
        sink += pc.total;
        for (int l = 0; l < c.n_layers; l++) sink += moe_config_layer_is_moe(&c, l);
        if (pc.total < 50000 && c.n_layers <= 16) {
            moe_model *m = NULL;
            if (moe_model_create(&m, &c, 1) == MOE_OK) {
                if ((int64_t)m->n_params != pc.total) {
                    fprintf(stderr, "param count %zu != %lld\n", m->n_params, (long long)pc.total);
                    abort();
                }
                moe_model_free(m);
            }
        }
    }
    free(text);
}

static int fuzz_write_seeds(const char *dir) {
    static const char *seeds[][2] = {
        {"tiny", "tiny\n"},
        {"default", "default\n"},
        {"dense", "dense\nvocab_size=300\nd_model=16\nd_ff=8\nn_heads=2\nn_kv_heads=1\nn_layers=1\n"},
        {"small_moe", "tiny\nvocab_size=257\nd_model=8\nn_heads=2\nn_kv_heads=1\nn_experts=3\n"
                      "top_k=2\nd_expert=4\nd_ff=4\nmoe_every=2\nmoe_first_dense=1\nn_layers=3\n"
                      "tied_embeddings=1\nrenorm_topk=0\nmax_seq=8\n"},
        {"floats", "tiny\nrope_base=1e6\nnorm_eps=1e-6\naux_loss_coef=0.5\nz_loss_coef=0\ninit_std=0.1\n"},
        {"bad_values", "tiny\nn_heads=3\ntop_k=9\nnorm_eps=nan\ninit_std=inf\nd_model=-1\nvocab_size=99999999999\n"},
        {"huge", "mixtral-8x7b\nn_layers=1024\nd_model=65536\nn_experts=65536\nd_expert=1000000000\n"},
        {"unknown", "nosuch\nnosuch_key=1\nd_model=\n=5\n"},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++)
        bad |= fuzz_put(dir, seeds[i][0], seeds[i][1], strlen(seeds[i][1]));
    return bad;
}
