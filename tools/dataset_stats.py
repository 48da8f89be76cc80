#!/usr/bin/env python3
"""Print a built dataset's statistics (its stats.json) as a table.

    python tools/dataset_stats.py DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prefix.data.stats import format_stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a directory written by tools/build_dataset.py")
    ap.add_argument("--json", action="store_true", help="print the raw JSON instead of the table")
    args = ap.parse_args(argv)
    path = Path(args.dataset) / "stats.json"
    if not path.is_file():
        print(f"dataset_stats: error: {path} not found; build the dataset with tools/build_dataset.py", file=sys.stderr)
        return 2
    stats = json.loads(path.read_text())
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
