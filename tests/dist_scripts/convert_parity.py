"""HF -> megatron conversion under torchrun (gloo): convert at the world layout, load, compare logits.

    torchrun --nproc-per-node=2 tests/dist_scripts/convert_parity.py --work DIR --kinds llama,qwen2 \\
        --tp 2 --pp 1 [--reshard-from run_tp1]

For each kind, ``DIR/hf_<kind>`` is a Hugging Face checkpoint and ``DIR/ref_<kind>.pt`` its reference
``{"tokens": [L], "logits": [L, V]}`` (written by ``tests/test_convert.py``). Every rank converts
``hf_<kind>`` into ``DIR/<kind>_tp<T>pp<P>`` collectively (each rank reads its own shards), then the
model is rebuilt at this layout, loaded from it (and, with ``--reshard-from NAME``, also from
``DIR/<kind>_NAME``, a checkpoint written at another layout), and the last stage prints
``MAXDIFF <kind> <source> <value>`` (max |logit diff| against HF).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tests.dist_scripts import convert_common as cc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--kinds", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--reshard-from", default=None)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import destroy_parallel, init_parallel

    init_parallel(args.tp, args.pp, 1)
    work = Path(args.work)
    for kind in args.kinds.split(","):
        ref = torch.load(work / f"ref_{kind}.pt", weights_only=True)
        name = f"tp{args.tp}pp{args.pp}"
        convert_hf_to_mcore(work / f"hf_{kind}", work / f"{kind}_{name}", progress=False)
        init_parallel(args.tp, args.pp, 1)
        sources = [name] + ([args.reshard_from] if args.reshard_from else [])
        for source in sources:
            model = cc.load_converted(work / f"{kind}_{source}")
            logits = cc.megatron_logits(model, ref["tokens"])
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                diff = (logits - ref["logits"]).abs().max().item()
                print(f"MAXDIFF {kind} {source} {diff:.3e}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
