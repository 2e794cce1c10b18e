#!/usr/bin/env python3
"""Reads the markdown rows printed by blocktf's `./train --bench`, `./infer --bench` and dev/bench/pytorch_runner.py
(any mix, any order, several files) and prints one table with the blocktf / PyTorch ratios, plus the block / vanilla
ratios of the equal-size pairs of issue 8.

  python3 dev/bench/ratio_table.py ROWS.md [MORE.md ...]     (no file: stdin)
  python3 dev/bench/ratio_table.py --selftest

Rows are recognised by the header above them (blocktf) or by their first cell (pytorch, pytorch-compile):
  train --bench:  | config | micro-batch x T | step ms ... | tokens/s | TFLOP/s | MFU | GPU memory used |
  infer --bench:  | config | prefill | decode | batch | ms per generation ... | tokens/s ... | GPU memory in use |
  pytorch_runner: | pytorch[-compile] | config | mode | shape | ms | tokens/s | peak GPU memory |
Columns are found by their header names, so added columns in blocktf's tables do not break the parsing.
"""

import argparse
import re
import sys

PAIRS = [("block_main_b4_85", "vanilla_160"), ("block_main_b4_300", "vanilla_410")]
IMPLS = ("blocktf", "pytorch", "pytorch-compile")


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(text):
    m = re.search(r"[-+]?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", text)
    return float(m.group(0).replace(",", "")) if m else None


def train_key(text):
    """"8 x 2048" -> ('mb', 8, 2048)."""
    nums = [int(x) for x in re.findall(r"\d+", text)]
    return ("mb", nums[0], nums[1] if len(nums) > 1 else 0)


def column(header, *words):
    """Index of the first header cell containing all words (case-insensitive), else None."""
    for i, h in enumerate(header):
        if all(w in h.lower() for w in words):
            return i
    return None


def parse(lines):
    """-> {(config, mode, shape_key): {impl: dict(tps, ms, mem, extra)}}; shape_key: ('mb', B, T) or (P, D, B).
    A row that does not parse is reported on stderr and skipped."""
    results = {}
    state = {"header": None}
    for line in lines:
        try:
            parse_line(line, state, results)
        except (TypeError, ValueError, IndexError) as e:
            print(f"ratio_table: skipped a row that does not parse ({e}): {line.strip()}", file=sys.stderr)
    return results


def parse_line(line, state, results):
    """One line: remembers a header row in state, adds a data row to results."""
    header = state["header"]
    s = line.strip()
    if not s.startswith("|"):
        return
    c = cells(s)
    if all(re.fullmatch(r":?-+:?", x) for x in c if x):
        return
    if c and c[0].lower() in ("config", "impl"):
        state["header"] = [x.lower() for x in c]
        return
    if c[0].startswith("pytorch"):
        if len(c) < 7:
            return
        impl, config, mode, shape = c[0], c[1], c[2], c[3]
        if mode == "train":
            key = train_key(shape)
        else:
            m = re.search(r"P(\d+)\s*D(\d+)\s*B(\d+)", shape)
            if not m:
                return
            key = tuple(int(x) for x in m.groups())
        results.setdefault((config, mode, key), {})[impl] = dict(ms=number(c[4]), tps=number(c[5]), mem=c[6],
                                                                  extra="")
        return
    if header is None or len(c) != len(header):
        return
    tps_i = column(header, "tokens/s")
    mem_i = column(header, "memory")
    if tps_i is None:
        return
    if column(header, "prefill") is not None:
        key = tuple(int(number(c[column(header, w)])) for w in ("prefill", "decode", "batch"))
        mode, ms_i = "generate", column(header, "ms")
        extra = ""
    elif column(header, "micro-batch") is not None:
        key = train_key(c[column(header, "micro-batch")])
        mode, ms_i = "train", column(header, "ms")
        mfu_i = column(header, "mfu")
        extra = f"MFU {c[mfu_i]}" if mfu_i is not None else ""
    else:
        return
    results.setdefault((c[0], mode, key), {})["blocktf"] = dict(
        ms=number(c[ms_i]) if ms_i is not None else None, tps=number(c[tps_i]),
        mem=c[mem_i] if mem_i is not None else "", extra=extra)


