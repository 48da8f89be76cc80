"""Counted FLOPs of a training step and the MFU estimate.

Per real (non-pad) token of the row: ``6 * N`` for the dense matrices (N = non-embedding parameters:
attention projections and the SwiGLU MLP of every layer, plus the output projection), and for attention
``12 * layers * heads * head_dim`` per *allowed* query-key pair of the prefix-shared mask (QK^T and AV,
forward and twice that backward). Pairs are counted exactly from the rows, so sharing's savings show.
Vision-language models add the encoder's FLOPs per *image encoded* (``vision_flops_per_image``: the
CLIP layers that run, up to ``feature_layer``, and the projector), forward only for a frozen part
(``model.freeze_vision`` / ``model.freeze_projector``), forward + backward (x3) for a trained one; the
shared layout encodes each image once per unit, the unshared layout once per response.
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


def vision_flops_per_image(vision, lm_hidden: int) -> tuple[float, float]:
    """(tower, projector) forward FLOPs of one image (2 per multiply-add).

    Tower: the patch embedding (a ``patch_size``-stride convolution = one matmul per patch), then per
    layer that runs (``layers_run``: up to ``feature_layer``) over S = patches + CLS tokens: QKV and
    output projections ``4 S h^2``, the MLP ``2 S h i``, attention scores and values ``2 S^2 h``.
    Projector: two linear layers over the ``tokens_per_image`` kept rows (``h -> H -> H``)."""
    h, i, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    patches = (vision.image_size // p) ** 2
    s = patches + 1
    layers = getattr(vision, "layers_run", vision.num_layers)
    tower = 2.0 * patches * 3 * p * p * h + layers * (2.0 * s * (4 * h * h + 2 * h * i) + 4.0 * s * s * h)
    kept = patches + (1 if vision.select_strategy == "full" else 0)
    projector = 2.0 * kept * (h * lm_hidden + lm_hidden * lm_hidden)
    return tower, projector


def row_images(row: PackedRow) -> int:
    """Images the vision encoder runs on for ``row`` (0 for a text row)."""
    images = getattr(row, "images", None)
    return 0 if images is None else len(images)


def vision_step_flops(model: ModelConfig, rows: Sequence[PackedRow]) -> float:
    """FLOPs of the vision encoder and projector for this rank's rows (0 for a text model)."""
    vision = getattr(model, "vision", None)
    if vision is None:
        return 0.0
    images = sum(row_images(r) for r in rows)
    tower, projector = vision_flops_per_image(vision, model.hidden_size)
    tower *= 1.0 if getattr(model, "freeze_vision", True) else 3.0
    projector *= 1.0 if getattr(model, "freeze_projector", False) else 3.0
    return images * (tower + projector)


def step_flops(model: ModelConfig, rows: Sequence[PackedRow]) -> float:
    """Forward + backward FLOPs of this rank's rows (the vision encoder's included)."""
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    q = model.num_attention_heads * model.kv_channels
    kv = model.kv_heads * model.kv_channels
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f  # QKV, output projection, SwiGLU (gate, up, down)
    dense = layers * per_layer + h * model.vocab_size
    tokens = sum(r.num_tokens for r in rows)
    pairs = sum(row_attention_pairs(r) for r in rows)
    return 6.0 * dense * tokens + 12.0 * layers * q * pairs + vision_step_flops(model, rows)


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
