"""Shared helpers of the attention tests (single- and multi-process): random packed rows, layer construction, the per-response reference."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megatron_prefix.data.row import PackedRow, pack_row
from megatron_prefix.data.unit import Unit


def random_rows(
    seed: int, n_rows: int, t: int, ks=(2, 3, 4), max_prompt: int = 6, max_resp: int = 5, min_pad: int = 1
) -> list[PackedRow]:
    """Rows of several random units (K drawn from ``ks``), then at least ``min_pad`` padding slots."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        units, used = [], 0
        while True:
            k = int(rng.choice(ks))
            u = Unit(
                rng.integers(1, 50, int(rng.integers(1, max_prompt + 1))),
                [rng.integers(1, 50, int(rng.integers(1, max_resp + 1))) for _ in range(k)],
                np.zeros(k),
            )
            if used + u.shared_len > t - min_pad:
                break
            units.append(u)
            used += u.shared_len
        assert units, "row too short for one unit"
        rows.append(pack_row(units, t, 0))
    return rows


def make_config(heads: int = 4, groups: int = 2, head_dim: int = 8, cp: int = 1, layers: int = 2):
    """A small megatron ``TransformerConfig`` (no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        context_parallel_size=cp,
    )


def make_layer(attention_config=None, layer_number: int = 1, **cfg_kwargs):
    """A ``SharedPrefixCoreAttention`` on a small config."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_prefix.attention.core_attention import SharedPrefixCoreAttention

    return SharedPrefixCoreAttention(
        config=make_config(**cfg_kwargs),
        layer_number=layer_number,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        attention_config=attention_config,
    )


def random_qkv(
    t: int,
    b: int,
    heads: int = 4,
    groups: int = 2,
    head_dim: int = 8,
    seed: int = 0,
    dtype=torch.float32,
    device="cpu",
):
    """Leaf q [t, b, heads, d], k/v [t, b, groups, d] with requires_grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(t, b, heads, head_dim), (t, b, groups, head_dim), (t, b, groups, head_dim)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def reference_attention(rows: list[PackedRow], q, k, v, scale: float, see_other_responses: bool = False):
    """Per response: plain causal SDPA over ``[prompt + response]`` alone, assembled into [t, b, h*d].

    Prompt outputs come from the first response's sequence; padding outputs are their own value rows.
    ``see_other_responses`` is a deliberately wrong variant (each response sees the whole unit before it).
    """
    t, _b, h, d = q.shape
    groups = h // k.shape[2]
    out_rows = []
    for r, row in enumerate(rows):
        parts, positions = [], []
        for doc in range(row.num_docs):
            start, p = int(row.cu_docs[doc]), int(row.doc_prompt_lens[doc])
            prompt = list(range(start, start + p))
            for i, (s, e) in enumerate(row.resp_spans[row.resp_doc == doc].tolist()):
                idx = (list(range(start, s)) if see_other_responses else prompt) + list(range(s, e))
                ix = torch.tensor(idx)
                qs = q[ix, r].transpose(0, 1)
                ks = k[ix, r].transpose(0, 1).repeat_interleave(groups, 0)
                vs = v[ix, r].transpose(0, 1).repeat_interleave(groups, 0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
                keep = slice(0, len(idx)) if i == 0 else slice(len(idx) - (e - s), len(idx))
                parts.append(o[keep])
                positions += idx[keep]
        pad = list(range(row.num_tokens, t))
        if pad:
            parts.append(v[torch.tensor(pad), r].repeat_interleave(groups, 1))
            positions += pad
        order = torch.argsort(torch.tensor(positions))
        out_rows.append(torch.cat(parts)[order].reshape(t, h * d))
    return torch.stack(out_rows, dim=1)


def grads(out, weight, tensors):
    """Gradients of ``sum(out * weight)`` w.r.t. ``tensors``."""
    return torch.autograd.grad((out * weight).sum(), tensors)
