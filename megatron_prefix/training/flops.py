"""Counted FLOPs of a training step and the MFU estimate.

Per real (non-pad) token of the row: ``6 * N`` for the dense matrices (N = non-embedding parameters:
attention projections and the SwiGLU MLP of every layer, plus the output projection), and for attention
``12 * layers * heads * head_dim`` per *allowed* query-key pair of the prefix-shared mask (QK^T and AV,
forward and twice that backward). Pairs are counted exactly from the rows, so sharing's savings show.
MFU = achieved FLOP/s per GPU over ``MEGATRON_PREFIX_PEAK_TFLOPS`` (default: 989 on H100/H200 in bf16,
unset elsewhere, in which case only achieved TFLOP/s are reported).

Pure arithmetic: no megatron.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from megatron_prefix.data.row import PackedRow
from megatron_prefix.model.config import ModelConfig

HOPPER_BF16_TFLOPS = 989.0


def row_attention_pairs(row: PackedRow) -> int:
    """Query-key pairs the mask allows in ``row`` (real tokens only; ``sharing.ids_pairs``)."""
    return row.attention_pairs()


def step_flops(model: ModelConfig, rows: Sequence[PackedRow]) -> float:
    """Forward + backward FLOPs of this rank's rows."""
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    q = model.num_attention_heads * model.kv_channels
    kv = model.kv_heads * model.kv_channels
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f  # QKV, output projection, SwiGLU (gate, up, down)
    dense = layers * per_layer + h * model.vocab_size
    tokens = sum(r.num_tokens for r in rows)
    pairs = sum(row_attention_pairs(r) for r in rows)
    return 6.0 * dense * tokens + 12.0 * layers * q * pairs


def peak_tflops(cuda: bool) -> float | None:
    """Peak per-GPU TFLOP/s for MFU, or None when unknown."""
    env = os.environ.get("MEGATRON_PREFIX_PEAK_TFLOPS")
    if env:
        return float(env)
    if cuda and any(n in torch.cuda.get_device_name() for n in ("H100", "H200")):
        return HOPPER_BF16_TFLOPS
    return None


def step_report(model: ModelConfig, rows: Sequence[PackedRow], info, seconds: float, device, cuda: bool) -> dict:
    """``tflops_per_device`` (and ``mfu`` when the peak is known) of this step, averaged over ranks."""
    flops = step_flops(model, rows) / (info.tp_size * info.cp_size * info.pp_size)
    achieved = flops / max(seconds, 1e-9) / 1e12
    if torch.distributed.is_initialized():
        t = torch.tensor([achieved], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        achieved = float(t.item()) / torch.distributed.get_world_size()
    out = {"tflops_per_device": achieved}
    peak = peak_tflops(cuda)
    if peak:
        out["mfu"] = achieved / peak
    return out
