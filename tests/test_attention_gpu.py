"""GPU tier of shared-prefix attention: flex (compiled), varlen (flash) and te against the dense reference.

Ground truth is the dense backend in fp32 on the same inputs. bf16 tolerances, as a fraction of the
reference tensor's max abs value: outputs <= 2e-2, q/k/v gradients <= 3e-2; dense bf16 itself is checked
to the same bound so the comparison is not vacuous. Skipped without CUDA (conftest).
"""

from __future__ import annotations

import pytest
import torch

from megatron_prefix.attention import masks, registry, varlen
from megatron_prefix.attention.backends import count_blocks
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.data.row import pack_row
from tests.dist_scripts.attention_common import make_layer, random_qkv, random_rows

pytestmark = pytest.mark.gpu

T, B, H, G, D = 1024, 2, 8, 2, 64
FWD_TOL, GRAD_TOL = 2e-2, 3e-2


def _inputs(seed: int):
    rows = random_rows(seed, B, T, max_prompt=200, max_resp=150, min_pad=17)
    q, k, v = random_qkv(T, B, heads=H, groups=G, head_dim=D, seed=seed, device="cuda")
    w = torch.randn(T, B, H * D, generator=torch.Generator().manual_seed(seed)).cuda()
    return rows, q, k, v, w


def _run(cfg, rows, q, k, v, w, dtype):
    layer = make_layer(cfg, heads=H, groups=G, head_dim=D).cuda()
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    params = SharedPrefixParams.from_rows(rows, device="cuda")
    out = layer(*leaves, None, packed_seq_params=params)
    grads = torch.autograd.grad((out.float() * w).sum(), leaves)
    return out.float(), [g.float() for g in grads], params


def _rel(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", ["dense", "flex", "varlen", "te"])
def test_bf16_backend_matches_fp32_dense(backend):
    if backend == "te":
        pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    rows, q, k, v, w = _inputs(0)
    ref_out, ref_grads, _ = _run(None, rows, q, k, v, w, torch.float32)
    cfg = {"backend": backend, "max_dense_tokens": 4096}
    out, grads, _ = _run(cfg, rows, q, k, v, w, torch.bfloat16)
    real = torch.from_numpy((SharedPrefixParams.from_rows(rows).doc_ids != -1).numpy().T).cuda()  # [T, B]
    assert _rel(out[real], ref_out[real]) <= FWD_TOL, backend
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert _rel(g, g_ref) <= GRAD_TOL, f"{backend} d{name}"


def test_fp32_flex_and_varlen_match_dense_tightly():
    rows, q, k, v, w = _inputs(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_out, ref_grads, _ = _run(None, rows, q, k, v, w, torch.float32)
    for cfg in ({"backend": "flex"},):  # flash varlen kernels have no fp32
        out, grads, _ = _run(cfg, rows, q, k, v, w, torch.float32)
        assert (out - ref_out).abs().max() <= 1e-3
        for g, g_ref in zip(grads, ref_grads):
            assert (g - g_ref).abs().max() <= 1e-3


def test_flex_block_skipping_counts():
    rows, q, k, v, w = _inputs(2)
    _, _, params = _run({"backend": "flex"}, rows, q, k, v, w, torch.bfloat16)
    (bm,) = [val for key, val in params.cache.items() if key.startswith("flex")]
    stats = count_blocks(bm)
    dense = masks.build_dense_mask(params.doc_ids, params.segment_ids)[:, 0]  # [B, T, T]
    nb = T // 128
    any_block = dense.view(B, nb, 128, nb, 128).any(dim=(2, 4))
    all_block = dense.view(B, nb, 128, nb, 128).all(dim=(2, 4))
    assert stats["computed"] == int(any_block.sum()) and stats["full"] == int(all_block.sum())
    causal_blocks = B * nb * (nb + 1) // 2
    assert stats["computed"] < causal_blocks, stats  # doc and response-vs-response blocks are skipped


def test_varlen_kernel_and_pairs():
    rows, _q, _k, _v, _w = _inputs(3)
    params = SharedPrefixParams.from_rows(rows, device="cuda")
    plan = masks.build_varlen_plan(params.doc_ids.cpu().numpy(), params.segment_ids.cpu().numpy())
    assert plan.pairs() == varlen.useful_pairs(params)
    assert varlen.kernel_name(torch.device("cuda")) in ("flash_attn", "torch_varlen_attn")


def test_varlen_refuses_fp32_on_gpu():
    """Flash varlen kernels have no fp32: refused by the config check and at run time, naming train.dtype."""
    with pytest.raises(ValueError, match="train.dtype"):
        registry.check(_Cfg("varlen"), device="cuda", dtype="float32")
    rows, q, k, v, w = _inputs(4)
    with pytest.raises(ValueError, match="train.dtype"):
        _run({"backend": "varlen"}, rows, q, k, v, w, torch.float32)


class _Cfg:
    def __init__(self, backend):
        self.backend, self.allow_cpu_reference = backend, False


@pytest.mark.parametrize("backend", ["varlen", "flex", "te"])
def test_padding_only_row_runs_forward_and_backward(backend):
    """The batcher tops ranks up with rows of padding only: the real kernels must not see zero sequences."""
    if backend == "te":
        pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    rows = [pack_row([], T, 0)] * B
    q, k, v = random_qkv(T, B, heads=H, groups=G, head_dim=D, seed=5, device="cuda")
    w = torch.randn(T, B, H * D, device="cuda")
    out, grads, _ = _run({"backend": backend}, rows, q, k, v, w, torch.bfloat16)
    ref_out, _, _ = _run(None, rows, q, k, v, w, torch.bfloat16)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert _rel(out, ref_out) <= FWD_TOL


def test_torch_varlen_kernel_signature_on_this_torch():
    """torch 2.11 on the GPU machine: the adapter understands the installed varlen_attn (bf16, causal)."""
    fn = varlen._kernel_torch()
    if fn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, 64, generator=g).cuda().bfloat16()
    k, v = (torch.randn(14, 2, 64, generator=g).cuda().bfloat16() for _ in range(2))
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32, device="cuda")
    got = varlen.torch_varlen_adapter(fn)(q, k, v, cu_q, cu_k, 5, 8, 0.11)
    want = varlen.reference_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, 0.11)
    assert _rel(got.float(), want) <= FWD_TOL


def test_flex_compiled_block_mask_memory_grows_with_blocks():
    """32k tokens: the compiled builder's CUDA memory is block tables (KiBs), not [B, 1, T, T] (>= 1 GiB)."""
    from megatron_prefix.attention.flex import block_mask_from_ids, count_blocks

    t = 32768
    warm = SharedPrefixParams.from_rows(random_rows(7, 1, t, max_prompt=900, max_resp=400), device="cuda")
    run = SharedPrefixParams.from_rows(random_rows(8, 1, t, max_prompt=900, max_resp=400), device="cuda")
    block_mask_from_ids(warm.doc_ids, warm.segment_ids, None, 128, compile_=True)  # compile once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bm = block_mask_from_ids(run.doc_ids, run.segment_ids, None, 128, compile_=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 64 * 2**20, f"compiled block-mask build used {peak / 2**20:.1f} MiB"
    assert count_blocks(bm)["computed"] < count_blocks(bm)["total"] // 4
