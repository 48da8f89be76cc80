"""Context parallelism for shared-prefix attention (all-gather of keys/values).

The row of T tokens is cut into ``2*cp`` equal chunks and rank r holds chunks ``r`` and ``2cp-1-r``
(megatron's load-balanced split, ``megatron.core.utils.get_batch_on_this_cp_rank``). Each rank keeps
its queries local, all-gathers keys/values of the CP group (gradients reduce-scattered back by
``_AllGatherSeq``), puts them in global row order, and attends with the mask rows of its own query
positions (``local_positions``). Per rank the exact mask is used, so results equal the unsplit row.

Helpers for the model/data side: ``split_for_cp`` (slice tokens/labels/positions for a rank) and
``local_positions`` (global row positions a rank holds, in its local order).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def _check(t: int, cp_size: int, cp_rank: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank: must be in [0, cp_size={cp_size}), got {cp_rank}")
    if t % (2 * cp_size):
        raise ValueError(
            f"pack_tokens: row length {t} must be divisible by 2*context_parallel_size={2 * cp_size}"
        )


def local_positions(
    t: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global row positions [T/cp] (int64) held by ``cp_rank``, in local order (chunk r, then 2cp-1-r)."""
    _check(t, cp_size, cp_rank)
    if cp_size == 1:
        return torch.arange(t, device=device)
    c = t // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def split_for_cp(tensor_bt_or_st: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This rank's slice along ``seq_dim`` (same result as ``get_batch_on_this_cp_rank``)."""
    if cp_size == 1:
        return tensor_bt_or_st
    t = tensor_bt_or_st.shape[seq_dim]
    _check(t, cp_size, cp_rank)
    return tensor_bt_or_st.index_select(seq_dim, local_positions(t, cp_size, cp_rank, tensor_bt_or_st.device))


def group_size_rank(group) -> tuple[int, int]:
    """(size, rank) of a process group; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


@functools.lru_cache(maxsize=32)
def _gathered_to_global(t: int, cp_size: int, device: str) -> torch.Tensor:
    order = torch.cat([local_positions(t, cp_size, r) for r in range(cp_size)])
    return torch.argsort(order).to(device)


def gathered_to_global(t: int, cp_size: int, device=None) -> torch.Tensor:
    """Index [T] such that ``gathered.index_select(0, idx)`` is in global row order (cached per device)."""
    return _gathered_to_global(t, cp_size, str(torch.device(device) if device is not None else "cpu"))


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x_sbhd: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        x = x_sbhd.contiguous()
        if dist.get_backend(group) == "nccl":
            out = x.new_empty((size * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        s = grad.shape[0] // size
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((s, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        total = grad.clone()  # gloo has no reduce_scatter: all-reduce, keep our slice
        dist.all_reduce(total, group=group)
        return total[rank * s : (rank + 1) * s].contiguous(), None


def gather_kv(
    key_sbhd: torch.Tensor, value_sbhd: torch.Tensor, group, cp_size: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of the whole row [T, b, ng, hn] in global order, from the local [T/cp, b, ng, hn].

    One collective for both (concatenated on the head dim); differentiable.
    """
    dk = key_sbhd.shape[-1]
    kv_local = torch.cat([key_sbhd, value_sbhd], dim=-1)
    kv_gathered = _AllGatherSeq.apply(kv_local, group)
    t = kv_gathered.shape[0]
    kv_global = kv_gathered.index_select(0, gathered_to_global(t, cp_size, kv_gathered.device))
    return kv_global[..., :dk], kv_global[..., dk:]
