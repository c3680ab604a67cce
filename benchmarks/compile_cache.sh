#!/usr/bin/env bash
# What Inductor's on-disk cache saves: train_speed.py twice in new processes over one cache folder that
# starts empty, the first run filling it ("cold cache") and the second reading it ("warm cache"). Each entry
# records run_seconds, the first epoch's images/s (which pays for compiling), and the cache's hits and misses.
# Give train_speed.py's arguments, with a compile option; LABEL (optional) starts each entry's label.
#   bash benchmarks/compile_cache.sh OUT_JSON --data-dir DIR --compile reduce-overhead --variants adios_batched ...
set -euo pipefail
out=${1:?usage: compile_cache.sh OUT_JSON TRAIN_SPEED_ARGUMENTS...}
shift
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
for run in cold warm; do
    TORCHINDUCTOR_CACHE_DIR="$cache" python3 benchmarks/train_speed.py --label "${LABEL:+$LABEL, }$run cache" --out "$out" "$@"
done
