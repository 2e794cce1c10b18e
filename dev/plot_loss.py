#!/usr/bin/env python3
"""Plot training and validation loss from the log.csv files that ./train writes.

usage: python3 dev/plot_loss.py OUT.png LABEL=DIR/log.csv [LABEL=DIR/log.csv ...]

Training loss is drawn as a thin line, validation loss as markers joined by a thick line, one colour per run,
against the tokens trained on (left) and the time spent in training steps (right; validation and checkpoints are
not counted).
A resumed run logs the steps after its checkpoint again; the last row of each step is kept. Needs matplotlib
(a dev tool only: nothing in training or generation depends on it).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_log(path):
    """Rows by step (the last of each step); returns (tokens_M, minutes, loss) per step and the validation points."""
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["step"])] = row
    tokens = minutes = 0.0
    train, val = [], []
    for s in sorted(rows):
        ms = float(rows[s]["ms"])
        tokens += float(rows[s]["tokens_per_s"]) * ms / 1000.0 / 1e6
        minutes += ms / 60000.0
        train.append((tokens, minutes, float(rows[s]["loss"])))
        if rows[s]["val_loss"]:
            val.append((tokens, minutes, float(rows[s]["val_loss"])))
    return train, val


def main():
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        sys.exit(__doc__)
    out = sys.argv[1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for i, spec in enumerate(sys.argv[2:]):
        label, path = spec.split("=", 1)
        train, val = read_log(path)
        colour = f"C{i}"
        for ax, x in zip(axes, (0, 1)):
            ax.plot([r[x] for r in train], [r[2] for r in train], color=colour, linewidth=0.8, alpha=0.5, label=f"{label} train")
            if val:
                ax.plot([r[x] for r in val], [r[2] for r in val], color=colour, linewidth=2, marker="o", markersize=3,
                        label=f"{label} validation")
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training time (minutes, steps only)")
    axes[0].set_ylabel("cross-entropy (nats per token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle("blocktf: make train on the shipped texts (H200)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
