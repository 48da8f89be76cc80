#!/usr/bin/env python3
"""Draw loss, reward margin, accuracy, learning rate, grad norm and throughput of one or more runs to a PNG.

    python tools/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [...] --output curves.png [--labels a b]

Each input is a run directory (its ``metrics.jsonl``) or a metrics file. Train curves are lines,
held-out (``split: eval``) points are markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("margin", "reward margin"), ("accuracy", "accuracy"),
          ("lr", "learning rate"), ("grad_norm", "grad norm"), ("tokens_per_s", "throughput (tokens/s)"))
COLUMNS = 3


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a run dir or a metrics.jsonl file (lines that do not parse are skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_metrics: {path} not found")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot(runs: dict[str, list[dict]], output: str | Path) -> None:
    """Write the figure for ``runs`` (label -> records): one panel per metric in ``PANELS``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("plot_metrics: needs matplotlib (pip install matplotlib)") from err
    rows = -(-len(PANELS) // COLUMNS)
    fig, grid = plt.subplots(rows, COLUMNS, figsize=(5 * COLUMNS, 3.4 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax, (key, title) in zip(axes, PANELS):
        for label, recs in runs.items():
            train = [(r["step"], r[key]) for r in recs if r.get("split", "train") == "train" and key in r]
            held = [(r["step"], r[key]) for r in recs if r.get("split") == "eval" and key in r]
            if train:
                line = ax.plot(*zip(*train), label=f"{label} train", linewidth=1.2)[0]
                color = line.get_color()
            else:
                color = None
            if held:
                ax.plot(*zip(*held), "o--", color=color, label=f"{label} held-out", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "accuracy":
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} in these runs", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--output", required=True)
    ap.add_argument("--labels", nargs="*", default=None)
    args = ap.parse_args(argv)
    labels = args.labels or [Path(p).name for p in args.inputs]
    if len(labels) != len(args.inputs):
        raise SystemExit("plot_metrics: --labels needs one label per input")
    plot({lab: read_metrics(p) for lab, p in zip(labels, args.inputs)}, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
