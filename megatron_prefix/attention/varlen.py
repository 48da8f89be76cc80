"""``varlen`` backend: no dense mask; each response gets its own key/value sequence ``[prompt; response]``.

Queries stay in the shared layout (a gather of the non-padding rows); keys/values are gathered per
sequence by ``VarlenPlan.kv_index`` so the shared prompt K/V rows appear once per response (autograd
sums their gradients back). Causal masking is bottom-right aligned (query i of an m-query sequence with
n keys sees keys ``0..n-m+i``), which is what flash varlen kernels do. The kernel computes exactly
``useful_pairs`` query-key pairs (tested).

Kernels, first available: ``flash_attn.flash_attn_varlen_func`` (flash-attn package), PyTorch's
``torch.nn.attention.varlen.varlen_attn`` (ships with torch >= 2.9 on CUDA). Without CUDA, and only
when allowed, a math fallback loops over per-sequence SDPA calls with the same indices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megatron_prefix.attention.masks import VarlenPlan, useful_pairs_np


def useful_pairs(params) -> int:
    """Allowed (query, key) pairs of a micro-batch's real queries (``SharedPrefixParams`` or ids pair)."""
    return useful_pairs_np(params.doc_ids.cpu().numpy(), params.segment_ids.cpu().numpy())


def _kernel_flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _kernel_torch():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel_name(device: torch.device) -> str:
    """Which kernel ``varlen_attention`` uses on ``device``."""
    if device.type != "cuda":
        return "cpu_reference"
    if _kernel_flash_attn() is not None:
        return "flash_attn"
    if _kernel_torch() is not None:
        return "torch_varlen_attn"
    return "none"


def reference_varlen(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Math varlen attention (bottom-right causal) as a loop of SDPA calls; any device, slow."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    groups = q_thd.shape[1] // k_thd.shape[1]
    for i in range(len(cq) - 1):
        q = q_thd[cq[i] : cq[i + 1]].transpose(0, 1)  # [h, m, d]
        k = k_thd[ck[i] : ck[i + 1]].transpose(0, 1)
        v = v_thd[ck[i] : ck[i + 1]].transpose(0, 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        m, n = q.shape[1], k.shape[1]
        mask = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(diagonal=n - m)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1))
    if not outs:
        return q_thd.new_zeros((0, *q_thd.shape[1:]))
    return torch.cat(outs, dim=0)


def _run_kernel(q, k, v, plan: VarlenPlan, scale: float, allow_cpu_reference: bool) -> torch.Tensor:
    if not q.is_cuda:
        if not allow_cpu_reference:
            raise RuntimeError(
                "varlen attention needs CUDA; allow_cpu_reference=True enables the CPU math fallback"
            )
        return reference_varlen(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, scale)
    fa = _kernel_flash_attn()
    if fa is not None:
        return fa(
            q,
            k,
            v,
            plan.cu_seqlens_q,
            plan.cu_seqlens_k,
            plan.max_seqlen_q,
            plan.max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=True,
        )
    tv = _kernel_torch()
    if tv is None:
        raise RuntimeError(
            f"varlen attention: neither flash_attn nor torch.nn.attention.varlen in torch {torch.__version__}"
        )
    return tv(
        q,
        k,
        v,
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        scale=scale,
        window_size=(-1, 0),
        enable_gqa=k.shape[1] != q.shape[1],
    )


def varlen_attention(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    plan: VarlenPlan,
    scale: float,
    allow_cpu_reference: bool = False,
) -> torch.Tensor:
    """Shared-prefix attention of flattened queries ``[b*Tq, np, hn]`` against ``[b*T, ng, hn]`` K/V.

    Returns ``[b*Tq, np, hn]``; a padding query's output is its own value row (self-only attention).
    """
    q_sel = q_thd.index_select(0, plan.q_index)
    k_sel = k_thd.index_select(0, plan.kv_index)
    v_sel = v_thd.index_select(0, plan.kv_index)
    out_sel = _run_kernel(q_sel, k_sel, v_sel, plan, scale, allow_cpu_reference)
    groups = q_thd.shape[1] // k_thd.shape[1]
    v_pad = v_thd.index_select(0, plan.pad_kv_index)
    if groups > 1:
        v_pad = v_pad.repeat_interleave(groups, dim=1)
    out_all = torch.cat([out_sel.to(q_thd.dtype), v_pad.to(q_thd.dtype)], dim=0)
    return out_all.index_select(0, plan.inverse)


def plan_summary(plan: VarlenPlan) -> dict[str, int]:
    """Sizes of a plan (for logs): sequences, gathered queries/keys, computed pairs."""
    return {
        "sequences": plan.num_sequences,
        "queries": int(plan.q_index.numel()),
        "keys": int(plan.kv_index.numel()),
        "pairs": plan.pairs(),
        "max_k": int(plan.max_seqlen_k),
        "padding": int(np.asarray(plan.pad_q_index.numel())),
    }
