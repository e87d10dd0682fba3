#!/usr/bin/env bash
# tests/test_crash.sh: crash safety of training, driving the moe binary (MOE_BIN).
#  1. SIGKILL at random moments (mid-step and mid-save), 20 times: after each
#     kill the last checkpoint loads (moe info --model) and resuming continues;
#     the finished run's model, state and logged losses equal a straight run's
#     bit for bit.
#  2. A save past a file-size limit (ulimit -f, like a full disk) fails with a
#     clear error and leaves the previous checkpoint intact and resumable.
#  3. A non-finite layer output (a checkpoint whose weights hold Inf) stops
#     training with a message naming the step and the layer; the checkpoint
#     is left as it was.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh crash
command -v python3 >/dev/null || { bad python3 "python3 is needed"; finish; }
RANDOM=${CRASH_SEED:-4242}   # reproducible kill times

python3 - "$T/corpus.txt" <<'PY'
import random, sys
random.seed(3)
words = "the expert router token sparse model learns a mixture of layers and gates choose two".split()
with open(sys.argv[1], "w") as f:
    for d in range(30):
        f.write(" ".join(random.choice(words) for _ in range(150)) + "\n\f\n")
PY

STEPS=${CRASH_STEPS:-5000}
CONFIG=(--preset tiny --set vocab_size=300 --set d_model=32 --set n_layers=2 --set n_heads=2
        --set n_kv_heads=1 --set d_ff=32 --set d_expert=16 --set max_seq=32)
RUN=(--eval-every 0 --threads 1 --data "$T/corpus.txt" --save-every 1)
SHAPE=(--batch 2 --seq 16)
# argument lists (the kill loop runs $MOE itself in the background, so $! is moe)
fresh_args()  { ARGS=(train "${CONFIG[@]}" --steps "$1" "${SHAPE[@]}" "${RUN[@]}" --out "$2" --log "$2.jsonl" --force "${@:3}"); }
resume_args() { ARGS=(train --resume "$1" "${RUN[@]}" --log "$1.jsonl" "${@:2}"); }
fresh()  { fresh_args "$@"; "$MOE" "${ARGS[@]}"; }
resume() { resume_args "$@"; "$MOE" "${ARGS[@]}"; }
# step -> losses of a JSONL log, one "step loss ce aux z grad_norm" line per record (repeats kept)
losses() {
    python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try: r = json.loads(line)
    except ValueError: continue     # a line cut by a kill
    if "loss" in r:
        print(r["step"], *(r.get(k) for k in ("loss", "ce", "aux", "z", "grad_norm")))
PY
}

# ---- 1. kills ----
t0=$SECONDS
if fresh "$STEPS" "$T/straight.gguf" --save-every 0 >/dev/null 2>"$T/err"; then ok "straight run of $STEPS steps"
else bad "straight run" "$(tail -n 3 "$T/err")"; fi

B="$T/b.gguf"
kills=0; mid_save=0; loaded=0; load_fail=0; finished_early=0
for i in $(seq 1 20); do
    # odd rounds checkpoint every step (kills mostly land in a save), even
    # rounds every 7th (kills mostly land mid-step)
    every=$((i % 2 ? 1 : 7))
    if [ -f "$B" ]; then resume_args "$B" --save-every $every; else fresh_args "$STEPS" "$B" --save-every $every; fi
    "$MOE" "${ARGS[@]}" >/dev/null 2>"$T/err" &
    pid=$!
    sleep "0.$(printf '%03d' $((20 + RANDOM % 230)))"
    if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); else finished_early=$((finished_early + 1)); fi
    wait "$pid" 2>/dev/null
    ls "$T"/b.gguf*.tmp >/dev/null 2>&1 && mid_save=$((mid_save + 1))
    if [ -f "$B" ]; then
        if "$MOE" info --model "$B" >/dev/null 2>"$T/err"; then loaded=$((loaded + 1))
        else load_fail=$((load_fail + 1)); echo "   kill $i: checkpoint does not load: $(head -c 300 "$T/err")"; fi
    fi
done
[ "$load_fail" -eq 0 ] && [ "$loaded" -gt 0 ] && ok "after $kills kills ($mid_save left a save's temporary file) the checkpoint loaded $loaded times" \
    || bad "checkpoint after kill" "$load_fail of $((loaded + load_fail)) checkpoints did not load"
[ "$kills" -ge 15 ] && ok "killed $kills times (run finished before the kill $finished_early times)" \
    || bad "kills" "only $kills kills landed (raise CRASH_STEPS)"

done_ok=0
for attempt in 1 2 3; do
    if [ -f "$B" ]; then resume "$B" --save-every 0 >"$T/out" 2>"$T/err"; else fresh "$STEPS" "$B" >"$T/out" 2>"$T/err"; fi
    rc=$?
    if [ $rc -eq 0 ]; then done_ok=1; break; fi
    grep -q "already complete" "$T/err" && { done_ok=1; break; }
    echo "   resume attempt $attempt: exit $rc: $(tail -n 2 "$T/err")"
done
[ $done_ok -eq 1 ] && ok "resumed to the end" || bad "resume after kills" "$(tail -n 3 "$T/err")"
cmp -s "$T/straight.gguf" "$B" && ok "final model equals the straight run's bit for bit" \
    || bad "final model" "differs from the straight run"
cmp -s "$T/straight.gguf.state" "$B.state" && ok "final training state equals the straight run's" \
    || bad "final state" "differs from the straight run"
losses "$T/straight.gguf.jsonl" | sort -u >"$T/l_straight"
losses "$B.jsonl" | sort -u >"$T/l_killed"
n_straight=$(wc -l <"$T/l_straight")
if [ "$n_straight" -eq "$STEPS" ] && cmp -s "$T/l_straight" "$T/l_killed"; then
    ok "logged losses of all $STEPS steps equal the straight run's (re-run steps included)"
