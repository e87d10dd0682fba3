/* Published architectures: tiny random-weight GGUF files of every layout,
 * written with our own writer, loaded back as typed views and run.
 *  - the config read back equals the one written;
 *  - a prompt in one chunk, in chunks and one token at a time gives the same
 *    logits bit for bit;
 *  - logits and greedy continuations against the independent PyTorch
 *    implementation in tests/ref/arch_ref.py;
 *  - broken files of each layout give one-line errors naming the tensor. */
#include <stdint.h>

#include "arch/arch.h"
#include "core/dtype.h"
#include "harness.h"
#include "model/model.h"

#include "arch_layouts.h"

/* runs tokens[n] one at a time from position 0, logits[n][V] */
static moe_status run_single(moe_model *m, const int32_t *tok, int n, float *logits) {
    for (int i = 0; i < n; i++) {
        moe_status st = model_infer(m, tok + i, 1, i, logits + (size_t)i * m->cfg.vocab_size, 0);
        if (st) return st;
    }
    return MOE_OK;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

/* Writes the checker's dump: the prompt, our greedy continuation and our
 * logits after every token (tests/ref/arch_ref.py documents the format). */
static int write_dump(const char *path, const int32_t *tok, int n_prompt, int n_gen, int V,
                      const float *logits, uint32_t flags) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    uint32_t h[4] = {(uint32_t)n_prompt, (uint32_t)n_gen, (uint32_t)V, flags};
    fwrite("MOEARC01", 1, 8, f);
    fwrite(h, 4, 4, f);
    fwrite(tok, 4, (size_t)(n_prompt + n_gen), f);
    fwrite(logits, 4, (size_t)(n_prompt + n_gen) * V, f);
    return fclose(f);
}

static void check_layout(const layout *L0, int wtype, const char *tname) {
    char name[160], path[256], dump[256], arg[600];
    layout scaled = *L0, *L = &scaled;
    if (dtype_traits_of(wtype)->blck == 256) { /* K-quants: rows of whole 256-blocks where the shape allows */
        L->c.d_model = 256; L->c.d_ff = 256; L->c.d_expert = 256;
        if (L->c.d_shared) L->c.d_shared = 256;
        if (L->c.q_lora_rank) L->c.q_lora_rank = 256;
        if (L->c.kv_lora_rank) L->c.kv_lora_rank = 256;
    }
    snprintf(name, sizeof name, "%s %s: writes, reads back the same config", L->label, tname);
    TEST_CASE(name);
    th_tmp_path(path, sizeof path, "arch.gguf");
    moe_model *m = NULL;
    moe_status st = arch_write_random(path, L->arch, &L->c, wtype, NULL, 7);
    if (st == MOE_ERR_UNSUPPORTED) { TEST_SKIP("%s", moe_last_error()); return; }
    CHECK(st == MOE_OK, "write: %s", moe_last_error());
    CHECK(st == MOE_OK && moe_model_load(&m, path) == MOE_OK, "load: %s", moe_last_error());
    if (!m) { TEST_END(); return; }
    const moe_config *c = &m->cfg;
    CHECK(!strcmp(m->arch, L->arch), "arch %s", m->arch);
    CHECK(c->n_layers == L->c.n_layers && c->d_model == L->c.d_model && c->n_experts == L->c.n_experts &&
          c->top_k == L->c.top_k && c->d_expert == L->c.d_expert && c->vocab_size == L->c.vocab_size &&
          c->attn == L->c.attn && c->qk_norm == L->c.qk_norm && c->qkv_bias == L->c.qkv_bias &&
          c->rope_neox == L->c.rope_neox && c->renorm_topk == L->c.renorm_topk &&
          c->n_shared_experts == L->c.n_shared_experts && c->router == L->c.router &&
          c->expert_bias == L->c.expert_bias && c->moe_first_dense == L->c.moe_first_dense &&
          moe_config_head_dim(c) == moe_config_head_dim(&L->c) && c->routed_scale == L->c.routed_scale &&
          c->n_group == L->c.n_group && c->q_lora_rank == L->c.q_lora_rank, "config differs after reading back");
    TEST_END();

    enum { NP = 12, NG = 12 };
    const int V = c->vocab_size;
    int32_t tok[NP + NG];
    for (int i = 0; i < NP; i++) tok[i] = (int32_t)((i * 37 + 5) % V);
    float *a = malloc(sizeof(float) * (NP + NG) * V), *b = malloc(sizeof(float) * (NP + NG) * V);
    snprintf(name, sizeof name, "%s %s: one chunk, chunks and single tokens give the same bits", L->label, tname);
    TEST_CASE(name);
    st = model_infer(m, tok, NP, 0, a, 1);
    CHECK(st == MOE_OK, "%s", moe_last_error());
    CHECK(run_single(m, tok, NP, b) == MOE_OK, "%s", moe_last_error());
    CHECK(!memcmp(a, b, sizeof(float) * NP * V), "chunked and single-token logits differ");
    CHECK(model_infer(m, tok, 5, 0, b, 1) == MOE_OK && model_infer(m, tok + 5, NP - 5, 5, b + 5 * V, 1) == MOE_OK,
          "%s", moe_last_error());
    CHECK(!memcmp(a, b, sizeof(float) * NP * V), "two chunks differ from one");
    TEST_END();

    /* greedy continuation, our logits after every token */
    for (int i = NP; i < NP + NG; i++) {
        tok[i] = argmax(a + (size_t)(i - 1) * V, V);
        CHECK(model_infer(m, tok + i, 1, i, a + (size_t)i * V, 0) == MOE_OK, "%s", moe_last_error());
    }
    th_tmp_path(dump, sizeof dump, "arch.dump");
    int wrote = write_dump(dump, tok, NP, NG, V, a, wtype == DT_F32 ? 0u : 1u) == 0;
    snprintf(name, sizeof name, "%s %s", L->label, tname);
    snprintf(arg, sizeof arg, "%s %s", path, dump);
    if (wrote) th_run_torch_checker("tests/ref/arch_ref.py", arg, name, 3);
    free(a);
    free(b);
    moe_model_free(m);
    if (!getenv("MOE_TEST_ONLY")) { remove(dump); remove(path); } /* kept for a closer look */
}

