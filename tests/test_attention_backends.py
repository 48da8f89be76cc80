"""The attention-backend seam (``attention.registry``) and the defects fixed through it (CPU tier).

- config refusals name the field, before any model is built;
- a backend is one object: a toy backend registered from a test is used by ``SharedPrefixCoreAttention``;
- varlen on a row of padding only never calls a kernel with zero sequences, and backward still runs;
- ``torch.nn.attention.varlen.varlen_attn`` is called by signature (fake functions of each release);
- flex builds its block mask compiled (equal to eager) once per micro-batch, without recompiling.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prefix.attention import registry, varlen
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.attention.dense import DenseBackend
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.data.row import pack_row
from tests.dist_scripts.attention_common import grads, make_layer, random_qkv, random_rows

SCALE = 1.0 / math.sqrt(8)


def _cfg(backend: str, **kw) -> AttentionConfig:
    return AttentionConfig(backend=backend, **kw)


def test_registry_names_and_capabilities():
    assert {"dense", "flex", "varlen", "te"} <= set(registry.names())
    assert registry.get("varlen").caps.dtypes_on("cuda") == ("bfloat16", "float16")
    assert not registry.get("te").caps.context_parallel and registry.get("te").caps.package == "transformer_engine"
    with pytest.raises(ValueError, match="attention.backend"):
        registry.get("sparse")


@pytest.mark.parametrize(
    "backend,device,dtype,cp,extra,field",
    [
        ("varlen", "cuda", "float32", 1, {}, "train.dtype"),  # flash kernels have no fp32
        ("flex", "cpu", "float32", 1, {}, "attention.backend"),  # no CPU path without allow_cpu_reference
        ("flex", "cpu", "float32", 1, {"allow_cpu_reference": True}, "attention.backend"),  # no CPU backward
        ("varlen", "cpu", "float32", 1, {}, "attention.backend"),
        ("te", "cuda", "bfloat16", 1, {}, "attention.backend"),  # transformer_engine is not installed here
    ],
)
def test_registry_refuses_impossible_combinations(backend, device, dtype, cp, extra, field):
    if backend == "te" and registry.package_available("transformer_engine"):
        pytest.skip("transformer_engine is installed")
    with pytest.raises(ValueError, match=field):
        registry.check(_cfg(backend, **extra), device=device, dtype=dtype, cp=cp)


def test_registry_accepts_possible_combinations():
    registry.check(_cfg("dense"), device="cpu", dtype="float32", cp=2)
    registry.check(_cfg("varlen"), device="cuda", dtype="bfloat16", cp=4)
    registry.check(_cfg("flex"), device="cuda", dtype="float32", cp=2)
    registry.check(_cfg("varlen", allow_cpu_reference=True), device="cpu", dtype="float32")
    registry.check(_cfg("flex", allow_cpu_reference=True), device="cpu", dtype="float32", backward=False)


def test_train_config_refuses_varlen_fp32_on_gpu_naming_both_fields():
    from megatron_prefix.training.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.path = "x"
    cfg.attention.backend, cfg.train.dtype = "varlen", "float32"
    with pytest.raises(ValueError, match=r"train\.dtype.*attention\.backend=varlen"):
        cfg.validate(world_size=1, cuda=True)
    cfg.train.dtype = "bfloat16"
    cfg.validate(world_size=1, cuda=True)


def test_te_refused_with_context_parallel(monkeypatch):
    monkeypatch.setattr(registry, "package_available", lambda name: True)
    registry.check(_cfg("te"), device="cuda", dtype="bfloat16", cp=1)
    with pytest.raises(ValueError, match="parallel.cp"):
        registry.check(_cfg("te"), device="cuda", dtype="bfloat16", cp=2)


def test_a_backend_is_one_registered_object():
    """A backend defined here (one class, one register call) is dispatched to by the core attention."""
    calls = []

    class Toy(DenseBackend):
        name = "toy_dense"

        def prepare(self, params, cp):
            calls.append("prepare")
            return super().prepare(params, cp)

        def attend(self, *a, **kw):
            calls.append("attend")
            return super().attend(*a, **kw)

    registry.register(Toy)
    try:
        rows = random_rows(0, 2, 40)
        params = SharedPrefixParams.from_rows(rows)
        q, k, v = random_qkv(40, 2)
        with torch.no_grad():
            ref = make_layer()(q, k, v, None, packed_seq_params=SharedPrefixParams.from_rows(rows))
            x = q
            for i in range(2):
                x = make_layer({"backend": "toy_dense"}, layer_number=i + 1)(x, k, v, None, packed_seq_params=params)
                if i == 0:
                    assert torch.equal(x, ref)
                x = x.view_as(q)
        assert calls == ["prepare", "attend", "attend"]
    finally:
        registry.BACKENDS.pop("toy_dense")


def test_varlen_padding_only_row_never_reaches_the_kernel(monkeypatch):
    """The batcher tops ranks up with rows of padding only: zero sequences must not reach a kernel."""
    real = varlen.reference_varlen

    def strict_kernel(q, k, v, cu_q, cu_k, scale):  # flash kernels require batch size > 0
        assert cu_q.numel() > 1, "kernel called with zero sequences"
        return real(q, k, v, cu_q, cu_k, scale)

    monkeypatch.setattr(varlen, "reference_varlen", strict_kernel)
    rows = [pack_row([], 32, 0)]
    params = SharedPrefixParams.from_rows(rows)
    q, k, v = random_qkv(32, 1)
    w = torch.randn(32, 1, 32, generator=torch.Generator().manual_seed(0))
    out = make_layer({"backend": "varlen", "allow_cpu_reference": True})(q, k, v, None, packed_seq_params=params)
    dense = make_layer()(q, k, v, None, packed_seq_params=SharedPrefixParams.from_rows(rows))
    assert torch.equal(out, dense)  # padding attends to itself only: its own value row
    for g, g_ref in zip(grads(out, w, (q, k, v)), grads(dense, w, (q, k, v))):
        assert torch.allclose(g, g_ref, atol=1e-5)


# ------------------------------------------------------------------- varlen_attn signature adapter


def _fake_causal(q, k, v, cu_q, cu_k, scale, causal):
    assert causal, "the adapter must request causal attention"
    if k.shape[1] != q.shape[1]:
        raise RuntimeError("this fake has no GQA: keys/values must be repeated")
    return varlen.reference_varlen(q, k, v, cu_q, cu_k, scale)


def fake_varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9/2.10: ``is_causal``, no ``scale``, no ``enable_gqa`` (scale is 1/sqrt(d))."""
    return _fake_causal(query, key, value, cu_seq_q, cu_seq_k, query.shape[-1] ** -0.5, is_causal)


