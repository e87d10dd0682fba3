#!/usr/bin/env bash
# tests/test_mpi.sh: distributed training (make MPI=1, build-mpi/moe) on
# loopback, 2 and 4 ranks, against one process of the plain build.
#  1. Data parallelism: N ranks with --batch B give the bits (model file and
#     logged losses) of one process with --batch B/N --grad-accum N: each rank
#     routes its shard as one micro-batch, the gradients add in rank order.
#  2. Expert parallelism alone (--expert-parallel N): the same bits too; with
#     data parallelism on top (4 ranks, groups of 2): the first step's losses
#     equal, the weights after 4 steps within a rounding bound (see there).
#  3. The all-to-all bytes in the log equal the volume each rank's routing
#     implies (rows out and back, forward and backward, plus the counts).
#  4. A checkpoint of 2 ranks resumes on 4 ranks and on one process.
#  5. Bad launches are refused up front; a rank killed mid-step, or stopped,
#     ends the job with an error within a bounded time.
#  6. Inference (generate, eval --expert-parallel N): the tokens and the
#     loss of one process, for our own and published (f32, q8_0) files, and
#     for our own with --mem-budget (one process and 2 ranks);
#     each rank reads only its experts' bytes (its counter), and ranks whose
#     files hold NaN in every other rank's experts still give those bits;
#     a rank killed or stopped during generate ends the job with an error.
#  7. Two hosts: two network namespaces joined by a veth pair, one job over
#     TCP between them (skipped, with the reason, where namespaces are not
#     allowed).
# Skipped, with the reason printed, without mpirun or build-mpi/moe.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh mpi
MPIMOE=${MOE_MPI_BIN:-$PWD/build-mpi/moe}
if ! command -v mpirun >/dev/null; then skip mpi "mpirun not found (scripts/setup.sh installs openmpi-bin)"; finish; fi
if [ ! -x "$MPIMOE" ]; then skip mpi "$MPIMOE not built (make MPI=1)"; finish; fi
# the MPI build is never sanitized (make test builds it plain), so a sanitizer
# pass would only repeat the plain pass's run of the same binary
if [ "${BUILD:-build}" != build ]; then skip mpi "$BUILD: the MPI build is not sanitized; the plain make test runs these"; finish; fi
command -v python3 >/dev/null || { bad python3 "python3 is needed"; finish; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader,tcp
MPIRUN=(mpirun --oversubscribe --bind-to none)

python3 - "$T/corpus.txt" <<'PY'
import random, sys
random.seed(5)
words = "the expert router token sparse model learns a mixture of layers and gates choose two".split()
with open(sys.argv[1], "w") as f:
    for d in range(40):
        f.write(" ".join(random.choice(words) for _ in range(200)) + "\n\f\n")
PY
CONFIG=(--preset tiny --set vocab_size=300 --set d_model=32 --set n_layers=2 --set n_heads=2
        --set n_kv_heads=1 --set d_ff=32 --set d_expert=16 --set max_seq=32 --set capacity_factor=0)
RUN=(--steps 4 --seq 16 --eval-every 0 --threads 1 --data "$T/corpus.txt" --force)
# step loss ce aux z grad_norm, one line per training record
losses() {
    python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "loss" in r: print(r["step"], *(r.get(k) for k in ("loss", "ce", "aux", "z", "grad_norm")))
PY
}
# one process: the plain build
ONE=("$MOE")
one()  { "${ONE[@]}" train "${CONFIG[@]}" "${RUN[@]}" "$@" >/dev/null 2>"$T/err"; }
mpi()  { local n=$1; shift; timeout 120 "${MPIRUN[@]}" -np "$n" "$MPIMOE" train "${CONFIG[@]}" "${RUN[@]}" "$@" >"$T/out" 2>"$T/err"; }
same() { # name, model a, model b
    if cmp -s "$2" "$3" && [ "$(losses "$2.jsonl")" = "$(losses "$3.jsonl")" ]; then ok "$1"
    else bad "$1" "models or logged losses differ"; fi
}
# weights of two models within a bound: the largest absolute difference and
# the relative L2 norm of the difference (numpy: /usr/bin/python3)
close() { # name, model a, model b, max abs bound, relative L2 bound
    local r
    r=$(/usr/bin/python3 - "$2" "$3" "$4" "$5" <<'PY'
import sys
sys.path.insert(0, "tests/ref")
import numpy as np
from gguf_read import GGUFFile
a, b = GGUFFile(sys.argv[1]), GGUFFile(sys.argv[2])
worst, num, den = 0.0, 0.0, 0.0
for name in a.tensors:
    x, y = a.tensor(name).astype(np.float64), b.tensor(name).astype(np.float64)
    d = np.abs(x - y)
    worst, num, den = max(worst, float(d.max())), num + float((d * d).sum()), den + float((x * x).sum())
rel = (num / den) ** 0.5
print("ok" if worst <= float(sys.argv[3]) and rel <= float(sys.argv[4]) else "bad",
      "max |diff| %.3g, relative L2 %.3g" % (worst, rel))
PY
)
    [ "${r%% *}" = ok ] && ok "$1 (${r#* })" || bad "$1" "${r#* } (bounds $4, $5)"
}

# ---- 1. data parallelism: bit for bit ----
one --batch 2 --grad-accum 2 --out "$T/s2.gguf" --log "$T/s2.gguf.jsonl" || bad "one process" "$(tail -n 3 "$T/err")"
one --batch 1 --grad-accum 4 --out "$T/s4.gguf" --log "$T/s4.gguf.jsonl" || bad "one process" "$(tail -n 3 "$T/err")"
if mpi 2 --batch 4 --out "$T/dp2.gguf" --log "$T/dp2.gguf.jsonl"; then
    same "2 ranks, data parallel = one process with batch/2 and grad-accum 2" "$T/s2.gguf" "$T/dp2.gguf"
else bad "2 ranks data parallel" "$(tail -n 5 "$T/err")"; fi
if mpi 4 --batch 4 --out "$T/dp4.gguf" --log "$T/dp4.gguf.jsonl"; then
    same "4 ranks, data parallel = one process with batch/4 and grad-accum 4" "$T/s4.gguf" "$T/dp4.gguf"
else bad "4 ranks data parallel" "$(tail -n 5 "$T/err")"; fi

# ---- 1b. the sharded optimizer ----
# Each rank updates its shard of the parameters (whole units of 65,536) and
# the shards are gathered; the model above fits in one unit, so this one has
# 335K parameters (6 units: every one of 4 ranks owns some). A checkpoint
# saved mid-run gathers the optimizer's moments from the shards: resuming it
# on 2 ranks gives the bits of the run that was never stopped.
WIDE=(--set d_model=96 --set d_ff=96 --set d_expert=96)
one "${WIDE[@]}" --batch 2 --grad-accum 2 --out "$T/w1.gguf" --log "$T/w1.gguf.jsonl" || bad "one process, wide" "$(tail -n 3 "$T/err")"
if mpi 2 "${WIDE[@]}" --batch 4 --out "$T/w2.gguf" --log "$T/w2.gguf.jsonl"; then
    same "sharded optimizer, 2 ranks = one process (335K parameters)" "$T/w1.gguf" "$T/w2.gguf"
else bad "2 ranks, wide" "$(tail -n 5 "$T/err")"; fi
one "${WIDE[@]}" --batch 1 --grad-accum 4 --out "$T/w4a.gguf" --log "$T/w4a.gguf.jsonl" || bad "one process, wide" "$(tail -n 3 "$T/err")"
if mpi 4 "${WIDE[@]}" --batch 4 --out "$T/w4.gguf" --log "$T/w4.gguf.jsonl"; then
    same "sharded optimizer, 4 ranks = one process (335K parameters)" "$T/w4a.gguf" "$T/w4.gguf"
else bad "4 ranks, wide" "$(tail -n 5 "$T/err")"; fi
if mpi 2 "${WIDE[@]}" --batch 4 --stop-after 2 --out "$T/wr.gguf" --log "$T/wr.gguf.jsonl" \
        && timeout 120 "${MPIRUN[@]}" -np 2 "$MPIMOE" train --resume "$T/wr.gguf" --threads 1 --data "$T/corpus.txt" \
            --log "$T/wr.gguf.jsonl" >"$T/out" 2>"$T/err"; then
    same "sharded optimizer: stopped after 2 steps and resumed on 2 ranks = the unbroken run" "$T/w2.gguf" "$T/wr.gguf"
else bad "wide stop and resume" "$(tail -n 5 "$T/err")"; fi

# ---- 2. expert parallelism ----
# Expert parallelism alone is bit for bit: an expert's forward is the same
# per row wherever it runs, and its owner sums the weight gradient one
# source rank at a time, from zero, adding them in rank order, as one
# process adds its micro-batches. With data parallelism on top, the owners
# of one expert in different groups each add their group's sources first,
# so the sum is regrouped ((p0+p1)+(p2+p3), not ((p0+p1)+p2)+p3): rounding
# only. Bound after 4 steps: every weight within 2e-5 (1% of one AdamW step
# at lr 2e-3) and 1e-6 relative in L2; a lost row or a wrong gradient moves
# weights by a whole step (routing the 4 shards as 2 moves them by ~7e-3).
if mpi 2 --batch 4 --expert-parallel 2 --out "$T/ep2.gguf" --log "$T/ep2.gguf.jsonl"; then
    same "2 ranks, expert parallel 2 = one process with batch/2 and grad-accum 2" "$T/s2.gguf" "$T/ep2.gguf"
    grep -q "2 ranks: a2a" "$T/err" && ok "progress line shows the all-to-all" || bad "progress line" "no '2 ranks: a2a' in it"
else bad "2 ranks expert parallel" "$(tail -n 5 "$T/err")"; fi
if mpi 4 --batch 4 --expert-parallel 4 --out "$T/ep4.gguf" --log "$T/ep4.gguf.jsonl"; then
    same "4 ranks, expert parallel 4 = one process with batch/4 and grad-accum 4" "$T/s4.gguf" "$T/ep4.gguf"
else bad "4 ranks expert parallel" "$(tail -n 5 "$T/err")"; fi
if mpi 4 --batch 4 --expert-parallel 2 --out "$T/ep2x2.gguf" --log "$T/ep2x2.gguf.jsonl"; then
    if [ "$(losses "$T/s4.gguf.jsonl" | head -n 1)" = "$(losses "$T/ep2x2.gguf.jsonl" | head -n 1)" ]; then
        ok "4 ranks, expert parallel 2 x data parallel 2: the first step's losses equal one process's"
    else bad "expert x data parallel" "first step's losses differ"; fi
    close "4 ranks, expert parallel 2 x data parallel 2: weights after 4 steps ~ one process" \
        "$T/s4.gguf" "$T/ep2x2.gguf" 2e-5 1e-6
else bad "4 ranks expert x data parallel" "$(tail -n 5 "$T/err")"; fi

# ---- 3. bytes: what the routing implies ----
# Rank r of a group of P owns experts [r*E/P, (r+1)*E/P). Per MoE layer and
# micro-batch it sends its rows for other ranks' experts (out) and returns
# the rows others sent it (in), in the forward and again in the backward,
# d floats each, plus E/P row counts to each of the P-1 peers.
for run in ep2 ep4 ep2x2; do
    [ -f "$T/$run.gguf.jsonl" ] || continue
    r=$(python3 - "$T/$run.gguf.jsonl" <<'PY'
import json, sys
d, n_moe, E = 32, 2, 4
bad = []
for line in open(sys.argv[1]):
    j = json.loads(line)
    if "a2a_sent" not in j: continue
    R, P, rows = j["ranks"], j["ep"], j["rank_rows"]
    for r in range(R):
        g0, me, Ep = r - r % P, r % P, E // P
        own = range(me * Ep, (me + 1) * Ep)
        out = sum(rows[r][e] for e in range(E) if e not in own)
        inn = sum(rows[s][e] for s in range(g0, g0 + P) if s != r for e in own)
        want = 2 * (out + inn) * d * 4 + n_moe * (P - 1) * Ep * 4
        if j["a2a_sent"][r] != want or j["a2a_recv"][r] != want or j["a2a_rows_out"][r] != out:
            bad.append("step %d rank %d: sent %d recv %d rows out %d, routing implies %d bytes, %d rows"
                       % (j["step"], r, j["a2a_sent"][r], j["a2a_recv"][r], j["a2a_rows_out"][r], want, out))
        if j["t_a2a"][r] < 0 or j["t_compute"][r] <= 0: bad.append("rank %d: impossible times" % r)
print("ok" if not bad else "; ".join(bad[:3]))
PY
)
    [ "$r" = ok ] && ok "$run: all-to-all bytes per rank and step = the routing's volume" || bad "$run bytes" "$r"
done
python3 - "$T/dp2.gguf.jsonl" <<'PY' && ok "data parallel: no all-to-all, reduction bytes logged" || bad "dp2 log" "a2a bytes or reduce bytes wrong"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"a2a_sent"' in l]
assert recs and all(r["a2a_sent"] == [0, 0] and min(r["reduce_sent"]) > 0 for r in recs)
PY

# ---- 4. resume across rank counts ----
if mpi 2 --batch 4 --expert-parallel 2 --stop-after 2 --out "$T/r.gguf" --log "$T/r.gguf.jsonl"; then
    cp "$T/r.gguf" "$T/r1.gguf"; cp "$T/r.gguf.state" "$T/r1.gguf.state"
    if timeout 120 "${MPIRUN[@]}" -np 4 "$MPIMOE" train --resume "$T/r.gguf" --threads 1 --data "$T/corpus.txt" \
            --log "$T/r.gguf.jsonl" >"$T/out" 2>"$T/err" && [ "$(losses "$T/r.gguf.jsonl" | cut -d' ' -f1 | tr '\n' ' ')" = "1 2 3 4 " ]; then
        ok "a checkpoint of 2 ranks resumes on 4 ranks (steps 3 and 4)"
    else bad "resume on 4 ranks" "$(tail -n 3 "$T/err")"; fi
    if "${ONE[@]}" train --resume "$T/r1.gguf" --threads 1 --data "$T/corpus.txt" --log "$T/r1.jsonl" >/dev/null 2>"$T/err" \
            && [ "$(losses "$T/r1.jsonl" | cut -d' ' -f1 | tr '\n' ' ')" = "3 4 " ]; then
        ok "a checkpoint of 2 ranks resumes on one process"
    else bad "resume on one process" "$(tail -n 3 "$T/err")"; fi
else bad "2 ranks stop-after" "$(tail -n 5 "$T/err")"; fi

# ---- 5. bad launches, dead and hung ranks ----
refused() { # name, expected text, ranks, args...
    local name=$1 want=$2 n=$3; shift 3
    local t0=$SECONDS
    if mpi "$n" "$@" --out "$T/bad.gguf"; then bad "$name" "was accepted"
    elif grep -q "$want" "$T/err" && [ $((SECONDS - t0)) -lt 60 ] && [ ! -f "$T/bad.gguf" ]; then ok "$name refused: $(grep -m1 "$want" "$T/err" | cut -c1-110)"
    else bad "$name" "no '$want' in: $(tail -n 3 "$T/err")"; fi
}
refused "expert-parallel 3 on 2 ranks" "does not divide the 2 ranks" 2 --batch 4 --expert-parallel 3
refused "expert-parallel 3 over 4 experts" "does not divide the model's 4 experts" 3 --batch 3 --expert-parallel 3
refused "batch 3 on 2 ranks" "does not split over the 2 ranks" 2 --batch 3

# each rank writes its pid, so that one rank can be killed or stopped
cat >"$T/rank.sh" <<EOF
#!/bin/sh
echo \$\$ >"$T/pid.\$OMPI_COMM_WORLD_RANK"
exec "$MPIMOE" "\$@"
EOF
chmod +x "$T/rank.sh"
# 2 ranks of a long job (args: the signal for rank 1, a file whose first bytes
# say the job is under way, then the moe command); prints the exit status and
# the seconds from the signal to the job's end
long_run() {
    local sig=$1 ready=$2
    shift 2
    rm -f "$T"/pid.* "$ready"
    MOE_DIST_TIMEOUT=5 timeout 120 "${MPIRUN[@]}" -np 2 "$T/rank.sh" "$@" >"$T/out" 2>"$T/err" &
    local job=$! i
    for i in $(seq 1 200); do [ -s "$ready" ] && [ -f "$T/pid.1" ] && break; sleep 0.1; done
    local t0=$SECONDS
    kill "-$sig" "$(cat "$T/pid.1")" 2>/dev/null
    wait "$job"; local rc=$?
    local took=$((SECONDS - t0))
    [ -f "$T/pid.1" ] && kill -KILL "$(cat "$T/pid.1")" 2>/dev/null
    echo "$rc $took"
}
LONG_TRAIN=(train "${CONFIG[@]}" --steps 100000 --batch 4 --seq 16 --expert-parallel 2 --eval-every 0 --threads 1
            --data "$T/corpus.txt" --force --tokenizer "$T/s2.gguf" --out "$T/long.gguf" --log "$T/long.jsonl")
read -r rc took < <(long_run KILL "$T/long.jsonl" "${LONG_TRAIN[@]}")
if [ "$rc" -ne 0 ] && [ "$took" -le 30 ]; then ok "rank 1 killed mid-run: the job ends (exit $rc) in ${took} s"
else bad "killed rank" "exit $rc after $took s: $(tail -n 3 "$T/err")"; fi
read -r rc took < <(long_run STOP "$T/long.jsonl" "${LONG_TRAIN[@]}")
if [ "$rc" -ne 0 ] && [ "$took" -le 40 ] && grep -q "did not complete within 5 s" "$T/err"; then
    ok "rank 1 stopped mid-run: rank 0 reports '$(grep -m1 -o "[^:]*did not complete within 5 s" "$T/err")' and the job ends in ${took} s"
else bad "hung rank" "exit $rc after $took s: $(tail -n 4 "$T/err")"; fi

# SIGTERM to one rank only: every rank stops after the same step, rank 0
# saves once and prints the resume command, the job exits 143, and the
# checkpoint and its state are there and load
read -r rc took < <(long_run TERM "$T/long.jsonl" "${LONG_TRAIN[@]}")
if [ "$rc" -eq 143 ] && grep -q "interrupted (SIGTERM) after step" "$T/err" \
        && grep -q "resume with: mpirun -np 2 moe train --resume" "$T/err" \
        && [ "$(grep -c "resume with" "$T/err")" -eq 1 ] && [ -s "$T/long.gguf.state" ] \
        && "$MOE" info --model "$T/long.gguf" >/dev/null 2>&1; then
    ok "SIGTERM to rank 1: all ranks stop after the same step, rank 0 saves once, exit 143 in ${took} s"
else bad "SIGTERM to one rank" "exit $rc after $took s: $(grep -v '^step' "$T/err" | tail -n 4)"; fi

# ---- 6. expert-parallel inference: the bits of one process ----
# Every rank runs the same tokens; rank r computes its own experts' rows and
# an all-gather gives every rank all outputs, combined in one process's order.
GEN=(generate --prompt "the expert router" --tokens 40 --temperature 0.9 --seed 7 --ignore-eos --threads 1)
EVAL=(eval --data "$T/corpus.txt" --threads 1 --stats)
"$MOE" convert --to gguf "$T/s2.gguf" "$T/pub.gguf" >/dev/null 2>&1 && "$MOE" convert --quant q8_0 "$T/s2.gguf" "$T/q8.gguf" >/dev/null 2>&1 \
    || bad "convert for inference" "moe convert failed"
exact_loss() { grep -o "loss [0-9.e+-]* (every digit" "$1" | head -n 1; }
for f in s2 pub q8; do
    "${ONE[@]}" "${GEN[@]}" --model "$T/$f.gguf" >"$T/gen1" 2>"$T/err" || bad "$f generate, one process" "$(tail -n 3 "$T/err")"
    "${ONE[@]}" "${EVAL[@]}" --model "$T/$f.gguf" >/dev/null 2>"$T/eval1" || bad "$f eval, one process" "$(tail -n 3 "$T/eval1")"
    for n in 2 4; do
        if timeout 120 "${MPIRUN[@]}" -np "$n" "$MPIMOE" "${GEN[@]}" --model "$T/$f.gguf" --expert-parallel "$n" --stats \
                >"$T/gen$n" 2>"$T/err$n" && [ -s "$T/gen1" ] && cmp -s "$T/gen1" "$T/gen$n"; then
            ok "$f: generate on $n ranks, --expert-parallel $n = one process's tokens"
        else bad "$f generate on $n ranks" "tokens differ or failed: $(tail -n 3 "$T/err$n")"; fi
        # the rank's own counter: exactly its experts' bytes read, all of them
        # used at least once on 40 tokens, and never another rank's (the store
        # refuses those: a read of one would be an error)
        r=$(python3 - "$T/err$n" "$n" <<'PY'
import re, sys
n = int(sys.argv[2]); seen = {}
for line in open(sys.argv[1]):
    m = re.search(r"rank (\d+) of (\d+): experts (\d+)\.\.(\d+) of each MoE layer; read (\d+) expert bytes of its (\d+)", line)
    if m: seen[int(m.group(1))] = [int(x) for x in m.groups()[1:]]
bad = [] if sorted(seen) == list(range(n)) else ["ranks reporting: %s" % sorted(seen)]
for r, (size, lo, hi, read, held) in sorted(seen.items()):
    if size != n or (lo, hi) != (r * 4 // n, (r + 1) * 4 // n - 1) or read != held or held <= 0:
        bad.append("rank %d: experts %d..%d, read %d of %d bytes" % (r, lo, hi, read, held))
print("ok" if not bad else "; ".join(bad))
PY
)
        [ "$r" = ok ] && ok "$f: each of $n ranks read exactly its own experts' bytes" || bad "$f bytes read on $n ranks" "$r"
        if timeout 120 "${MPIRUN[@]}" -np "$n" "$MPIMOE" "${EVAL[@]}" --model "$T/$f.gguf" --expert-parallel "$n" \
                >/dev/null 2>"$T/eval$n" && [ -n "$(exact_loss "$T/eval1")" ] && [ "$(exact_loss "$T/eval1")" = "$(exact_loss "$T/eval$n")" ]; then
            ok "$f: eval on $n ranks = one process's $(exact_loss "$T/eval1" | cut -d' ' -f1-2)"
        else bad "$f eval on $n ranks" "'$(exact_loss "$T/eval1")' vs '$(exact_loss "$T/eval$n")': $(tail -n 2 "$T/eval$n")"; fi
    done
done
# our own model with a budget (a share of each rank's experts, and of all on
# one process): mapped, experts through the cache, still one process's bits
"${ONE[@]}" "${GEN[@]}" --model "$T/s2.gguf" >"$T/gen1" 2>/dev/null
"${ONE[@]}" "${EVAL[@]}" --model "$T/s2.gguf" >/dev/null 2>"$T/eval1"
"${ONE[@]}" "${GEN[@]}" --model "$T/s2.gguf" --mem-budget 50% >"$T/genb" 2>"$T/err"
[ -s "$T/gen1" ] && cmp -s "$T/gen1" "$T/genb" && ok "s2: generate --mem-budget 50%, one process = its tokens" \
    || bad "s2 generate --mem-budget 50%" "tokens differ or failed: $(tail -n 3 "$T/err")"
if timeout 120 "${MPIRUN[@]}" -np 2 "$MPIMOE" "${GEN[@]}" --model "$T/s2.gguf" --expert-parallel 2 --mem-budget 50% \
        >"$T/gen2" 2>"$T/err2" && cmp -s "$T/gen1" "$T/gen2"; then
    ok "s2: generate on 2 ranks with --mem-budget 50% of each rank's experts = one process's tokens"
else bad "s2 generate on 2 ranks with a budget" "tokens differ or failed: $(tail -n 3 "$T/err2")"; fi
if timeout 120 "${MPIRUN[@]}" -np 2 "$MPIMOE" "${EVAL[@]}" --model "$T/s2.gguf" --expert-parallel 2 --mem-budget 50% \
        >/dev/null 2>"$T/eval2" && [ -n "$(exact_loss "$T/eval1")" ] && [ "$(exact_loss "$T/eval1")" = "$(exact_loss "$T/eval2")" ]; then
    ok "s2: eval on 2 ranks with --mem-budget 50% = one process's loss"
else bad "s2 eval on 2 ranks with a budget" "'$(exact_loss "$T/eval1")' vs '$(exact_loss "$T/eval2")': $(tail -n 2 "$T/eval2")"; fi
# Rank r gets its own copy of the file with every other rank's experts
# overwritten by NaN (0xff bytes: NaN in f32 and in q8_0's f16 scales); if a
# rank read or used any of them the tokens would change.
poison() { # model, ranks, rank -> copy with the other ranks' experts NaN
    /usr/bin/python3 - "$1" "$2" "$3" "$T/poison.$3.gguf" <<'PY'
import shutil, sys
sys.path.insert(0, "tests/ref")
from gguf_read import GGUFFile
src, n, me, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
f = GGUFFile(src)
shutil.copyfile(src, out)
with open(out, "r+b") as w:
    for name, t in f.tensors.items():
        if not name.endswith("_exps.weight"): continue
        E = t.ne[2]; per = t.n_bytes() // E
        for e in range(E):
            if e * n // E == me: continue
            w.seek(f.data_offset + t.offset + e * per); w.write(b"\xff" * per)
PY
}
for f in s2 q8; do
    poison "$T/$f.gguf" 2 0 && poison "$T/$f.gguf" 2 1 || { bad "$f poison" "could not write the copies"; continue; }
    "${ONE[@]}" "${GEN[@]}" --model "$T/$f.gguf" >"$T/gen1" 2>/dev/null
    "${ONE[@]}" "${GEN[@]}" --model "$T/poison.0.gguf" >"$T/genp" 2>/dev/null
    cmp -s "$T/gen1" "$T/genp" && bad "$f poison" "one process on a poisoned copy gives the same tokens: the check proves nothing"
    if timeout 120 "${MPIRUN[@]}" -np 1 "$MPIMOE" "${GEN[@]}" --model "$T/poison.0.gguf" --expert-parallel 2 : \
            -np 1 "$MPIMOE" "${GEN[@]}" --model "$T/poison.1.gguf" --expert-parallel 2 >"$T/gen2" 2>"$T/err" && cmp -s "$T/gen1" "$T/gen2"; then
        ok "$f: 2 ranks whose files hold NaN in the other rank's experts give one process's tokens"
    else bad "$f poisoned ranks" "tokens differ or failed: $(tail -n 3 "$T/err")"; fi
done
# larger than "this machine": a memory size (MOE_PHYSICAL_MEMORY) between
# what one process needs (every weight) and what one of 4 ranks needs (a
# quarter of the experts): one process refuses to load, 4 ranks run
mem=$(/usr/bin/python3 - "$T/pub.gguf" <<'PY'
import sys
sys.path.insert(0, "tests/ref")
from gguf_read import GGUFFile
f = GGUFFile(sys.argv[1])
data = sum(t.n_bytes() for t in f.tensors.values())
experts = sum(t.n_bytes() for n, t in f.tensors.items() if n.endswith("_exps.weight"))
print(int((data - experts * 3 / 8 + 8192) / 0.9))  # the load wants weights + KV <= 0.9 x memory
PY
)
for f in s2 pub; do
    if MOE_PHYSICAL_MEMORY=$mem "${ONE[@]}" "${GEN[@]}" --model "$T/$f.gguf" >/dev/null 2>"$T/err"; then
        bad "$f larger than memory" "one process loaded it with MOE_PHYSICAL_MEMORY=$mem"
    elif MOE_PHYSICAL_MEMORY=$mem timeout 120 "${MPIRUN[@]}" -x MOE_PHYSICAL_MEMORY -np 4 "$MPIMOE" "${GEN[@]}" --model "$T/$f.gguf" \
            --expert-parallel 4 >"$T/gen4" 2>"$T/err4" && [ -s "$T/gen4" ]; then
        ok "$f: a model one process refuses for memory ($mem bytes) runs on 4 ranks"
    else bad "$f larger than memory on 4 ranks" "$(tail -n 3 "$T/err4")"; fi
done
# bad launches, refused before the model is read
inf_refused() { # name, expected text, ranks, args...
    local name=$1 want=$2 n=$3; shift 3
    if timeout 60 "${MPIRUN[@]}" -np "$n" "$MPIMOE" "$@" >"$T/out" 2>"$T/err"; then bad "$name" "was accepted"
    elif grep -q "$want" "$T/err"; then ok "$name refused: $(grep -m1 "$want" "$T/err" | cut -c1-120)"
    else bad "$name" "no '$want' in: $(tail -n 3 "$T/err")"; fi
}
inf_refused "generate on 2 ranks without --expert-parallel" "give --expert-parallel 2" 2 "${GEN[@]}" --model "$T/s2.gguf"
inf_refused "generate --expert-parallel 4 on 2 ranks" "give --expert-parallel 2" 2 "${GEN[@]}" --model "$T/s2.gguf" --expert-parallel 4
inf_refused "eval --expert-parallel 3 over 4 experts" "does not divide the model's 4 experts" 3 "${EVAL[@]}" --model "$T/s2.gguf" --expert-parallel 3
inf_refused "generate --expert-parallel 2 on one rank" "needs 2 ranks" 1 "${GEN[@]}" --model "$T/s2.gguf" --expert-parallel 2
inf_refused "--mem-budget 0 with expert parallelism" "always read through the expert" 2 "${GEN[@]}" --model "$T/pub.gguf" --expert-parallel 2 --mem-budget 0

# a rank killed or stopped during generation: the other stops with an error
# within a bounded time (the same deadline as training's, on the all-gather
# and on the per-token agreement to stop). A model of 4096 positions keeps
# generating long enough (4000 tokens, many seconds) to be caught mid-run.
if "${ONE[@]}" train "${CONFIG[@]}" --set max_seq=4096 --steps 1 --batch 2 --seq 16 --eval-every 0 --threads 1 \
        --data "$T/corpus.txt" --force --tokenizer "$T/s2.gguf" --out "$T/longctx.gguf" >/dev/null 2>"$T/err"; then
    LONG_GEN=(generate --model "$T/longctx.gguf" --prompt "the expert router" --tokens 4000 --ignore-eos
              --expert-parallel 2 --threads 1)
    read -r rc took < <(long_run KILL "$T/out" "${LONG_GEN[@]}")
    if [ "$rc" -ne 0 ] && [ "$took" -le 30 ] && [ -s "$T/out" ]; then
        ok "rank 1 killed during generate: the job ends (exit $rc) in ${took} s"
    else bad "killed rank during generate" "exit $rc after $took s: $(tail -n 3 "$T/err")"; fi
    read -r rc took < <(long_run STOP "$T/out" "${LONG_GEN[@]}")
    if [ "$rc" -ne 0 ] && [ "$took" -le 40 ] && [ -s "$T/out" ] && grep -q "did not complete within 5 s" "$T/err"; then
        ok "rank 1 stopped during generate: rank 0 reports '$(grep -m1 -o "[^:]*did not complete within 5 s" "$T/err")' and the job ends in ${took} s"
    else bad "hung rank during generate" "exit $rc after $took s: $(tail -n 4 "$T/err")"; fi
else bad "long-context model" "$(tail -n 3 "$T/err")"; fi

# ---- 7. two hosts: network namespaces joined by a veth pair, TCP only ----
# Each "host" is a network namespace (and its own hostname); mpirun starts the
# remote daemon through an rsh agent that enters the other namespace. The
# job must give the bits of one process and its rows must cross the veth.
two_hosts() {
    local a="moea$$" b="moeb$$" va="mva$$" vb="mvb$$"
    if ! ip netns add "$a" 2>/dev/null; then skip "two hosts" "cannot create network namespaces here (ip netns add: not permitted)"; return; fi
    ip netns add "$b" && ip link add "$va" type veth peer name "$vb" && ip link set "$va" netns "$a" && ip link set "$vb" netns "$b" &&
        ip -n "$a" addr add 10.77.0.1/24 dev "$va" && ip -n "$b" addr add 10.77.0.2/24 dev "$vb" &&
        ip -n "$a" link set "$va" up && ip -n "$b" link set "$vb" up && ip -n "$a" link set lo up && ip -n "$b" link set lo up
    if [ $? -ne 0 ]; then skip "two hosts" "could not set up the veth pair"; ip netns del "$a"; ip netns del "$b" 2>/dev/null; return; fi
    cat >"$T/agent.sh" <<AGENT
#!/bin/sh
host=\$1; shift
case "\$host" in 10.77.0.1) ns=$a;; 10.77.0.2) ns=$b;; *) echo "no host \$host" >&2; exit 1;; esac
exec ip netns exec "\$ns" unshare --uts sh -c 'hostname "\$0"; exec sh -c "\$*"' "\$ns" "\$@"
AGENT
    chmod +x "$T/agent.sh"
    printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' >"$T/hosts"
    local rx0 rx1
    rx0=$(ip netns exec "$b" cat "/sys/class/net/$vb/statistics/rx_bytes")
    if timeout 120 ip netns exec "$a" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$a" \
            mpirun --hostfile "$T/hosts" -np 2 --mca plm_rsh_agent "$T/agent.sh" --mca btl self,tcp \
            --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
            "$MPIMOE" train "${CONFIG[@]}" "${RUN[@]}" --batch 4 --expert-parallel 2 \
            --out "$T/hosts2.gguf" --log "$T/hosts2.gguf.jsonl" >"$T/out" 2>"$T/err"; then
        rx1=$(ip netns exec "$b" cat "/sys/class/net/$vb/statistics/rx_bytes")
        same "two hosts over TCP, expert parallel 2 = one process with batch/2 and grad-accum 2" "$T/s2.gguf" "$T/hosts2.gguf"
        local need
        need=$(python3 -c "import json,sys; print(sum(json.loads(l)['a2a_recv'][1] for l in open(sys.argv[1]) if 'a2a_recv' in l))" "$T/hosts2.gguf.jsonl")
        [ $((rx1 - rx0)) -ge "$need" ] && ok "two hosts: the second host's veth received $((rx1 - rx0)) bytes, at least the $need all-to-all bytes logged" \
            || bad "two hosts traffic" "veth received $((rx1 - rx0)) bytes, fewer than the $need logged"
    else
        bad "two hosts" "$(tail -n 5 "$T/err")"
    fi
    ip netns del "$a"; ip netns del "$b"
}
two_hosts
finish
