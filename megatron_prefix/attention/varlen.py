"""``varlen`` backend: no dense mask; each response gets its own key/value sequence ``[prompt; response]``.

Queries stay in the shared layout (a gather of the non-padding rows); keys/values are gathered per
sequence by ``VarlenPlan.kv_index`` (``masks.build_varlen_plan``) so the shared prompt K/V rows appear
once per response (autograd sums their gradients back). Causal masking is bottom-right aligned (query i
of an m-query sequence with n keys sees keys ``0..n-m+i``), which is what flash varlen kernels do. The
kernel computes exactly ``sharing.ids_pairs`` query-key pairs (tested).

Kernels, first available: ``flash_attn.flash_attn_varlen_func`` (flash-attn package), PyTorch's
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9 on CUDA; its keyword arguments changed across
releases, so ``torch_varlen_adapter`` reads its signature). Flash kernels have no fp32: fp32 on CUDA is
refused (``registry.check``, and again at run time). Without CUDA, and only when allowed, a math fallback
loops over per-sequence SDPA calls with the same indices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from megatron_prefix.attention import masks
from megatron_prefix.attention.masks import VarlenPlan, run_varlen_plan, useful_pairs_np
from megatron_prefix.attention.registry import AttentionBackend, Capabilities, CPSlice, register

FLASH_DTYPES = ("bfloat16", "float16")


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


def torch_varlen_adapter(fn: Callable) -> Callable:
    """Call ``fn`` (a ``varlen_attn`` of any torch release) as bottom-right causal, scaled, GQA attention.

    Detected by ``inspect.signature``: causal via ``window_size=(-1, 0)`` when present, else
    ``is_causal=True`` (torch 2.9/2.10); ``scale`` passed when accepted, else folded into the queries
    (the kernel then uses its default ``1/sqrt(d)``); ``enable_gqa`` passed when accepted, else K/V heads
    are repeated. Returns ``call(q_thd, k_thd, v_thd, cu_q, cu_k, max_q, max_k, scale)``.
    """
    params = inspect.signature(fn).parameters
    window, causal = "window_size" in params, "is_causal" in params
    has_scale, has_gqa = "scale" in params, "enable_gqa" in params
    if not (window or causal):
        raise RuntimeError(
            f"torch.nn.attention.varlen.varlen_attn{inspect.signature(fn)}: no is_causal or window_size "
            "argument, cannot request causal attention; install flash-attn or use backend flex"
        )

    def call(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
        kw: dict = {"window_size": (-1, 0)} if window else {"is_causal": True}
        gqa = k.shape[1] != q.shape[1]
        if has_gqa:
            kw["enable_gqa"] = gqa
        elif gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if has_scale:
            kw["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    return call


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
    assert len(cq) > 1, "a varlen kernel needs at least one sequence (run_varlen_plan skips empty plans)"
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
    return torch.cat(outs, dim=0)


def _run_kernel(q, k, v, plan: VarlenPlan, scale: float, allow_cpu_reference: bool) -> torch.Tensor:
    if not q.is_cuda:
        if not allow_cpu_reference:
            raise RuntimeError(
                "varlen attention needs CUDA; allow_cpu_reference=True enables the CPU math fallback"
            )
        return reference_varlen(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, scale)
    if q.dtype == torch.float32:
        raise ValueError(
            "train.dtype: attention.backend=varlen runs flash kernels, which have no float32; use "
            "train.dtype=bfloat16 or attention.backend=dense/flex"
        )
    fa = _kernel_flash_attn()
    if fa is not None:
        return fa(
            q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
            dropout_p=0.0, softmax_scale=scale, causal=True,
        )
    tv = _kernel_torch()
    if tv is None:
        raise RuntimeError(
            f"varlen attention: neither flash_attn nor torch.nn.attention.varlen in torch {torch.__version__}"
        )
    return torch_varlen_adapter(tv)(
        q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k, scale
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
    return run_varlen_plan(
        q_thd, k_thd, v_thd, plan, lambda q, k, v: _run_kernel(q, k, v, plan, scale, allow_cpu_reference)
    )


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


def prepare_varlen_plan(params, cp: CPSlice) -> VarlenPlan:
    """The gather plan of this rank's queries (shared by ``varlen`` and other per-sequence backends)."""
    q_pos = cp.q_positions(params.seq_len)
    return masks.build_varlen_plan(
        params.doc_ids.cpu().numpy(), params.segment_ids.cpu().numpy(), None if q_pos is None else q_pos.cpu().numpy()
    ).to(cp.device)


def sbhd_to_thd(x_sbhd: torch.Tensor) -> torch.Tensor:
    """``[s, b, h, d]`` -> ``[b*s, h, d]`` (row-major over the batch, as the plan indexes it)."""
    s, b, h, d = x_sbhd.shape
    return x_sbhd.transpose(0, 1).reshape(b * s, h, d)


@register
class VarlenBackend(AttentionBackend):
    """Per-response K/V gather + a flash varlen kernel (bf16/fp16 on CUDA; CPU math reference)."""

    name = "varlen"
    caps = Capabilities(
        devices=("cuda",), dtypes={"cuda": FLASH_DTYPES}, cpu_reference=True, cpu_backward=True, context_parallel=True
    )

    def prepare(self, params, cp: CPSlice) -> VarlenPlan:
        """``masks.build_varlen_plan`` for this rank's queries, on its device."""
        return prepare_varlen_plan(params, cp)

    def attend(self, q_sbhd, k_sbhd, v_sbhd, plan, scale, dropout_p=0.0):
        """Gather, run the kernel, scatter back; returns ``[s, b, np*hn]``."""
        s, b, nh, hd = q_sbhd.shape
        out_thd = varlen_attention(
            sbhd_to_thd(q_sbhd), sbhd_to_thd(k_sbhd), sbhd_to_thd(v_sbhd), plan, scale, self.cfg.allow_cpu_reference
        )
        return out_thd.view(b, s, nh * hd).transpose(0, 1).contiguous()
