#!/usr/bin/env bash
# dev/bench/side_by_side.sh: blocktf (./train --bench, ./infer --bench) and the PyTorch baseline
# (dev/bench/pytorch_runner.py, eager and torch.compile) on the same GPU in one run, for the pairs of issue 8, then one
# table with the blocktf / PyTorch ratios (dev/bench/ratio_table.py).  Run from the repository root after `make`:
#   bash dev/bench/side_by_side.sh [check] [train] [generate]        (default: all three)
# Environment (all optional):
#   CONFIGS       configs (default "block_main_b4_85 vanilla_160 block_main_b4_300 vanilla_410")
#   MICRO_BATCH   training micro-batch (8)              STEPS  timed training steps, median (10)
#   SETTINGS      generation settings PREFILLxDECODE (default "2048x128 128x2048")
#   BATCH         one generation batch for every config and setting (overrides the defaults below)
#   BATCH_<config>_P<prefill>_D<decode>   the batch of one run, e.g. BATCH_vanilla_160_P128_D2048=128
#                 (defaults: issue 8's PyTorch batches; block_main_b4_85 2048 / 512, block_main_b4_300 1024 / 512,
#                 vanilla_160 256 / 128, vanilla_410 128 / 64 at P2048/D128 / P128/D2048)
#   RUNS          timed PyTorch generations after the warm-up (5, as SPEC 5.5 and ./infer --bench)
#   COMPILE=0     skip the torch.compile training runs;  BLOCKTF=0 or PYTORCH=0 skip one side
#   PY            python with torch 2.11 + transformers 5.17 + CUDA (python3)
#   DEVICE, DTYPE the PyTorch runner's --device and --dtype (cuda, bf16; DEVICE=cpu DTYPE=fp32 for a dry run)
# Every table row goes to $LOGS/rows.md and every command's output to $LOGS/<name>.log, LOGS = /tmp/side_by_side
# unless set; rows.md is also copied to $OUT when that is set (the device tool's output folder brings back only a
# few files, so the logs stay on the machine).  Rows of several runs combine into one table:
#   python3 dev/bench/ratio_table.py first/rows.md second/rows.md
set -uo pipefail
cd "$(dirname "$0")/../.."

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(check train generate)
configs=${CONFIGS:-"block_main_b4_85 vanilla_160 block_main_b4_300 vanilla_410"}
micro_batch=${MICRO_BATCH:-8}
steps=${STEPS:-10}
settings=${SETTINGS:-"2048x128 128x2048"}
runs=${RUNS:-5}
py=${PY:-python3}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bf16}
logs=${LOGS:-/tmp/side_by_side}
mkdir -p "$logs"
rows="$logs/rows.md"
: >"$rows"
failed=()

for tool in ./train ./infer; do
    if [ "${BLOCKTF:-1}" != 0 ] && [ ! -x "$tool" ]; then echo "side_by_side: $tool is missing: run make first" >&2; exit 2; fi
done

default_batch() {   # config prefill decode
    case "$1:$2x$3" in
        block_main_b4_85:2048x128) echo 2048 ;;   block_main_b4_85:128x2048) echo 512 ;;
        block_main_b4_300:2048x128) echo 1024 ;;  block_main_b4_300:128x2048) echo 512 ;;
        vanilla_160:2048x128) echo 256 ;;         vanilla_160:128x2048) echo 128 ;;
        vanilla_410:2048x128) echo 128 ;;         vanilla_410:128x2048) echo 64 ;;
        *) echo 64 ;;
    esac
}

batch_for() {   # config prefill decode
    local var="BATCH_${1//[^A-Za-z0-9_]/_}_P$2_D$3"
    if [ -n "${!var:-}" ]; then echo "${!var}"; elif [ -n "${BATCH:-}" ]; then echo "$BATCH"; else default_batch "$@"; fi
}

run() {   # name command...: output to its log, table rows (lines starting with |) to rows.md
    local name=$1; shift
    echo "== $name: $*" >&2
    local start=$SECONDS
    "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    grep -E '^\|' "$logs/$name.log" | tee -a "$rows" | grep -vE '^\| *(config|impl|---)' >&2
    if [ $rc -ne 0 ]; then
        failed+=("$name (exit $rc, see $logs/$name.log)")
        tail -5 "$logs/$name.log" >&2
    fi
    echo "   ($((SECONDS - start)) s)" >&2
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$logs/gpu.txt" >&2
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >&2

for part in "${parts[@]}"; do
    case $part in
    check)
        [ "${PYTORCH:-1}" != 0 ] && run pytorch_check "$py" dev/bench/pytorch_runner.py --check --device "$device" --dtype fp32
        ;;
    train)
        for c in $configs; do
            [ "${BLOCKTF:-1}" != 0 ] && run "blocktf_train_$c" ./train --bench --config "$c" --micro-batch "$micro_batch" --steps "$steps"
            if [ "${PYTORCH:-1}" != 0 ]; then
                run "pytorch_train_$c" "$py" dev/bench/pytorch_runner.py --config "$c" --mode train \
                    --micro-batch "$micro_batch" --steps "$steps" --device "$device" --dtype "$dtype"
                [ "${COMPILE:-1}" != 0 ] && run "pytorch_compile_train_$c" "$py" dev/bench/pytorch_runner.py --config "$c" \
                    --mode train --compile --micro-batch "$micro_batch" --steps "$steps" --device "$device" --dtype "$dtype"
            fi
        done
        ;;
    generate)
        for s in $settings; do
            p=${s%x*}; d=${s#*x}
            for c in $configs; do
                b=$(batch_for "$c" "$p" "$d")
                [ "${BLOCKTF:-1}" != 0 ] && run "blocktf_generate_${c}_P${p}_D${d}_B${b}" \
                    ./infer --bench --config "$c" --prefill "$p" --decode "$d" --batch "$b"
                [ "${PYTORCH:-1}" != 0 ] && run "pytorch_generate_${c}_P${p}_D${d}_B${b}" \
                    "$py" dev/bench/pytorch_runner.py --config "$c" --mode generate --prefill "$p" --decode "$d" \
                    --batch "$b" --runs "$runs" --device "$device" --dtype "$dtype"
            done
        done
        ;;
    *) echo "side_by_side: unknown part '$part' (check, train, generate)" >&2; exit 2 ;;
    esac
done

[ -n "${OUT:-}" ] && cp "$rows" "$OUT/rows.md"
echo
echo "## blocktf vs PyTorch, $(head -1 "$logs/gpu.txt" 2>/dev/null | cut -d, -f1), $(date -u +%Y-%m-%d)"
echo
"$py" dev/bench/ratio_table.py "$rows"
if [ ${#failed[@]} -gt 0 ]; then
    echo
    echo "failed:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
