#!/usr/bin/env python3
"""The short summary that ends ``make demo``: speed-up measured beside the ideal, held-out accuracy
before and after, where the plot is.

    python tools/demo_summary.py SHARED_RUN_DIR UNSHARED_RUN_DIR --plot out/demo/curves.png [--seconds S]

Speed-up: unshared time / shared time over the steps both runs have (``compare_runs.compare``; the first
step is warm-up and left out). Ideal: the token ratio (unshared tokens / shared tokens of the same steps),
the speed-up if time were proportional to tokens. Accuracy: the held-out (eval split) pair accuracy of the
shared run, first and last evaluation; when there is no evaluation at step 0 the baseline is stated: at
step 0 the policy is the reference, every reward margin is 0 and no pair is ranked (chance: 0.5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_runs import compare
from plot_metrics import read_metrics


def summary(shared: list[dict], unshared: list[dict], plot: str, seconds: float | None = None) -> list[str]:
    """The summary lines (pure: from the two runs' metrics records)."""
    c = compare(shared, unshared)
    evals = sorted((r for r in shared if r.get("split") == "eval" and "accuracy" in r), key=lambda r: r["step"])
    train_steps = max((r["step"] for r in shared if r.get("split", "train") == "train"), default=0)
    lines = ["", "=" * 72, "demo summary" + (f" (make demo took {seconds / 60:.1f} min)" if seconds else "")]
    lines.append(f"  speed-up from prefix sharing: {c['speedup']:.2f}x measured (same {c['steps']} steps, "
                 f"step time unshared/shared)")
    lines.append(f"                                {c['token_ratio']:.2f}x ideal (tokens unshared/shared: "
                 f"{c['tokens_unshared']:,.0f} / {c['tokens_shared']:,.0f})")
    lines.append(f"  loss shared vs unshared: max difference {c['max_abs_loss_diff']:.1e} (the same numbers)")
    if evals:
        last = evals[-1]
        if evals[0]["step"] == 0:
            before = f"{evals[0]['accuracy']:.3f} at step 0"
        else:
            before = "not measured (at step 0 the policy is the reference: every margin is 0; chance is 0.5)"
        lines.append(f"  held-out accuracy ({last['pairs']:.0f} pairs): before {before}")
        lines.append(f"                                   after  {last['accuracy']:.3f} at step {last['step']}"
                     f" of {train_steps}")
    else:
        lines.append("  held-out accuracy: no evaluation in the shared run (data.eval_fraction is 0?)")
    lines.append(f"  curves (loss, accuracy, shared vs unshared): {plot}")
    lines.append("=" * 72)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shared")
    ap.add_argument("unshared")
    ap.add_argument("--plot", required=True, help="the plot's path (printed)")
    ap.add_argument("--seconds", type=float, default=None, help="wall time of the whole demo (printed)")
    args = ap.parse_args(argv)
    print("\n".join(summary(read_metrics(args.shared), read_metrics(args.unshared), args.plot, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
