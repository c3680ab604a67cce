#!/usr/bin/env bash
# The CIFAR-10 quality comparison with ResNet18 on one GPU, as many steps as fit in one ~8-minute
# run: unpacks the CIFAR-10 training archive (nothing is downloaded), then runs quality.py with
# --minutes, on the fast path (augmentation on the device, batched views: the same training).
# Results (JSON, table, mask pictures) go to $1; more arguments go to quality.py.
#   bash benchmarks/gpu_quality.sh OUT path/to/cifar10/train.tar.gz [quality.py arguments]
set -euo pipefail
out=${1:?usage: gpu_quality.sh OUTPUT_DIR CIFAR10_TRAIN_TAR_GZ [quality.py arguments]}
archive=${2:?usage: gpu_quality.sh OUTPUT_DIR CIFAR10_TRAIN_TAR_GZ [quality.py arguments]}
shift 2
data=/tmp/quality_data/cifar10  # the result files are named after this folder
mkdir -p "$out" "$data"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tar xzf "$archive" -C "$data"
nvidia-smi -L > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
python3 benchmarks/quality.py --data folder --data-dir "$data/train" --encoder resnet18 \
    --accelerator gpu --precision bf16-mixed --batch-size 256 --num-workers 12 --minutes 7 --eval-reserve 25 \
    --augment-on device --masked-views batched \
    --variants baseline adios random_patch adios_s random_block --results "$out" "$@" 2>&1 | grep --line-buffered -v -i "warn\|tip\|available:" | tee "$out/quality.log"
