#!/usr/bin/env python3
"""Export one of our megatron checkpoints (any TP/PP; a run dir with `latest` or a checkpoint dir) to a
Hugging Face checkpoint loadable by transformers.

    python tools/convert_mcore_to_hf.py --ckpt RUN_OR_CKPT_DIR --out HF_DIR [--tokenizer TOK_DIR]
        [--dtype bfloat16] [--shard-size 5GB] [--hf-config SRC/config.json|SRC_DIR] [--reward-bias refuse|drop]

Writes model-0000X-of-0000N.safetensors, model.safetensors.index.json, config.json (and the tokenizer
files of --tokenizer). A policy becomes <Family>ForCausalLM, a reward model (task rm)
<Family>ForSequenceClassification with one label (score.weight); HF's score layer has no bias, so a
non-zero reward-head bias is refused unless --reward-bias drop (recorded as config.json `reward_bias`).
config.json gets bos/eos/pad token ids: those --hf-config sets (the source model's config.json or its
folder), else the tokenizer's (--tokenizer, or the tokenizer recorded with the checkpoint at save, or
in its training dataset's meta.json). Single process.

A LLaVA checkpoint (converted from a `model_type: llava` folder) becomes LlavaForConditionalGeneration, in
the key layout the installed transformers writes; --tokenizer HF_LLAVA_DIR copies the tokenizer and
processor files (default: from the LLaVA folder it was converted from, when recorded and still present;
its config.json also supplies the token ids unless --hf-config is given). A LLaVA reward model is
refused (transformers has no LLaVA sequence-classification class).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '123' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--shard-size: cannot parse {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv: list[str] | None = None) -> int:
    from megatron_prefix.model.config import DTYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory (with `latest`) or checkpoint directory")
    ap.add_argument("--out", required=True, help="HF folder to create (must be absent or empty)")
    ap.add_argument("--tokenizer", default=None,
                    help="folder whose tokenizer files are copied; its bos/eos/pad ids go into config.json "
                         "(default ids: the tokenizer recorded with the checkpoint or its dataset)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="written dtype (default: the checkpoint's)")
    ap.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="max bytes per shard (default 5GB)")
    ap.add_argument("--hf-config", default=None,
                    help="source config.json, or the folder holding it, to take token ids from (first choice)")
    ap.add_argument("--reward-bias", choices=("refuse", "drop"), default="refuse")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from megatron_prefix.convert import convert_mcore_to_hf

    try:
        out = convert_mcore_to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                                  shard_size=args.shard_size, hf_config=args.hf_config,
                                  reward_bias_mode=args.reward_bias, progress=not args.no_progress)
    except ValueError as err:
        print(f"convert_mcore_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
