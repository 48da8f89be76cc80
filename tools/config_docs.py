#!/usr/bin/env python3
"""Write or check docs/config.md, the reference of every training-config key (generated).

    python tools/config_docs.py --write     # regenerate docs/config.md
    python tools/config_docs.py --check     # exit 1 when docs/config.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prefix.config_docs import render  # noqa: E402
from megatron_prefix.training.config import TrainConfig  # noqa: E402

DOC = ROOT / "docs" / "config.md"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = render(TrainConfig)
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
        return 0
    if not DOC.is_file() or DOC.read_text() != text:
        print(f"{DOC} is stale: run python tools/config_docs.py --write", file=sys.stderr)
        return 1
    print(f"{DOC} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
