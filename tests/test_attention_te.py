"""The ``te`` backend (Transformer Engine ``DotProductAttention``, THD, bottom-right causal) on CPU.

Real TE needs CUDA (GPU tier: ``tests/test_attention_gpu.py``). Here a fake ``DotProductAttention`` that
computes with SDPA from ``cu_seqlens_q``/``cu_seqlens_kv`` checks the plumbing: the plan, the THD layout,
the arguments TE receives, and that the result equals the dense backend (outputs and gradients).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_prefix.attention import registry, te
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.attention.registry import CPSlice
from megatron_prefix.data.row import pack_row
from tests.dist_scripts.attention_common import grads, make_layer, random_qkv, random_rows

SCALE = 1.0 / math.sqrt(8)
SEEN: list[dict] = []


class FakeDotProductAttention(torch.nn.Module):
    """TE's constructor and THD forward signature; bottom-right causal SDPA per (q, kv) sequence."""

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", softmax_scale=None, **kw):
        super().__init__()
        self.heads, self.groups, self.scale = num_attention_heads, num_gqa_groups, softmax_scale
        SEEN.append({"init_format": qkv_format, "init_mask": attn_mask_type})

    def forward(self, query, key, value, attention_mask=None, qkv_format=None, cu_seqlens_q=None,
                cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None, **kw):
        SEEN.append({"format": qkv_format, "mask": attn_mask_type})
        assert query.dim() == 3 and key.shape[1] == self.groups and query.shape[1] == self.heads
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_kv.dtype == torch.int32
        outs = []
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
        assert len(cq) > 1, "TE requires at least one sequence"
        g = self.heads // self.groups
        for i in range(len(cq) - 1):
            q = query[cq[i] : cq[i + 1]].transpose(0, 1)
            k = key[ck[i] : ck[i + 1]].transpose(0, 1).repeat_interleave(g, 0)
            v = value[ck[i] : ck[i + 1]].transpose(0, 1).repeat_interleave(g, 0)
            m, n = q.shape[1], k.shape[1]
            assert m <= max_seqlen_q and n <= max_seqlen_kv
            mask = torch.ones(m, n, dtype=torch.bool).tril(diagonal=n - m)  # bottom-right causal
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(0, 1))
        return torch.cat(outs).reshape(query.shape[0], -1)  # TE returns [t, np*hn]


@pytest.fixture
def fake_te(monkeypatch):
    SEEN.clear()
    monkeypatch.setattr(te, "_te_dot_product_attention", lambda: FakeDotProductAttention)
    return SEEN


def test_te_plumbing_equals_dense(fake_te):
    rows = random_rows(3, 2, 40)
    q, k, v = random_qkv(40, 2, seed=3)
    w = torch.randn(40, 2, 32, generator=torch.Generator().manual_seed(1))
    dense = make_layer()(q, k, v, None, packed_seq_params=SharedPrefixParams.from_rows(rows))
    backend = registry.make(AttentionConfig(backend="te"))
    params = SharedPrefixParams.from_rows(rows)
    plan = backend.prepare(params, CPSlice(1, 0, "cpu"))
    assert (plan.cu_seqlens_q != plan.cu_seqlens_k).any(), "responses have more keys than queries"
    out = backend.attend(q, k, v, plan, SCALE)
    assert out.shape == dense.shape and (out - dense).abs().max() <= 1e-5
    for g, g_ref in zip(grads(out, w, (q, k, v)), grads(dense, w, (q, k, v))):
        assert (g - g_ref).abs().max() <= 1e-5
    assert fake_te[0] == {"init_format": "thd", "init_mask": "padding_causal_bottom_right"}
    assert fake_te[1] == {"format": "thd", "mask": "padding_causal_bottom_right"}


def test_te_padding_only_row_skips_the_kernel(fake_te):
    backend = registry.make(AttentionConfig(backend="te"))
    rows = [pack_row([], 16, 0)]
    q, k, v = random_qkv(16, 1)
    params = SharedPrefixParams.from_rows(rows)
    out = backend.attend(q, k, v, backend.prepare(params, CPSlice()), SCALE)
    assert torch.allclose(out, v.repeat_interleave(2, 2).reshape(16, 1, 32))
    assert len(fake_te) <= 1  # constructed at most; never called with zero sequences


def test_te_refused_at_config_time():
    from megatron_prefix.training.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.path = "x"
    cfg.attention.backend, cfg.train.dtype = "te", "bfloat16"
    if not registry.package_available("transformer_engine"):
        with pytest.raises(ValueError, match="attention.backend: te needs the 'transformer_engine' package"):
            cfg.validate(world_size=1, cuda=True)
    cfg.parallel.cp, cfg.data.pack_tokens = 2, 64
    with pytest.raises(ValueError, match="attention.backend|parallel.cp"):
        cfg.validate(world_size=2, cuda=True)


def test_te_refused_with_context_parallel_even_when_installed(monkeypatch):
    from megatron_prefix.training.config import TrainConfig

    monkeypatch.setattr(registry, "package_available", lambda name: True)
    cfg = TrainConfig()
    cfg.data.path = "x"
    cfg.attention.backend, cfg.train.dtype = "te", "bfloat16"
    cfg.validate(world_size=1, cuda=True)
    cfg.parallel.cp, cfg.data.pack_tokens = 2, 64
    with pytest.raises(ValueError, match="parallel.cp"):
        cfg.validate(world_size=2, cuda=True)
