"""Shared-prefix core attention on CPU: exactness against per-response causal attention, backends, caching, CP.

The reference for every response i of a unit is plain causal SDPA over ``[prompt + response_i]`` alone
(what an unshared trainer computes); fp32 tolerance 1e-5 (max abs) for outputs and q/k/v gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_prefix.attention import backends, masks, varlen
from megatron_prefix.attention.backends import AttentionConfig, count_blocks
from megatron_prefix.attention.context_parallel import local_positions, split_for_cp
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.data.row import pack_row
from megatron_prefix.data.unit import Unit
from tests.dist_scripts.attention_common import (
    grads,
    make_layer,
    random_qkv,
    random_rows,
    reference_attention,
)

TOL = 1e-5
SCALE = 1.0 / math.sqrt(8)
CPU_FLEX = {"backend": "flex", "allow_cpu_reference": True, "flex_block_size": 16}
CPU_VARLEN = {"backend": "varlen", "allow_cpu_reference": True}


def _setup(seed: int, ks=(2, 3, 4), t: int = 40, b: int = 2):
    rows = random_rows(seed, b, t, ks=ks)
    params = SharedPrefixParams.from_rows(rows)
    q, k, v = random_qkv(t, b, seed=seed)
    weight = torch.randn(t, b, 32, generator=torch.Generator().manual_seed(seed + 100))
    return rows, params, q, k, v, weight


@pytest.mark.parametrize("seed,ks", [(0, (2,)), (1, (3,)), (2, (4,)), (3, (2, 3, 4))])
def test_dense_equals_per_response_causal_attention(seed, ks):
    rows, params, q, k, v, w = _setup(seed, ks)
    assert all(r.num_docs >= 2 and r.num_tokens < r.pack_tokens for r in rows), "want several units + padding"
    out = make_layer()(q, k, v, None, packed_seq_params=params)
    ref = reference_attention(rows, q, k, v, SCALE)
    assert out.shape == (40, 2, 32)
    assert (out - ref).abs().max() <= TOL
    for g, g_ref in zip(grads(out, w, (q, k, v)), grads(ref, w, (q, k, v))):
        assert (g - g_ref).abs().max() <= TOL


def test_negative_control_wrong_mask_is_detected():
    """A reference in which responses see the earlier responses of their unit must not match."""
    rows, params, q, k, v, _ = _setup(4, ks=(3,))
    out = make_layer()(q, k, v, None, packed_seq_params=params)
    wrong = reference_attention(rows, q, k, v, SCALE, see_other_responses=True)
    assert (out - wrong).abs().max() > 1e-2


def test_dense_mask_equals_row_reference():
    rows = random_rows(5, 2, 40)
    params = SharedPrefixParams.from_rows(rows)
    mask = masks.build_dense_mask(params.doc_ids, params.segment_ids)
    for r, row in enumerate(rows):
        assert np.array_equal(mask[r, 0].numpy(), row.dense_mask())


def test_flex_forward_on_cpu_equals_dense():
    _rows, params, q, k, v, _ = _setup(6)
    with torch.no_grad():
        dense = make_layer()(q, k, v, None, packed_seq_params=params)
        flex = make_layer(CPU_FLEX)(q, k, v, None, packed_seq_params=params)
    assert (dense - flex).abs().max() <= TOL


def test_flex_refuses_cpu_backward():
    _, params, q, k, v, _ = _setup(6)
    with pytest.raises(RuntimeError, match="only the forward"):
        make_layer(CPU_FLEX)(q, k, v, None, packed_seq_params=params)


def test_varlen_cpu_reference_equals_dense_forward_and_backward():
    _rows, params, q, k, v, w = _setup(7)
    dense = make_layer()(q, k, v, None, packed_seq_params=params)
    var = make_layer(CPU_VARLEN)(q, k, v, None, packed_seq_params=params)
    assert (dense - var).abs().max() <= TOL
    for g, g_ref in zip(grads(var, w, (q, k, v)), grads(dense, w, (q, k, v))):
        assert (g - g_ref).abs().max() <= TOL


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_varlen_computes_exactly_the_useful_pairs(cp):
    rows = random_rows(8, 3, 48)
    params = SharedPrefixParams.from_rows(rows)
    expected = varlen.useful_pairs(params)
    units_pairs = 0  # independent count from the units' own formula (+0 for padding)
    dense_pairs = 0
    for row in rows:
        real = row.doc_ids != -1
        dense_pairs += int(row.dense_mask()[real].sum())
    plans = [
        masks.build_varlen_plan(
            params.doc_ids.numpy(), params.segment_ids.numpy(), local_positions(48, cp, r).numpy()
        )
        for r in range(cp)
    ]
    assert sum(p.pairs() for p in plans) == expected == dense_pairs
    rng = np.random.default_rng(0)
    u = Unit(rng.integers(1, 9, 5), [rng.integers(1, 9, n) for n in (3, 4, 2)], np.zeros(3))
    units_pairs = u.shared_attention_pairs()
    one = SharedPrefixParams.from_rows([pack_row([u], 16, 0)])
    assert varlen.useful_pairs(one) == units_pairs < u.unshared_attention_pairs()
    plan = masks.build_varlen_plan(one.doc_ids.numpy(), one.segment_ids.numpy())
    assert plan.num_sequences == 1 + 3  # prompt alone + one per response
    assert plan.cu_seqlens_k.tolist() == [0, 5, 5 + 8, 5 + 8 + 9, 5 + 8 + 9 + 7]


def test_count_blocks_on_a_known_row():
    """prompt [0,16), r1 [16,32), r2 [32,48), pad [48,64), blocks of 16: 6 of 16 blocks computed."""
    u = Unit(np.arange(1, 17), [np.arange(1, 17), np.arange(1, 17)], np.zeros(2))
    params = SharedPrefixParams.from_rows([pack_row([u], 64, 0)])
    bm = backends.build_block_mask(
        masks.make_mask_mod(params.doc_ids, params.segment_ids), 1, 64, 64, "cpu", 16
    )
    assert count_blocks(bm) == {"total": 16, "full": 2, "partial": 4, "computed": 6, "skipped": 10}


def test_block_mask_skips_exactly_the_empty_blocks():
    """On random rows, computed blocks = blocks with any allowed pair; full blocks = all allowed."""
    rows = random_rows(12, 2, 64, max_prompt=10, max_resp=8)
    params = SharedPrefixParams.from_rows(rows)
    bm = backends.build_block_mask(
        masks.make_mask_mod(params.doc_ids, params.segment_ids), 2, 64, 64, "cpu", 16
    )
    blocks = masks.build_dense_mask(params.doc_ids, params.segment_ids)[:, 0].view(2, 4, 16, 4, 16)
    stats = count_blocks(bm)
    assert stats["computed"] == int(blocks.any(dim=(2, 4)).sum())
    assert stats["full"] == int(blocks.all(dim=(2, 4)).sum())
    assert stats["skipped"] > 2 * 6  # more than the causal upper triangle


@pytest.mark.parametrize("backend", ["dense", "flex", "varlen"])
def test_structures_built_once_per_micro_batch(backend, monkeypatch):
    calls = []
    for name in ("build_dense_mask", "make_mask_mod", "build_varlen_plan"):
        real = getattr(masks, name)
        monkeypatch.setattr(
            masks, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw)
        )
    cfg = {"dense": None, "flex": CPU_FLEX, "varlen": CPU_VARLEN}[backend]
    layers = [make_layer(cfg, layer_number=i + 1) for i in range(2)]
    _, params, q, k, v, _ = _setup(9)
    with torch.no_grad():
        x = q
        for layer in layers:
            x = layer(x, k, v, None, packed_seq_params=params).view_as(q)
    assert len(calls) == 1 and len(params.cache) == 1


def test_context_parallel_mask_rows_emulated():
    """Each CP rank's local queries against global K/V with its mask rows reproduce the full output."""
    _rows, params, q, k, v, _ = _setup(10, t=48)
    with torch.no_grad():
        full = make_layer()(q, k, v, None, packed_seq_params=params)
        k_bhsd, v_bhsd = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        for r in range(2):
            pos = local_positions(48, 2, r)
            q_loc = split_for_cp(q, 2, r, seq_dim=0)
            want = split_for_cp(full, 2, r, seq_dim=0)
            mask = masks.build_dense_mask(params.doc_ids, params.segment_ids, pos)
            got = backends.dense_attention(q_loc.permute(1, 2, 0, 3), k_bhsd, v_bhsd, mask, SCALE)
            assert (got.permute(2, 0, 1, 3).reshape_as(want) - want).abs().max() <= TOL
            bm = backends.build_block_mask(
                masks.make_mask_mod(params.doc_ids, params.segment_ids, pos), 2, 24, 48, "cpu", 16
            )
            got = backends.flex_attention_bhsd(q_loc.permute(1, 2, 0, 3), k_bhsd, v_bhsd, bm, SCALE, False)
            assert (got.permute(2, 0, 1, 3).reshape_as(want) - want).abs().max() <= TOL
            plan = masks.build_varlen_plan(params.doc_ids.numpy(), params.segment_ids.numpy(), pos.numpy())
            got = varlen.varlen_attention(
                q_loc.transpose(0, 1).reshape(-1, 4, 8),
                k.transpose(0, 1).reshape(-1, 2, 8),
                v.transpose(0, 1).reshape(-1, 2, 8),
                plan,
                SCALE,
                True,
            )
            assert (got.view(2, 24, 32).transpose(0, 1) - want).abs().max() <= TOL


