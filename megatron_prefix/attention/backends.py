"""``AttentionConfig`` (the ``attention:`` section) and the availability check of its backend.

Backends themselves live one per module (``dense.py``, ``flex.py``, ``varlen.py``, ``te.py``) and are
found through ``registry`` (``registry.names()``, ``registry.get(name)``, ``registry.check(...)``). The
kernel helpers are re-exported here for existing callers. Keys/values may have fewer heads than queries
(GQA); every backend handles that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_prefix.attention import registry


@dataclass
class AttentionConfig:
    """Choice and limits of the shared-prefix attention backend.

    - ``backend``: a ``registry`` name: ``dense`` (boolean mask + SDPA, any device, the reference),
      ``flex`` (flex_attention with a block-sparse ``BlockMask``; training needs CUDA), ``varlen``
      (per-response K/V gather + a varlen flash kernel; CUDA, bf16/fp16), ``te`` (Transformer Engine's
      ``DotProductAttention``, THD + ``padding_causal_bottom_right``; CUDA, no context parallelism).
    - ``max_dense_tokens``: ``dense`` refuses rows longer than this (its mask is O(T^2)).
    - ``flex_block_size``: ``BLOCK_SIZE`` of ``create_block_mask``.
    - ``flex_compile``: compile ``flex_attention`` and the block-mask builder (None: on CUDA only; eager
      flex on CPU is the math path).
    - ``allow_cpu_reference``: allow the CPU paths of ``flex`` (forward only) and ``varlen`` (a math loop
      over per-sequence SDPA with the same gather indices). Tests and evaluation only.
    """

    backend: str = "dense"
    max_dense_tokens: int = 16384
    flex_block_size: int = 128
    flex_compile: bool | None = None
    allow_cpu_reference: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        registry.get(self.backend)  # ValueError naming attention.backend when unknown
        if self.max_dense_tokens <= 0:
            raise ValueError(f"attention.max_dense_tokens: must be positive, got {self.max_dense_tokens}")
        if self.flex_block_size <= 0 or self.flex_block_size % 16:
            raise ValueError(
                f"attention.flex_block_size: must be a positive multiple of 16, got {self.flex_block_size}"
            )

    @classmethod
    def coerce(cls, value: Any) -> AttentionConfig:
        """Accept an ``AttentionConfig``, a dict of its fields, a backend name, or None (defaults)."""
        if value is None:
            cfg = cls()
        elif isinstance(value, cls):
            cfg = value
        elif isinstance(value, str):
            cfg = cls(backend=value)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"attention: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
                )
            cfg = cls(**value)
        else:
            raise ValueError(
                f"attention: expected AttentionConfig, dict or backend name, got {type(value).__name__}"
            )
        cfg.validate()
        return cfg


def check_available(cfg: AttentionConfig, cp: int = 1) -> None:
    """Fail at layer construction if ``cfg.backend`` cannot run on this machine (``registry.check``).

    The dtype is not known yet here (it is checked by ``TrainConfig.validate`` and at run time); a CPU
    reference path is accepted forward-only, since a layer may be built for evaluation.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    registry.check(cfg, device=device, dtype=None, cp=cp, backward=False)


def __getattr__(name: str):  # re-exports of the kernel helpers, resolved lazily (no import cycle)
    if name == "dense_attention":
        from megatron_prefix.attention.dense import dense_attention

        return dense_attention
    if name in ("build_block_mask", "count_blocks", "flex_attention_bhsd", "flex_fn", "block_mask_from_ids"):
        from megatron_prefix.attention import flex

        return getattr(flex, name)
    if name == "BACKENDS":
        return registry.names()
    raise AttributeError(name)
