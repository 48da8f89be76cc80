"""``flex`` backend: ``flex_attention`` with a block-sparse ``BlockMask`` built from the doc/segment ids.

The block mask is built once per micro-batch (``prepare``; every layer reuses it). With
``attention.flex_compile`` (default: on CUDA) it is built by a compiled function, so the mask rule is
evaluated block by block inside a fused kernel and memory grows with the number of blocks
``(T/BLOCK)^2``; the eager path (CPU reference, tests) materialises ``[B, 1, Tq, T]`` intermediates
(numbers in ``docs/attention.md``). The compiled builder takes the ids as tensor inputs, so a new
micro-batch of the same shape reuses the compiled code (no recompilation per batch).

Training needs CUDA: PyTorch's flex_attention has no CPU backward (the CPU path is forward-only).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from megatron_prefix.attention import masks
from megatron_prefix.attention.registry import AttentionBackend, Capabilities, CPSlice, register

_COMPILED: dict[str, Any] = {}


def flex_fn(compile_: bool):
    """``flex_attention``, compiled once per process when ``compile_`` (module-level cache)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_:
        return flex_attention
    if "attn" not in _COMPILED:
        _COMPILED["attn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["attn"]


def build_block_mask(mask_mod, b: int, q_len: int, kv_len: int, device: torch.device, block_size: int):
    """``create_block_mask`` over ``mask_mod`` (heads broadcast), eager."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, BLOCK_SIZE=block_size
    )


def _block_mask_from_ids(doc_bt, seg_bt, q_positions, q_len: int, block_size: int):
    return build_block_mask(
        masks.make_mask_mod(doc_bt, seg_bt, q_positions), doc_bt.shape[0], q_len, doc_bt.shape[1],
        doc_bt.device, block_size,
    )


def block_mask_from_ids(
    doc_bt: torch.Tensor,
    seg_bt: torch.Tensor,
    q_positions: torch.Tensor | None,
    block_size: int,
    compile_: bool,
):
    """The ``BlockMask`` of the queries at global ``q_positions`` (None: all) over the rows' keys.

    ``compile_``: build it with a compiled function (memory O(blocks)); otherwise eagerly (O(Tq*T)).
    """
    q_len = doc_bt.shape[1] if q_positions is None else int(q_positions.numel())
    doc_bt, seg_bt = doc_bt.to(torch.int32), seg_bt.to(torch.int32)
    if not compile_:
        return _block_mask_from_ids(doc_bt, seg_bt, q_positions, q_len, block_size)
    if "mask" not in _COMPILED:
        _COMPILED["mask"] = torch.compile(_block_mask_from_ids, dynamic=False)
    return _COMPILED["mask"](doc_bt, seg_bt, q_positions, q_len, block_size)


def count_blocks(block_mask) -> dict[str, int]:
    """Block statistics of a ``BlockMask``: total, full, partial (masked), computed, skipped."""
    partial = int(block_mask.kv_num_blocks.sum())
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    b, h, nq = block_mask.kv_num_blocks.shape
    _q_len, kv_len = block_mask.seq_lengths
    _bq, bk = block_mask.BLOCK_SIZE
    total = b * h * nq * (-(-kv_len // bk))
    return {
        "total": total,
        "full": full,
        "partial": partial,
        "computed": full + partial,
        "skipped": total - full - partial,
    }


def flex_attention_bhsd(
    q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, block_mask, scale: float, compile_: bool
) -> torch.Tensor:
    """Block-sparse flex attention; refuses CPU backward (unsupported by PyTorch)."""
    if (
        q_bhsd.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q_bhsd, k_bhsd, v_bhsd))
    ):
        raise RuntimeError(
            "flex attention on CPU supports only the forward pass (PyTorch has no CPU flex backward); "
            "run under torch.no_grad()/eval, or use the dense backend for CPU training"
        )
    if q_bhsd.device.type == "cpu":  # PyTorch rejects CPU inputs that require grad even under no_grad
        q_bhsd, k_bhsd, v_bhsd = q_bhsd.detach(), k_bhsd.detach(), v_bhsd.detach()
    fn = flex_fn(compile_)
    with warnings.catch_warnings():
        if not compile_:  # eager flex (CPU reference) warns on every call that it is unfused
            warnings.filterwarnings("ignore", message=".*flex_attention.*")
        return fn(
            q_bhsd,
            k_bhsd,
            v_bhsd,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=k_bhsd.shape[1] != q_bhsd.shape[1],
        )


@register
class FlexBackend(AttentionBackend):
    """Block-sparse ``flex_attention``; plan = one ``BlockMask`` per micro-batch and CP slice."""

    name = "flex"
    caps = Capabilities(devices=("cuda",), cpu_reference=True, cpu_backward=False, context_parallel=True)

    def _compile(self, device) -> bool:
        return self.cfg.flex_compile if self.cfg.flex_compile is not None else torch.device(device).type == "cuda"

    def plan_key(self) -> str:
        return f"flex{self.cfg.flex_block_size}"

    def prepare(self, params, cp: CPSlice):
        """The ``BlockMask`` of this rank's queries (compiled build when ``flex_compile``)."""
        return block_mask_from_ids(
            params.doc_ids.to(cp.device), params.segment_ids.to(cp.device), cp.q_positions(params.seq_len),
            self.cfg.flex_block_size, self._compile(cp.device),
        )

    def attend(self, q_sbhd, k_sbhd, v_sbhd, plan, scale, dropout_p=0.0):
        """flex attention over ``[b, h, s, d]`` permutations; returns ``[s, b, np*hn]``."""
        s, b, nh, hd = q_sbhd.shape
        out_bhsd = flex_attention_bhsd(
            q_sbhd.permute(1, 2, 0, 3), k_sbhd.permute(1, 2, 0, 3), v_sbhd.permute(1, 2, 0, 3), plan, scale,
            self._compile(q_sbhd.device),
        )
        return out_bhsd.permute(2, 0, 1, 3).reshape(s, b, nh * hd)
