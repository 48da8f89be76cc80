"""Torch norms for megatron's *local* layer spec that also work with sequence parallelism.

megatron-core 0.16's ``WrappedTorchNorm`` (what ``get_gpt_layer_local_spec`` and ``TransformerBlock``'s
final norm use without TE/apex) asserts ``not config.sequence_parallel``. With sequence parallelism each
TP rank normalises its own slice of the sequence, so a norm weight's gradient on one rank covers only
those tokens; megatron's ``finalize_model_grads`` sums the gradients of every parameter marked
``sequence_parallel=True`` over the TP group (what TE's norms and ``FusedLayerNorm`` mark). ``TorchNorm``
builds the same ``torch.nn.RMSNorm`` / ``LayerNorm`` (same state-dict keys) and marks its parameters with
``config.sequence_parallel``; nothing else differs, so without sequence parallelism it is the stock norm.
"""

from __future__ import annotations

import torch


class TorchNorm:
    """Drop-in for megatron's ``WrappedTorchNorm`` (same constructor) that allows sequence parallelism."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma: not supported by the torch norms")
        if config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("persist_layer_norm/memory_efficient_layer_norm: not supported by the torch norms")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization: {config.normalization!r} is not supported (RMSNorm, LayerNorm)")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
