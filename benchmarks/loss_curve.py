#!/usr/bin/env python3
"""A short DPO loss curve in bf16 held against the same steps in fp32 (the GPU suite's precision check).

    python benchmarks/loss_curve.py --data BUILT_DIR --out DIR [--steps 30] [--preset gpu-small|cpu-tiny]
                                    [--dtypes float32,bfloat16]

Trains the same recipe (``launch/train_dpo.py``, same seed, same data, precomputed reference in each
run's own dtype) once per dtype and writes ``DIR/loss_curve.json`` (per-step losses, the largest
absolute and relative per-step difference against the first dtype, final losses) and
``DIR/loss_curve.png``. On CPU training runs in fp32 only (``train.dtype``), so ``--dtypes
float32,float32`` there checks the plumbing (the difference must then be 0: the runs are deterministic).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from plot_metrics import plot, read_metrics

PRESETS = {
    "cpu-tiny": {"family": "llama", "hidden_size": 64, "ffn_hidden_size": 128, "num_layers": 2,
                 "num_attention_heads": 4, "num_query_groups": 2, "max_position_embeddings": 4096},
    "gpu-small": {"family": "llama", "hidden_size": 1024, "ffn_hidden_size": 2816, "num_layers": 8,
                  "num_attention_heads": 16, "num_query_groups": 4, "max_position_embeddings": 8192},
}


def train(data: Path, run_dir: Path, model: dict, dtype: str, steps: int, pack_tokens: int, units: int,
          backend: str) -> float:
    """One training run; returns its wall time. Raises SystemExit with the run's output on failure."""
    recipe = {
        "model": model,
        "data": {"path": str(data), "pack_tokens": pack_tokens, "global_batch_units": units, "eval_fraction": 0.0},
        "optimizer": {"lr": 3e-4, "clip_grad": 1.0},
        "schedule": {"warmup_steps": 2},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "attention": {"backend": backend},
        "logging": {"tensorboard": False, "interval": 1},
        "checkpoint": {"dir": str(run_dir), "interval": 0, "save_at_end": False},
        "reference": {"path": str(run_dir / "reference")},
        "train": {"max_steps": steps, "dtype": dtype, "seed": 7},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train_dpo.py"), "--config",
                           str(run_dir / "recipe.yaml")], cwd=ROOT, capture_output=True, text=True, check=False)
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"loss_curve: the {dtype} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-small")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list; the first is the baseline")
    ap.add_argument("--pack-tokens", type=int, default=4096)
    ap.add_argument("--global-batch-units", type=int, default=16)
    ap.add_argument("--backend", default="dense")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    curves, walls = {}, {}
    for i, dtype in enumerate(dtypes):
        run_dir = args.out / "loss_curve_runs" / f"{i}_{dtype}"
        walls[dtype] = train(args.data, run_dir, PRESETS[args.preset], dtype, args.steps, args.pack_tokens,
                             args.global_batch_units, args.backend)
        curves[f"{i}_{dtype}"] = read_metrics(run_dir)
    names = list(curves)
    losses = {n: [r["loss"] for r in curves[n] if r.get("split", "train") == "train"] for n in names}
    base = losses[names[0]]
    diffs = {}
    for n in names[1:]:
        d = [abs(a - b) for a, b in zip(base, losses[n])]
        diffs[n] = {"max_abs_diff": max(d), "max_rel_diff": max(x / max(abs(b), 1e-12) for x, b in zip(d, base)),
                    "final_abs_diff": d[-1]}
    out = {"benchmark": "loss curve per dtype", "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
           "model": PRESETS[args.preset], "steps": args.steps, "dtypes": dtypes, "backend": args.backend,
           "losses": losses, "against_first": diffs, "wall_s": walls}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_curve.json").write_text(json.dumps(out, indent=2) + "\n")
    plot({n: curves[n] for n in names}, args.out / "loss_curve.png")
    print(json.dumps({"against_first": diffs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
