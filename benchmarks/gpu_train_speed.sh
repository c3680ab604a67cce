#!/usr/bin/env bash
# End-to-end GPU training speed in one go (about 7 minutes on one H200 without OLD_SRC; 5 to 6 before
# the compiled-augmentation runs were added):
#   1. this version, augmentation on the device, batched views, at 32 px: baseline, ADIOS, ADIOS-s,
#      simultaneous; and ADIOS with sequential views;
#      and batched ADIOS with batch norm per view joined by cat (--per-view-bn cat; the baseline's
#      two views take that way anyway);
#      and the batched baseline and ADIOS with the augmentation compiled (--compile-augmentation);
#   2. with OLD_SRC (an older version's src/ folder), loader augmentation: baseline and ADIOS;
#   3. 96 px, N=6 (a CIFAR-10 subset upscaled): ADIOS with batched views (and the older version);
#   4. profiles of the batched ADIOS and baseline steps (and of the older version's ADIOS step)
#      (profile_step.py: host and GPU time per phase, top kernels);
#   5. the exact step against the reference step at N=4 (step_speed.py), batched views.
# PARTS picks and orders what runs (default "main cat augment 96 profile step"): main (step 1's five
# runs), cat, augment (the compiled-augmentation runs), compile, kernels, 96, compile-96 (ADIOS at 96 px, N=6,
# compiled in reduce-overhead mode), profile, step; and, on request,
# warm (always first: the runs of the parts compile and compile-96 side by side, one process per variant, for
# one short epoch each, to fill Inductor's on-disk cache, so that the timed runs after them load their compiled
# code in seconds instead of compiling it one run after another for minutes; their figures are not kept),
# tests (the CUDA tests that do not compile: gpu_check.sh's eager group, logged to gpu_tests.log),
# compile-cache (compile_cache.sh: batched ADIOS compiled from an empty Inductor cache, then again from the
# cache it filled; about 5 minutes) and
# compile-bn (compile_batched.py on CUDA: kernels and compile time of the batched encoder's graph) and
# profile-compile (profiles of batched exact ADIOS compiled in reduce-overhead mode, at 32 px and at 96 px, N=6, or
# at the sizes PROFILE_COMPILE_SIZES names, e.g. "96"; part warm compiles them first where no timed run does).
# SEQUENTIAL=1 adds the sequential-views runs of the other variants, at 96 px and in step "step".
# COMPILE=1 adds the part "compile" first: ADIOS and the baseline, batched views, with the encoder, the mask
# generator and the augmentation under torch.compile at 32 px, without validation (compiling took about 3 minutes
# of ADIOS's run and 40 s of the baseline's on an H100); COMPILE_VARIANTS names other variants for it
# (e.g. "adios_s_batched simultaneous_batched");
# COMPILE=reduce-overhead (or another torch.compile mode) compiles in that mode: reduce-overhead replays them as
# CUDA graphs. Several, space separated ("1 reduce-overhead"), run one after the other. ONLY_COMPILE=1 runs nothing
# else. COMPILE_OBJECTIVE=1 compiles the objective too (its forward, the encoder within it, and its losses;
# ADIOSModule's compile_objective) in the same mode, in the parts compile, compile-96 and profile-compile (and warm);
# COMPILE_OPTIMIZERS=1 compiles both optimisers' updates there too (compile_optimizers; never as CUDA graphs). The part "kernels" counts the kernels per batch of the augmentation, eager and compiled (augment_launches.py:
# Triton's fusion, not the CPU's).
# BUDGET_S: the seconds the whole script may take (a device lease); each run's time limit is cut to what is left,
# and a part with under 30 s left is skipped. run.log records when each part starts. Runs are stopped by
# SIGKILL 5 s after SIGTERM: Lightning catches SIGTERM and only stops at the next batch, so a run that is
# compiling would outlive a plain timeout.
# ResNet18, bf16-mixed, batch 256, CIFAR-10 JPEGs, 14 loader workers, OnlineKNN + OnlineLinearProbe.
# CACHE_OUT=1 packs the Inductor cache the runs filled into OUT/inductor_cache.tar.gz; CACHE_IN=FILE (such a
# file, carried) starts the runs from it, so a later call on the same kind of card skips most of the compiling.
# Python packages missing on the machine travel as wheels in .whl/ (installed to /tmp/site). SPEED_ARGS adds
# train_speed.py arguments to each of its runs (e.g. "--accelerator cpu --precision 32 --batch-size 16" to try
# parts on a CPU).
#   bash benchmarks/gpu_train_speed.sh OUT CIFAR10_TRAIN_TAR_GZ [OLD_SRC]
#   COMPILE=reduce-overhead COMPILE_VARIANTS="adios_s_batched simultaneous_batched" PARTS="warm compile compile-96 tests" \
#       BUDGET_S=560 CACHE_OUT=1 bash benchmarks/gpu_train_speed.sh OUT .data/cifar10_train.tar.gz
#   (with PARTS="... tests profile-compile" PROFILE_COMPILE_SIZES=96, the compiled 96 px profile if time is left, and
#   PACK_LOGS=1, which packs warm.log and train_speed_full.log into logs.tar.gz: a call brings back 8 files at most)
#   PARTS="main augment" COMPILE=reduce-overhead BUDGET_S=560 bash benchmarks/gpu_train_speed.sh OUT ...
set -uo pipefail
out=${1:?usage: gpu_train_speed.sh OUT CIFAR10_TRAIN_TAR_GZ [OLD_SRC]}
archive=${2:?usage: gpu_train_speed.sh OUT CIFAR10_TRAIN_TAR_GZ [OLD_SRC]}
old=${3:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && site=/tmp/site
fi
new="$(pwd)/src"
t0=$(date +%s)
parts=${PARTS-main cat augment 96 profile step}
[ -n "${ONLY_COMPILE:-}" ] && parts=""
[ -n "${COMPILE:-}" ] && [[ " $parts " != *" compile "* ]] && parts="compile $parts"
[[ " $parts " == *" warm "* ]] && parts="warm $(echo " $parts " | sed 's/ warm / /')"
left() { echo $(( ${BUDGET_S:-100000} - ($(date +%s) - t0) )); }
part() {  # part NAME [WHAT]: whether NAME is asked for and there is time for it; logs "NAME WHAT" starting
    [[ " $parts " == *" $1 "* ]] || return 1
    local name="$1${2:+ $2}"
    if [ "$(left)" -lt 30 ]; then echo "[$(( $(date +%s) - t0 )) s] $name skipped: budget spent" | tee -a "$out/run.log"; return 1; fi
    echo "[$(( $(date +%s) - t0 )) s] $name" | tee -a "$out/run.log"
}
limit() { local l; l=$(( $(left) - 10 )); l=$(( $1 < l ? $1 : l )); echo $(( l < 1 ? 1 : l )); }  # limit SECONDS: cut to the budget left
data=/tmp/speed_data
if [ ! -d "$data/cifar10/train" ]; then mkdir -p "$data/cifar10" && tar xzf "$archive" -C "$data/cifar10"; fi
# One Inductor cache for every run (compile-cache's runs keep their own). CACHE_IN: a cache packed by an earlier
# call (CACHE_OUT=1), carried in and unpacked first, so that graphs compiled then are loaded instead of compiled
# again; its entries serve only the same torch version and card (both are in their keys).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
if [ -n "${CACHE_IN:-}" ]; then
    tar xzf "$CACHE_IN" -C "$TORCHINDUCTOR_CACHE_DIR" && echo "Inductor cache from $CACHE_IN: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)" | tee -a "$out/run.log"
fi
nvidia-smi -L > "$out/gpu.txt" 2>&1
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" >> "$out/gpu.txt"
profile_sizes=" ${PROFILE_COMPILE_SIZES:-32 96} "  # the image sizes part profile-compile profiles, space-delimited
upscale=""
if [[ " $parts " == *" 96 "* || " $parts " == *" compile-96 "* || ( " $parts " == *" profile-compile "* && $profile_sizes == *" 96 "* ) ]] && [ ! -d "$data/cifar10_96/train" ]; then
python3 - "$data/cifar10/train" "$data/cifar10_96/tmp" <<'EOF' &
# 96 px images: the first 1,000 of each CIFAR-10 class, upscaled (bicubic), as JPEGs; made while other parts run
import os, sys
from multiprocessing import Pool
from PIL import Image
src, dst = sys.argv[1], sys.argv[2]
jobs = []
for c in sorted(os.listdir(src)):
    os.makedirs(os.path.join(dst, c), exist_ok=True)
    jobs += [(os.path.join(src, c, f), os.path.join(dst, c, f)) for f in sorted(os.listdir(os.path.join(src, c)))[:1000]]
def up(job):
    Image.open(job[0]).convert("RGB").resize((96, 96), Image.BICUBIC).save(job[1], quality=90)
with Pool(4) as pool:
    pool.map(up, jobs, chunksize=64)
os.rename(dst, os.path.join(os.path.dirname(dst), "train"))
print(len(jobs), "images at 96 px")
EOF
upscale=$!
fi

speed() {  # speed LABEL SRC SECONDS ARGS...
    local label=$1 src=$2 seconds
    seconds=$(limit "$3")
    shift 3
    # TORCH_LOGS=cudagraphs: a compiled graph that does not replay as a CUDA graph says why
    TORCH_LOGS=cudagraphs PYTHONPATH="$src${site:+:$site}" timeout -k 5 "$seconds" python3 benchmarks/train_speed.py --label "$label" \
        --num-workers 14 --out "$out/train_speed_gpu.json" "$@" "${extra[@]}" 2>&1 | tee -a "$out/train_speed_full.log" | grep --line-buffered -E '^\{|Error|error:|skipping cudagraphs|recompil' \
        | tee -a "$out/train_speed.log"
}
profile() {  # profile LABEL SRC AUGMENT_ON VARIANT [SECONDS [ARGS...]]: ARGS go to profile_step.py after the 32 px data
    local label=$1 src=$2 place=$3 variant=$4 seconds=${5:-45}
    shift $(( $# < 5 ? $# : 5 ))
    PYTHONPATH="$src${site:+:$site}" timeout -k 5 "$(limit "$seconds")" python3 benchmarks/profile_step.py --data-dir "$data/cifar10/train" \
        --label "$label" --augment-on "$place" --variant "$variant" "$@" --out "$out/profile_gpu.md" 2>&1 \
        | grep --line-buffered -E '^(##|-|  -)|Error' | tee -a "$out/run.log"
}
c32=(--data-dir "$data/cifar10/train" --epochs 3 --batches 40)
c96=(--data-dir "$data/cifar10_96/train" --image-size 96 --num-masks 6 --epochs 2 --batches 20)
# fast MODE: sets fast_args to the device path with its three parts (and those COMPILE_OBJECTIVE and COMPILE_OPTIMIZERS add) compiled in
# MODE ("" for torch.compile's default mode), and no validation: its eval-mode graphs would be compiled too,
# minutes that the training figures do not need
fast() { fast_args=(--augment-on device --compile $1 --compile-augmentation $1 ${COMPILE_OBJECTIVE:+--compile-objective $1}
    ${COMPILE_OPTIMIZERS:+--compile-optimizers $1} --val-batches 0); }
read -r -a extra <<< "${SPEED_ARGS:-}"
compile_variants=${COMPILE_VARIANTS:-adios_batched baseline_batched}
compiled() {  # compiled PART [MODE VARIANT...]: sets args to the train_speed.py arguments of part compile or compile-96
    case $1 in
    compile) local mode=$2; shift 2; [ "$mode" = 1 ] && mode=""
        fast "$mode"; args=("${c32[@]}" "${fast_args[@]}" --variants "$@") ;;  # ADIOS first (the launch-bound step)
    compile-96) fast reduce-overhead; args=("${c96[@]}" "${fast_args[@]}" --variants adios_batched) ;;  # the first epoch compiles, the second is measured
    esac
}
warm() {  # warm ARGS...: one short run that compiles what a timed run with ARGS will (same graphs, few batches)
    PYTHONPATH="$new${site:+:$site}" timeout -k 5 "$(limit 420)" python3 benchmarks/train_speed.py --label warm "$@" \
        "${extra[@]}" --num-workers 4 --epochs 1 --batches 3 >> "$out/warm.log" 2>&1
}
warmed=()
warm_once() {  # warm_once: start warm, in the background, for the run compiled() set up last, unless it is already started
    local key="${args[*]}" started
    for started in "${warmed[@]}"; do [ "$started" = "$key" ] && return; done
    warmed+=("$key")
    warm "${args[@]}" &
}
sequential=${SEQUENTIAL:-}
upscaled() { [ -z "$upscale" ] || wait "$upscale"; upscale=""; }  # the 96 px images are ready

for name in $parts; do
    case $name in
    main) part main || continue
        speed new "$new" 200 "${c32[@]}" --augment-on device --variants baseline_batched adios_batched adios_s_batched \
            simultaneous_batched adios ${sequential:+baseline adios_s simultaneous}
        [ -n "$old" ] && speed old "$old" 100 "${c32[@]}" --augment-on host --variants baseline adios ;;
    cat) part cat || continue
        # batched ADIOS with batch norm per view the older way (own forward per view, joined by cat):
        # fewer launches against less host time in Python, on the same machine
        speed new "$new" 80 "${c32[@]}" --augment-on device --per-view-bn cat --variants adios_batched ;;
    augment) part augment || continue
        # the augmentation's image operations compiled (about 210 launches per batch eager) into a few fused kernels
        speed new "$new" 150 "${c32[@]}" --augment-on device --compile-augmentation --variants baseline_batched adios_batched ;;
    warm) upscaled
        part warm || continue
        if [[ " $parts " == *" compile "* ]]; then
            for mode in ${COMPILE:-1}; do
                for variant in $compile_variants; do
                    compiled compile "$mode" "$variant"; warm_once
                done
            done
        fi
        if [[ " $parts " == *" compile-96 "* ]]; then compiled compile-96; warm_once; fi
        if [[ " $parts " == *" profile-compile "* ]]; then  # the graphs of its runs (the timed runs' own if the same)
            if [[ $profile_sizes == *" 32 "* ]]; then compiled compile reduce-overhead adios_batched; warm_once; fi
            if [[ $profile_sizes == *" 96 "* ]]; then compiled compile-96; warm_once; fi
        fi
        wait
        grep -h '^{' "$out/warm.log" | python3 -c "import json, sys