/* ---- broken files: patch one tensor's info in a good file ---- */
static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)len);
    if (p && fread(p, 1, (size_t)len, f) != (size_t)len) { free(p); p = NULL; }
    fclose(f);
    *n = (size_t)len;
    return p;
}

/* the tensor info right after the name: u32 n_dims, i64 ne[n_dims], u32 type */
static unsigned char *tensor_info(unsigned char *buf, size_t n, const char *tname) {
    const size_t tl = strlen(tname);
    for (size_t i = 8; i + tl + 8 < n; i++) {
        uint64_t len;
        memcpy(&len, buf + i - 8, 8);
        if (len == tl && !memcmp(buf + i, tname, tl)) return buf + i + tl;
    }
    return NULL;
}

static void broken(const char *label, const layout *L, const char *tname, int what, const char *expect) {
    char name[200], path[256];
    snprintf(name, sizeof name, "%s: %s gives a one-line error", L->label, label);
    TEST_CASE(name);
    th_tmp_path(path, sizeof path, "broken.gguf");
    size_t n = 0;
    unsigned char *buf = NULL, *ti = NULL;
    CHECK(arch_write_random(path, L->arch, &L->c, DT_F32, NULL, 3) == MOE_OK, "%s", moe_last_error());
    buf = read_all(path, &n);
    ti = buf ? tensor_info(buf, n, tname) : NULL;
    CHECK(ti != NULL, "tensor %s not found in the file", tname);
    if (ti) {
        uint32_t nd;
        memcpy(&nd, ti, 4);
        if (what == 0) ti[-1] ^= 0x20;                           /* rename: the tensor goes missing */
        if (what == 1) { int64_t v; memcpy(&v, ti + 4 + 8, 8); v -= 1; memcpy(ti + 4 + 8, &v, 8); } /* fewer rows */
        if (what == 2) { int64_t v; memcpy(&v, ti + 4 + 16, 8); v -= 1; memcpy(ti + 4 + 16, &v, 8); } /* fewer experts */
        if (what == 3) { uint32_t t = DT_Q4_K; memcpy(ti + 4 + 8 * nd, &t, 4); } /* a type whose block does not fit */
        FILE *f = fopen(path, "wb");
        if (f) { fwrite(buf, 1, n, f); fclose(f); }
        moe_model *m = NULL;
        moe_status st = moe_model_load(&m, path);
        const char *msg = moe_last_error();
        CHECK(st != MOE_OK && !m, "a broken file loaded");
        CHECK(strstr(msg, expect) != NULL, "message '%s' does not name '%s'", msg, expect);
        CHECK(!strchr(msg, '\n'), "message has more than one line: %s", msg);
        moe_model_free(m);
    }
    free(buf);
    remove(path);
    TEST_END();
}

