#!/usr/bin/env bash
# tests/test_cli.sh: the moe command's behaviour on good and bad input.
# Every failure case checks the exit code, that stderr has a one-line message
# naming the problem, that nothing crashed (exit < 128) and, where a file was
# in the way, that it is unchanged. Run by tests/run.sh with MOE_BIN set.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh cli
cd "$T"

# VERBOSE=1 shows the stderr of every failure case.
# run CMD...: sets RC, leaves stdout in $T/out and stderr in $T/err
run() { timeout -k 5 60 "$@" >"$T/out" 2>"$T/err"; RC=$?; }

# expect NAME RC PATTERN CMD...: exit code RC, no crash, and an error line on
# stderr matching PATTERN (extended regex, case-insensitive) that starts with "moe"
expect() {
    local name=$1 want=$2 pat=$3; shift 3
    run "$@"
    [ -n "${VERBOSE:-}" ] && sed 's/^/     | /' "$T/err"
    if [ "$RC" -ge 124 ]; then bad "$name" "crashed or hung (exit $RC): $(head -c 300 "$T/err")"; return 1; fi
    if [ "$RC" -ne "$want" ]; then bad "$name" "exit $RC, expected $want; stderr: $(head -c 300 "$T/err")"; return 1; fi
    if ! grep -E '^moe' "$T/err" | grep -qiE -- "$pat"; then
        bad "$name" "stderr lacks a 'moe...' line matching /$pat/: $(head -c 300 "$T/err")"; return 1
    fi
    if [ "$(wc -l <"$T/err")" -gt 3 ]; then bad "$name" "error message is not short: $(head -c 300 "$T/err")"; return 1; fi
    ok "$name"
}

# unchanged NAME FILE COPY: FILE still has the bytes of COPY
unchanged() {
    if cmp -s "$2" "$3"; then ok "$1"; else bad "$1" "$2 was modified"; fi
}

# ---- a small corpus and a tiny configuration --------------------------------------
awk 'BEGIN { srand(7); split("the a fox dog runs jumps over under quick lazy brown river tree " \
     "stone light dark north wind rain sun moon café naïve über smörgåsbord", w, " ");
     for (i = 0; i < 400; i++) { s = ""; for (j = 0; j < 12; j++) s = s w[int(rand() * 26) + 1] " ";
     print s "." } }' >"$T/small.txt"
TINY=(--set d_model=32 --set n_layers=1 --set n_heads=2 --set n_kv_heads=1 --set d_ff=64
      --set n_experts=4 --set top_k=2 --set d_expert=32 --set max_seq=32 --set vocab_size=300)
SHORT=(--steps 2 --batch 2 --seq 16 --threads 1 --eval-every 0)
mkdir -p "$T/emptydir"; : >"$T/empty.txt"
echo "precious" >"$T/existing.gguf"; cp "$T/existing.gguf" "$T/existing.copy"

# ---- help and version -----------------------------------------------------------------
for c in "--help" "help" "help train" "train --help" "generate --help" "eval --help" "info --help" \
         "tokenizer --help" "tokenizer train --help" "tokenizer encode --help" "tokenizer decode --help" \
         "train --steps 5 -h" "route --help" "report --help"; do
    run "$MOE" $c
    if [ "$RC" -eq 0 ] && grep -q "Usage" "$T/out"; then ok "help: moe $c"
    else bad "help: moe $c" "exit $RC, stdout: $(head -c 200 "$T/out")"; fi
done
run "$MOE" train --help
for f in preset set data steps batch seq lr seed threads out resume log eval-every save-every stop-after \
         tokenizer grad-accum warmup force; do
    grep -q -- "--$f" "$T/out" || bad "help lists --$f" "moe train --help does not mention --$f"
done
grep -q "default" "$T/out" && ok "train help shows defaults" || bad "train help shows defaults" "no 'default'"
# the preset list: every preset the library knows (as its unknown-preset error
# names them) on a line of its own, with its description
cp "$T/out" "$T/help"
run "$MOE" train --preset nosuchpreset --data "$T/small.txt"
known=$(sed -n 's/.*(known: \(.*\)).*/\1/p' "$T/err" | tr -d ',')
missing=""
for p in $known; do grep -qE "^  $p +[^ ].{10,}$" "$T/help" || missing="$missing $p"; done
if [ -n "$known" ] && [ -z "$missing" ] && grep -qE "^  tiny +2 layers, d_model 64, 4 experts top-2: for tests$" "$T/help"; then
    ok "train help describes every preset ($(echo $known | wc -w))"
else bad "train help describes every preset" "known: '$known'; without a description:$missing"; fi
run "$MOE" --version
[ "$RC" -eq 0 ] && grep -qE '^moe [0-9]' "$T/out" && ok "--version" || bad "--version" "exit $RC: $(cat "$T/out")"

# ---- command-line errors (exit 2) ---------------------------------------------------------
expect "no command" 2 "usage|command" "$MOE"
expect "unknown command" 2 "unknown command 'frobnicate'" "$MOE" frobnicate
expect "unknown top-level option" 2 "unknown option '--frob'" "$MOE" --frob
for c in train generate eval info route report "tokenizer train" "tokenizer encode" "tokenizer decode"; do
    expect "unknown flag: $c" 2 "moe $c: unknown option '--foo' \(see 'moe $c --help'\)" "$MOE" $c --foo
done
expect "unknown flag with =value" 2 "unknown option '--foo'" "$MOE" train --foo=3
expect "unknown tokenizer subcommand" 2 "unknown subcommand 'split'" "$MOE" tokenizer split
expect "missing tokenizer subcommand" 2 "subcommand" "$MOE" tokenizer
expect "missing value at end" 2 "'--steps' needs a value" "$MOE" train --steps
expect "missing value before flag" 2 "'--out' needs a value" "$MOE" train --out --force
expect "non-numeric --steps" 2 "'--steps' expects an integer, got 'abc'" "$MOE" train --steps abc
expect "trailing junk --steps" 2 "'--steps' expects an integer" "$MOE" train --steps 12x
expect "float for int --batch" 2 "'--batch' expects an integer" "$MOE" train --batch 1.5
expect "overflowing --steps" 2 "'--steps' expects an integer" "$MOE" train --steps 99999999999999
expect "--steps 0" 2 "'--steps' must be > 0" "$MOE" train --steps 0
expect "--seq 1" 2 "'--seq' must be > 1" "$MOE" train --seq 1
expect "--lr negative" 2 "'--lr' must be > 0" "$MOE" train --lr -1e-3
expect "--lr too large" 2 "'--lr' must be below 10" "$MOE" train --lr 50
expect "--lr nan" 2 "'--lr' expects a number" "$MOE" train --lr nan
expect "--threads negative" 2 "'--threads' must be >= 0" "$MOE" train --threads -2
expect "--seed negative" 2 "'--seed' expects a non-negative integer" "$MOE" train --seed -5
expect "--temperature negative" 2 "'--temperature' must be >= 0" "$MOE" generate --model x --temperature -1
expect "--top-p above 1" 2 "'--top-p' must be in \(0, 1\]" "$MOE" generate --model x --top-p 1.5
expect "--top-p zero" 2 "'--top-p' must be in" "$MOE" generate --model x --top-p 0
expect "--tokens empty" 2 "'--tokens' expects an integer" "$MOE" generate --model x --tokens=
expect "flag given a value" 2 "'--force' takes no value" "$MOE" train --force=yes
expect "stray argument" 2 "unexpected argument 'extra'" "$MOE" train extra
expect "--set without =" 2 "--set expects KEY=VALUE" "$MOE" train --set d_model
expect "--set with an empty key" 2 "--set expects KEY=VALUE" "$MOE" train --set =4
expect "info --set without =" 2 "--set expects KEY=VALUE" "$MOE" info --set d_model
expect "--resume with --preset" 2 "--resume" "$MOE" train --resume "$T/existing.gguf" --preset tiny
expect "generate without --model" 2 "--model" "$MOE" generate
expect "eval without --data" 2 "--data" "$MOE" eval --model x
expect "decode bad id" 2 "invalid token id 'x1'" "$MOE" tokenizer decode --tokenizer x 5 x1
unchanged "bad flags leave files alone" "$T/existing.gguf" "$T/existing.copy"

