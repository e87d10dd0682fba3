# Sourced by the shell tests: the moe binary (MOE_BIN, else build/moe), pass
# and fail counters with ok/bad, a temporary directory T removed on exit, and
# skip (counted apart, never as passed), the closing "N passed, N failed, N skipped"
# line via finish. Usage: . tests/lib.sh NAME (KEEP=1 keeps T and prints its path)
MOE=${MOE_BIN:-$PWD/build/moe}
pass=0; failed=0; skipped=0
ok()     { echo "ok   $1"; pass=$((pass + 1)); }
bad()    { echo "FAIL $1: $2"; failed=$((failed + 1)); }
skip()   { echo "skip $1: $2"; skipped=$((skipped + 1)); }
finish() { echo "$pass passed, $failed failed, $skipped skipped"; [ "$failed" -eq 0 ]; exit $?; }
if [ ! -x "$MOE" ]; then bad binary "$MOE is not executable (build it with make)"; finish; fi
T=$(mktemp -d "${TMPDIR:-/tmp}/moe-$1.XXXXXX")
[ -n "${KEEP:-}" ] && echo "keeping $T" || trap 'rm -rf "$T"' EXIT
