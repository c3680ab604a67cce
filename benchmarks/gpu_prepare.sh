#!/usr/bin/env bash
# What the GPU runs carry, made here before the first device call (both folders are git-ignored):
#   .whl/   the pure-Python packages adios-pl imports that the GPU machines' image lacks (lightly with
#           hydra-core, omegaconf and antlr4; jsonargparse with its signature helpers), at the versions of the
#           Python environment this runs in, as wheels (gpu_check.sh and gpu_train_speed.sh install them);
#   .data/cifar10_train.tar.gz   the CIFAR-10 training JPEGs.
# Then pass carry=[".whl", ".data"] to the device call. Run with the project's environment active:
#   bash benchmarks/gpu_prepare.sh [CIFAR10_TRAIN_TAR_GZ (default ../shared/data/cifar10/train.tar.gz)]
set -euo pipefail
archive=$(realpath "${1:-$(dirname "$0")/../../shared/data/cifar10/train.tar.gz}")
cd "$(dirname "$0")/.."
mkdir -p .whl .data
pinned=()
for name in lightly hydra-core omegaconf antlr4-python3-runtime jsonargparse typeshed-client docstring-parser; do
    pinned+=("$name==$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
python3 -m pip wheel -q --no-deps -w .whl "${pinned[@]}"
cp "$archive" .data/cifar10_train.tar.gz
ls .whl
du -sh .whl .data
