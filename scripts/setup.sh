#!/usr/bin/env bash
# Installs what moe needs from Debian's archive, only when something is missing.
set -eu
pkgs=(build-essential python3 python3-torch python3-numpy libopenblas0-pthread clang valgrind
      libclang-rt-14-dev libomp-14-dev    # libFuzzer + sanitizer runtimes, OpenMP for clang (make fuzz)
      openmpi-bin libopenmpi-dev)         # make MPI=1: the distributed moe and its tests
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "setup: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
