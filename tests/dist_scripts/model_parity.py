"""Run the shared model under several parallel layouts on 4 CPU processes; save log-probs and grads.

Layouts (data parallel fills the rest of the 4 ranks): ``tp2``, ``cp2``, ``tp2cp2`` (qwen2: QKV bias, tied embeddings, GQA), ``pp2`` (llama; a hand-written 2-stage
forward/backward with send/recv: positions reach the second stage through ``position_ids``).
Sequence parallelism needs the Transformer-Engine spec (megatron's torch norm refuses it): GPU only. Every layout holds
the same model (``model_common.randomize_`` seeds by global parameter name) and the same rows as the
single-process run in ``tests/test_model.py::test_tp_cp_pp_match_single_process``, which compares.

Gradients are reported at full shape: TP shards all-gathered, CP contributions summed (see
``megatron_prefix.model.logprobs``), pipeline stages merged. Rank 0 writes ``--out``.

    torchrun --nproc-per-node=4 tests/dist_scripts/model_parity.py --out /tmp/parity.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from tests.dist_scripts.model_common import (
    full_grads,
    loss_weights,
    pack_units,
    random_units,
    randomize_,
    tiny_config,
)

LAYOUTS = {  # name: (tp, pp, cp, family, sequence_parallel)
    "tp2": (2, 1, 1, "qwen2", False),
    "cp2": (1, 1, 2, "qwen2", False),
    "tp2cp2": (2, 1, 2, "qwen2", False),
    "pp2": (1, 2, 1, "llama", False),
}
MODEL_SEED, DATA_SEED = 11, 5


def parity_rows(cfg):
    """The rows every layout and the single-process reference use."""
    units = random_units(seed=DATA_SEED, vocab=cfg.vocab_size, ks=(2, 4, 3, 2))
    return pack_units(units, per_row=2, pack_tokens=64)


def run_layout(tp: int, pp: int, cp: int, family: str, sequence_parallel: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import response_logprobs
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.parallel import init_parallel

    info = init_parallel(tp, pp, cp, seed=1234)
    cfg = tiny_config(family)
    model = build_model(cfg, "dense", sequence_parallel=sequence_parallel)
    randomize_(model, MODEL_SEED)
    mb = MicroBatch.from_rows(parity_rows(cfg), cp_size=info.cp_size, cp_rank=info.cp_rank)
    tp_group, cp_group = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()

    logps = None
    if pp == 1:
        out = response_logprobs(mb.forward(model), mb.index, tp_group=tp_group, cp_group=cp_group)
        (loss_weights(out.logps.numel()) * out.logps).sum().backward()
        logps = out.logps.detach()
    elif info.is_first_pp_stage:
        hidden_sbh = mb.forward(model)
        dist.send(hidden_sbh.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(hidden_sbh)
        dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
        hidden_sbh.backward(grad)
    else:
        s_local, b = mb.tokens.shape[1], mb.tokens.shape[0]
        received = torch.empty(s_local, b, cfg.hidden_size)
        dist.recv(received, ps.get_pipeline_model_parallel_prev_rank())
        received.requires_grad_(True)
        model.set_input_tensor(received)
        out = response_logprobs(mb.forward(model), mb.index, tp_group=tp_group, cp_group=cp_group)
        (loss_weights(out.logps.numel()) * out.logps).sum().backward()
        dist.send(received.grad.contiguous(), ps.get_pipeline_model_parallel_prev_rank())
        logps = out.logps.detach()

    grads = full_grads(model)
    if cp > 1:
        for g in grads.values():
            dist.all_reduce(g, group=cp_group)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (grads, logps))
    merged, all_logps = {}, None
    for g, lp in gathered:
        merged.update(g)
        if lp is not None:
            all_logps = lp if all_logps is None else all_logps
            assert torch.allclose(lp, all_logps, rtol=0, atol=1e-6), "ranks disagree on the log-probs"
    return {"family": family, "logps": all_logps, "grads": merged}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    results = {}
    for name in args.layouts.split(","):
        results[name] = run_layout(*LAYOUTS[name])
    if dist.get_rank() == 0:
        torch.save(results, args.out)
        print("OK", sorted(results))
    from megatron_prefix.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