for line in sys.stdin:
    e = json.loads(line); print('warm', e['variant'], e['image_size'], 'px:', e['run_seconds'], 's,', e.get('compiled_graphs'), 'graphs')" \
            | tee -a "$out/run.log"
        grep -E "Error|error:" "$out/warm.log" | tail -n 5 | tee -a "$out/run.log" ;;
    compile)
        for mode in ${COMPILE:-1}; do
            part compile "(mode $mode)" || continue
            compiled compile "$mode" $compile_variants
            speed new "$new" 330 "${args[@]}"
        done ;;
    kernels) part kernels || continue  # kernels per batch of the augmentation, eager and compiled
        PYTHONPATH="$new${site:+:$site}" timeout -k 5 "$(limit 120)" python3 benchmarks/augment_launches.py --device cuda 2>&1 \
            | grep "^{" | tee -a "$out/augment_launches.json" | tee -a "$out/run.log" ;;
    96) upscaled
        part 96 || continue
        [ -n "$old" ] && speed old "$old" 60 "${c96[@]}" --augment-on host --variants adios
        speed new "$new" 75 "${c96[@]}" --augment-on device --variants adios_batched ${sequential:+adios} ;;
    compile-96) upscaled
        part compile-96 || continue
        compiled compile-96
        speed new "$new" 330 "${args[@]}" ;;
    profile) part profile || continue
        profile new "$new" device adios_batched
        profile new "$new" device baseline_batched
        [ -n "$old" ] && profile old "$old" host adios ;;
    profile-compile) upscaled
        part profile-compile || continue
        # batched exact ADIOS with the three parts compiled in reduce-overhead mode, at 32 px and at 96 px N=6: what
        # the eager rest of the step (heads, losses, optimisers, callbacks) costs around the graph replays; the
        # warmup covers the graphs' recording, and their code comes from the cache the warm or timed runs filled
        compiled_profile=(--compile reduce-overhead --compile-augmentation reduce-overhead
            ${COMPILE_OBJECTIVE:+--compile-objective reduce-overhead} ${COMPILE_OPTIMIZERS:+--compile-optimizers reduce-overhead} --warmup 12)
        [[ $profile_sizes == *" 32 "* ]] && profile new "$new" device adios_batched 240 "${compiled_profile[@]}"
        [[ $profile_sizes == *" 96 "* ]] && profile new "$new" device adios_batched 240 "${compiled_profile[@]}" \
            --data-dir "$data/cifar10_96/train" --image-size 96 --num-masks 6 ;;
    step) part step || continue
        for views in batched ${sequential:+sequential}; do
            PYTHONPATH="$new${site:+:$site}" timeout -k 5 "$(limit 45)" python3 benchmarks/step_speed.py --device cuda --encoder resnet18 \
                --image-size 96 --batch-size 128 --mask-width 32 --masks 4 --modes all --objectives simclr --reps 3 --steps 2 \
                --precision bf16-mixed --channels-last --masked-views "$views" --out "$out/step_speed_gpu_n4_$views.json" 2>&1 \
                | grep --line-buffered "^|" | tee -a "$out/run.log"
        done ;;
    tests) part tests || continue
        TEST_GROUPS=eager ONLY_TESTS=1 TESTS_S="$(limit 150)" bash benchmarks/gpu_check.sh "$out" | tee -a "$out/run.log" ;;
    compile-cache) part compile-cache || continue
        fast reduce-overhead
        # batched exact ADIOS compiled in reduce-overhead mode twice over one new Inductor cache: what a second
        # run of a configuration on the same machine pays for compiling
        PYTHONPATH="$new${site:+:$site}" timeout -k 5 "$(limit 400)" bash benchmarks/compile_cache.sh "$out/train_speed_gpu.json" \
            "${c32[@]}" "${fast_args[@]}" --num-workers 14 --variants adios_batched "${extra[@]}" 2>&1 | grep --line-buffered -E '^\{|Error|error:' | tee -a "$out/train_speed.log" ;;
    compile-bn) part compile-bn || continue
        PYTHONPATH="$new${site:+:$site}" timeout -k 5 "$(limit 300)" python3 benchmarks/compile_batched.py --device cuda \
            --out "$out/compile_batched_gpu.json" 2>&1 | grep "^{" | tee -a "$out/run.log" ;;
    *) echo "unknown part $name (warm main cat augment compile kernels 96 compile-96 profile profile-compile step tests compile-cache" \
        "compile-bn)" >&2; exit 2 ;;
    esac
done
if [ -n "${PACK_LOGS:-}" ]; then  # the full logs in one file: a call brings back 8 files at most
    logs=$(cd "$out" && ls warm.log train_speed_full.log 2>/dev/null)
    [ -n "$logs" ] && tar czf "$out/logs.tar.gz" -C "$out" $logs && (cd "$out" && rm $logs)
fi
if [ -n "${CACHE_OUT:-}" ]; then  # the cache packed for a later call's CACHE_IN, when it can come back (16 MiB a file)
    tar czf "$out/inductor_cache.tar.gz" -C "$TORCHINDUCTOR_CACHE_DIR" .
    size=$(stat -c %s "$out/inductor_cache.tar.gz")
    echo "Inductor cache packed: $(( size / 1024 )) KiB" | tee -a "$out/run.log"
    [ "$size" -le $(( 16 * 1024 * 1024 )) ] || { rm "$out/inductor_cache.tar.gz"; echo "too large to come back; not kept" | tee -a "$out/run.log"; }
fi
echo "[$(( $(date +%s) - t0 )) s] done" | tee -a "$out/run.log"
