#!/usr/bin/env python3
"""Side by side: a prefix-shared run and the same steps with sharing off (``data.layout=unshared``).

    python tools/compare_runs.py SHARED_RUN_DIR UNSHARED_RUN_DIR [--json OUT.json]

Over the steps both runs have, prints tokens per step, step time, pairs/s, the measured speed-up
(unshared time / shared time, same code, same machine, same steps) and the largest per-step loss
difference (prefix sharing must not change the numbers). The first step is left out of the timing
(warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_metrics import read_metrics  # noqa: E402


def compare(shared: list[dict], unshared: list[dict]) -> dict:
    """The comparison numbers over the common train steps."""
    a = {r["step"]: r for r in shared if r.get("split", "train") == "train"}
    b = {r["step"]: r for r in unshared if r.get("split", "train") == "train"}
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("compare_runs: the two runs have no step in common")
    timed = steps[1:] if len(steps) > 1 else steps

    def total(run: dict, key: str, which: list[int]) -> float:
        return float(sum(run[s][key] for s in which))

    out = {
        "steps": len(steps),
        "timed_steps": len(timed),
        "tokens_shared": total(a, "tokens", steps),
        "tokens_unshared": total(b, "tokens", steps),
        "time_shared_s": total(a, "step_time_s", timed),
        "time_unshared_s": total(b, "step_time_s", timed),
        "pairs": total(a, "pairs", steps),
        "median_step_s_shared": statistics.median(a[s]["step_time_s"] for s in timed),
        "median_step_s_unshared": statistics.median(b[s]["step_time_s"] for s in timed),
        "max_abs_loss_diff": max(abs(a[s]["loss"] - b[s]["loss"]) for s in steps),
    }
    out["token_ratio"] = out["tokens_unshared"] / out["tokens_shared"]
    out["speedup"] = out["time_unshared_s"] / out["time_shared_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shared")
    ap.add_argument("unshared")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    c = compare(read_metrics(args.shared), read_metrics(args.unshared))
    print(f"same {c['steps']} steps ({c['pairs']:.0f} preference pairs), timing over the last {c['timed_steps']}:")
    print(f"{'':28}{'shared':>14}{'unshared':>14}{'ratio':>9}")
    print(f"{'tokens processed':28}{c['tokens_shared']:>14,.0f}{c['tokens_unshared']:>14,.0f}{c['token_ratio']:>9.2f}")
    print(f"{'time (s)':28}{c['time_shared_s']:>14.1f}{c['time_unshared_s']:>14.1f}{c['speedup']:>9.2f}")
    print(f"{'median step (s)':28}{c['median_step_s_shared']:>14.2f}{c['median_step_s_unshared']:>14.2f}")
    print(f"max |loss(shared) - loss(unshared)| over the common steps: {c['max_abs_loss_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(c, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
