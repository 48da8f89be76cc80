"""Sequence parallelism (local spec, gloo) on 4 CPU processes: log-probs, reward hidden states, gradients.

Layouts: ``tp2sp`` (TP=2 + sequence parallelism, DP=2) and ``tp2cp2sp`` (TP=2 x CP=2 + sequence
parallelism). Same model and rows as ``model_parity`` (``tests/test_sequence_parallel.py`` compares with
the single-process run). Norm-weight gradients are summed over the TP group for every parameter megatron
marks ``sequence_parallel`` (what ``finalize_model_grads`` does in training): a norm that is not marked
leaves its gradient partial and the comparison fails. ``--collectives fallback`` forces the gloo fallback
collectives of ``megatron_prefix.compat.sp_collectives``. Rank 0 writes ``--out``.

    torchrun --nproc-per-node=4 tests/dist_scripts/sp_parity.py --out /tmp/sp.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from tests.dist_scripts.model_common import full_grads, loss_weights, randomize_, tiny_config
from tests.dist_scripts.model_parity import MODEL_SEED, parity_rows

LAYOUTS = {"tp2sp": (2, 1), "tp2cp2sp": (2, 2)}  # name: (tp, cp)
FAMILY = "qwen2"


def run_layout(tp: int, cp: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import last_token_hidden, response_logprobs
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.parallel import init_parallel

    info = init_parallel(tp, 1, cp, seed=1234)
    cfg = tiny_config(FAMILY)
    model = build_model(cfg, "dense", sequence_parallel=True, impl="local")
    assert model.config.sequence_parallel
    marked = [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert marked and all("layernorm" in n for n in marked), marked
    randomize_(model, MODEL_SEED)
    mb = MicroBatch.from_rows(parity_rows(cfg), cp_size=info.cp_size, cp_rank=info.cp_rank)
    tp_group, cp_group = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()

    with torch.no_grad():
        hidden_sbh = mb.forward(model, return_hidden=True)
        last = last_token_hidden(hidden_sbh, mb.index, cp_group=cp_group)
    out = response_logprobs(mb.forward(model), mb.index, tp_group=tp_group, cp_group=cp_group)
    (loss_weights(out.logps.numel()) * out.logps).sum().backward()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=tp_group)
    grads = full_grads(model)
    if cp > 1:
        for g in grads.values():
            dist.all_reduce(g, group=cp_group)
    return {"logps": out.logps.detach(), "last_hidden": last, "grads": grads, "marked": marked}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--collectives", choices=("native", "fallback"), default="native")
    args = parser.parse_args()
    if args.collectives == "fallback":
        from megatron_prefix.compat import sp_collectives

        sp_collectives.FORCE_FALLBACK = True
    results = {name: run_layout(*LAYOUTS[name]) for name in args.layouts.split(",")}
    if args.collectives == "fallback":
        from megatron_prefix.compat import sp_collectives

        assert sp_collectives.FALLBACK_CALLS["all_gather"] and sp_collectives.FALLBACK_CALLS["reduce_scatter"]
    if dist.get_rank() == 0:
        torch.save(results, args.out)
        print("OK", sorted(results))
    from megatron_prefix.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
