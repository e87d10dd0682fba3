#!/usr/bin/env bash
# tests/test_fuzz_replay.sh: replays every seed corpus in tests/fuzz/NAME/
# through its target built as a plain program ($BUILD/fuzz/fuzz_NAME), so the
# fuzzers' seeds and regression inputs run in every `make test` (and under
# ASan/UBSan with SANITIZE=address,undefined). One case per target.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
pass=0; failed=0
for src in tests/fuzz/fuzz_*.c; do
    name=$(basename "$src" .c); name=${name#fuzz_}
    bin="$BUILD/fuzz/fuzz_$name" dir="tests/fuzz/$name"
    if [ ! -x "$bin" ]; then echo "FAIL $name: $bin is not built (make test-bins)"; failed=$((failed + 1)); continue; fi
    if [ ! -d "$dir" ] || [ -z "$(ls -A "$dir")" ]; then echo "FAIL $name: no seeds in $dir"; failed=$((failed + 1)); continue; fi
    log=$(mktemp)
    if timeout -k 5 300 "$bin" "$dir" >"$log" 2>&1; then
        echo "ok   $name: $(grep -o 'replayed [0-9]* inputs' "$log")"; pass=$((pass + 1))
    else
        echo "FAIL $name: exit $?"; grep -vE '^moe' "$log" | tail -n 15; failed=$((failed + 1))
    fi
    rm -f "$log"
done
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
