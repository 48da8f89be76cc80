#!/usr/bin/env python3
"""Benchmark the offline dataset builder: synthetic pairs -> built dataset; pairs/s and peak RSS.

    python benchmarks/bench_build.py [--pairs 200000] [--workers 1 2] [--out benchmarks/results/FILE.json]

Writes a JSONL file of synthetic pairs (prompt ~420 bytes, responses ~90 bytes each, so about 600 byte
tokens per pair in the duplicated layout), then runs ``tools/build_dataset.py`` once per worker count
in a fresh process, timing it and reading its peak resident memory (``ru_maxrss`` of the child and its
workers). Prints a table and writes the numbers, with the machine, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_pairs(path: Path, n: int, seed: int = 0) -> int:
    """Synthetic pairs in the string ``pair`` format; returns the file size in bytes."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choices(WORDS, k=70))
            chosen = " ".join(rng.choices(WORDS, k=15))
            rejected = " ".join(rng.choices(WORDS, k=15))
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path.stat().st_size


def run_build(data: Path, out: Path, workers: int) -> dict:
    """Build in a child process; wall time and the child's peak RSS (MiB, largest process)."""
    cmd = [
        sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(data), "--tokenizer", "byte",
        "--output", str(out), "--max-unit-tokens", "2048", "--pack-tokens", "8192", "--workers", str(workers),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stderr[-4000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stats = json.loads((out / "stats.json").read_text())
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "pairs": stats["units"],
        "pairs_per_s": round(stats["units"] / wall, 1),
        "peak_rss_mib": round(max(peak_kib, before) / 1024, 1),
        "token_ratio": stats["token_ratio"],
        "pack_fill": stats["pack_fill"],
        "skipped": stats["skipped_total"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        size = write_pairs(data, args.pairs)
        runs = []
        for w in args.workers:
            runs.append(run_build(data, Path(tmp) / f"ds{w}", w))
            print(json.dumps(runs[-1]), flush=True)
        identical = None
        if len(runs) > 1:
            a, b = Path(tmp) / f"ds{args.workers[0]}", Path(tmp) / f"ds{args.workers[1]}"
            identical = subprocess.run(["diff", "-rq", str(a), str(b)], capture_output=True).returncode == 0
    result = {
        "benchmark": "build_dataset",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "input_pairs": args.pairs,
        "input_mib": round(size / 2**20, 1),
        "tokenizer": "byte",
        "runs": runs,
        "outputs_identical_across_workers": identical,
        "note": "peak_rss_mib is ru_maxrss of the largest child process (builder or one of its workers)",
    }
    print(f"{'workers':>8} {'wall s':>8} {'pairs/s':>10} {'peak RSS MiB':>13}")
    for r in runs:
        print(f"{r['workers']:>8} {r['wall_s']:>8} {r['pairs_per_s']:>10} {r['peak_rss_mib']:>13}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
