#!/usr/bin/env bash
# Installs what moe needs from Debian's archive, only when something is missing.
set -eu
pkgs=(build-essential python3 python3-torch python3-numpy libopenblas0-pthread clang valgrind
      libclang-rt-14-dev libomp-14-dev    # libFuzzer + sanitizer runtimes, OpenMP for clang (make fuzz)
      openmpi-bin libopenmpi-dev)         # make MPI=1: the distributed moe and its tests
optional=(chromium)                       # tests/test_report_browser.sh (skipped without it)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=(); missing_opt=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${optional[@]}"; do installed "$p" || missing_opt+=("$p"); done
[ ${#missing[@]} -eq 0 ] && [ ${#missing_opt[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
all=("${missing[@]}" "${missing_opt[@]}")
echo "setup: installing ${all[*]}"
$SUDO apt-get update -qq
[ ${#missing[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# an optional package that cannot be installed leaves its tests to skip, not the setup to fail
for p in "${missing_opt[@]}"; do
    $SUDO apt-get install -y -qq --no-install-recommends "$p" >/dev/null \
        || echo "setup: could not install $p; the tests that need it will skip" >&2
done
