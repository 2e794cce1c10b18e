#!/usr/bin/env bash
# dev/profile_kernels.sh: where a program's GPU time goes, kernel by kernel (Nsight Compute's gpu__time_duration, the
# clocks left alone as METHOD.md asks). Profiles the first LAUNCHES kernel launches (graph nodes included) after
# skipping SKIP, then prints one row per kernel name: launches, total and mean microseconds, share of the total.
#   bash dev/profile_kernels.sh ./infer --bench --config block_main_b4_85 --prefill 128 --decode 32 --batch 512
# Knobs: SKIP (default 0), LAUNCHES (default 2000), CSV (where the raw per-launch CSV goes; default $OUT or /tmp).
set -euo pipefail
csv=${CSV:-${OUT:-/tmp}/kernels.csv}
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --launch-skip "${SKIP:-0}" --launch-count "${LAUNCHES:-2000}" "$@" > "$csv.raw" 2> "$csv.log" || { tail -20 "$csv.log"; exit 1; }
# ncu prints the program's own output before the CSV: keep from the header line on
sed -n '/^"ID"/,$p' "$csv.raw" > "$csv"
python3 - "$csv" <<'PY'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
total = collections.defaultdict(float); count = collections.Counter(); order = {}
for r in rows:
    if r["Metric Name"] != "gpu__time_duration.sum": continue
    name = r["Kernel Name"].split("(")[0][:70]
    total[name] += float(r["Metric Value"].replace(",", "")) / 1e3   # ns -> us
    count[name] += 1
    order.setdefault(name, len(order))
grand = sum(total.values())
print(f"{len(rows)} launches profiled, {grand:.0f} us of kernel time")
print("| kernel | launches | total us | mean us | share |")
print("| --- | --- | --- | --- | --- |")
for name in sorted(total, key=lambda n: -total[n]):
    print(f"| {name} | {count[name]} | {total[name]:.0f} | {total[name] / count[name]:.1f} | {100 * total[name] / grand:.1f}% |")
PY
