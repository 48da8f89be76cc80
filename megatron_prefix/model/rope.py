"""Rotary position embedding gathered at explicit position ids.

megatron-core's ``RotaryEmbedding`` builds the rotary tensor for positions ``0..s-1`` of the row and
ignores ``position_ids``; in a shared row every response restarts at the prompt length, so the angle
of each token must come from its own position id. ``PositionRotary`` computes

    freqs_sb1d[t, b, 0, :] = cat(pos[b, t] * inv_freq, pos[b, t] * inv_freq)      # [s, b, 1, d]

in fp32 on the device of ``position_ids`` (so no CUDA move, and no buffer that a bf16 cast of the
model would corrupt). megatron's unfused ``apply_rotary_pos_emb`` (``_apply_rotary_pos_emb_bshd``)
takes ``freqs`` of any shape broadcastable against ``t`` [s, b, h, d]: it computes ``t * cos(freqs) +
rotate_half(t) * sin(freqs)`` elementwise, so a per-batch-row [s, b, 1, d] tensor is applied as is
(tested in ``tests/test_model.py``). The fused TE kernel would not accept it, hence
``apply_rope_fusion=False`` in ``ModelConfig.to_transformer_config``.

``inv_freq`` follows Hugging Face's ``ROPE_INIT_FUNCTIONS`` (default, linear, llama3) so that a
converted checkpoint sees the same angles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_prefix.model.config import RopeScaling


def rope_inv_freq(
    dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | str | None = None
) -> Tensor:
    """[dim/2] fp32 inverse frequencies ``theta^(-2i/dim)``, with linear or llama3 scaling applied."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    inv_freq = 1.0 / (theta**exponent)
    scaling = scaling or RopeScaling()
    if scaling.type == "none":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"model.rope_scaling.type: unsupported {scaling.type!r}")


def _llama3_scale(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1 frequency-dependent scaling (as in transformers' ``_compute_llama3_parameters``)."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_at_positions(position_ids_bs: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary angles [s, b, 1, d] (megatron's non-interleaved layout) for position ids [b, s]."""
    pos_sb = position_ids_bs.t().to(device=inv_freq.device, dtype=torch.float32)
    freqs_sbf = pos_sb[:, :, None] * inv_freq[None, None, :]
    return torch.cat((freqs_sbf, freqs_sbf), dim=-1)[:, :, None, :]


class PositionRotary:
    """Holds the RoPE definition of a model; ``__call__(position_ids [b, s]) -> freqs [s, b, 1, d]``.

    Not an ``nn.Module`` on purpose: it has no parameters or buffers, so ``model.cuda()``,
    ``model.bfloat16()`` and checkpoints never see it. ``inv_freq`` is cached per device.
    """

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        self.dim = dim
        self.theta = theta
        self.scaling = scaling or RopeScaling()
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device | str) -> Tensor:
        device = torch.device(device)
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.dim, self.theta, self.scaling, device)
        return self._inv_freq[device]

    def __call__(self, position_ids_bs: Tensor) -> Tensor:
        if position_ids_bs.dim() != 2:
            raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids_bs.shape)}")
        return rotary_at_positions(position_ids_bs, self.inv_freq(position_ids_bs.device))
