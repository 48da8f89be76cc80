"""Per-micro-batch metadata for shared-prefix attention, carried the way megatron carries packing.

``SharedPrefixParams`` subclasses megatron-core's ``PackedSeqParams`` and is passed as
``packed_seq_params`` to ``GPTModel.forward``; megatron hands it unchanged to every layer's
``core_attention``. Its ``qkv_format`` stays ``"sbhd"`` so that megatron's own THD code paths (fused
RoPE on cu_seqlens, TE's packed kernels) are not triggered: our core attention interprets it.

Whatever a backend derives from it (dense mask, flex block mask, varlen gather indices, CP key
indices) is built once per micro-batch and kept in ``cache``; layers only read it.

Tensors are ``[b, T]`` in the full (pre-context-parallel) row layout; see ``megatron_prefix.data.row``
for the meaning of each field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prefix.data.row import PackedRow


@dataclass
class SharedPrefixParams(PackedSeqParams):
    """Packed prefix-shared rows of one micro-batch (all rows of length T)."""

    doc_ids: torch.Tensor | None = None  # [b, T] int32, -1 in padding
    segment_ids: torch.Tensor | None = None  # [b, T] int32, 0 prompt, i response i, -1 padding
    position_ids: torch.Tensor | None = None  # [b, T] int64
    cu_docs: list[torch.Tensor] = field(default_factory=list)  # per row: [D_r + 1] int32
    doc_prompt_lens: list[torch.Tensor] = field(default_factory=list)  # per row: [D_r] int32
    cache: dict[str, Any] = field(default_factory=dict)  # backend structures, built once per micro-batch

    def __post_init__(self) -> None:
        if self.qkv_format is None:
            self.qkv_format = "sbhd"

    @property
    def batch_size(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.doc_ids.shape[1])

    @classmethod
    def from_rows(cls, rows: Sequence[PackedRow], device: torch.device | str = "cpu") -> SharedPrefixParams:
        """Stack packed rows (equal ``pack_tokens``) into one micro-batch carrier on ``device``."""
        lengths = {r.pack_tokens for r in rows}
        assert len(lengths) == 1, f"rows of one micro-batch must have equal length, got {sorted(lengths)}"

        def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
            arr = np.stack([getattr(r, name) for r in rows])
            return torch.from_numpy(arr).to(device=device, dtype=dtype)

        return cls(
            doc_ids=stack("doc_ids", torch.int32),
            segment_ids=stack("segment_ids", torch.int32),
            position_ids=stack("position_ids", torch.long),
            cu_docs=[torch.from_numpy(r.cu_docs).to(device) for r in rows],
            doc_prompt_lens=[torch.from_numpy(r.doc_prompt_lens).to(device) for r in rows],
        )