# ---- configuration errors (exit 1), found before any work ----------------------------------
expect "--set unknown key" 1 "bogus_key" "$MOE" train --data "$T/small.txt" --set bogus_key=3
expect "--set key too long" 1 "key too long" "$MOE" train --data "$T/small.txt" --set "$(printf 'k%.0s' $(seq 200))=1"
expect "--set bad value" 1 "n_layers" "$MOE" train --data "$T/small.txt" --set n_layers=abc
expect "top_k > n_experts" 1 "top_k" "$MOE" train --data "$T/small.txt" --set n_experts=8 --set top_k=9
expect "n_heads not dividing d_model" 1 "head" "$MOE" train --data "$T/small.txt" --set d_model=64 --set n_heads=5
expect "unknown preset" 1 "nosuchpreset" "$MOE" train --data "$T/small.txt" --preset nosuchpreset
expect "info impossible config" 1 "top_k" "$MOE" info --set n_experts=8 --set top_k=9
expect "--seq beyond max_seq" 1 "max_seq" "$MOE" train --data "$T/small.txt" "${TINY[@]}" --seq 64

# ---- data errors ---------------------------------------------------------------------------
expect "missing --data path" 1 "nowhere\.txt" "$MOE" train --data "$T/nowhere.txt" --out "$T/a.gguf"
expect "empty data file" 1 "empty" "$MOE" train --data "$T/empty.txt" --out "$T/a.gguf"
expect "empty data directory" 1 "emptydir|no .*files|empty" "$MOE" train --data "$T/emptydir" --out "$T/a.gguf"
mkdir -p "$T/nested/sub"; cp "$T/small.txt" "$T/nested/sub/"
expect "data directory with only subdirectories" 1 "nested" "$MOE" train --data "$T/nested" --out "$T/a.gguf"
expect "one bad path of several" 1 "nowhere" "$MOE" train --data "$T/small.txt" --data "$T/nowhere" --out "$T/a.gguf"
expect "tokenizer train: missing data" 1 "nowhere" "$MOE" tokenizer train --data "$T/nowhere" --vocab 300 --out "$T/t.gguf"
[ ! -e "$T/a.gguf" ] && [ ! -e "$T/t.gguf" ] && ok "bad data creates no output" || bad "bad data creates no output" "output file appeared"

# ---- --out protection ---------------------------------------------------------------------
expect "--out exists without --force" 1 "refusing to overwrite .*existing\.gguf \(use --force\)" \
    "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --out "$T/existing.gguf"
unchanged "refused --out file unchanged" "$T/existing.gguf" "$T/existing.copy"
expect "tokenizer train --out exists" 1 "refusing to overwrite" \
    "$MOE" tokenizer train --data "$T/small.txt" --vocab 300 --out "$T/existing.gguf"
unchanged "refused tokenizer --out unchanged" "$T/existing.gguf" "$T/existing.copy"
expect "--out in a missing directory" 1 "does not exist" \
    "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --out "$T/no/such/dir/m.gguf"
expect "--resume missing file" 1 "gone\.gguf" "$MOE" train --data "$T/small.txt" --resume "$T/gone.gguf"

# ---- happy path ------------------------------------------------------------------------------
M="$T/tiny.gguf"
run "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --out "$M"
if [ "$RC" -eq 0 ] && [ -s "$M" ] && grep -q "step 2/2" "$T/err"; then ok "train tiny"
else bad "train tiny" "exit $RC, stderr: $(tail -c 400 "$T/err")"; fi
have_model=0; [ -s "$M" ] && have_model=1
run "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --set matmul=bf16 --profile --out "$T/prof.gguf"
if [ "$RC" -eq 0 ] && grep -q "^fwd attention  *[0-9.]* *[0-9.]*%" "$T/out" && grep -q "^bwd moe experts" "$T/out" \
   && grep -q "^opt adamw" "$T/out" && grep -q "^total timed" "$T/out"; then ok "train --profile (bf16) prints the phase table"
else bad "train --profile" "exit $RC: $(tail -c 600 "$T/out") $(tail -c 200 "$T/err")"; fi

