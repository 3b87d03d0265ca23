#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of at most 9.2 minutes (each step has its own time limit):
#   1. the tests marked `gpu` (bf16 AMP step, resume on the GPU, NCCL DDP over the GPUs present with the device
#      input path, the GPU predictor, gpu_pipeline on the GPU);
#   2. a short real training with --gpu on $DATA (../shared/asl/train; skipped, and said so, when it is absent);
#   3. bench.py --device cuda: B0 at 224 px, then the quick-start model (Lite0, 128 px).
# Outputs go to $OUT when it is set (else gpu-check/): the logs, the training run folder and the bench JSON.
# `DRY_RUN=1 bash gpu_check.sh` prints the commands without running them (for checking the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
OUT=${OUT:-gpu-check}
DATA=${DATA:-../shared/asl/train}  # a folder of class sub-folders; a few hundred frames will do
mkdir -p "$OUT"

run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, stop at SECONDS, go on to the next check on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if [[ ${DRY_RUN:-0} == 1 ]]; then return 0; fi
    local start=$SECONDS status=0
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s (log: $OUT/$name.log)"
    tail -n 25 "$OUT/$name.log"
    [[ $status == 0 ]] || failed+=("$name")
}

failed=()
if [[ ${DRY_RUN:-0} != 1 ]]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s), torch', torch.__version__)" | tee "$OUT/device.txt"
    nvidia-smi >>"$OUT/device.txt" 2>&1 || true
fi

# only the files that hold GPU tests: the others import the app and serving packages, which a bare GPU image lacks
run gpu_tests 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
    $(grep -l "mark.gpu" tests/test_*.py)

if [[ -d $DATA ]]; then
    # the frames in $DATA, 2 epochs: the first decodes them into the cache, the second is the steady speed
    # (time_s per epoch in $OUT/train_gpu/history.json)
    run train_gpu 120 "$PY" pt_train.py --xtrain_path "$DATA" --save_dir "$OUT/train_gpu" --overwrite --gpu \
        --arch efficientnet_b0 --weights none --img_size 128 --batch_size 256 --total_epochs 2 --num_workers 8 \
        --cache_dir "$OUT/cache"
else
    echo "== train_gpu: skipped, $DATA not present"
fi

BENCH=(--device cuda --batch_size 256 --train_batch_size 256 --num_workers 8)
[[ -d $DATA ]] && BENCH+=(--data "$DATA")
run bench_b0_224 150 "$PY" bench.py "${BENCH[@]}" --arch efficientnet_b0 --img_size 224 --images 2048 --reps 3 \
    --latency_reps 10 --json "$OUT/bench_b0_224.json"
run bench_default 120 "$PY" bench.py "${BENCH[@]}" --arch efficientnet_lite0 --img_size 128 --images 2048 --reps 2 \
    --latency_reps 10 --json "$OUT/bench_default.json"

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "dry run: nothing was run"
elif ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
else
    echo "all GPU checks passed"
fi
