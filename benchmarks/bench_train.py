#!/usr/bin/env python3
"""Training speed-up of prefix sharing: the same steps with sharing on and off, side by side, one run.

    python benchmarks/bench_train.py [--preset cpu-tiny|gpu-1b] [--steps 12] [--backend dense]
                                     [--out benchmarks/results/FILE.json]

Builds a synthetic preference set with long shared prompts (the project's sorting data, K = 2 and 4,
byte tokenizer), then trains with ``data.layout=shared`` and ``data.layout=unshared`` for the same
steps with the same code (``launch/train_dpo.py``), and reports the measured ratio of step times, of
tokens, the loss agreement, and the device. The first step is excluded from timing (warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from compare_runs import compare  # noqa: E402
from plot_metrics import read_metrics  # noqa: E402

PRESETS = {
    "cpu-tiny": {
        "model": {"family": "llama", "hidden_size": 96, "ffn_hidden_size": 256, "num_layers": 3,
                  "num_attention_heads": 4, "num_query_groups": 2, "max_position_embeddings": 4096},
        "records": 800, "pack_tokens": 2048, "global_batch_units": 32, "dtype": "float32",
    },
    "gpu-1b": {
        "model": {"family": "llama", "hidden_size": 2048, "ffn_hidden_size": 5632, "num_layers": 16,
                  "num_attention_heads": 16, "num_query_groups": 4, "max_position_embeddings": 16384},
        "records": 6000, "pack_tokens": 8192, "global_batch_units": 128, "dtype": "bfloat16",
    },
}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--backend", default="dense")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run([sys.executable, "tools/make_demo_data.py", "--output", str(tmp / "d.jsonl"), "--records", str(p["records"])])
        run([sys.executable, "tools/build_dataset.py", "--input", str(tmp / "d.jsonl"), "--tokenizer", "byte",
             "--output", str(tmp / "data"), "--max-unit-tokens", "1024", "--pack-tokens", str(p["pack_tokens"])])
        recipe = {
            "model": p["model"],
            "data": {"path": str(tmp / "data"), "pack_tokens": p["pack_tokens"],
                     "global_batch_units": p["global_batch_units"]},
            "optimizer": {"lr": 1e-4},
            "loss": {"type": "sigmoid", "beta": 0.1},
            "attention": {"backend": args.backend},
            "logging": {"tensorboard": False, "interval": 1},
            "checkpoint": {"dir": str(tmp / "run"), "save_at_end": False},
            "train": {"max_steps": args.steps, "dtype": p["dtype"]},
        }
        (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
        runs = {}
        for layout in ("shared", "unshared"):
            t0 = time.perf_counter()
            run([sys.executable, "launch/train_dpo.py", "--config", str(tmp / "r.yaml"), f"data.layout={layout}",
                 f"checkpoint.dir={tmp / layout}"])
            runs[layout] = time.perf_counter() - t0
        result = compare(read_metrics(tmp / "shared"), read_metrics(tmp / "unshared"))
        stats = json.loads((tmp / "data" / "stats.json").read_text())
    out = {
        "benchmark": "train_dpo shared vs unshared",
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
        "preset": args.preset,
        "model": p["model"],
        "attention_backend": args.backend,
        "pack_tokens": p["pack_tokens"],
        "global_batch_units": p["global_batch_units"],
        "dataset_token_ratio": stats["token_ratio"],
        "dataset_attention_pair_ratio": stats["attention_pair_ratio"],
        **result,
        "wall_s_including_startup_and_reference": {k: round(v, 1) for k, v in runs.items()},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