if [ $have_model = 1 ]; then
    run "$MOE" info --model "$M"
    if [ "$RC" -eq 0 ] && grep -q "d_model" "$T/out" && grep -qE "total +[0-9.]+[KMBT]? \([0-9,]+\)" "$T/out" \
       && grep -q "active" "$T/out" && grep -q "vocab 300" "$T/out"; then ok "info --model"
    else bad "info --model" "exit $RC: $(head -c 400 "$T/out") $(head -c 200 "$T/err")"; fi

    run "$MOE" generate --model "$M" --tokens 5 --prompt "the fox" --seed 3 --threads 1
    [ "$RC" -eq 0 ] && [ -s "$T/out" ] && ok "generate --tokens 5" || bad "generate --tokens 5" "exit $RC: $(head -c 300 "$T/err")"
    cp "$T/out" "$T/gen1"
    run "$MOE" generate --model "$M" --tokens 5 --prompt "the fox" --seed 3 --threads 1
    cmp -s "$T/out" "$T/gen1" && ok "generate is deterministic for a seed" || bad "generate is deterministic for a seed" "outputs differ"
    run "$MOE" generate --model "$M" --tokens 3 --prompt "" --temperature 0
    [ "$RC" -eq 0 ] && ok "generate from an empty prompt, greedy" || bad "generate from an empty prompt, greedy" "exit $RC: $(head -c 300 "$T/err")"
    run "$MOE" generate --model "$M" --tokens 3 --prompt "$(head -c 3000 "$T/small.txt")"
    [ "$RC" -eq 0 ] && ok "generate with a prompt longer than the context" \
        || bad "generate with a prompt longer than the context" "exit $RC: $(head -c 300 "$T/err")"
    run "$MOE" generate --model "$M" --tokens 3 --top-k 5 --top-p 1
    [ "$RC" -eq 0 ] && ok "generate with --top-k" || bad "generate with --top-k" "exit $RC: $(head -c 300 "$T/err")"

    run "$MOE" generate --model "$M" --tokens 5 --prompt "the fox" --stats
    grep -qE "^moe generate: prompt [0-9]+ tokens, [0-9.]+ tokens/s; generation [0-9]+ tokens, [0-9.]+ tokens/s$" "$T/err" \
        && grep -qE "^moe generate: units: .*; kernels: " "$T/err" \
        && ok "generate --stats" || bad "generate --stats" "exit $RC: $(head -c 300 "$T/err")"
    # Ctrl-C stops generation cleanly: the text so far is printed, exit 130
    # (a long context, so generation outlasts the signal: the interrupt comes as soon as text appears)
    run "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --set max_seq=32768 --out "$T/long.gguf"
    "$MOE" generate --model "$T/long.gguf" --tokens 32000 --ignore-eos --prompt "the" >"$T/out" 2>"$T/err" &
    gp=$!
    for _ in $(seq 200); do [ -s "$T/out" ] && break; sleep 0.05; done
    kill -INT $gp; wait $gp; RC=$?
    if [ "$RC" -eq 130 ] && [ -s "$T/out" ] && grep -q "interrupted" "$T/err"; then ok "generate stops on SIGINT (exit 130, text kept)"
    else bad "generate stops on SIGINT" "exit $RC, $(wc -c <"$T/out") bytes out, stderr: $(head -c 200 "$T/err")"; fi

    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1
    if [ "$RC" -eq 0 ] && grep -qE "^loss [0-9.]+  perplexity [0-9.]+  tokens [0-9]+$" "$T/out"; then ok "eval"
    else bad "eval" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    grep -qE "^eval [0-9]+/[0-9]+ tokens \(100%\)" "$T/err" && ok "eval shows progress, ending at 100%" \
        || bad "eval progress" "stderr: $(head -c 300 "$T/err")"

    # the sampling error, and the blocks behind it: their sums give the loss printed
    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1 --block-losses "$T/blocks.txt"
    if [ "$RC" -eq 0 ] && grep -qE "^standard error [0-9.]+ over [0-9]+ blocks of 128 positions \([0-9.]+ over blocks of 2048\)$" "$T/out" \
        && /usr/bin/python3 - "$T/out" "$T/blocks.txt" <<'PY'
import re, sys
out = open(sys.argv[1]).read()
loss, tokens = float(re.search(r"^loss ([0-9.]+)", out, re.M).group(1)), int(re.search(r"tokens ([0-9]+)", out).group(1))
n = int(re.search(r"over ([0-9]+) blocks", out).group(1))
b = [tuple(map(float, l.split())) for l in open(sys.argv[2])]
assert len(b) == n and sum(c for _, c in b) == tokens, (len(b), n)
assert abs(sum(s for s, _ in b) / tokens - loss) < 6e-4, (sum(s for s, _ in b) / tokens, loss)
PY
    then ok "eval prints the loss's standard error; --block-losses writes the blocks, which add up to the loss"
    else bad "eval standard error / --block-losses" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1 --validation
    [ "$RC" -eq 0 ] && grep -qE "^loss [0-9.]+  perplexity [0-9.]+  tokens [0-9]+$" "$T/out" && ok "eval --validation" \
        || bad "eval --validation" "exit $RC: $(head -c 300 "$T/err")"
    # run-time routing: --active-experts / --expert-threshold (tiny: 4 experts, top-2)
    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1 --active-experts 2
    if [ "$RC" -eq 0 ] && grep -qE "^loss [0-9.]+  perplexity [0-9.]+  tokens [0-9]+  experts/token 2\.00$" "$T/out"
    then ok "eval --active-experts 2 (the model's top-k) reports 2 experts per token"
    else bad "eval --active-experts" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    sed 's/  experts.*//' "$T/out" >"$T/k2"
    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1
    cmp -s "$T/out" "$T/k2" && ok "eval --active-experts at the top-k gives the default loss" \
        || bad "eval --active-experts at the top-k" "'$(cat "$T/k2")' vs '$(cat "$T/out")'"
    run "$MOE" eval --model "$M" --data "$T/small.txt" --seq 16 --threads 1 --active-experts 4 --expert-threshold 0.5 --min-experts 2
    if [ "$RC" -eq 0 ] && grep -qE "experts/token (2\.[0-9]+|3\.[0-9]+|4\.00)$" "$T/out"; then ok "eval --expert-threshold with --min-experts"
    else bad "eval --expert-threshold" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    run "$MOE" generate --model "$M" --tokens 5 --prompt "the fox" --temperature 0 --active-experts 1 --stats
    [ "$RC" -eq 0 ] && grep -q "1.00 experts per token" "$T/err" && ok "generate --active-experts 1" \
        || bad "generate --active-experts 1" "exit $RC: $(head -c 300 "$T/err")"
    expect "eval: --active-experts above the experts" 1 "active experts 5 must be in 1\.\.4" \
        "$MOE" eval --model "$M" --data "$T/small.txt" --active-experts 5
    expect "eval: --expert-threshold above 1" 2 "expert-threshold.*in \(0, 1\]" \
        "$MOE" eval --model "$M" --data "$T/small.txt" --expert-threshold 1.5
    expect "eval: --min-experts without a threshold" 2 "only counts with --expert-threshold" \
        "$MOE" eval --model "$M" --data "$T/small.txt" --min-experts 2
    expect "generate: --min-experts above the active experts" 1 "minimum experts 3 must be in 1\.\.2" \
        "$MOE" generate --model "$M" --expert-threshold 0.5 --min-experts 3

    printf 'caf\xc3\xa9 na\xc3\xafve \xe2\x9c\x93 \xf0\x9f\x98\x80 raw \x01\xfe\xff bytes\n' >"$T/text.bin"
    run "$MOE" tokenizer encode --tokenizer "$M" <"$T/text.bin"; cp "$T/out" "$T/ids.txt"
    if [ "$RC" -eq 0 ] && grep -qE '^[0-9]+( [0-9]+)*$' "$T/ids.txt"; then
        run "$MOE" tokenizer decode --tokenizer "$M" <"$T/ids.txt"
        cmp -s "$T/out" "$T/text.bin" && ok "tokenizer round trip via stdin" || bad "tokenizer round trip via stdin" "bytes differ"
        run "$MOE" tokenizer decode --tokenizer "$M" $(cat "$T/ids.txt")
        cmp -s "$T/out" "$T/text.bin" && ok "tokenizer decode of argument ids" || bad "tokenizer decode of argument ids" "bytes differ"
    else bad "tokenizer encode" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    run "$MOE" tokenizer encode --tokenizer "$M" --text "$(printf 'd\xc3\xa9j\xc3\xa0 vu')"
    [ "$RC" -eq 0 ] && [ -s "$T/out" ] && ok "tokenizer encode --text" || bad "tokenizer encode --text" "exit $RC"
    expect "decode out-of-range id" 1 "99999" "$MOE" tokenizer decode --tokenizer "$M" 1 99999

    run "$MOE" tokenizer train --data "$T/small.txt" --vocab 280 --out "$T/tok.gguf"
    [ "$RC" -eq 0 ] && [ -s "$T/tok.gguf" ] && ok "tokenizer train" || bad "tokenizer train" "exit $RC: $(head -c 300 "$T/err")"
    if [ -s "$T/tok.gguf" ]; then
        expect "--tokenizer vs --set vocab_size" 1 "vocab_size" \
            "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --tokenizer "$T/tok.gguf" --out "$T/m2.gguf"
        run "$MOE" train --data "$T/small.txt" "${TINY[@]:0:18}" "${SHORT[@]}" --tokenizer "$T/tok.gguf" --out "$T/m2.gguf"
        [ "$RC" -eq 0 ] && [ -s "$T/m2.gguf" ] && ok "train with --tokenizer" || bad "train with --tokenizer" "exit $RC: $(tail -c 300 "$T/err")"
        run "$MOE" info --model "$T/m2.gguf"
        grep -q "vocab_size *= *280" "$T/out" && ok "--tokenizer sets vocab_size" || bad "--tokenizer sets vocab_size" "$(grep vocab "$T/out")"
    fi

    # pause and resume: 2 of 4 steps, then the rest
    R="$T/resume.gguf"
    run "$MOE" train --data "$T/small.txt" "${TINY[@]}" --steps 4 --batch 2 --seq 16 --threads 1 --stop-after 2 --out "$R"
    if [ "$RC" -eq 0 ] && [ -s "$R" ] && [ -s "$R.state" ] && grep -q "paused" "$T/out"; then
        ok "train --stop-after pauses"
        run "$MOE" train --data "$T/small.txt" --resume "$R" --threads 1
        [ "$RC" -eq 0 ] && grep -q "step 4/4" "$T/err" && ok "train --resume finishes" \
            || bad "train --resume finishes" "exit $RC: $(tail -c 300 "$T/err")"
        # resuming a finished run: a plain note, before any data is read, and nothing written
        cp "$R" "$T/resume.copy"; cp "$R.state" "$T/resume.state.copy"
        run "$MOE" train --data "$T/small.txt" --resume "$R" --threads 1
        if [ "$RC" -eq 0 ] && grep -qx "nothing to train: the run is already complete (step 4 of 4); model in $R" "$T/out" \
           && ! grep -q "error" "$T/err" && ! grep -q "^data:" "$T/err"; then ok "train --resume of a finished run says so"
        else bad "train --resume of a finished run says so" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
        unchanged "finished run's model left as it was" "$R" "$T/resume.copy"
        unchanged "finished run's state left as it was" "$R.state" "$T/resume.state.copy"
    else bad "train --stop-after pauses" "exit $RC: $(tail -c 300 "$T/err") $(cat "$T/out")"; fi

    # ---- damaged model files ----
    size=$(stat -c %s "$M")
    head -c $((size / 2)) "$M" >"$T/trunc.gguf"
    head -c 20 "$M" >"$T/stub.gguf"
    { printf 'XXXX'; tail -c +5 "$M"; } >"$T/magic.gguf"
    cp "$M" "$T/flip.gguf"   # scribble over the metadata counts right after magic+version
    printf '\xff\xff\xff\xff\xff\xff\xff\x7f\xff\xff\xff\xff' | dd of="$T/flip.gguf" bs=1 seek=8 conv=notrunc status=none
    for f in trunc stub magic flip; do
        cp "$T/$f.gguf" "$T/$f.copy"
        expect "generate: $f model" 1 "error" "$MOE" generate --model "$T/$f.gguf" --tokens 2
        expect "info: $f model" 1 "error" "$MOE" info --model "$T/$f.gguf"
        expect "eval: $f model" 1 "error" "$MOE" eval --model "$T/$f.gguf" --data "$T/small.txt"
        expect "tokenizer encode: $f model" 1 "error" "$MOE" tokenizer encode --tokenizer "$T/$f.gguf" --text hi
        unchanged "$f model left as it was" "$T/$f.gguf" "$T/$f.copy"
    done
    # random damage in the tensor data may load or not, but must never crash
    cp "$M" "$T/noise.gguf"
    head -c 64 /dev/urandom | dd of="$T/noise.gguf" bs=1 seek=$((size - 200)) conv=notrunc status=none
    run "$MOE" generate --model "$T/noise.gguf" --tokens 3
    [ "$RC" -lt 124 ] && ok "noisy tensor data does not crash" || bad "noisy tensor data does not crash" "exit $RC"
