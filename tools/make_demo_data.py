#!/usr/bin/env python3
"""Write the project's own synthetic preference data for the demo (JSONL, the ``ranked`` format).

Verifiable tasks a tiny model can learn on a CPU in minutes: sort letters or two-digit numbers.
Every prompt carries a long shared instruction block (the point of prefix sharing), then the task.
The correct answer is best; corrupted answers swap neighbours (more swaps rank lower). A fraction of
records have K = 4 ranked answers, the rest are pairs (K = 2).

    python tools/make_demo_data.py --output out/demo/demo.jsonl [--records 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

RULES = (
    "You are a meticulous sorting assistant. Return the items of the user's message in ascending "
    "order, separated by single spaces. Letters sort alphabetically, numbers by value. Keep every "
    "item exactly once; never drop, duplicate or invent one. Do not explain and do not add "
    "punctuation. A program checks the answer item by item, so one misplaced item makes it wrong. "
)


def corrupt(items: list[str], swaps: int, rng: random.Random) -> list[str]:
    """Apply ``swaps`` distinct adjacent swaps to a sorted list (each makes the answer worse)."""
    out = list(items)
    positions = rng.sample(range(len(out) - 1), k=min(swaps, len(out) - 1))
    for i in positions:
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def make_record(rng: random.Random, k: int) -> dict:
    """One prompt with ``k`` answers ranked by the number of swaps (0 = correct = rank 0)."""
    n = rng.randint(5, 9)
    if rng.random() < 0.5:
        items = rng.sample(string.ascii_lowercase, n)
        key = str
        what = "letters"
    else:
        items = [str(x) for x in rng.sample(range(10, 100), n)]
        key = int
        what = "numbers"
    task = f"Sort these {what}: {' '.join(items)}"
    best = sorted(items, key=key)
    answers = [best] + [corrupt(best, s, rng) for s in range(1, k)]
    # make sure the answers are distinct (a swap count past the list length can repeat)
    seen, responses, ranks = set(), [], []
    for rank, a in enumerate(answers):
        text = " ".join(a)
        if text not in seen:
            seen.add(text)
            responses.append(text)
            ranks.append(rank)
    order = list(range(len(responses)))
    rng.shuffle(order)  # the best answer is not always first
    return {
        "messages": [{"role": "system", "content": RULES}, {"role": "user", "content": task}],
        "responses": [responses[i] for i in order],
        "ranks": [ranks[i] for i in order],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="JSONL file to write")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--k4-fraction", type=float, default=0.25, help="fraction of records with K = 4 answers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.records < 1:
        raise SystemExit("--records must be >= 1")
    rng = random.Random(args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for _ in range(args.records):
            k = 4 if rng.random() < args.k4_fraction else 2
            fh.write(json.dumps(make_record(rng, k)) + "\n")
    print(f"wrote {args.records} records to {out}")


if __name__ == "__main__":
    main()
