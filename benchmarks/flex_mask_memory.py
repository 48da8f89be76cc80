#!/usr/bin/env python3
"""Peak memory of building the flex ``BlockMask`` for one micro-batch: eager vs compiled, on CPU.

    python benchmarks/flex_mask_memory.py [--tokens 16384 32768] [--block 128] [--out FILE.json]

Each (tokens, mode) runs in a fresh subprocess: the builder (``attention.flex.block_mask_from_ids``, the
code the ``flex`` backend runs) is called once to warm up (and compile), then on a *different*
micro-batch of the same shape while the process's peak RSS is tracked (``/proc/self/clear_refs`` resets
VmHWM; peak = VmHWM - RSS before the call). Rows are realistic: units with a prompt and 2-4 responses.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(tokens: int, mode: str, block: int) -> dict:
    """Measure one (tokens, mode) in this process."""
    import torch

    from megatron_prefix.attention.flex import block_mask_from_ids, count_blocks
    from megatron_prefix.attention.params import SharedPrefixParams
    from tests.dist_scripts.attention_common import random_rows

    torch.set_num_threads(1)

    def params(seed):
        return SharedPrefixParams.from_rows(random_rows(seed, 1, tokens, max_prompt=900, max_resp=400))

    warm, run = params(0), params(1)
    t0 = time.perf_counter()
    block_mask_from_ids(warm.doc_ids, warm.segment_ids, None, block, compile_=mode == "compiled")
    first_s = time.perf_counter() - t0
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    bm = block_mask_from_ids(run.doc_ids, run.segment_ids, None, block, compile_=mode == "compiled")
    build_s = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    return {"tokens": tokens, "mode": mode, "block_size": block, "peak_bytes": peak,
            "peak_mib": round(peak / 2**20, 1), "build_s": round(build_s, 3), "first_call_s": round(first_s, 2),
            "blocks": count_blocks(bm), "dense_mask_bytes": tokens * tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.block)))
        return
    results = []
    for tokens in args.tokens:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--child", str(tokens), mode, "--block", str(args.block)],
                                  capture_output=True, text=True, cwd=ROOT, check=False)
            if proc.returncode:
                results.append({"tokens": tokens, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    import torch

    doc = {"benchmark": "flex_mask_memory", "device": "cpu", "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "what": "peak RSS growth while building one micro-batch's flex BlockMask (B=1, H broadcast)",
           "results": results}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
