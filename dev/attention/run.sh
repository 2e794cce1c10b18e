#!/usr/bin/env bash
# dev/attention/run.sh: on the GPU machine, builds dev/attention/test_attention.cu in FP32 and BF16 and runs both: every
# check of blocktf.cu's attention paths (small, flash in BF16, matmul: vs a double-precision reference, determinism,
# flash vs the matmul path, flash refusing what it does not serve, cached prefill vs attention_cached), then in the
# BF16 build the benchmark (flash and small vs the matmul path, cached prefill vs attention_cached), then
# compute-sanitizer memcheck, racecheck and synccheck on the quick set (--quick) of both builds (SANITIZE=0 skips
# them), and last a summary table.
#   bash dev/attention/run.sh          (from anywhere; full logs in $OUT/attention when OUT is set, else /tmp/attention)
# Exit status 0 when everything built, passed and was sanitizer-clean.
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=${OUT:-/tmp}/attention
mkdir -p build "$logs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -1

status=0
declare -A result sanitizer
for precision in FP32 BF16; do
    binary=build/test_attention_$precision
    echo
    echo "== $precision build"
    if ! nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -DBLOCKTF_SM90A -I. -DBLOCKTF_PRECISION_$precision -Xcompiler -Wall,-Wextra \
            dev/attention/test_attention.cu -o "$binary" -lcublas -lcublasLt >"$logs/build_$precision.log" 2>&1; then
        tail -20 "$logs/build_$precision.log"
        result[$precision]="build failed (see $logs/build_$precision.log)"
        status=1
        continue
    fi
    # The binary runs the benchmark in the BF16 build only.
    "$binary" 2>&1 | tee "$logs/test_$precision.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    result[$precision]=$(grep -E "^(ALL PASSED|FAILURES):" "$logs/test_$precision.log" | tail -1)
    [ -n "${result[$precision]}" ] || result[$precision]="no summary line (crashed? see $logs/test_$precision.log)"

    if [ "${SANITIZE:-1}" = 1 ]; then
        if ! command -v compute-sanitizer >/dev/null; then
            sanitizer[$precision]="compute-sanitizer not found"
            continue
        fi
        line=""
        for tool in memcheck racecheck synccheck; do
            log="$logs/sanitize_${tool}_$precision.log"
            if compute-sanitizer --tool "$tool" --error-exitcode 1 "$binary" --quick >"$log" 2>&1; then
                line="$line $tool clean;"
            else
                line="$line $tool FAILED (see $log);"
                status=1
                grep -E "=========" "$log" | head -20
            fi
        done
        sanitizer[$precision]=$line
    fi
done

if [ -f "$logs/test_BF16.log" ] && grep -q "^| shape" "$logs/test_BF16.log"; then
    echo
    grep -E "^(\||Benchmark)" "$logs/test_BF16.log"
fi
echo
echo "| build | checks | compute-sanitizer on the quick set |"
echo "| --- | --- | --- |"
for precision in FP32 BF16; do echo "| $precision | ${result[$precision]:-} | ${sanitizer[$precision]:-skipped} |"; done
echo
echo "overall: $([ $status = 0 ] && echo PASS || echo FAIL)   (logs: $logs)"
exit $status
