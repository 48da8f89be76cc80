#!/usr/bin/env python3
"""Convert a Hugging Face llama / qwen2 / mistral checkpoint (safetensors), or a LLaVA one
(LlavaForConditionalGeneration: CLIP vision tower, MLP projector, llama / qwen2 / mistral language
model; any of its key layouts), to our megatron checkpoint.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out RUN_DIR [--tp N --pp N] [--dtype bfloat16]
    torchrun --nproc-per-node=8 tools/convert_hf_to_mcore.py --hf HF_DIR --out RUN_DIR --tp 4 --pp 2

Writes RUN_DIR/iter_0000000 (dist_checkpointing, key `model`, plus train_state.json) and RUN_DIR/latest;
use it as `checkpoint.load: RUN_DIR` at any TP/PP. Under torchrun each rank reads only its layers and
tensor-parallel shards; --tp/--pp default to the world layout (tp*pp must equal the number of
processes). Runs on CPU with gloo. --task rm adds a fresh scalar reward head instead of the LM head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from megatron_prefix.model.config import DTYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="run directory to create (must be absent or empty)")
    ap.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: world / pp)")
    ap.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default: world / tp)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="stored dtype (default: config.json's)")
    ap.add_argument("--task", choices=("dpo", "rm"), default="dpo")
    ap.add_argument("--seed", type=int, default=1234, help="init seed of the reward head (--task rm)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from megatron_prefix.convert import convert_hf_to_mcore

    try:
        out = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, task=args.task,
                                  seed=args.seed, progress=not args.no_progress)
    except ValueError as err:
        print(f"convert_hf_to_mcore: error: {err}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out} (load it with checkpoint.load: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