fi
expect "generate: missing model" 1 "missing\.gguf" "$MOE" generate --model "$T/missing.gguf"
expect "eval: missing model" 1 "missing\.gguf" "$MOE" eval --model "$T/missing.gguf" --data "$T/small.txt"
expect "info: directory as model" 1 "directory" "$MOE" info --model "$T/emptydir"
expect "encode: missing tokenizer" 1 "missing\.gguf" "$MOE" tokenizer encode --tokenizer "$T/missing.gguf" --text hi
expect "train: missing --tokenizer" 1 "missing\.gguf" "$MOE" train --data "$T/small.txt" "${TINY[@]}" --tokenizer "$T/missing.gguf"

# ---- moe convert --to gguf: our model in the published llama layout -----------------------
run "$MOE" convert --help
if [ "$RC" -eq 0 ] && grep -q "Usage: moe convert --to gguf IN OUT" "$T/out"; then ok "help: moe convert --help"
else bad "help: moe convert --help" "exit $RC: $(head -c 200 "$T/out")"; fi
C="$T/conv-src.gguf"
run "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${SHORT[@]}" --out "$C"
if [ "$RC" -eq 0 ] && [ -s "$C" ]; then
    run "$MOE" convert --to gguf "$C" "$T/conv.gguf"
    if [ "$RC" -eq 0 ] && grep -q "^wrote .*conv.gguf: llama layout, 1 layers, 4 experts top-2" "$T/out" && [ -s "$T/conv.gguf" ]
    then ok "convert writes the llama layout"; else bad "convert writes the llama layout" "exit $RC: $(head -c 300 "$T/err")"; fi
    if grep -aq "moe\.d_model\|moe\.train_step" "$T/conv.gguf"; then bad "converted file has no moe.* keys" "found moe.* keys"
    else ok "converted file has no moe.* keys"; fi
    run "$MOE" info --model "$T/conv.gguf"
    if [ "$RC" -eq 0 ] && grep -qx "architecture: llama" "$T/out" && grep -q "4 routed, top-2, hidden 32; softmax scores, renormalised" "$T/out"
    then ok "converted file loads as a published llama model"; else bad "converted file loads as a published llama model" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    run "$MOE" generate --model "$C" --prompt "the quick" --tokens 12 --temperature 0 --threads 1; cp "$T/out" "$T/gen-orig"
    run "$MOE" generate --model "$T/conv.gguf" --prompt "the quick" --tokens 12 --temperature 0 --threads 1
    if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/gen-orig"; then ok "converted model generates the same greedy text"
    else bad "converted model generates the same greedy text" "exit $RC: '$(head -c 200 "$T/out")' vs '$(head -c 200 "$T/gen-orig")'"; fi
    # expert offloading: the same greedy text from a cache of part of the experts, and the cache's numbers
    for b in 100% 50% 25%; do
        run "$MOE" generate --model "$T/conv.gguf" --prompt "the quick" --tokens 12 --temperature 0 --threads 1 --mem-budget "$b" --stats
        if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/gen-orig" && grep -qE "^moe generate: experts: hit rate [0-9.]+% .* MiB read per token" "$T/err"
        then ok "generate --mem-budget $b: same text, cache stats"; else bad "generate --mem-budget $b: same text, cache stats" "exit $RC: $(head -c 300 "$T/err")"; fi
    done
    run "$MOE" eval --model "$T/conv.gguf" --data "$T/small.txt" --seq 16 --threads 1; cp "$T/out" "$T/eval-orig"
    run "$MOE" eval --model "$T/conv.gguf" --data "$T/small.txt" --seq 16 --threads 1 --mem-budget 25% --offload-policy lfu --stats
    if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/eval-orig" && grep -q "^moe eval: experts: hit rate" "$T/err"
    then ok "eval --mem-budget 25%: same loss"; else bad "eval --mem-budget 25%: same loss" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
    expect "generate: --mem-budget below the minimum" 1 "below the minimum of [0-9]+ bytes" "$MOE" generate --model "$T/conv.gguf" --mem-budget 1K
    expect "generate: --mem-budget nonsense" 1 "memory budget 'lots'" "$MOE" generate --model "$T/conv.gguf" --mem-budget lots
    expect "generate: --offload-policy unknown" 1 "policy 'fifo'" "$MOE" generate --model "$T/conv.gguf" --mem-budget 50% --offload-policy fifo
    for pf in on off; do
        run "$MOE" generate --model "$T/conv.gguf" --prompt "the quick" --tokens 12 --temperature 0 --threads 1 --mem-budget 25% --offload-prefetch $pf --stats
        if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/gen-orig"
        then ok "generate --mem-budget 25% --offload-prefetch $pf: same text"; else bad "generate --mem-budget 25% --offload-prefetch $pf: same text" "exit $RC: $(head -c 300 "$T/err")"; fi
    done
    expect "generate: --offload-prefetch unknown" 1 "prefetch 'maybe'" "$MOE" generate --model "$T/conv.gguf" --mem-budget 50% --offload-prefetch maybe
    # our own model (moe train's file) offloads too: mapped, its experts read into the cache
    for b in 50% 25%; do
        run "$MOE" generate --model "$C" --prompt "the quick" --tokens 12 --temperature 0 --threads 1 --mem-budget "$b" --stats
        if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/gen-orig" && grep -qE "^moe generate: experts: hit rate [0-9.]+% .* MiB read per token" "$T/err"
        then ok "generate --mem-budget $b on our own model: same text"; else bad "generate --mem-budget $b on our own model: same text" "exit $RC: $(head -c 300 "$T/err")"; fi
    done
    run "$MOE" eval --model "$C" --data "$T/small.txt" --seq 16 --threads 1 --stats; grep -o "loss [0-9.]* (every digit" "$T/err" >"$T/own-loss"
    run "$MOE" eval --model "$C" --data "$T/small.txt" --seq 16 --threads 1 --mem-budget 25% --stats
    if [ "$RC" -eq 0 ] && [ -s "$T/own-loss" ] && grep -qF "$(cat "$T/own-loss")" "$T/err" && grep -qE "^moe eval: experts: hit rate .* [0-9.]+ MiB read per token" "$T/err"
    then ok "eval --mem-budget 25% on our own model: the same loss, every digit"
    else bad "eval --mem-budget 25% on our own model: the same loss, every digit" "exit $RC: $(cat "$T/own-loss") $(head -c 300 "$T/err")"; fi
    # warm from a routing trace: the experts it uses are read before the run (100%: no miss on them)
    "$MOE" route --model "$C" --data "$T/small.txt" --max-tokens 400 --json >"$T/trace.jsonl" 2>/dev/null
    run "$MOE" generate --model "$C" --prompt "the quick" --tokens 12 --temperature 0 --threads 1 --mem-budget 100% --offload-warm "$T/trace.jsonl" --stats
    if [ "$RC" -eq 0 ] && cmp -s "$T/out" "$T/gen-orig" && grep -qE "^moe generate: experts: hit rate 100.0% \([0-9]+ hits, 0 misses\)" "$T/err"
    then ok "generate --offload-warm TRACE: same text, no miss at 100%"; else bad "generate --offload-warm TRACE" "exit $RC: $(head -c 300 "$T/err")"; fi
    expect "generate: --offload-warm without --mem-budget" 1 "needs an expert cache" "$MOE" generate --model "$C" --offload-warm "$T/trace.jsonl"
    expect "generate: --offload-warm of a text file" 1 "no routing found" "$MOE" generate --model "$C" --mem-budget 50% --offload-warm "$T/small.txt"
    run "$MOE" bench --model "$C" -p 8 -n 4 -r 1 -t 1 --mem-budget 50%
    if [ "$RC" -eq 0 ] && grep -q "tg4" "$T/out" && grep -q "^moe bench: experts: hit rate" "$T/err"
    then ok "bench --mem-budget on our own model"; else bad "bench --mem-budget on our own model" "exit $RC: $(head -c 300 "$T/err")"; fi
    expect "convert: a published file" 1 "already a published llama file" "$MOE" convert --to gguf "$T/conv.gguf" "$T/conv2.gguf"
    cp "$T/conv.gguf" "$T/conv.copy"
    expect "convert: refuses to overwrite" 1 "refusing to overwrite" "$MOE" convert --to gguf "$C" "$T/conv.gguf"
    unchanged "convert: existing OUT left as it was" "$T/conv.gguf" "$T/conv.copy"
    run "$MOE" convert --to gguf --force "$C" "$T/conv.gguf"
    [ "$RC" -eq 0 ] && ok "convert --force overwrites" || bad "convert --force overwrites" "exit $RC: $(head -c 300 "$T/err")"
    expect "convert: IN is OUT" 1 "same file" "$MOE" convert --to gguf --force "$C" "$C"
    # quantised copies: they load and evaluate; moe info lists each form's size
    run "$MOE" eval --model "$C" --data "$T/small.txt" --seq 16 --threads 1; f32_loss=$(awk '{print $2}' "$T/out")
    for q in q8_0 q4_0 q4_k; do
        run "$MOE" convert --quant $q "$C" "$T/conv-$q.gguf"
        if [ "$RC" -eq 0 ] && grep -q "$q weights" "$T/out"; then ok "convert --quant $q"
        else bad "convert --quant $q" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; continue; fi
        run "$MOE" eval --model "$T/conv-$q.gguf" --data "$T/small.txt" --seq 16 --threads 1
        loss=$(awk '{print $2}' "$T/out")
        # a 4-bit copy of this tiny model may lose a little: within 0.25 nats of the f32 loss
        if [ "$RC" -eq 0 ] && awk -v a="$loss" -v b="$f32_loss" 'BEGIN { d = a - b; exit !(d < 0.25 && d > -0.25) }'
        then ok "eval of the $q copy ($loss vs f32 $f32_loss)"
        else bad "eval of the $q copy" "exit $RC: loss '$loss' vs f32 '$f32_loss' $(head -c 300 "$T/err")"; fi
    done
    expect "convert: unknown --quant" 2 "unknown weight type 'q5_1'" "$MOE" convert --quant q5_1 "$C" "$T/x.gguf"
    run "$MOE" info --model "$C"
    if [ "$RC" -eq 0 ] && grep -q "weights in each form" "$T/out" && grep -qE "^  q4_k +[0-9.]+ MiB$" "$T/out"
    then ok "info lists the memory of each form"; else bad "info lists the memory of each form" "$(tail -c 300 "$T/out")"; fi
