#!/usr/bin/env bash
# dev/loss_curves.sh: the 10-minute training runs behind README.md's loss curves. block_main_b4_5 and vanilla_31 are
# trained with `make train` (the shipped corpus, a held-out book for validation) at the same time, one GPU each on
# a machine with two (neither slows the other), or sharing the one GPU otherwise; then docs/loss_curves.png is
# drawn from their log.csv files.
#   bash dev/loss_curves.sh [DATA_DIR]    (DATA_DIR as for make, default ../shared/data)
# The step counts are sized to end within MINUTES (default 10) at the H200's speed; a run still going at the limit
# gets Ctrl-C (SIGINT), which writes a checkpoint and ends it, so its curve stops early rather than being lost.
# The logs are copied to $OUT (the device tool's output folder) when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-../shared/data}
limit_s=$(awk "BEGIN { print int(${MINUTES:-10} * 60) }")
gpus=$(nvidia-smi -L | wc -l)
second_gpu=$(( gpus >= 2 ? 1 : 0 ))
# Alone on an H200 an update of 64 x 2048 tokens takes about 0.11 s (block) and 0.26 s (vanilla); sharing one GPU,
# about twice that.
block_steps=${BLOCK_STEPS:-$(( gpus >= 2 ? 4500 : 2400 ))}
vanilla_steps=${VANILLA_STEPS:-$(( gpus >= 2 ? 2000 : 1000 ))}
echo "$gpus GPU(s): block_main_b4_5 on GPU 0 ($block_steps updates), vanilla_31 on GPU $second_gpu ($vanilla_steps updates)"
common="DATA_DIR=$data_dir VAL_INTERVAL=100 CHECKPOINT_INTERVAL=1000"

make -j"$(nproc)" DATA_DIR="$data_dir" build/bin/train out/data/train.idx > /tmp/curves_build.log 2>&1 || { tail -20 /tmp/curves_build.log; exit 1; }
rm -rf out/curves
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout -s INT "$limit_s" make train $common CONFIG=block_main_b4_5 STEPS="$block_steps" \
    OUT_DIR=out/curves/block_main_b4_5 > /tmp/curves_block.log 2>&1 &
CUDA_VISIBLE_DEVICES=$second_gpu timeout -s INT "$limit_s" make train $common CONFIG=vanilla_31 STEPS="$vanilla_steps" \
    OUT_DIR=out/curves/vanilla_31 > /tmp/curves_vanilla.log 2>&1 &
wait
echo "both runs ended after $(( $(date +%s) - start )) s"
for config in block_main_b4_5 vanilla_31; do
    echo "== $config: last lines of its output"
    tail -4 "/tmp/curves_${config%%_*}.log" | tr '\r' '\n' | tail -4
done
if [ -n "${OUT:-}" ]; then
    for config in block_main_b4_5 vanilla_31; do cp "out/curves/$config/log.csv" "$OUT/$config.log.csv"; done
    cp /tmp/curves_block.log /tmp/curves_vanilla.log "$OUT/"
fi
python3 dev/plot_loss.py docs/loss_curves.png block_main_b4_5=out/curves/block_main_b4_5/log.csv \
    vanilla_31=out/curves/vanilla_31/log.csv && [ -n "${OUT:-}" ] && cp docs/loss_curves.png "$OUT/"
