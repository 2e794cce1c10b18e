#!/usr/bin/env bash
# bench_tokenizer.sh: encode speed of our tokenizer (./prepare --bench) next to Hugging Face tokenizers, in one run.
#
#   dev/bench_tokenizer.sh            (from the repository root or anywhere; REPEATS=5 by default)
#
# Both encode every file of $BLOCKTF_DATA_DIR/text (the shipped ~7 MB corpus), each file as one string,
# single-threaded, REPEATS times; the table shows the best and the median repeat. Ours clears its word cache
# before every repeat (each repeat is a first encoding of the corpus); HF keeps its own cache warm across repeats.
# HF tokenizers is pip-installed into a venv under /tmp (pinned to the version of the reference tokenizations).
set -euo pipefail

cd "$(dirname "$0")/.."
DATA_DIR=${BLOCKTF_DATA_DIR:-../shared/data}
TOKENIZER="$DATA_DIR/tokenizer/pythia-tokenizer.json"
REPEATS=${REPEATS:-5}
HF_VERSION=${HF_TOKENIZERS_VERSION:-0.23.2}  # shared/data/README.md section 2: the reference outputs' version
VENV=${BENCH_VENV:-/tmp/blocktf-bench-tokenizers-$HF_VERSION}

[ -f "$TOKENIZER" ] || { echo "bench_tokenizer.sh: no tokenizer at $TOKENIZER (set BLOCKTF_DATA_DIR)" >&2; exit 1; }
mapfile -t FILES < <(find "$DATA_DIR/text" -name '*.txt' | sort)
[ "${#FILES[@]}" -gt 0 ] || { echo "bench_tokenizer.sh: no .txt files under $DATA_DIR/text" >&2; exit 1; }

echo "== building ./prepare"
make -s prepare >/dev/null

echo "== Hugging Face tokenizers $HF_VERSION in $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import tokenizers, sys; sys.exit(tokenizers.__version__ != '$HF_VERSION')" 2>/dev/null \
    || "$VENV/bin/pip" install --quiet "tokenizers==$HF_VERSION"

echo "== blocktf: ./prepare --bench --repeats $REPEATS (${#FILES[@]} files)"
OURS=$(./prepare --bench --repeats "$REPEATS" --tokenizer "$TOKENIZER" "${FILES[@]}" | tee /dev/stderr | grep '^RESULT')

echo "== HF: dev/bench_tokenizer.py --repeats $REPEATS"
HF=$(RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" dev/bench_tokenizer.py \
        --repeats "$REPEATS" --tokenizer "$TOKENIZER" "${FILES[@]}" | tee /dev/stderr | grep '^RESULT')

# The table: one row per implementation, then the speed ratio. RESULT lines are "RESULT key=value ...".
echo
printf '%s\n%s\n' "$OURS" "$HF" | awk '
    { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[NR, kv[1]] = kv[2] } }
    END {
        printf "| %-22s | %8s | %9s | %9s | %12s | %14s |\n", "implementation", "load s", "bytes", "tokens", "best MB/s", "median MB/s"
        printf "| %-22s | %8s | %9s | %9s | %12s | %14s |\n", "---", "---", "---", "---", "---", "---"
        for (r = 1; r <= 2; r++) {
            best[r] = v[r, "bytes"] / v[r, "best_s"] / 1e6; median[r] = v[r, "bytes"] / v[r, "median_s"] / 1e6
            printf "| %-22s | %8.3f | %9d | %9d | %12.2f | %14.2f |\n", v[r, "impl"], v[r, "load_s"], v[r, "bytes"],
                   v[r, "tokens"], best[r], median[r]
        }
        printf "\nratio blocktf / HF: %.1fx (best), %.1fx (median); single thread, %s bytes\n",
               best[1] / best[2], median[1] / median[2], v[1, "bytes"]
        if (v[1, "tokens"] != v[2, "tokens"]) { print "WARNING: token counts differ"; exit 1 }
    }'
