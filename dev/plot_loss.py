#!/usr/bin/env python3
"""Plot training and validation loss from the log.csv files that ./train writes.

usage: python3 dev/plot_loss.py OUT.png LABEL=DIR/log.csv [LABEL=DIR/log.csv ...]

Training loss is drawn as a thin line, validation loss as markers joined by a thick line, one colour per run.
A resumed run logs the steps after its checkpoint again; the last row of each step is kept. Needs matplotlib
(a dev tool only: nothing in training or generation depends on it).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_log(path):
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["step"])] = row
    steps = sorted(rows)
    train = [(s, float(rows[s]["loss"])) for s in steps]
    val = [(s, float(rows[s]["val_loss"])) for s in steps if rows[s]["val_loss"]]
    return train, val


def main():
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        sys.exit(__doc__)
    out = sys.argv[1]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, spec in enumerate(sys.argv[2:]):
        label, path = spec.split("=", 1)
        train, val = read_log(path)
        colour = f"C{i}"
        ax.plot(*zip(*train), color=colour, linewidth=0.8, alpha=0.5, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=colour, linewidth=2, marker="o", label=f"{label} validation")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("blocktf: make train on the shipped texts (H200)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
