#!/usr/bin/env python3
"""The GPU suite's summary: one JSON with every step's status and results, and the train-step plot.

    python benchmarks/suite_summary.py --status STATUS_TSV --raw RAW_DIR --out OUT_DIR [--rehearse]

``STATUS_TSV`` has one line per step: ``name<TAB>status<TAB>seconds<TAB>note`` (status: ok, failed,
timeout, refused, skipped), written by ``benchmarks/gpu_suite.sh`` as the steps finish. Results are the
JSON files the steps wrote under ``RAW_DIR`` (``train_<backend>.json``, ``loss_curve.json``, the
attention sweep's ``*.json``); they are embedded as they are. Writes ``OUT_DIR/summary.json`` and, when
any train-step result exists, ``OUT_DIR/train_step.png`` (measured time ratio beside the ideal token and
pair ratios, and peak-memory ratio, per backend).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def read_status(path: Path) -> list[dict]:
    """Steps in the order they ran."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            out.append({"name": name, "status": status, "seconds": float(seconds or 0), "note": note})
    return out


def read_results(raw: Path) -> dict:
    """{relative path: parsed JSON} of every ``*.json`` under ``raw`` (unparsable ones as an error note)."""
    out = {}
    for path in sorted(raw.rglob("*.json")) if raw.is_dir() else []:
        if "loss_curve_runs" in path.parts or path.name in ("meta.json", "stats.json"):
            continue
        try:
            out[str(path.relative_to(raw))] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out[str(path.relative_to(raw))] = {"error": f"unreadable: {err}"}
    return out


def plot_train(results: dict, output: Path) -> bool:
    """Bars per backend: ideal token ratio, ideal pair ratio, measured time ratio, peak-memory ratio."""
    rows = [(k.removeprefix("train_").removesuffix(".json"), v) for k, v in results.items()
            if Path(k).name.startswith("train_") and "time_ratio" in v]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("ideal_token_ratio", "ideal_pair_ratio", "time_ratio", "peak_memory_ratio")
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 3.6))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [float(v.get(key) or 0) for _, v in rows], width, label=key)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [name for name, _ in rows])
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylabel("unshared / shared")
    ax.set_title(f"DPO step, sharing on vs off ({rows[0][1].get('device', '?')})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--status", required=True, type=Path)
    ap.add_argument("--raw", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--device", default="")
    args = ap.parse_args(argv)
    steps = read_status(args.status)
    results = read_results(args.raw)
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = plot_train(results, args.out / "train_step.png")
    summary = {
        "suite": "benchmarks/gpu_suite.sh", "rehearsal": args.rehearse, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device, "steps": steps,
        "ok": all(s["status"] in ("ok", "refused", "skipped") for s in steps) and bool(steps),
        "train_step_plot": "train_step.png" if plotted else None,
        "results": results,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s in steps:
        print(f"{s['name']:<24} {s['status']:<8} {s['seconds']:7.1f}s  {s['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