else bad "train a model to convert" "exit $RC: $(tail -c 300 "$T/err")"; fi
expect "convert: no --to" 2 "--to FORMAT is required" "$MOE" convert "$C" "$T/x.gguf"
expect "convert: unknown format" 2 "unknown format 'onnx'" "$MOE" convert --to onnx "$C" "$T/x.gguf"
expect "convert: one file" 2 "expects two files" "$MOE" convert --to gguf "$C"
expect "convert: missing IN" 1 "missing\.gguf" "$MOE" convert --to gguf "$T/missing.gguf" "$T/x.gguf"
expect "convert: OUT in a missing directory" 1 "does not exist" "$MOE" convert --to gguf "$C" "$T/nodir/x.gguf"
# what the llama layout cannot express: refused, naming the feature, nothing written
refuse_case() { # NAME PATTERN SET...
    local name=$1 pat=$2; shift 2
    local sets=(); for s in "$@"; do sets+=(--set "$s"); done
    run "$MOE" train --data "$T/small.txt" "${TINY[@]}" "${sets[@]}" "${SHORT[@]}" --out "$T/ref-$name.gguf"
    if [ "$RC" -ne 0 ]; then bad "convert refuses $name" "training it failed: $(tail -c 200 "$T/err")"; return; fi
    expect "convert refuses $name" 1 "$pat" "$MOE" convert --to gguf "$T/ref-$name.gguf" "$T/ref-$name.out"
    [ -e "$T/ref-$name.out" ] && bad "convert refuses $name: nothing written" "$T/ref-$name.out exists"
}
refuse_case sigmoid "sigmoid routing: the llama layout has only softmax; deepseek2 .*MLA" router=sigmoid
refuse_case expert-choice "expert-choice routing" routing=expert_choice
refuse_case eval-capacity "eval_capacity_factor 2 drops tokens over capacity at inference" eval_capacity_factor=2
refuse_case shared "shared experts: the llama layout has none; deepseek2" n_shared_experts=1 d_shared=32
refuse_case no-renorm "renorm_topk = 0: llama.cpp's llama architecture always renormalises" renorm_topk=0
unchanged "existing file survived everything" "$T/existing.gguf" "$T/existing.copy"