def test_split_for_cp_matches_megatron(monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # megatron reads the fake group

    x = torch.arange(2 * 48).view(2, 48)
    for r in range(2):
        ours = split_for_cp(x, 2, r, seq_dim=1)
        batch = get_batch_on_this_cp_rank({"tokens": x.clone()}, cp_group=_FakeGroup(2, r))
        assert torch.equal(ours, batch["tokens"])
        assert torch.equal(ours[0], local_positions(48, 2, r))
    with pytest.raises(ValueError, match="pack_tokens"):
        local_positions(50, 2, 0)


class _FakeGroup:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_errors_name_the_problem():
    _, params, q, k, v, _ = _setup(11)
    with pytest.raises(TypeError, match="SharedPrefixParams"):
        make_layer()(q, k, v, None, packed_seq_params=None)
    with pytest.raises(ValueError, match="attention.backend"):
        AttentionConfig.coerce({"backend": "sparse"})
    with pytest.raises(ValueError, match="max_dense_tokens"):
        make_layer({"max_dense_tokens": 32})(q, k, v, None, packed_seq_params=params)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="varlen: needs CUDA"):
            make_layer("varlen")
        with pytest.raises(ValueError, match="flex: needs CUDA"):
            make_layer("flex")


def test_backend_from_transformer_config_attribute():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_prefix.attention.core_attention import SharedPrefixCoreAttention
    from tests.dist_scripts.attention_common import make_config

    cfg = make_config()
    cfg.shared_prefix_attention = CPU_VARLEN
    layer = SharedPrefixCoreAttention(
        config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    assert layer.attn_cfg.backend == "varlen"


@pytest.mark.dist
def test_context_parallel_matches_single_process():
    """CP=2 (gloo, 2 processes): local outputs and q/k/v grads equal one process (dense, varlen; flex fwd)."""
    from tests.dist import run_torchrun

    out = run_torchrun("tests/dist_scripts/attention_cp.py", nproc=2, timeout=300)
    for backend in ("dense", "flex", "varlen"):
        for rank in range(2):
            assert f"OK {backend} rank {rank}" in out
