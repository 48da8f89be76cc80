"""Train a tiny stock GPTModel for a few steps under a TP/PP/DP layout; print the per-step losses.

Every layout sees the same global batch (2 micro-batches of 2 samples); with DP=2 each rank takes one
sample of each micro-batch and the reported loss is averaged over DP. Prints ``LOSSES [..]`` once (from
the rank with tp=0, dp=0 on the last pipeline stage), then ``OK``.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from tests.dist_scripts import compat_common as cc


def main() -> None:
    args = cc.parse_args({"steps": 3, "dist_opt": 0, "name_init": 0})
    info = cc.setup(args.tp, args.pp, args.seed)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = cc.build_gpt(info, seed=args.seed)
    if args.name_init:
        cc.reinit_by_global_name(model, info)
    ddp = cc.wrap_ddp(model, bool(args.dist_opt))
    opt = cc.make_optimizer(ddp, bool(args.dist_opt))
    n_micro, per_rank = 2, cc.MBS // info.dp_size
    losses = []
    for step in range(args.steps):
        micro = []
        for i in range(n_micro):
            b = cc.batch(step * n_micro + i)
            micro.append({k: (v[info.dp_rank * per_rank : (info.dp_rank + 1) * per_rank] if k != "attention_mask" else v)
                          for k, v in b.items()})
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=cc.forward_step_fn(), data_iterator=iter(micro), model=[ddp],
            num_microbatches=n_micro, seq_length=cc.SEQ, micro_batch_size=per_rank, forward_only=False,
        )
        ok, _, _ = opt.step()
        assert ok
        if info.is_last_pp_stage:
            loss = torch.tensor(sum(float(d["loss"]) for d in out) / len(out), dtype=torch.float64)
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(float(loss) / info.dp_size)
    if info.is_last_pp_stage and info.tp_rank == 0 and info.dp_rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    dist.barrier()
    from megatron_prefix.parallel import destroy_parallel

    destroy_parallel()
    if info.rank == 0:
        print("OK", flush=True)


if __name__ == "__main__":
    main()
