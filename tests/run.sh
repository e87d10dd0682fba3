#!/usr/bin/env bash
# Runs every test program and script, sums their "N passed, N failed[, N skipped]"
# lines, and ends with the total (skips count as neither passed nor failed). Exits non-zero if anything failed or did not report.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export MOE_BIN="$PWD/$BUILD/moe" BUILD
total_pass=0; total_fail=0; total_skip=0; broken=()
run_one() {   # name, command...
    local name=$1; shift
    local log; log=$(mktemp)
    local t0=$SECONDS
    "$@" >"$log" 2>&1; local rc=$?
    local line; line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        broken+=("$name"); total_fail=$((total_fail + 1))
        echo "== $name: no summary line (exit $rc)"; tail -n 20 "$log"
    else
        local p f s=0; p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
        [[ "$line" =~ ([0-9]+)\ skipped ]] && s=${BASH_REMATCH[1]}
        total_pass=$((total_pass + p)); total_fail=$((total_fail + f)); total_skip=$((total_skip + s))
        if [ "$f" -ne 0 ] || [ $rc -ne 0 ]; then
            [ "$f" -eq 0 ] && total_fail=$((total_fail + 1))
            echo "== $name: $line (exit $rc)"; grep -E 'FAIL|error' "$log" | head -n 40
        else
            echo "== $name: $line ($((SECONDS - t0))s)"
        fi
    fi
    rm -f "$log"
}
only=${1:-}
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    n=$(basename "$t"); [ -n "$only" ] && [[ "$n" != *"$only"* ]] && continue
    run_one "$n" "$t"
done
for t in tests/test_*.sh; do
    [ -f "$t" ] || continue
    n=$(basename "$t"); [ -n "$only" ] && [[ "$n" != *"$only"* ]] && continue
    run_one "$n" bash "$t"
done
echo
echo "$total_pass passed, $total_fail failed, $total_skip skipped"
[ "$total_fail" -eq 0 ]
