#!/usr/bin/env bash
# dev/attention/run.sh: on the GPU machine, builds dev/attention/test_attention.cu in three variants and runs them:
# FP32, BF16 (sm_90a: the wgmma flash kernels at head size 64) and BF16_SM90 (plain sm_90: the mma.sync flash kernels
# at every head size, as GPU_ARCH=90 builds run them). Each runs every check of blocktf.cu's attention paths (small,
# flash in BF16, matmul: vs a double-precision reference, determinism, flash vs the matmul path, flash refusing what
# it does not serve, cached prefill vs attention_cached), the BF16 variants then the benchmark (flash and small vs
# the matmul path, cached prefill vs attention_cached: wgmma and mma.sync side by side), then compute-sanitizer
# memcheck, racecheck and synccheck on the quick set (--quick) of every variant (SANITIZE=0 skips them), and last a
# summary table.
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
variants="FP32 BF16 BF16_SM90"
for precision in $variants; do
    binary=build/test_attention_$precision
    case $precision in
        BF16_SM90) flags="-gencode arch=compute_90,code=sm_90 -DBLOCKTF_PRECISION_BF16" ;;
        *) flags="-gencode arch=compute_90a,code=sm_90a -DBLOCKTF_SM90A -DBLOCKTF_PRECISION_$precision" ;;
    esac
    echo
    echo "== $precision build"
    if ! nvcc -std=c++17 -O2 $flags -I. -Xcompiler -Wall,-Wextra \
            dev/attention/test_attention.cu -o "$binary" -lcublas -lcublasLt >"$logs/build_$precision.log" 2>&1; then
        tail -20 "$logs/build_$precision.log"
        result[$precision]="build failed (see $logs/build_$precision.log)"
        status=1
        continue
    fi
    # The binary runs the benchmark in the BF16 builds only.
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

for precision in BF16 BF16_SM90; do
    if [ -f "$logs/test_$precision.log" ] && grep -q "^| shape" "$logs/test_$precision.log"; then
        echo
        echo "$precision:"
        grep -E "^(\||Benchmark)" "$logs/test_$precision.log"
    fi
done
echo
echo "| build | checks | compute-sanitizer on the quick set |"
echo "| --- | --- | --- |"
for precision in $variants; do echo "| $precision | ${result[$precision]:-} | ${sanitizer[$precision]:-skipped} |"; done
echo
echo "overall: $([ $status = 0 ] && echo PASS || echo FAIL)   (logs: $logs)"
exit $status
