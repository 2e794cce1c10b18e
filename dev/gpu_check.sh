#!/usr/bin/env bash
# dev/gpu_check.sh: what to run on the GPU machine before saying a GPU change is done. Builds the test binary in
# both precisions, runs every test (the [gpu] cases included) and prints a short table at the end.
#   bash dev/gpu_check.sh [DATA_DIR]     (DATA_DIR: a copy of ../shared/data inside the checkout, e.g. .device_data)
# Full logs go to $OUT (the device tool's output folder) when it is set, else to /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-../shared/data}
logs=${OUT:-/tmp}
jobs=$(nproc)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

declare -A summary
for precision in FP32 BF16; do
    log="$logs/test_$precision.log"
    if ! make -j"$jobs" PRECISION="$precision" test_blocktf >"$logs/build_$precision.log" 2>&1; then
        summary[$precision]="build failed (see build_$precision.log)"
        tail -20 "$logs/build_$precision.log"
        continue
    fi
    BLOCKTF_DATA_DIR="$data_dir" ./test_blocktf >"$log" 2>&1
    summary[$precision]=$(grep -E '^\[doctest\] test cases:' "$log" | tail -1)
    grep -E "ERROR|MESSAGE|relative error|worst" "$log" | head -60
done

echo
echo "| precision | doctest test cases |"
echo "| --- | --- |"
for precision in FP32 BF16; do echo "| $precision | ${summary[$precision]} |"; done

# Training-step benchmark (BF16, the build left by the loop above): forward + backward + AdamW on random tokens.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    make -j"$jobs" PRECISION=BF16 build/bin/train >"$logs/build_train.log" 2>&1 || { tail -20 "$logs/build_train.log"; exit 1; }
    echo
    for config in ${BENCH_CONFIGS:-block_main_b4_85 vanilla_160 block_main_b4_300 vanilla_410}; do
        ./train --bench --config "$config" --micro-batch 8 --steps 10 2>&1 | tee -a "$logs/bench_train.log" | grep -E "^\| [a-z]" | grep -v "^| config"
    done
fi
