#!/usr/bin/env bash
# GPU checks in one go (about 5 minutes on one H100): the CUDA tests (bf16 and 16-mixed steps,
# channels-last + compile, SyncBatchNorm under DDP when 2+ GPUs) and the step benchmark at
# ResNet18 / 96 px. Writes gpu_tests.log, step_speed_gpu.json and step_speed_gpu.md into $1.
#   bash benchmarks/gpu_check.sh results/
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTPUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=line tests/test_gpu.py -o addopts="" 2>&1 | tail -n 30 | tee "$out/gpu_tests.log"
python3 benchmarks/step_speed.py --device cuda --encoder resnet18 --image-size 96 --batch-size 128 --mask-width 32 \
    --reps 5 --steps 2 --simultaneous --out "$out/step_speed_gpu.json" 2>&1 | grep -v -i "warn" | tee "$out/step_speed_gpu.log"
python3 benchmarks/step_speed.py --device cuda --encoder resnet18 --image-size 96 --batch-size 128 --mask-width 32 \
    --masks 4 --modes all --objectives simclr --reps 5 --steps 2 --precision bf16-mixed --channels-last \
    --out "$out/step_speed_gpu_bf16.json" 2>&1 | grep "^|"