# ---- moe bench: speed of a model file, and the synthetic benchmark models ----------------
SYN=(--set n_layers=2 --set d_model=64 --set n_heads=4 --set n_kv_heads=2 --set n_experts=4 --set top_k=2
     --set d_expert=64 --set vocab_size=300 --set max_seq=128)
run "$MOE" bench --write-synthetic moe --type q8_0 --out "$T/bm.gguf" "${SYN[@]}"
[ "$RC" -eq 0 ] && grep -q "4 experts top-2 of hidden 64, q8_0" "$T/out" && ok "bench --write-synthetic moe" \
    || bad "bench --write-synthetic moe" "exit $RC: $(head -c 300 "$T/err")"
run "$MOE" bench --write-synthetic dense-total --type bf16 --out "$T/bd.gguf" "${SYN[@]}"
[ "$RC" -eq 0 ] && grep -q "dense layers of hidden 256, bf16" "$T/out" && ok "bench --write-synthetic dense-total" \
    || bad "bench --write-synthetic dense-total" "exit $RC: $(head -c 300 "$T/err")"
run "$MOE" info --model "$T/bm.gguf"
[ "$RC" -eq 0 ] && grep -q "experts: 4 routed, top-2" "$T/out" && ok "the synthetic model loads" \
    || bad "the synthetic model loads" "exit $RC: $(head -c 300 "$T/err")"
run "$MOE" bench --model "$T/bm.gguf" -p 8 -n 4 -r 2 -t 1
if [ "$RC" -eq 0 ] && grep -qE '^\| llama 162.1K q8_0 +\| .* \| +1 \| +pp8 \| +[0-9.]+ ± [0-9.]+ \| +- \|$' "$T/out" &&
   grep -qE '^\| llama .* \| +tg4 @ d8 \| +[0-9.]+ ± [0-9.]+ \| +[0-9.]+% \|$' "$T/out" &&
   grep -q "memory bandwidth [0-9.]* GB/s" "$T/out" && grep -q "run 2/2" "$T/err"; then
    ok "bench: the table has the pp and tg rows"
else bad "bench: the table has the pp and tg rows" "exit $RC: $(head -c 600 "$T/out") $(head -c 200 "$T/err")"; fi
run "$MOE" bench --model "$T/bd.gguf" --n-prompt 4 --n-gen 0 --repetitions 1 --json
if [ "$RC" -eq 0 ] && /usr/bin/python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert [t["test"] for t in j["tests"]] == ["pp4"], j["tests"]
assert len(j["tests"][0]["samples_ts"]) == 1 and j["tests"][0]["avg_ts"] > 0
assert j["type"] == "bf16" and j["bandwidth_gbs"] > 0 and 0 < j["bytes_per_token"] < j["size_bytes"]' "$T/out"; then
    ok "bench --json parses"
else bad "bench --json parses" "exit $RC: $(head -c 400 "$T/out")"; fi
run "$MOE" bench --model "$T/bm.gguf" -p 8 -n 4 -r 1 -t 1 --mem-budget 50%
if [ "$RC" -eq 0 ] && grep -q "tg4 @ d8" "$T/out" && grep -q "^moe bench: experts: hit rate .*(50% of the experts" "$T/err"
then ok "bench --mem-budget: the table and the expert cache's numbers"
else bad "bench --mem-budget" "exit $RC: $(head -c 300 "$T/out") $(head -c 300 "$T/err")"; fi
expect "bench: no model" 2 "--model FILE is required" "$MOE" bench
expect "bench: nothing to measure" 2 "nothing to measure" "$MOE" bench --model "$T/bm.gguf" -p 0 -n 0
expect "bench: bad -p" 2 "n-prompt.*expects an integer" "$MOE" bench --model "$T/bm.gguf" -p many
expect "bench: negative -n" 2 "n-gen.*>= 0" "$MOE" bench --model "$T/bm.gguf" -n -3
expect "bench: too long for the context" 1 "context length is 128" "$MOE" bench --model "$T/bm.gguf" -p 200
expect "bench: missing model" 1 "missing\.gguf" "$MOE" bench --model "$T/missing.gguf"
expect "bench: not a model" 1 "small\.txt" "$MOE" bench --model "$T/small.txt"
expect "bench: unknown synthetic model" 2 "unknown model 'sparse'" "$MOE" bench --write-synthetic sparse --out "$T/x.gguf"
expect "bench: synthetic needs --out" 2 "needs --out" "$MOE" bench --write-synthetic moe
expect "bench: unknown type" 1 "type 'q3_x'.*known: .*q4_K" "$MOE" bench --write-synthetic moe --type q3_x --out "$T/x.gguf" "${SYN[@]}"
expect "bench: vocabulary too large" 1 "synthetic vocabulary has 257 to 65793 tokens" "$MOE" bench --write-synthetic moe --out "$T/x.gguf" "${SYN[@]}" --set vocab_size=70000
expect "bench: --out without --write-synthetic" 2 "go with --write-synthetic" "$MOE" bench --model "$T/bm.gguf" --out "$T/x.gguf"
expect "bench: refuses to overwrite" 1 "refusing to overwrite" "$MOE" bench --write-synthetic moe --out "$T/bm.gguf" "${SYN[@]}"
run "$MOE" bench --help
[ "$RC" -eq 0 ] && grep -q -- "--write-synthetic" "$T/out" && grep -q "short for --n-prompt" "$T/out" && ok "bench --help" \
    || bad "bench --help" "exit $RC"
