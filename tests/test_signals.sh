#!/usr/bin/env bash
# tests/test_signals.sh: interruptions with real signals, driving the moe binary (MOE_BIN).
#  - SIGINT mid-training: exit 130, checkpoint and state saved, the printed
#    resume command works and ends with the model and state of a run never
#    interrupted, byte for byte; SIGTERM likewise with 143.
#  - Two signals: out at once (no save), the last checkpoint loads and resumes.
#  - --save-minutes: a checkpoint appears while the run goes on, so a kill -9
#    loses at most that interval; with 0 (and no --save-every) none does.
#  - moe eval: Ctrl-C prints the result so far marked partial, exit 130;
#    moe generate: SIGTERM stops it with 143.
# No fixed sleeps before a signal: each waits for the output that shows the
# process is where the signal should find it.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh signals
cd "$T"

awk 'BEGIN { srand(7); split("the a fox dog runs jumps over under quick lazy brown river tree " \
     "stone light dark north wind rain sun moon", w, " ");
     for (i = 0; i < 400; i++) { s = ""; for (j = 0; j < 12; j++) s = s w[int(rand() * 22) + 1] " ";
     print s "." } }' >small.txt
TINY=(--set d_model=32 --set n_layers=1 --set n_heads=2 --set n_kv_heads=1 --set d_ff=64
      --set n_experts=4 --set top_k=2 --set d_expert=32 --set max_seq=32 --set vocab_size=300)
STEPS=2000
RUN=(--data small.txt "${TINY[@]}" --steps $STEPS --batch 2 --seq 16 --threads 1 --eval-every 0)