def fake_varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
    """Later releases: ``window_size`` (causal = (-1, 0)), ``scale``, ``enable_gqa``."""
    if enable_gqa:
        g = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    return _fake_causal(query, key, value, cu_seq_q, cu_seq_k, scale, tuple(window_size) == (-1, 0))


def fake_varlen_unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    raise AssertionError("never called")


@pytest.mark.parametrize("fn", [fake_varlen_2_9, fake_varlen_new])
def test_torch_varlen_adapter_by_signature(fn):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(9, 4, 8, generator=g), torch.randn(14, 2, 8, generator=g), torch.randn(14, 2, 8, generator=g)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 14], dtype=torch.int32)
    want = varlen.reference_varlen(q, k, v, cu_q, cu_k, 0.3)
    got = varlen.torch_varlen_adapter(fn)(q, k, v, cu_q, cu_k, 5, 8, 0.3)
    assert (got - want).abs().max() <= 1e-5


def test_torch_varlen_adapter_refuses_a_signature_without_causal():
    with pytest.raises(RuntimeError, match="is_causal or window_size"):
        varlen.torch_varlen_adapter(fake_varlen_unknown)


def test_installed_torch_varlen_signature_is_understood():
    fn = varlen._kernel_torch()
    if fn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    varlen.torch_varlen_adapter(fn)  # raises if neither is_causal nor window_size exists


# ------------------------------------------------------------------------------ flex block masks


def test_flex_compiled_block_mask_equals_eager_and_is_reused():
    """The compiled builder (the CUDA default) gives the eager mask and does not recompile per batch."""
    from torch._dynamo.utils import counters

    from megatron_prefix.attention.flex import block_mask_from_ids, count_blocks

    for seed in (0, 1):
        params = SharedPrefixParams.from_rows(random_rows(20 + seed, 2, 256, max_prompt=40, max_resp=30))
        before = counters["stats"]["unique_graphs"]
        eager = block_mask_from_ids(params.doc_ids, params.segment_ids, None, 32, compile_=False)
        comp = block_mask_from_ids(params.doc_ids, params.segment_ids, None, 32, compile_=True)
        if seed == 1:
            assert counters["stats"]["unique_graphs"] == before, "recompiled for a new micro-batch"
        assert count_blocks(comp) == count_blocks(eager)
        assert torch.equal(comp.kv_num_blocks, eager.kv_num_blocks)
        assert torch.equal(comp.kv_indices, eager.kv_indices)
        assert torch.equal(comp.full_kv_num_blocks, eager.full_kv_num_blocks)