# ---- routing analytics: moe route, moe eval --disable-expert --------------------------------
mkdir -p "$T/dom"
awk 'BEGIN { srand(3); for (i = 0; i < 200; i++) print "the quick brown fox jumps over the lazy dog " int(rand() * 9) }' >"$T/dom/prose.txt"
awk 'BEGIN { srand(4); for (i = 0; i < 200; i++) print "def f(x): return x * " int(rand() * 9) " + 1" }' >"$T/dom/code.txt"
PY=/usr/bin/python3
run "$MOE" train --data "$T/dom" "${TINY[@]}" --set n_layers=2 --set moe_first_dense=1 --steps 20 --batch 4 --seq 16 \
    --threads 1 --eval-every 0 --out "$T/rt.gguf" --log "$T/rt.jsonl"
if [ "$RC" -eq 0 ]; then
    R="$T/rt.gguf"
    run "$MOE" route --model "$R" --prompt 'say "hi" <b> & tab	end' --json --threads 1
    if [ "$RC" -eq 0 ] && "$PY" -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
assert rows and [r["pos"] for r in rows] == list(range(len(rows)))
text = "".join(r["text"] for r in rows)
assert text == "say \"hi\" <b> & tab\tend", text
for r in rows:
    assert [l["layer"] for l in r["layers"]] == [1]
    for l in r["layers"]:
        assert len(l["experts"]) == 2 and len(set(l["experts"])) == 2 and all(0 <= e < 4 for e in l["experts"])
        assert abs(sum(l["weights"]) - 1) < 1e-4 and l["weights"][0] >= l["weights"][1]
' "$T/out"; then ok "route --json: JSON Lines that parse, the text back, one MoE layer, weights sum to 1"
    else bad "route --json" "exit $RC: $(head -c 400 "$T/out") $(head -c 300 "$T/err")"; fi
    run "$MOE" route --model "$R" --data "$T/dom/code.txt" --max-tokens 7 --json --layer 1
    [ "$RC" -eq 0 ] && [ "$(wc -l <"$T/out")" -eq 7 ] && ok "route --data --max-tokens 7 --layer 1" \
        || bad "route --data --max-tokens" "exit $RC, $(wc -l <"$T/out") lines: $(head -c 300 "$T/err")"
    NO_COLOR=1 script -qec "$MOE route --model $R --prompt 'the fox' --threads 1" /dev/null >"$T/out" 2>&1; RC=$?
    if [ "$RC" -eq 0 ] && grep -q "L1" "$T/out" && ! grep -q $'\x1b' "$T/out"; then ok "route: NO_COLOR on a terminal, no escapes"
    else bad "route NO_COLOR" "exit $RC: $(head -c 300 "$T/out" | cat -v)"; fi
    script -qec "$MOE route --model $R --prompt 'the fox' --threads 1" /dev/null >"$T/out" 2>&1
    grep -q $'\x1b\[' "$T/out" && grep -q "colour = top expert of layer 1" "$T/out" && ok "route: coloured on a terminal" \
        || bad "route colour" "$(head -c 300 "$T/out" | cat -v)"
    run "$MOE" route --model "$R" --prompt "the fox" --threads 1
    [ "$RC" -eq 0 ] && ! grep -q $'\x1b' "$T/out" && grep -qE '^ +0 +[0-9]+  ".*"  \| L1  [0-3]:[0-9.]+  [0-3]:[0-9.]+$' "$T/out" \
        && ok "route: plain table into a pipe" || bad "route plain" "exit $RC: $(head -c 300 "$T/out" | cat -v)"
    expect "route: dense layer" 1 "layer 0 is a dense layer" "$MOE" route --model "$R" --prompt x --layer 0
    expect "route: layer out of range" 1 "layer 7 is out of range" "$MOE" route --model "$R" --prompt x --layer 7
    expect "route: no text" 2 "--prompt TEXT or --data PATH is required" "$MOE" route --model "$R"
    expect "route: both texts" 2 "not both" "$MOE" route --model "$R" --prompt x --data "$T/dom"

    run "$MOE" eval --model "$R" --data "$T/dom" --seq 16 --threads 1; cp "$T/out" "$T/eval.plain"
    run "$MOE" eval --model "$R" --data "$T/dom" --seq 16 --threads 1 --domains
    if [ "$RC" -eq 0 ] && [ "$(head -n 2 "$T/out")" = "$(cat "$T/eval.plain")" ] && grep -qE "^domain code +loss [0-9.]+ " "$T/out" \
       && grep -qE "^domain prose +loss [0-9.]+ " "$T/out"; then ok "eval --domains: the plain lines (loss, standard error) and one line per domain"
    else bad "eval --domains" "exit $RC: $(cat "$T/out") vs $(cat "$T/eval.plain")"; fi
    cp "$T/out" "$T/eval.dom"
    changed=0
    for e in 0 1 2 3; do
        run "$MOE" eval --model "$R" --data "$T/dom" --seq 16 --threads 1 --disable-expert 1:$e
        grep -q "^disabled experts (layer:expert): 1:$e$" "$T/out" || bad "eval --disable-expert 1:$e" "$(cat "$T/out" "$T/err")"
        [ "$(grep '^domain' "$T/out")" != "$(grep '^domain' "$T/eval.dom")" ] && changed=$((changed + 1))
    done
    [ $changed -ge 3 ] && ok "eval --disable-expert changes the domain losses ($changed of 4 experts)" \
        || bad "eval --disable-expert" "only $changed of 4 ablations changed a loss"
    run "$MOE" eval --model "$R" --data "$T/dom" --seq 16 --threads 1 --disable-expert 1:0 --disable-expert 1:1
    [ "$RC" -eq 0 ] && grep -q "^disabled experts (layer:expert): 1:0 1:1$" "$T/out" && ok "eval: --disable-expert repeats" \
        || bad "eval --disable-expert twice" "exit $RC: $(cat "$T/err")"
    expect "eval: disable in a dense layer" 1 "layer 0 is a dense layer" "$MOE" eval --model "$R" --data "$T/dom" --disable-expert 0:1
    expect "eval: disable layer out of range" 1 "layer 5 is out of range" "$MOE" eval --model "$R" --data "$T/dom" --disable-expert 5:1
    expect "eval: disable expert out of range" 1 "expert 4 is out of range" "$MOE" eval --model "$R" --data "$T/dom" --disable-expert 1:4
    expect "eval: malformed disable spec" 2 "is not LAYER:EXPERT" "$MOE" eval --model "$R" --data "$T/dom" --disable-expert 1-2

    if [ -f "$T/conv.gguf" ]; then # a published (llama) layout
        run "$MOE" route --model "$T/conv.gguf" --prompt "the fox" --json --threads 1
        [ "$RC" -eq 0 ] && "$PY" -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; assert r and r[0]["layers"][0]["experts"]' "$T/out" \
            && ok "route: a published llama-layout file" || bad "route published" "exit $RC: $(head -c 300 "$T/err")"
    fi
    # moe report: one self-contained HTML page and report.json with the same numbers
    run "$MOE" train --data "$T/dom" "${TINY[@]}" --set n_layers=2 --set moe_first_dense=1 --steps 5 --batch 4 --seq 16 \
        --threads 1 --eval-every 0 --out "$T/rt-old.gguf"
    run "$MOE" report --model "$R" --data "$T/dom" --log "$T/rt.jsonl" --compare "$T/rt-old.gguf" --max-tokens 600 \
        --prompt 'the <fox> & "dog"' --threads 1 --out "$T/rep.html"
    if [ "$RC" -eq 0 ] && [ -s "$T/rep.html" ] && "$PY" -c '
