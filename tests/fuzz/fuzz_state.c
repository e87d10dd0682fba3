/* Fuzz target: the training-state reader (train_state_check, the code that
 * moe_train runs on --resume). Input: one flag byte, then the file. When the
 * flag's low bit is set the harness rewrites the trailing FNV-1a checksum to
 * match, so mutations get past the checksum to the checks behind it. The
 * reader runs for a 4-parameter model and for the parameter count the file's
 * header claims (when small). */
#define FUZZ_HAS_SEEDS
#include "fuzz.h"
#include "core/hash.h"
#include "train/train.h"

static void fuzz_one(const uint8_t *data, size_t size) {
    if (size < 1) return;
    int fix = data[0] & 1;
    data++; size--;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return;
    memcpy(buf, data, size);
    if (fix && size >= 8) {
        uint64_t sum = moe_fnv1a64(MOE_FNV1A64_BASIS, buf, size - 8);
        memcpy(buf + size - 8, &sum, 8);
    }
    const char *path = fuzz_file(buf, size);
    int step = -1;
    train_state_check(path, 4, &step);
    if (size >= sizeof(state_header)) {
        state_header h;
        memcpy(&h, buf, sizeof h);
        if (h.n_params <= 4096) train_state_check(path, (size_t)h.n_params, &step);
    }
    free(buf);
}

/* seeds: a valid file for 4 parameters and a few broken ones */
static size_t make_state(uint8_t *out, uint64_t n_params, int32_t step, int32_t steps) {
    state_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, "MOESTATE", 8);
    h.version = STATE_VERSION;
    h.step = step; h.steps = steps; h.batch = 2; h.seq = 8; h.grad_accum = 1; h.warmup = 1;
    h.lr = 1e-3f; h.min_lr_frac = 0.1f; h.weight_decay = 0.1f; h.beta1 = 0.9f; h.beta2 = 0.95f;
    h.adam_eps = 1e-8f; h.grad_clip = 1.0f; h.seed = 1;
    h.rng[0] = 1; h.rng[1] = 2; h.rng[2] = 3; h.rng[3] = 4; h.fingerprint = 42; h.n_params = n_params;
    size_t n = 0;
    out[n++] = 1; /* flag: fix the checksum */
    memcpy(out + n, &h, sizeof h); n += sizeof h;
    for (uint64_t i = 0; i < 2 * n_params; i++) { float x = 0.5f * (float)i; memcpy(out + n, &x, 4); n += 4; }
    uint64_t sum = moe_fnv1a64(MOE_FNV1A64_BASIS, out + 1, n - 1);
    memcpy(out + n, &sum, 8); n += 8;
    return n;
}

static int fuzz_write_seeds(const char *dir) {
    uint8_t b[1024];
    int bad = 0;
    size_t n = make_state(b, 4, 3, 10);
    bad |= fuzz_put(dir, "valid", b, n);
    b[0] = 0; bad |= fuzz_put(dir, "valid_nofix", b, n);
    b[0] = 1;
    bad |= fuzz_put(dir, "truncated", b, n / 2);
    bad |= fuzz_put(dir, "header_only", b, 1 + sizeof(state_header));
    b[n] = 7; bad |= fuzz_put(dir, "trailing_byte", b, n + 1);
    b[0] = 0; b[n - 1] ^= 0x55; bad |= fuzz_put(dir, "bad_checksum", b, n);
    n = make_state(b, 4, 11, 10); bad |= fuzz_put(dir, "step_past_end", b, n);
    n = make_state(b, 7, 0, 5); bad |= fuzz_put(dir, "other_size", b, n);
    n = make_state(b, 4, 0, 5); b[1 + 8] = STATE_VERSION + 1; bad |= fuzz_put(dir, "bad_version", b, n);
    n = make_state(b, 4, 0, 5); b[1] = 'X'; bad |= fuzz_put(dir, "bad_magic", b, n);
    bad |= fuzz_put(dir, "empty", b, 0);
    return bad ? 1 : 0;
}
