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
    "$BUILD/bench/bench_kernels" | tee "$tmp/kernels.txt"
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

# median tokens/s over steps 4..14 of a moe run's log (skip warm-up)
log_rate() {
    $PY -c '
import json, statistics, sys
v = [json.loads(l) for l in open(sys.argv[1])]
v = [x["tokens_per_s"] for x in v if "tokens_per_s" in x and x["step"] > 3]
print(statistics.median(v))' "$1"
}
declare -A moe_rates torch_rates # per precision: tokens/s of each run, space-separated
for r in $(seq "$RUNS"); do
    for mm in fp32 bf16; do
        "$BUILD/moe" train --preset "$PRESET" --set matmul=$mm --steps 14 --batch "$BATCH" --seq "$SEQ" \
            --threads "$THREADS" --eval-every 0 --out "$tmp/bench.gguf" --force --log "$tmp/log.jsonl" \
            2>/dev/null >/dev/null
        moe_rates[$mm]+="$(log_rate "$tmp/log.jsonl") "
    done
done

# one PyTorch measurement: tokens/s of each of RUNS runs (args: torch threads, OpenBLAS threads, matmul)
torch_runs() {
    local rates=() r tcfg out
    for r in $(seq "$RUNS"); do
        tcfg=$($PY -c 'import json,sys; c=json.loads(sys.argv[1]); c.update(batch=int(sys.argv[2]), seq=int(sys.argv[3]), steps=8, warmup=2, threads=int(sys.argv[4]), matmul=sys.argv[5]); print(json.dumps(c))' "$cfg" "$BATCH" "$SEQ" "$1" "$3")
        out=$(OPENBLAS_NUM_THREADS=$2 $PY bench/torch_train.py "$tcfg" --quiet 2>"$tmp/torch.err") || { cat "$tmp/torch.err" >&2; exit 1; }
        rates+=("$($PY -c 'import json,sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$out")")
        $PY -c 'import json,sys; print(json.loads(sys.argv[1]).get("blas","?"))' "$out" >"$tmp/blas"
    done
    echo "${rates[*]}"
}
median() { $PY -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

# PyTorch gets its best thread layout on this machine: its own intra-op threads
# and OpenBLAS's threads compete for the same cores when both are > 1, so try
# each split and keep the fastest (all are printed), in fp32 and in PyTorch's
# own mixed precision (bf16 autocast, oneDNN), set beside moe's matmul=bf16.
layouts=("$THREADS 1" "1 $THREADS" "$THREADS $THREADS")
for mm in fp32 bf16; do
    best_rate=0; best_layout=""
    for layout in "${layouts[@]}"; do
        set -- $layout
        rates=($(torch_runs "$1" "$2" $mm)) || exit 1
        med=$(median "${rates[@]}")
        echo "pytorch $mm  torch threads $1, OpenBLAS threads $2: tokens/s per run: ${rates[*]}   median $med"
        if $PY -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$med" "$best_rate"; then
            best_rate=$med; best_layout="torch threads $1, OpenBLAS threads $2"
            torch_rates[$mm]="${rates[*]}"
        fi
    done
    echo "pytorch $mm  best layout: $best_layout"
done
blas=$(cat "$tmp/blas")

touch "$tmp/kernels.txt"
$PY - "$blas" "${moe_rates[fp32]}" "${moe_rates[bf16]}" "${torch_rates[fp32]}" "${torch_rates[bf16]}" \
    "$cfg" "$SEQ" "$tmp/kernels.txt" <<'PYEOF'
import json, re, statistics, sys
blas = sys.argv[1]
mf, mb, tf, tb = ([float(x) for x in a.split()] for a in sys.argv[2:6])
cfg, seq, kernels = json.loads(sys.argv[6]), int(sys.argv[7]), open(sys.argv[8]).read()
med = statistics.median
def row(name, v):
    print(f"{name:<34} tokens/s per run: {', '.join(f'{x:,.0f}' for x in v)}   median {med(v):,.0f}")
row("moe matmul=fp32", mf)
row("moe matmul=bf16", mb)
row(f"pytorch fp32 (BLAS: {blas})", tf)
row("pytorch bf16 autocast", tb)
print(f"ratio moe fp32 / pytorch fp32 (medians): {med(mf) / med(tf):.2f}x")
print(f"ratio moe bf16 / pytorch bf16 autocast:   {med(mb) / med(tb):.2f}x")
print(f"ratio moe bf16 / pytorch fp32:            {med(mb) / med(tf):.2f}x")

# The ceiling: matmul work alone (projections, attention products, router,
# experts, lm head; forward + backward = 3x the forward) at the machine's
# measured peak. Elementwise work is left out, so this bounds tokens/s from above.
sys.path.insert(0, "tests/ref")
import model_ref  # the reference model's config: layer kinds, head and shared-expert sizes
def matmul_flops_per_token(c, T):
    d, H, KVH, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    macs = d * c.vocab_size
    for l in range(c.n_layers):
        macs += d * H * hd * 2 + d * KVH * hd * 2 + 2 * H * hd * (T + 1) / 2
        if c.layer_is_moe(l):
            macs += d * c.n_experts + 3 * d * c.top_k * c.d_expert + 3 * d * c.d_shared_total
        else:
            macs += 3 * d * c.d_ff
    return 2 * 3 * macs
peak = {}
for name, key in (("fma loop", "fp32"), ("bf16 dot loop", "bf16")):
    m = re.search(r"peak\s+" + name + r".*?(\d+) threads\s+([\d.]+) GFLOP/s", kernels)
    if m: peak[key] = float(m.group(2))
ref_cfg = model_ref.Config(**{k: v for k, v in cfg.items() if k in model_ref.Config.DEFAULTS})
fpt = matmul_flops_per_token(ref_cfg, seq)
print(f"matmul work per token (forward + backward): {fpt / 1e6:.1f} MFLOP")
for name, v in (("moe fp32", mf), ("moe bf16", mb), ("pytorch fp32", tf), ("pytorch bf16", tb)):
    gf = med(v) * fpt / 1e9
    key = name.split()[1]
    frac = f" = {100 * gf / peak[key]:.0f}% of the measured {key} peak" if key in peak else ""
    print(f"  {name:<13} matmuls at {gf:6.1f} GFLOP/s{frac}")
for key, torch_v in (("fp32", tf), ("bf16", tb)):
    if key in peak:
        best = peak[key] * 1e9 / fpt
        print(f"ceiling {key}: at 100% of the {key} peak the matmuls alone allow {best:,.0f} tokens/s"
              f" = {best / med(torch_v):.2f}x pytorch {key}")
PYEOF
