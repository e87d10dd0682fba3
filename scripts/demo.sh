#!/usr/bin/env bash
# The main job: train the default model on the built-in corpus, then generate.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE:-build/moe}
OUT=${OUT:-model.gguf}
echo "== training the default model on data/corpus-small (writes $OUT, log in train.jsonl)"
"$MOE" train --out "$OUT" --log train.jsonl --force "$@"
echo
"$MOE" info --model "$OUT" | tail -n 6
echo
for prompt in "It is a truth universally acknowledged" "def main(" "Die Datei"; do
    echo "== moe generate --prompt \"$prompt\""
    "$MOE" generate --model "$OUT" --prompt "$prompt" --tokens 80 --temperature 0.7 --seed 1
    echo
done