/* The moe command on a published-layout file with a vocabulary: info,
 * generate and eval, as a user runs them. */
static int run_cmd(const char *cmd, char *out, size_t cap) {
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    return pclose(p);
}

static void cli_on_published(void) {
    TEST_CASE("moe info, generate and eval on a published-layout file");
    const char *bin = getenv("MOE_BIN");
    if (!bin) { TEST_SKIP("MOE_BIN is not set (run through tests/run.sh)"); return; }
    char path[256], txt[256], cmd[1024], out[8192];
    th_tmp_path(path, sizeof path, "cli_arch.gguf");
    th_tmp_path(txt, sizeof txt, "cli_arch.txt");
    CHECK(th_write_word_text(txt, 5, 20, 60) == 0, "text");
    FILE *f = fopen(txt, "rb");
    static char text[65536];
    size_t len = f ? fread(text, 1, sizeof text, f) : 0;
    if (f) fclose(f);
    const char *texts[1] = {text};
    moe_tokenizer *tok = NULL;
    CHECK(moe_tokenizer_train(&tok, texts, &len, 1, 300) == MOE_OK, "%s", moe_last_error());
    layout L[8];
    layouts(L);
    moe_config c = L[2].c; /* qwen2moe */
    CHECK(tok && arch_write_random(path, "qwen2moe", &c, DT_Q8_0, tok, 9) == MOE_OK, "%s", moe_last_error());
    moe_tokenizer_free(tok);
    snprintf(cmd, sizeof cmd, "%s info --model %s --ctx 32 2>&1", bin, path);
    int rc = run_cmd(cmd, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "architecture: qwen2moe") && strstr(out, "shared experts: 1") &&
          strstr(out, "q8_0") && strstr(out, "memory at context 32"), "info: rc %d: %.600s", rc, out);
    snprintf(cmd, sizeof cmd, "%s generate --model %s --prompt 'the expert' --tokens 8 --temperature 0 2>&1", bin, path);
    rc = run_cmd(cmd, out, sizeof out);
    CHECK(rc == 0 && strlen(out) > 1, "generate: rc %d: %.300s", rc, out);
    snprintf(cmd, sizeof cmd, "%s eval --model %s --data %s --seq 32 2>/dev/null", bin, path, txt);
    rc = run_cmd(cmd, out, sizeof out);
    CHECK(rc == 0 && !strncmp(out, "loss ", 5), "eval: rc %d: %.300s", rc, out);
    snprintf(cmd, sizeof cmd, "%s generate --model %s --ctx 100000 --tokens 2 2>&1", bin, path);
    rc = run_cmd(cmd, out, sizeof out);
    CHECK(rc != 0 && strstr(out, "context"), "a context beyond the model's: rc %d: %.300s", rc, out);
    remove(path);
    remove(txt);
    TEST_END();
}

int main(void) {
    layout L[8];
    const int n = layouts(L);
    static const int types[] = {DT_F32, DT_F16, DT_BF16, DT_Q8_0, DT_Q4_0, DT_Q4_K, DT_Q5_K, DT_Q6_K};
    for (int i = 0; i < n; i++) {
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            if (!dtype_usable(types[t]) && types[t] != DT_F32) {
                char nm[160];
                snprintf(nm, sizeof nm, "%s %s", L[i].label, dtype_name(types[t]));
                TEST_CASE(nm);
                TEST_SKIP("type %s is not built yet", dtype_name(types[t]));
                continue;
            }
            const char *only = getenv("MOE_TEST_ONLY"); /* e.g. "qwen2moe q4_0": one case, files kept */
            char nm[160];
            snprintf(nm, sizeof nm, "%s %s", L[i].label, dtype_name(types[t]));
            if (only && !strstr(nm, only)) continue;
            check_layout(&L[i], types[t], dtype_name(types[t]));
        }
        broken("a missing tensor", &L[i], "blk.1.ffn_norm.weight", 0, "blk.1.ffn_norm.weight");
        broken("a wrong shape", &L[i], "blk.0.attn_output.weight", 1, "blk.0.attn_output.weight");
        broken("an inconsistent expert count", &L[i], "blk.1.ffn_up_exps.weight", 2, "blk.1.ffn_up_exps.weight");
    }
    /* type with a block size that does not divide the rows: d_ff 96 is not a multiple of 256 */
    broken("a type whose blocks do not fit the rows", &L[0], "blk.0.ffn_down_exps.weight", 3, "ffn_down_exps");
    cli_on_published();
    TEST_MAIN_END();
}