def shape_text(mode, key):
    return f"{key[1]} x {key[2]}" if mode == "train" else f"P{key[0]} D{key[1]} B{key[2]}"


def fmt_tps(r):
    return f"{r['tps']:,.0f}" if r and r.get("tps") is not None else "-"


def ratio(a, b):
    if not a or not b or a.get("tps") is None or not b.get("tps"):
        return "-"
    return f"{a['tps'] / b['tps']:.2f}x"


def table(results, pairs=PAIRS):
    out = ["| config | mode | shape | blocktf tokens/s | pytorch tokens/s | pytorch-compile tokens/s "
           "| blocktf / pytorch | blocktf / compile | blocktf memory | pytorch memory | blocktf notes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {name: i for i, name in enumerate(n for p in pairs for n in p)}
    keys = sorted(results, key=lambda k: (k[1] != "train", order.get(k[0], 99), k[0], str(k[2])))
    for k in keys:
        r = results[k]
        b, p, pc = r.get("blocktf"), r.get("pytorch"), r.get("pytorch-compile")
        pmem = (p or pc or {}).get("mem", "")
        out.append(f"| {k[0]} | {k[1]} | {shape_text(k[1], k[2])} | {fmt_tps(b)} | {fmt_tps(p)} | {fmt_tps(pc)} "
                   f"| {ratio(b, p)} | {ratio(b, pc)} | {(b or {}).get('mem', '')} | {pmem} | "
                   f"{(b or {}).get('extra', '')} |")
    # the pairs: block / vanilla throughput, each implementation at its own batch, same mode and prefill/decode
    pair_rows = []
    for blk, van in pairs:
        for (cfg, mode, key), r in sorted(results.items(), key=lambda kv: str(kv[0])):
            if cfg != blk:
                continue
            match = [(k2, r2) for (c2, m2, k2), r2 in results.items() if c2 == van and m2 == mode
                     and (mode == "train" and k2 == key or mode == "generate" and k2[:2] == key[:2])]
            for k2, r2 in match:
                setting = shape_text(mode, key) if mode == "train" else \
                    f"P{key[0]} D{key[1]} (B{key[2]} vs B{k2[2]})"
                pair_rows.append(f"| {blk} / {van} | {mode} | {setting} | "
                                 + " | ".join(ratio(r.get(i), r2.get(i)) for i in IMPLS) + " |")
    if pair_rows:
        out += ["", "| pair (block / vanilla tokens/s) | mode | setting | blocktf | pytorch | pytorch-compile |",
                "| --- | --- | --- | --- | --- | --- |"] + pair_rows
    return "\n".join(out)


SELFTEST_INPUT = """\
device: NVIDIA H200 (fabricated)
| config | micro-batch x T | step ms (median of 10) | tokens/s | TFLOP/s | MFU | GPU memory used |
| block_main_b4_85 | 8 x 2048 | 20.00 | 819200 | 300.0 | 42.3% | 20.5 GiB |
| config | micro-batch x T | step ms (median of 10) | tokens/s | TFLOP/s | MFU | GPU memory used |
| vanilla_160 | 8 x 2048 | 25.00 | 655360 | 320.0 | 45.1% | 22.0 GiB |
some log line | with a bar
| config | prefill | decode | batch | ms | tokens/s |
| broken | x | y | z | 1 | 2 |
| config | prefill | decode | batch | ms per generation (mean +- std of 5) | tokens/s (batch x decode / time) | GPU memory in use |
| --- | --- | --- | --- | --- | --- | --- |
| block_main_b4_85 | 128 | 2048 | 512 | 1000.00 +- 3.00 | 1048576 | 30.00 GiB |
| config | prefill | decode | batch | ms per generation (mean +- std of 5) | tokens/s (batch x decode / time) | GPU memory in use |
| --- | --- | --- | --- | --- | --- | --- |
| vanilla_160 | 128 | 2048 | 128 | 2621.44 +- 1.00 | 100000 | 40.00 GiB |
| impl | config | mode | shape | ms | tokens/s | peak GPU memory |
| --- | --- | --- | --- | --- | --- | --- |
| pytorch | block_main_b4_85 | train | 8 x 2048 | 70.00 | 204800 | 50.00 GiB |
| pytorch-compile | block_main_b4_85 | train | 8 x 2048 | 60.00 | 409600 | 45.00 GiB |
| pytorch | vanilla_160 | train | 8 x 2048 | 60.00 | 327680 | 40.00 GiB |
| pytorch | block_main_b4_85 | generate | P128 D2048 B512 | 10000.00 | 104857.6 | 60.00 GiB |
| pytorch | vanilla_160 | generate | P128 D2048 B128 | 30000.00 | 10000 | 70.00 GiB |
| pytorch | vanilla_410 | generate | P2048 D128 B128 | 8000.00 | 2000 | 70.00 GiB |
"""


def selftest():
    res = parse(SELFTEST_INPUT.splitlines())
    assert set(res) == {("block_main_b4_85", "train", ("mb", 8, 2048)), ("vanilla_160", "train", ("mb", 8, 2048)),
                        ("block_main_b4_85", "generate", (128, 2048, 512)),
                        ("vanilla_160", "generate", (128, 2048, 128)),
                        ("vanilla_410", "generate", (2048, 128, 128))}, sorted(res)
    t = res[("block_main_b4_85", "train", ("mb", 8, 2048))]
    assert t["blocktf"]["tps"] == 819200 and t["blocktf"]["ms"] == 20.0 and t["blocktf"]["extra"] == "MFU 42.3%"
    assert t["pytorch"]["tps"] == 204800 and t["pytorch-compile"]["tps"] == 409600
    g = res[("block_main_b4_85", "generate", (128, 2048, 512))]
    assert g["blocktf"]["ms"] == 1000.0 and g["blocktf"]["mem"] == "30.00 GiB" and g["pytorch"]["tps"] == 104857.6
    text = table(res)
    print(text)
    lines = text.splitlines()

    def line_of(*words):
        hits = [x for x in lines if all(w in x for w in words)]
        assert len(hits) == 1, (words, hits)
        return cells(hits[0])

    r = line_of("| block_main_b4_85 | train")
    assert r[3:8] == ["819,200", "204,800", "409,600", "4.00x", "2.00x"], r
    r = line_of("| vanilla_160 | train")
    assert r[6:8] == ["2.00x", "-"], r
    r = line_of("| block_main_b4_85 | generate")
    assert r[2] == "P128 D2048 B512" and r[6] == "10.00x" and r[7] == "-", r
    r = line_of("| vanilla_410 | generate")
    assert r[3] == "-" and r[6] == "-", r
    r = line_of("block_main_b4_85 / vanilla_160", "| train")
    assert r[3:6] == ["1.25x", "0.62x", "-"], r
    r = line_of("block_main_b4_85 / vanilla_160", "| generate")
    assert r[2] == "P128 D2048 (B512 vs B128)" and r[3] == "10.49x" and r[4] == "10.49x", r
    assert not [x for x in lines if "block_main_b4_300 /" in x]
    print("selftest: passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args()
    if args.selftest:
        selftest()
        return
    lines = []
    if args.files:
        for f in args.files:
            with open(f, errors="replace") as fh:
                lines += fh.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    res = parse(lines)
    if not res:
        sys.exit("ratio_table: no benchmark rows found")
    print(table(res))


if __name__ == "__main__":
    main()