import json, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
E, k, L = d["n_experts"], d["top_k"], d["layers"]
assert (E, k, L) == (4, 2, [1]) and d["tokens"] == 600, (E, k, L, d["tokens"])
assert d["domains"] == ["code", "prose"] and sum(d["domain_tokens"]) == 600 and min(d["domain_tokens"]) > 100
assert abs(sum(d["load"][0]) - 1) < 1e-4
for row in d["domain_share"][0]: assert abs(sum(row) - k) < 1e-4          # k experts per token
for i, row in enumerate(d["coactivation"][0]): assert row[i] in (0, 1) and all(0 <= v <= 1 for v in row)
o = d["saturation"]["overlap"][0]; assert 0 <= o <= 1
assert len(d["training"]["step"]) == 20 and len(d["training"]["maxvio"][0]) == 20
assert "".join(t["text"] for t in d["view"]) == "the <fox> & \"dog\""
assert all(len(e) > 0 for e in d["vocabulary"]["top"][0]) and 0 < d["vocabulary"]["favourite_share"][0] <= 1
' "$T/rep.json"; then ok "report: report.json parses and its numbers add up"
    else bad "report" "exit $RC: $(tail -c 400 "$T/err")"; fi
    missing=""
    for sec in load training domains vocabulary coactivation saturation tokens; do
        grep -q "<section id=\"$sec\">" "$T/rep.html" || missing="$missing $sec"
    done
    [ -z "$missing" ] && [ "$(grep -c '<svg' "$T/rep.html")" -ge 7 ] && grep -q 'class="tok" data-i="0"' "$T/rep.html" \
        && grep -q "addEventListener('mouseover'" "$T/rep.html" && ok "report: every section, SVG charts, the hover view" \
        || bad "report sections" "missing:$missing; $(grep -c '<svg' "$T/rep.html") svg"
    ! grep -qiE 'https?://|<link|src=' "$T/rep.html" && ok "report: self-contained (no http(s)://, no links or sources)" \
        || bad "report self-contained" "$(grep -oiE 'https?://[^ ]*|<link[^>]*|src=[^ ]*' "$T/rep.html" | head -3)"
    view=$(grep -o '<div id="view">.*</div></section>' "$T/rep.html" | sed 's/<[^>]*>//g')
    [ "$view" = 'the &lt;fox&gt; &amp; &quot;dog&quot;' ] && ! grep -q '<fox' "$T/rep.html" \
        && ok "report: token text escaped in the HTML" || bad "report escaping" "raw <fox> in the page"
    grep -qE '^report: routing [0-9]+/600 tokens' "$T/err" && ok "report: progress on stderr" || bad "report progress" "$(head -c 200 "$T/err")"
    cp "$T/rep.html" "$T/rep.copy"
    expect "report: refuses to overwrite" 1 "exists|overwrite" "$MOE" report --model "$R" --data "$T/dom" --out "$T/rep.html"
    unchanged "report: existing page left as it was" "$T/rep.html" "$T/rep.copy"
    expect "report: no --out" 2 "--out FILE.html is required" "$MOE" report --model "$R" --data "$T/dom"
    expect "report: missing log" 1 "cannot open the log" "$MOE" report --model "$R" --data "$T/dom" --log "$T/none.jsonl" --out "$T/r2.html"
    "$MOE" train --data "$T/dom" "${TINY[@]}" --set n_experts=8 "${SHORT[@]}" --out "$T/rt8.gguf" >/dev/null 2>&1
    expect "report: --compare of another shape" 1 "different shape" "$MOE" report --model "$R" --data "$T/dom" --compare "$T/rt8.gguf" --out "$T/r3.html"
else bad "train a model for routing analytics" "exit $RC: $(tail -c 300 "$T/err")"; fi


# training precision default: bf16 where AMX or full-rate VDPBF16PS run bf16 matmuls, fp32 elsewhere
run "$MOE" info
if grep -q "bf16: amx_bf16" "$T/out"; then
    grep -q "training precision default on this CPU: bf16" "$T/out" && grep -q "matmul backend on this CPU: amx_bf16 " "$T/out" \
        && ok "info: bf16 is the training default on this AMX CPU" || bad "info: AMX default" "$(cat "$T/out" | tail -3)"
    run "$MOE" info --set matmul=fp32
    grep -q "overridden by --set matmul=fp32" "$T/out" && grep -q "matmul backend on this CPU: avx512 " "$T/out" \
        && ok "info: --set matmul=fp32 overrides the AMX default" || bad "info: fp32 override" "$(tail -3 "$T/out")"
elif grep -q "bf16: avx512_bf16" "$T/out" && grep -q "^vendor_id.*AuthenticAMD" /proc/cpuinfo; then
    # AMD's VDPBF16PS runs at the FMA's rate (Zen 4, Zen 5): bf16 is the faster matmul there
    grep -q "training precision default on this CPU: bf16 matmul inputs (AVX512_BF16" "$T/out" \
        && ok "info: bf16 is the training default on this AMD AVX512_BF16 CPU" || bad "info: AMD bf16 default" "$(tail -3 "$T/out")"
else # no bf16 unit, or Intel's half-rate VDPBF16PS (Sapphire Rapids without AMX granted, its kin)
    grep -q "training precision default" "$T/out" && bad "info: no fast bf16 unit, no bf16 default" "$(tail -3 "$T/out")" \
        || ok "info: fp32 stays the training default without a fast bf16 unit"
fi
MOE_REFERENCE=1 run "$MOE" info
grep -q "training precision default" "$T/out" && bad "info: MOE_REFERENCE=1 keeps fp32" "$(tail -3 "$T/out")" \
    || ok "info: MOE_REFERENCE=1 keeps the fp32 default"

finish
