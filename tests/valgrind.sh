#!/usr/bin/env bash
# make valgrind: a tiny train + generate under valgrind's memcheck must report
# no errors and no lost memory. Valgrind does not decode AVX-512, so the binary
# is built for baseline x86-64 (make valgrind does that) and the engine's
# run-time CPU check picks the portable reference kernels.
set -u
MOE=${1:?usage: tests/valgrind.sh MOE_BINARY}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for i in $(seq 400); do echo "The router sends token $i to expert $((i % 4)); the experts learn."; done > "$tmp/text.txt"
vg=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9)
export OMP_NUM_THREADS=1
pass=0; fail=0
check() { # name, command...
    local name=$1; shift
    if "$@" >"$tmp/out" 2>&1; then echo "ok   $name"; pass=$((pass + 1))
    else echo "FAIL $name"; tail -n 30 "$tmp/out"; fail=$((fail + 1)); fi
}
check "valgrind: tiny train" "${vg[@]}" "$MOE" train --preset tiny --set vocab_size=300 --data "$tmp/text.txt" \
    --steps 4 --stop-after 2 --batch 2 --seq 16 --threads 1 --out "$tmp/m.gguf"
check "valgrind: generate" "${vg[@]}" "$MOE" generate --model "$tmp/m.gguf" --prompt "The router" --tokens 8 --threads 1
check "valgrind: resume after pause" "${vg[@]}" "$MOE" train --resume "$tmp/m.gguf" --data "$tmp/text.txt" --threads 1
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