# wait_for FILE PATTERN [PID]: until FILE has a line matching PATTERN (10 s at most);
# fails early when PID has exited
wait_for() {
    for _ in $(seq 500); do
        grep -qE -- "$2" "$1" 2>/dev/null && return 0
        [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null && return 1
        sleep 0.02
    done
    return 1
}

# reap PID: its exit status in RC, waiting 120 s at most (then SIGKILL and RC=999: a
# process that ignores a signal must fail the test, not hang it)
reap() {
    for _ in $(seq 6000); do kill -0 "$1" 2>/dev/null || break; sleep 0.02; done
    if kill -0 "$1" 2>/dev/null; then kill -9 "$1"; wait "$1" 2>/dev/null; RC=999; return; fi
    wait "$1"; RC=$?
}

# the uninterrupted reference
if "$MOE" train "${RUN[@]}" --out ref.gguf >/dev/null 2>ref.err; then ok "reference run of $STEPS steps"
else bad "reference run" "$(tail -n 3 ref.err)"; fi

# interrupted SIG STATUS NAME: interrupt a fresh run with SIG once it reports a
# step, then resume it with the command it printed
interrupted() {
    local sig=$1 want=$2 out=$3.gguf
    "$MOE" train "${RUN[@]}" --out "$out" --log "$3.jsonl" >"$3.out" 2>"$3.err" &
    local pid=$!
    wait_for "$3.err" "^step [0-9]+/" $pid
    kill -"$sig" $pid; reap $pid; local rc=$RC
    local cmd; cmd=$(sed -n 's/^resume with: moe //p' "$3.err")
    if [ $rc -eq "$want" ] && [ -s "$out" ] && [ -s "$out.state" ] && grep -q "^moe train: interrupted (SIG$sig) after step [0-9]*/$STEPS" "$3.err" \
       && [ "$cmd" = "train --resume $out --data small.txt --log $3.jsonl --eval-every 0 --threads 1" ]; then
        ok "SIG$sig mid-training: exit $want, checkpoint and state saved, resume command printed"
    else bad "SIG$sig mid-training" "exit $rc, files: $(ls "$3".* | tr '\n' ' '), stderr: $(tail -c 500 "$3.err")"; return; fi
    local at; at=$(sed -n "s/^moe train: interrupted (SIG$sig) after step \([0-9]*\)\/.*/\1/p" "$3.err")
    [ "$at" -lt $STEPS ] && ok "SIG$sig: stopped early (step $at of $STEPS)" || bad "SIG$sig: stopped early" "ran to $at"
    eval "\"\$MOE\" $cmd" >"$3.out" 2>"$3.err"; rc=$?
    if [ $rc -eq 0 ] && grep -q "^trained $STEPS steps" "$3.out"; then ok "SIG$sig: the printed command resumes to the end"
    else bad "SIG$sig: resume" "exit $rc: $(tail -c 300 "$3.err")"; return; fi
    if cmp -s "$out" ref.gguf && cmp -s "$out.state" ref.gguf.state; then
        ok "SIG$sig: model and state equal the uninterrupted run's, byte for byte"
    else bad "SIG$sig: resumed run equals the reference" "model or state differ"; fi
    # the log has every step once before the interruption and once after it
    local n; n=$(grep -c '"loss"' "$3.jsonl")
    [ "$n" -eq $STEPS ] && ok "SIG$sig: the log has each of the $STEPS steps once" || bad "SIG$sig: log" "$n step records"
}
interrupted INT 130 int
interrupted TERM 143 term

# ---- two signals: the second stops at once ----
# steps of about a second, so the second signal finds the run inside one
SLOW=(--data small.txt --set d_model=128 --set n_layers=2 --set n_heads=4 --set n_kv_heads=2 --set d_ff=256
      --set n_experts=4 --set top_k=2 --set d_expert=128 --set max_seq=128 --set vocab_size=300
      --steps 1000 --batch 64 --seq 128 --threads 1 --eval-every 0 --save-every 1)
"$MOE" train "${SLOW[@]}" --out two.gguf >two.out 2>two.err &
pid=$!
for _ in $(seq 1000); do [ -e two.gguf ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.02; done
if [ -e two.gguf ]; then   # the checkpoint of step 1 is complete (renamed into place)
    kill -INT $pid
    wait_for two.err "stopping after this step" $pid && kill -INT $pid
fi
reap $pid; rc=$RC
if [ $rc -eq 130 ] && grep -q "stopped at once, not saved; the last checkpoint is kept" two.err \
   && ! grep -q "^moe train: interrupted" two.err; then ok "a second SIGINT stops at once, exit 130, no save"
else bad "a second SIGINT stops at once" "exit $rc: $(tail -c 400 two.err)"; fi
if "$MOE" info --model two.gguf >/dev/null 2>info.err; then ok "after two signals the last checkpoint loads"
else bad "after two signals the last checkpoint loads" "$(head -c 300 info.err)"; fi
"$MOE" train --resume two.gguf --data small.txt --threads 1 --eval-every 0 --stop-after 1 >two.out 2>two.err; rc=$?
[ $rc -eq 0 ] && grep -q "^paused at step" two.out && ok "after two signals the run resumes" \
    || bad "after two signals the run resumes" "exit $rc: $(tail -c 300 two.err)"

# ---- time-based checkpoints ----
"$MOE" train "${RUN[@]}" --steps 1000000 --save-minutes 0.001 --out timed.gguf >timed.out 2>timed.err &
pid=$!
wait_for timed.err "^step 1/" $pid
for _ in $(seq 500); do [ -e timed.gguf ] && break; sleep 0.02; done
if kill -0 $pid 2>/dev/null && [ -s timed.gguf ]; then
    kill -9 $pid; wait $pid 2>/dev/null
    grep -q "^checkpoints: every 0.001 min, at the end and on Ctrl-C/SIGTERM, to timed.gguf" timed.err \
        && ok "--save-minutes is announced" || bad "--save-minutes is announced" "$(head -c 400 timed.err)"
    if "$MOE" info --model timed.gguf >/dev/null 2>info.err \
       && "$MOE" train --resume timed.gguf --data small.txt --threads 1 --stop-after 1 >timed.out 2>timed.err; then
        ok "--save-minutes 0.001 checkpoints while the run goes on; after kill -9 it loads and resumes"
    else bad "--save-minutes checkpoint after kill -9" "$(head -c 300 info.err) $(tail -c 300 timed.err)"; fi
else
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    bad "--save-minutes 0.001 checkpoints while the run goes on" "no checkpoint: $(tail -c 300 timed.err)"
fi
"$MOE" train "${RUN[@]}" --steps 1000000 --save-minutes 0 --out untimed.gguf --log untimed.jsonl >untimed.out 2>untimed.err &
pid=$!
wait_for untimed.jsonl '^\{"step":300,' $pid   # far more than 0.001 min
kill -9 $pid; wait $pid 2>/dev/null
[ ! -e untimed.gguf ] && grep -q "^checkpoints: at the end and on" untimed.err \
    && ok "--save-minutes 0 (and no --save-every): no checkpoint before the end" \
    || bad "--save-minutes 0" "a checkpoint appeared, or: $(head -c 300 untimed.err)"

# ---- moe eval: Ctrl-C gives the partial result ----
for _ in $(seq 100); do cat small.txt; done >big.txt
"$MOE" eval --model ref.gguf --data big.txt --seq 32 --threads 1 >eval.out 2>eval.err &
pid=$!
wait_for eval.err "^eval [0-9]+/[0-9]+ tokens" $pid
kill -INT $pid; reap $pid; rc=$RC
total=$(sed -n 's/^eval [0-9]*\/\([0-9]*\) tokens.*/\1/p' eval.err | head -n 1)
got=$(sed -n 's/^loss [0-9.]*  perplexity [0-9.]*  tokens \([0-9]*\)  (partial: interrupted)$/\1/p' eval.out)
if [ $rc -eq 130 ] && [ -n "$got" ] && [ "$got" -gt 0 ] && [ "$got" -lt "$total" ] \
   && grep -q "^moe eval: interrupted (SIGINT) after $got tokens" eval.err; then
    ok "eval stops on SIGINT: exit 130, partial result over $got of $total tokens"
else bad "eval stops on SIGINT" "exit $rc: $(cat eval.out) $(tail -c 300 eval.err)"; fi

# ---- moe generate: SIGTERM (SIGINT is in test_cli.sh) ----
"$MOE" train --data small.txt "${TINY[@]}" --steps 2 --batch 2 --seq 16 --threads 1 --eval-every 0 \
    --set max_seq=32768 --out long.gguf >/dev/null 2>&1
"$MOE" generate --model long.gguf --tokens 32000 --ignore-eos --prompt "the" >gen.out 2>gen.err &
pid=$!
for _ in $(seq 500); do [ -s gen.out ] && break; sleep 0.02; done
kill -TERM $pid; reap $pid; rc=$RC
[ $rc -eq 143 ] && [ -s gen.out ] && grep -q "interrupted (SIGTERM)" gen.err \
    && ok "generate stops on SIGTERM (exit 143, text kept)" || bad "generate stops on SIGTERM" "exit $rc: $(head -c 200 gen.err)"

# ---- the help says it ----
"$MOE" train --help >help.out
grep -q -- "--save-minutes M .*(default: 10)" help.out && grep -q "130 (SIGINT) or 143 (SIGTERM)" help.out \
    && ok "train --help documents --save-minutes and the exit statuses" || bad "train --help" "no --save-minutes or statuses"
finish
