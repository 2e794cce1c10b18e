#!/usr/bin/env bash
# dev/interop_check.sh: issue 7 on a GPU machine (torch and transformers installed): blocktf checkpoints in PyTorch
# and PyTorch checkpoints in blocktf, through dev/parity.py.
#   1. the checkpoint `make train` wrote (out/block_main_b4_5; trained first if missing): logits and loss on an
#      excerpt of the held-out book, greedy generations of dev/parity_prompts.txt;
#   2. a random-init block_main_b4_1.2b that PyTorch writes in the released layout (bf16, no config.json), whose
#      shape blocktf infers;
#   3. a random-init vanilla_160 saved by HF's save_pretrained (config.json + model.safetensors).
# Also scores the whole held-out book with ./infer --score. Reports go to $OUT (or /tmp).
#   bash dev/interop_check.sh [DATA_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-../shared/data}
logs=${OUT:-/tmp}
tokenizer="$data_dir/tokenizer/pythia-tokenizer.json"
book="$data_dir/text/gutenberg/pg84-frankenstein.txt"
excerpt=/tmp/parity_excerpt.txt
head -n 120 "$book" > "$excerpt"   # ~2k tokens: the logits dump holds V = 50304 fp32 values per scored token
make -j"$(nproc)" DATA_DIR="$data_dir" build/bin/infer > "$logs/interop_build.log" 2>&1 || { tail -20 "$logs/interop_build.log"; exit 1; }
[ -d out/block_main_b4_5 ] || make train DATA_DIR="$data_dir" > "$logs/interop_make_train.log" 2>&1
status=0

echo "== ./infer --score on the held-out book (make train's checkpoint)"
./infer --checkpoint out/block_main_b4_5 --tokenizer "$tokenizer" --score "$book" 2>&1 | tail -2

compare() {   # name checkpoint score-length [prompts]
    local name=$1 checkpoint=$2 length=$3
    shift 3
    echo "== $name"
    python3 dev/parity.py compare --checkpoint "$checkpoint" --infer ./infer --tokenizer "$tokenizer" --text "$excerpt" \
        --score-length "$length" --report "$logs/parity_$name.md" "$@" > "$logs/parity_$name.log" 2>&1
    local rc=$?
    cat "$logs/parity_$name.md" 2>/dev/null || tail -20 "$logs/parity_$name.log"
    echo "(exit $rc)"
    [ $rc = 0 ] || status=1
}
compare make_train_block_main_b4_5 out/block_main_b4_5 2048 --prompts dev/parity_prompts.txt --max-new-tokens 32

python3 dev/parity.py write-random --config block_main_b4_1.2b --out /tmp/random_b4_1.2b > "$logs/write_random_1.2b.log" 2>&1 || { tail "$logs/write_random_1.2b.log"; status=1; }
compare random_block_main_b4_1.2b /tmp/random_b4_1.2b 512 --prompts dev/parity_prompts.txt --max-new-tokens 16

python3 dev/parity.py write-random --config vanilla_160 --out /tmp/random_vanilla_160 > "$logs/write_random_160.log" 2>&1 || { tail "$logs/write_random_160.log"; status=1; }
compare random_vanilla_160 /tmp/random_vanilla_160 512 --prompts dev/parity_prompts.txt --max-new-tokens 16
exit $status
