#!/usr/bin/env bash
# dev/gpu_check.sh: what to run on the GPU machine before saying a GPU change is done. Builds the test binary in
# both precisions, runs every test (the [gpu] cases included) and prints a short table; then the training and
# generation benchmarks and an end-to-end training run with an interrupted-and-resumed copy.
#   bash dev/gpu_check.sh [DATA_DIR]     (DATA_DIR: a copy of ../shared/data inside the checkout, e.g. .device_data)
# Parts can be skipped: SKIP_TESTS=1, SKIP_BENCH=1 (both benchmarks), SKIP_GENERATION_BENCH=1, SKIP_TRAIN=1.
# BENCH_CONFIGS lists the training-benchmark configs; GENERATION_PAIRS the generation-benchmark configs.
# Full logs go to $OUT (the device tool's output folder) when it is set, else to /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-../shared/data}
logs=${OUT:-/tmp}
jobs=$(nproc)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

declare -A summary
for precision in FP32 BF16; do
    [ "${SKIP_TESTS:-0}" = 1 ] && break
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

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo
    echo "| precision | doctest test cases |"
    echo "| --- | --- |"
    for precision in FP32 BF16; do echo "| $precision | ${summary[$precision]} |"; done
fi

# The programs, BF16 (the build left by the loop above).
make -j"$jobs" PRECISION=BF16 build/bin/train build/bin/infer >"$logs/build_programs.log" 2>&1 || { tail -20 "$logs/build_programs.log"; exit 1; }

# Training-step benchmark: forward + backward + AdamW on random tokens.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo
    for config in ${BENCH_CONFIGS:-block_main_b4_85 vanilla_160 block_main_b4_300 vanilla_410}; do
        ./train --bench --config "$config" --micro-batch 8 --steps 10 2>&1 | tee -a "$logs/bench_train.log" | grep -E "^\| [a-z]" | grep -v "^| config"
    done
fi

# Generation benchmark (SPEC 5.5) at the paper's two settings, each config at the batch that --batch auto finds best.
if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${SKIP_GENERATION_BENCH:-0}" != 1 ]; then
    echo
    header_printed=0
    for config in ${GENERATION_CONFIGS:-block_main_b4_85 vanilla_160 block_main_b4_300 vanilla_410}; do
        for setting in "2048 128" "128 2048"; do
            set -- $setting
            ./infer --bench --config "$config" --prefill "$1" --decode "$2" --batch auto > "$logs/bench_generation_${config}_$1_$2.log" 2>&1
            if [ $header_printed = 0 ]; then grep -E "^\| (config|---)" "$logs/bench_generation_${config}_$1_$2.log"; header_printed=1; fi
            grep -E "^\| [a-z]" "$logs/bench_generation_${config}_$1_$2.log" | grep -v "^| config" || tail -3 "$logs/bench_generation_${config}_$1_$2.log"
        done
    done
fi

# Training end to end on the shipped shard: a run of 40 updates, and the same run interrupted with Ctrl-C and
# resumed, whose losses must equal the uninterrupted run's exactly (bit-exact resume).
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    shard="$data_dir/idxmap/shipped_corpus_text_document"
    args="--config block_main_b4_5 --data $shard --steps 40 --warmup 5 --batch-size 64 --micro-batch 32 --val-interval 20 --checkpoint-interval 10"
    rm -rf /tmp/run_a /tmp/run_b /tmp/run_nan
    ./train $args --out /tmp/run_a > "$logs/train_a.log" 2>&1; echo "uninterrupted run: exit $?"
    # Ctrl-C once the first checkpoint is on disk (a fixed delay is no good: 40 updates take ~2 s on an H200)
    ./train $args --out /tmp/run_b > "$logs/train_b1.log" 2>&1 &
    pid=$!
    until [ -d /tmp/run_b/checkpoint-10 ] || ! kill -0 $pid 2>/dev/null; do sleep 0.02; done
    kill -INT $pid 2>/dev/null
    wait $pid; status=$?
    echo "interrupted run: exit $status (expected 130) ($(ls /tmp/run_b | tr '\n' ' '))"
    ./train --resume /tmp/run_b $args > "$logs/train_b2.log" 2>&1; echo "resumed run: exit $?"
    # a diverging run (absurd learning rate) must stop with a message before applying a non-finite update
    ./train ${args/--steps 40/--steps 6} --lr 1e30 --checkpoint-interval 2 --out /tmp/run_nan > "$logs/train_nan.log" 2>&1
    echo "diverging run: exit $? (expected 1): $(grep -o 'stopping at step.*' "$logs/train_nan.log" | cut -c1-150)"
    tail -3 "$logs/train_a.log"
    python3 - <<'PY'
import csv
def losses(path):
    rows = {}
    for r in csv.DictReader(open(path)):
        rows[int(r["step"])] = r["loss"]   # a resumed run re-logs the steps after its checkpoint: keep the last
    return rows
a, b = losses("/tmp/run_a/log.csv"), losses("/tmp/run_b/log.csv")
same = [s for s in a if s in b and a[s] == b[s]]
print(f"resume check: {len(same)} of {len(a)} steps have bit-identical losses; first differing: "
      f"{next((s for s in sorted(a) if a.get(s) != b.get(s)), None)}")
PY
fi
