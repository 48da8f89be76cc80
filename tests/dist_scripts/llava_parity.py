"""LLaVA conversion and logits under torchrun (gloo): convert at the world layout, load, compare with HF.

    torchrun --nproc-per-node=2 tests/dist_scripts/llava_parity.py --work DIR --kind default --tp 2 --pp 1 [--cp 1]

``DIR/hf_<kind>`` is the HF folder, ``DIR/run_<kind>`` its TP=1 conversion and ``DIR/ref_<kind>.pt`` the
sample with HF's logits (written by ``tests/test_llava_model.py``). Every rank converts ``hf_<kind>`` into
``DIR/run_<kind>_tp<T>pp<P>`` collectively (not with ``--cp`` > 1: then only the TP=1 checkpoint is
loaded, and each CP rank feeds its slice of the tokens and of ``image_feature_index``); the model is built at this layout, loaded from that
checkpoint and from the TP=1 one (and, at TP > 1 without PP, from it again with sequence parallelism),
and the last stage's TP / CP rank 0 prints ``REL own <value>`` / ``REL from_tp1 <value>`` / ``REL own_sp
<value>`` (max relative logit difference against HF).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tests.dist_scripts import llava_common as lc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--cp", type=int, default=1)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import destroy_parallel, init_parallel

    work = Path(args.work)
    ref = torch.load(work / f"ref_{args.kind}.pt", weights_only=True)
    hf = work / f"hf_{args.kind}"
    cases = [("from_tp1", work / f"run_{args.kind}", False)]
    if args.cp == 1:  # a conversion runs at tp*pp = world
        own = work / f"run_{args.kind}_tp{args.tp}pp{args.pp}"
        init_parallel(args.tp, args.pp, 1)
        convert_hf_to_mcore(hf, own, progress=False)
        cases.append(("own", own, False))
        if args.tp > 1 and args.pp == 1:
            cases.append(("own_sp", own, True))
    init_parallel(args.tp, args.pp, args.cp)
    image = lc.image_token_id(hf)
    for name, run, sp in cases:
        model = lc.load_llava(run, sequence_parallel=sp)
        logits = lc.our_logits(model, ref["ids"], ref["prompt_len"], ref["pixels"], image)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
            print(f"REL {name} {lc.rel_diff(logits, ref['logits']):.3e}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
