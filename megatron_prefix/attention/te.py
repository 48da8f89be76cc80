"""``te`` backend: Transformer Engine's ``DotProductAttention`` over per-response K/V sequences.

The plan is the ``varlen`` backend's (``varlen.prepare_varlen_plan``): queries of each (prompt or
response) run in the shared layout, keys/values gathered per sequence as ``[prompt; response]``, so
query and key lengths differ. TE takes them in THD layout with ``cu_seqlens_q``/``cu_seqlens_kv`` and
``attn_mask_type="padding_causal_bottom_right"`` (query i of an m-query sequence over n keys sees keys
``0..n-m+i``). Refused without the ``transformer_engine`` package, and with context parallelism (TE
turns its fused kernels off for bottom-right masks under CP; the other backends' K/V-gather CP is the
path there). CUDA only, bf16/fp16 (TE's fused/flash kernels).
"""

from __future__ import annotations

import torch

from megatron_prefix.attention.masks import VarlenPlan, run_varlen_plan
from megatron_prefix.attention.registry import AttentionBackend, Capabilities, CPSlice, register
from megatron_prefix.attention.varlen import prepare_varlen_plan, sbhd_to_thd

MASK_TYPE = "padding_causal_bottom_right"


def _te_dot_product_attention():
    """``transformer_engine.pytorch.DotProductAttention`` (imported on first use)."""
    import transformer_engine.pytorch as te

    return te.DotProductAttention


@register
class TEBackend(AttentionBackend):
    """TE ``DotProductAttention`` (THD, bottom-right causal, different q/kv lengths) on the varlen plan."""

    name = "te"
    caps = Capabilities(
        devices=("cuda",), dtypes={"cuda": ("bfloat16", "float16")}, context_parallel=False,
        package="transformer_engine",
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._modules: dict[tuple, torch.nn.Module] = {}  # per (heads, groups, head_dim, scale); no params

    def _module(self, nh: int, ng: int, hd: int, scale: float, device) -> torch.nn.Module:
        key = (nh, ng, hd, float(scale), str(device))
        if key not in self._modules:
            dpa = _te_dot_product_attention()(
                nh, hd, num_gqa_groups=ng, attention_dropout=0.0, qkv_format="thd", attn_mask_type=MASK_TYPE,
                softmax_scale=scale,
            )
            self._modules[key] = dpa.to(device) if isinstance(dpa, torch.nn.Module) else dpa
        return self._modules[key]

    def prepare(self, params, cp: CPSlice) -> VarlenPlan:
        """The varlen gather plan (TE needs no other structure)."""
        return prepare_varlen_plan(params, cp)

    def attend(self, q_sbhd, k_sbhd, v_sbhd, plan, scale, dropout_p=0.0):
        """Gather, TE attention over the packed sequences, scatter back; returns ``[s, b, np*hn]``."""
        s, b, nh, hd = q_sbhd.shape
        dpa = self._module(nh, k_sbhd.shape[2], hd, scale, q_sbhd.device)

        def kernel(q_thd, k_thd, v_thd):
            out = dpa(
                q_thd, k_thd, v_thd, qkv_format="thd", attn_mask_type=MASK_TYPE,
                cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_kv=plan.cu_seqlens_k,
                max_seqlen_q=plan.max_seqlen_q, max_seqlen_kv=plan.max_seqlen_k,
            )
            return out.view(q_thd.shape[0], nh, hd)  # TE returns [t, np*hn]

        out_thd = run_varlen_plan(sbhd_to_thd(q_sbhd), sbhd_to_thd(k_sbhd), sbhd_to_thd(v_sbhd), plan, kernel)
        return out_thd.view(b, s, nh * hd).transpose(0, 1).contiguous()
