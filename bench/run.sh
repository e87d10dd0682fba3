#!/usr/bin/env bash
# make bench: speed measured side by side in one run.
#  1. kernels: matmul GFLOP/s against this machine's measured FMA peak and memory bandwidth
#  2. training: moe vs a PyTorch model of the same config (bench/torch_train.py), same
#     batch, sequence length and thread count; medians over steps and over runs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUNS=${RUNS:-3}
PRESET=${PRESET:-default}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
THREADS=${THREADS:-$(nproc)}
PY=/usr/bin/python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -x "$BUILD/bench/bench_kernels" ]; then
    echo "== kernels"
    "$BUILD/bench/bench_kernels"
    echo
fi

echo "== training throughput: preset $PRESET, batch $BATCH x seq $SEQ, $THREADS threads, $RUNS runs each"
# the config exactly as the engine has it, passed field by field to PyTorch
cfg=$("$BUILD/moe" info --preset "$PRESET" | $PY -c '
import json, sys
cfg = {}
for line in sys.stdin:
    if " = " in line:
        k, v = [s.strip() for s in line.split(" = ", 1)]
        try: cfg[k] = int(v)
        except ValueError:
            try: cfg[k] = float(v)
            except ValueError: pass
print(json.dumps(cfg))')

moe_rates=()
for r in $(seq "$RUNS"); do
    "$BUILD/moe" train --preset "$PRESET" --steps 14 --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" \
        --eval-every 0 --out "$tmp/bench.gguf" --force --log "$tmp/log.jsonl" 2>/dev/null >/dev/null
    # median tokens/s over steps 4..14 (skip warm-up)
    moe_rates+=("$($PY -c '
import json, statistics, sys
v = [json.loads(l) for l in open(sys.argv[1])]
v = [x["tokens_per_s"] for x in v if "tokens_per_s" in x and x["step"] > 3]
print(statistics.median(v))' "$tmp/log.jsonl")")
done

# PyTorch gets its best thread layout on this machine: its own intra-op threads
# and OpenBLAS's threads compete for the same cores when both are > 1, so try
# each split and keep the fastest (all are printed).
layouts=("$THREADS 1" "1 $THREADS" "$THREADS $THREADS")
best_rate=0; best_layout=""; blas="?"
for layout in "${layouts[@]}"; do
    set -- $layout
    rates=()
    for r in $(seq "$RUNS"); do
        tcfg=$($PY -c 'import json,sys; c=json.loads(sys.argv[1]); c.update(batch=int(sys.argv[2]), seq=int(sys.argv[3]), steps=8, warmup=2, threads=int(sys.argv[4])); print(json.dumps(c))' "$cfg" "$BATCH" "$SEQ" "$1")
        out=$(OPENBLAS_NUM_THREADS=$2 $PY bench/torch_train.py "$tcfg" --quiet 2>"$tmp/torch.err") || { cat "$tmp/torch.err"; exit 1; }
        rates+=("$($PY -c 'import json,sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$out")")
        blas=$($PY -c 'import json,sys; print(json.loads(sys.argv[1]).get("blas","?"))' "$out")
    done
    med=$($PY -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "${rates[@]}")
    echo "pytorch  torch threads $1, OpenBLAS threads $2: tokens/s per run: ${rates[*]}   median $med"
    if $PY -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$med" "$best_rate"; then
        best_rate=$med; best_layout="torch threads $1, OpenBLAS threads $2"; torch_rates=("${rates[@]}")
    fi
done
echo "pytorch  best layout: $best_layout"

$PY - "$blas" "${moe_rates[*]}" "${torch_rates[*]}" <<'PYEOF'
import statistics, sys
blas, m, t = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
mm, tm = statistics.median(m), statistics.median(t)
print(f"moe      tokens/s per run: {', '.join(f'{x:,.0f}' for x in m)}   median {mm:,.0f}")
print(f"pytorch  tokens/s per run: {', '.join(f'{x:,.0f}' for x in t)}   median {tm:,.0f}   (BLAS: {blas})")
print(f"ratio moe / pytorch (medians): {mm / tm:.2f}x")
PYEOF
