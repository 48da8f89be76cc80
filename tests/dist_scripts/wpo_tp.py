"""WPO's per-token denominator and the log-probs at TP = 2 (vocabulary split over 2 gloo ranks) equal a
direct full-vocabulary computation, forward and backward. Prints ``WPO_TP_OK`` on rank 0.

    torchrun --nproc-per-node=2 tests/dist_scripts/wpo_tp.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_prefix.model.logprobs import token_logprobs_and_wpo


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same full logits on every rank
    s, b, v = 5, 2, 34
    logits = torch.randn(s, b, v) * 5
    logits[1, 0, 30] = 70.0  # dominant token on the second shard
    pred_s, pred_b = torch.tensor([0, 1, 1, 4, 2, 3]), torch.tensor([0, 0, 0, 1, 1, 0])
    targets = torch.tensor([2, 30, 3, 33, 16, 17])  # both shards own some targets
    w = torch.randn(6)
    shard = logits[..., rank * v // world:(rank + 1) * v // world].clone().requires_grad_(True)
    lp, denom = token_logprobs_and_wpo(shard, pred_s, pred_b, targets, tp_group=dist.group.WORLD, chunk_elems=8)
    (w * lp).sum().backward()

    full = logits.double().requires_grad_(True)
    rows = full[pred_s, pred_b]
    want_denom = torch.logsumexp(2 * rows, -1) - 2 * torch.logsumexp(rows, -1)
    want_lp = torch.log_softmax(rows, -1).gather(1, targets[:, None]).squeeze(1)
    (w.double() * want_lp).sum().backward()
    torch.testing.assert_close(denom.double(), want_denom.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=1e-6, atol=2e-6)  # fp32 of |lp| ~ 70
    want_grad = full.grad[..., rank * v // world:(rank + 1) * v // world]
    torch.testing.assert_close(shard.grad.double(), want_grad, rtol=0, atol=2e-6)
    dist.barrier()
    if rank == 0:
        print("WPO_TP_OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
