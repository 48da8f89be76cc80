"""HF LLaVA -> megatron conversion under torchrun (gloo), one folder per key layout.

    torchrun --nproc-per-node=2 tests/dist_scripts/llava_convert.py --work DIR --layouts tf5,hub,v4 --tp 2 --pp 1

Every rank converts ``DIR/hf_<layout>`` into ``DIR/run_<layout>_tp<T>pp<P>`` collectively (each reads its
own layers and TP shards); ``tests/test_llava_convert.py`` exports the results and compares them with
the source bit for bit. Prints ``CONVERTED <layout>`` on rank 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    args = ap.parse_args()

    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import destroy_parallel, init_parallel

    init_parallel(args.tp, args.pp, 1)
    work = Path(args.work)
    for layout in args.layouts.split(","):
        convert_hf_to_mcore(work / f"hf_{layout}", work / f"run_{layout}_tp{args.tp}pp{args.pp}", progress=False)
        if dist.get_rank() == 0:
            print(f"CONVERTED {layout}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
