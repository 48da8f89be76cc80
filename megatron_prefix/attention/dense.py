"""``dense`` backend: a boolean ``[b, 1, Tq, T]`` mask and SDPA. Any device, any dtype, CP, dropout.

The reference backend: O(T^2) mask memory, so rows longer than ``attention.max_dense_tokens`` are refused.
Layout at the kernel boundary: ``*_bhsd`` = [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prefix.attention import masks
from megatron_prefix.attention.registry import AttentionBackend, Capabilities, CPSlice, register


def dense_attention(
    q_bhsd: torch.Tensor,
    k_bhsd: torch.Tensor,
    v_bhsd: torch.Tensor,
    mask_b1qk: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA with a boolean mask ``[b, 1, Tq, Tk]`` (True = attend); returns ``[b, h, Tq, d]``.

    On CUDA, GQA keys/values are expanded first so that the memory-efficient SDPA kernel (which takes
    a mask) stays eligible; elsewhere SDPA's ``enable_gqa`` avoids the copy.
    """
    groups = q_bhsd.shape[1] // k_bhsd.shape[1]
    if q_bhsd.is_cuda and groups > 1:
        k_bhsd = k_bhsd.repeat_interleave(groups, dim=1)
        v_bhsd = v_bhsd.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q_bhsd,
        k_bhsd,
        v_bhsd,
        attn_mask=mask_b1qk,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k_bhsd.shape[1] != q_bhsd.shape[1],
    )


@register
class DenseBackend(AttentionBackend):
    """Boolean mask from ``masks.build_dense_mask`` + SDPA."""

    name = "dense"
    caps = Capabilities(devices=("cpu", "cuda"), context_parallel=True, dropout=True)

    def prepare(self, params, cp: CPSlice) -> torch.Tensor:
        """The ``[b, 1, T/cp, T]`` mask of this rank's queries."""
        t = params.seq_len
        if t > self.cfg.max_dense_tokens:
            raise ValueError(
                f"attention.max_dense_tokens: row of {t} tokens exceeds {self.cfg.max_dense_tokens} "
                "for the dense backend (O(T^2) mask); use backend flex or varlen, or raise the limit"
            )
        return masks.build_dense_mask(
            params.doc_ids.to(cp.device), params.segment_ids.to(cp.device), cp.q_positions(t)
        )

    def attend(self, q_sbhd, k_sbhd, v_sbhd, plan, scale, dropout_p=0.0):
        """SDPA over ``[b, h, s, d]`` permutations; returns ``[s, b, np*hn]``."""
        s, b, nh, hd = q_sbhd.shape
        out_bhsd = dense_attention(
            q_sbhd.permute(1, 2, 0, 3), k_sbhd.permute(1, 2, 0, 3), v_sbhd.permute(1, 2, 0, 3), plan, scale, dropout_p
        )
        return out_bhsd.permute(2, 0, 1, 3).reshape(s, b, nh * hd)