else
    bad "logged losses" "$(diff "$T/l_straight" "$T/l_killed" | head -n 4 | tr '\n' ' ')"
fi
echo "   (kill test: $((SECONDS - t0)) s)"

# ---- 2. a save that hits a file-size limit ----
C="$T/c.gguf"
fresh 6 "$C" --stop-after 2 >/dev/null 2>"$T/err" || bad "setup for file-size limit" "$(tail -n 2 "$T/err")"
sum_before=$(cat "$C" "$C.state" | md5sum)
( ulimit -f 64; exec "$MOE" train --resume "$C" "${RUN[@]}" --log "$C.jsonl" ) >/dev/null 2>"$T/err"; rc=$?
if [ $rc -eq 1 ] && grep -qiE '^moe: error: .*(file too large|no space)' "$T/err"; then
    ok "save past a 64 KB file-size limit fails with a clear error: $(grep -m1 '^moe: error' "$T/err" | cut -c1-110)"
else
    bad "file-size limit" "exit $rc: $(head -c 300 "$T/err")"
fi
[ "$(cat "$C" "$C.state" | md5sum)" = "$sum_before" ] && ok "previous checkpoint unchanged after the failed save" \
    || bad "file-size limit" "the previous checkpoint changed"
ls "$T"/c.gguf*.tmp >/dev/null 2>&1 && bad "file-size limit" "left temporary files: $(ls "$T"/c.gguf*.tmp)" \
    || ok "no temporary files left behind"
"$MOE" info --model "$C" >/dev/null 2>&1 && resume "$C" >/dev/null 2>"$T/err" \
    && ok "the kept checkpoint loads and resumes to the end" || bad "resume after full disk" "$(tail -n 2 "$T/err")"

# ---- 3. a kill between a save's two renames (made by hand) ----
# model at step 2, STATE at step 1, STATE.tmp at step 2: resuming must use STATE.tmp
E="$T/e.gguf"
fresh 6 "$E" --stop-after 1 >/dev/null 2>"$T/err" && cp "$E.state" "$T/state1" \
    && resume "$E" --stop-after 1 >/dev/null 2>>"$T/err" && mv "$E.state" "$E.state.tmp" && cp "$T/state1" "$E.state" \
    || bad "setup for the rename window" "$(tail -n 2 "$T/err")"
if resume "$E" >/dev/null 2>"$T/err" && cmp -s "$E" "$C"; then
    ok "a save cut between its renames resumes from STATE.tmp, ending equal to an uninterrupted run"
else
    bad "rename window" "$(tail -n 2 "$T/err")"
fi
# and with no STATE at all yet (the first save cut the same way)
fresh 6 "$E" --stop-after 1 >/dev/null 2>"$T/err" && mv "$E.state" "$E.state.tmp" \
    && resume "$E" >/dev/null 2>"$T/err" && cmp -s "$E" "$C" \
    && ok "a first save cut between its renames resumes too" || bad "rename window (first save)" "$(tail -n 2 "$T/err")"

# ---- 4. a layer output that is not finite ----
D="$T/d.gguf"
fresh 6 "$D" --stop-after 2 >/dev/null 2>"$T/err" || bad "setup for NaN" "$(tail -n 2 "$T/err")"
# a checkpoint whose layer-1 expert down-projections hold +Inf
python3 - "$D" blk.1.ffn_down_exps.weight <<'PY' || bad "NaN setup" "could not patch the GGUF"
import struct, sys
path, name = sys.argv[1], sys.argv[2].encode()
b = bytearray(open(path, "rb").read())
pos = 8
n_t, n_kv = struct.unpack_from("<QQ", b, pos); pos += 16
def string():
    global pos
    (n,) = struct.unpack_from("<Q", b, pos); pos += 8 + n
    return bytes(b[pos - n:pos])
size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
align = 32
def value(t):
    global pos
    if t == 8: return string()
    if t == 9:
        et, n = struct.unpack_from("<IQ", b, pos); pos += 12
        for _ in range(n): value(et)
        return None
    pos += size[t]
    return struct.unpack_from("<I", b, pos - 4)[0] if t == 4 else None
for _ in range(n_kv):
    k = string(); (t,) = struct.unpack_from("<I", b, pos); pos += 4
    v = value(t)
    if k == b"general.alignment": align = v
target = None
for _ in range(n_t):
    nm = string(); (nd,) = struct.unpack_from("<I", b, pos); pos += 4
    ne = struct.unpack_from("<%dQ" % nd, b, pos); pos += 8 * nd
    ty, off = struct.unpack_from("<IQ", b, pos); pos += 12
    if nm == name:
        count = 1
        for e in ne: count *= e
        target = (off, count)
data = (pos + align - 1) // align * align
off, count = target
struct.pack_into("<%df" % count, b, data + off, *([float("inf")] * count))
open(path, "wb").write(bytes(b))
PY
sum_before=$(cat "$D" "$D.state" | md5sum)
resume "$D" >/dev/null 2>"$T/err"; rc=$?
msg=$(grep -m1 '^moe: error' "$T/err")
if [ $rc -eq 1 ] && echo "$msg" | grep -q "step 3" && echo "$msg" | grep -q "layer 1"; then
    ok "non-finite layer output stops training: $(echo "$msg" | cut -c1-120)"
else
    bad "non-finite stop" "exit $rc: $(head -c 300 "$T/err")"
fi
[ "$(cat "$D" "$D.state" | md5sum)" = "$sum_before" ] && "$MOE" info --model "$D" >/dev/null 2>&1 \
    && ok "the last checkpoint is kept and loads" || bad "non-finite stop" "the checkpoint changed or does not load"

finish
