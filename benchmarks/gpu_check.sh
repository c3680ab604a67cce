#!/usr/bin/env bash
# GPU checks in one go: the CUDA tests, then the step benchmark at ResNet18 / 96 px. Writes gpu.txt,
# gpu_tests.log, gpu_tests_compiled.log, step_speed_gpu.json and step_speed_gpu_bf16.json into $1.
#   bash benchmarks/gpu_check.sh OUT
# The tests run in two groups (TEST_GROUPS, default "eager compiled"), each under its own time limit
# (TESTS_S, COMPILED_TESTS_S seconds); ONLY_TESTS=1 skips the step benchmark:
# first those that run eagerly (about a minute and a half on an H200), then those that compile
# (from a cold cache: ResNet18 once, in the channels-last test; small_cnn and the U-Net in the CUDA-graph
# tests, in two modes each; the augmentation). With ResNet18 at 96 px the batched CUDA-graph test's compiled
# half took 354 s on the CPU, which is why those tests use small_cnn at 32 px now. A test still running after FAULTHANDLER_S
# seconds prints every thread's stack, so a run cut short shows where it was. Each group is
# stopped by SIGKILL 5 s after SIGTERM: Lightning catches SIGTERM and stops only at its next batch.
# Python packages missing on the machine travel as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTPUT_DIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"
compiled="compile or cuda_graph"
tests() {  # tests SECONDS LOG -k EXPRESSION
    local seconds=$1 log=$2
    shift 2
    timeout -k 5 "$seconds" python3 -m pytest -q -p no:cacheprovider -p no:warnings -p no:logging --tb=short \
        -o addopts="" -o faulthandler_timeout="${FAULTHANDLER_S:-240}" --durations=8 tests/test_gpu.py "$@" \
        > "$out/$log" 2>&1
    echo "$log: exit $?"; tail -n 12 "$out/$log"
}
groups=" ${TEST_GROUPS:-eager compiled} "
[[ $groups == *" eager "* ]] && tests "${TESTS_S:-180}" gpu_tests.log -k "not ($compiled)"
# TORCH_LOGS=cudagraphs: a graph that does not replay as a CUDA graph says why (in a failing test's output)
[[ $groups == *" compiled "* ]] && TORCH_LOGS=cudagraphs tests "${COMPILED_TESTS_S:-420}" gpu_tests_compiled.log -k "$compiled"
[ -n "${ONLY_TESTS:-}" ] && exit 0
timeout -k 5 120 python3 benchmarks/step_speed.py --device cuda --encoder resnet18 --image-size 96 --batch-size 128 --mask-width 32 \
    --reps 5 --steps 2 --simultaneous --out "$out/step_speed_gpu.json" 2>&1 | grep -v -i "warn" | tee "$out/step_speed_gpu.log"
timeout -k 5 120 python3 benchmarks/step_speed.py --device cuda --encoder resnet18 --image-size 96 --batch-size 128 --mask-width 32 \
    --masks 4 --modes all --objectives simclr --reps 5 --steps 2 --precision bf16-mixed --channels-last \
    --out "$out/step_speed_gpu_bf16.json" 2>&1 | grep "^|"
