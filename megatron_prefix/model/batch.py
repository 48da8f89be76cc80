"""Packed rows -> the inputs of one model forward (one micro-batch), per CP rank.

``MicroBatch.from_rows(rows, cp_size, cp_rank, device)`` gives, for b rows of T tokens:

- ``tokens`` / ``position_ids``: [b, T/cp] int64 in megatron's ``input_ids`` / ``position_ids`` layout,
  this CP rank's slice (``attention.context_parallel.split_for_cp``: chunks r and 2cp-1-r of 2cp);
- ``params``: the ``SharedPrefixParams`` of the *full* rows (the core attention derives this rank's
  mask rows from it) — pass it as ``packed_seq_params``;
- ``index``: a ``ScoringIndex`` (``model.logprobs``) of the scored tokens whose pred position this
  rank holds, plus each response's last-token coordinates;
- per response (length R, row-major: row 0's spans, then row 1's ...): ``resp_row``, ``resp_unit``,
  ``resp_slot``, ``resp_scores`` (what the loss groups and ranks by), ``resp_spans`` [R, 2].

Images (``docs/vision.md``): ``pixel_values`` [N_total, C, H, W] float32, the rows' images concatenated
(row 0's, then row 1's ...), or None when no row has images; ``image_feature_index`` [b, T/cp] int64
(this CP rank's slice): -1 for a text token, else the row of the token's feature in the flattened
projected features ``[N_total * tokens_per_image, h]`` (row r's ``PackedRow.image_index`` shifted by the
feature rows of the rows before it). Every CP rank gets all of the micro-batch's images (the vision
encoder runs on all of them, each rank scatters the features of its own positions). ``forward`` passes
both only when ``pixel_values`` is not None, so the text path is unchanged.

Under pipeline parallelism every stage builds the same ``MicroBatch`` (positions and the mask are
needed by every stage's layers); the first stage also uses ``tokens``, the last stage ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megatron_prefix.attention.context_parallel import local_positions, split_for_cp
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.data.row import PackedRow
from megatron_prefix.model.logprobs import ScoringIndex


@dataclass
class MicroBatch:
    """One micro-batch of packed rows, as this CP rank feeds it to ``SharedPrefixGPTModel``."""

    tokens: Tensor  # [b, T/cp] int64
    position_ids: Tensor  # [b, T/cp] int64
    params: SharedPrefixParams
    index: ScoringIndex
    resp_row: Tensor  # [R] int64
    resp_spans: Tensor  # [R, 2] int64, full-row positions
    resp_unit: Tensor  # [R] int64
    resp_slot: Tensor  # [R] int64
    resp_scores: Tensor  # [R] float32
    cp_size: int = 1
    cp_rank: int = 0
    pixel_values: Tensor | None = None  # [N_total, C, H, W] float32, or None
    image_feature_index: Tensor | None = None  # [b, T/cp] int64, -1 for text tokens; None without images

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_responses(self) -> int:
        return int(self.resp_row.numel())

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_rows(
        cls, rows: Sequence[PackedRow], cp_size: int = 1, cp_rank: int = 0, device: torch.device | str = "cpu"
    ) -> MicroBatch:
        """Stack ``rows`` (equal ``pack_tokens``, divisible by ``2*cp_size`` when ``cp_size > 1``)."""
        if not rows:
            raise ValueError("rows: a micro-batch needs at least one row")
        t = rows[0].pack_tokens
        local_pos = local_positions(t, cp_size, cp_rank).numpy()
        global_to_local = np.full(t, -1, dtype=np.int64)
        global_to_local[local_pos] = np.arange(len(local_pos))

        tokens = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64))
        positions = torch.from_numpy(np.stack([r.position_ids for r in rows]).astype(np.int64))
        pred_s, pred_b, targets, resp_ids = [], [], [], []
        last_s, last_b, last_owned, lengths = [], [], [], []
        resp_row, spans, units, slots, scores = [], [], [], [], []
        offset = 0
        for b, row in enumerate(rows):
            r_spans = row.resp_spans.astype(np.int64).reshape(-1, 2)
            resp_of_pos = np.full(t, -1, dtype=np.int64)
            for i, (s, e) in enumerate(r_spans.tolist()):
                resp_of_pos[s:e] = offset + i
            scored = np.nonzero(row.loss_mask)[0]
            pred = row.pred_index[scored].astype(np.int64)
            keep = global_to_local[pred] >= 0
            pred_s.append(global_to_local[pred[keep]])
            pred_b.append(np.full(int(keep.sum()), b, dtype=np.int64))
            targets.append(row.tokens[scored[keep]].astype(np.int64))
            resp_ids.append(resp_of_pos[scored[keep]])
            last = r_spans[:, 1] - 1
            last_local = global_to_local[last]
            last_owned.append(last_local >= 0)
            last_s.append(np.maximum(last_local, 0))
            last_b.append(np.full(len(last), b, dtype=np.int64))
            lengths.append(r_spans[:, 1] - r_spans[:, 0])
            resp_row.append(np.full(len(r_spans), b, dtype=np.int64))
            spans.append(r_spans)
            units.append(row.resp_unit.astype(np.int64))
            slots.append(row.resp_slot.astype(np.int64))
            scores.append(row.resp_scores.astype(np.float32))
            offset += len(r_spans)

        def cat(parts: list[np.ndarray]) -> Tensor:
            return torch.from_numpy(np.concatenate(parts)).to(device)

        pixel_values, feature_index = _images(rows, t)
        index = ScoringIndex(
            pred_s=cat(pred_s), pred_b=cat(pred_b), targets=cat(targets), resp_ids=cat(resp_ids),
            num_responses=offset, resp_lengths=cat(lengths),
            last_s=cat(last_s), last_b=cat(last_b), last_owned=cat(last_owned),
        )
        return cls(
            tokens=split_for_cp(tokens, cp_size, cp_rank).to(device),
            position_ids=split_for_cp(positions, cp_size, cp_rank).to(device),
            params=SharedPrefixParams.from_rows(rows, device=device),
            index=index,
            resp_row=cat(resp_row),
            resp_spans=torch.from_numpy(np.concatenate(spans).reshape(-1, 2)).to(device),
            resp_unit=cat(units),
            resp_slot=cat(slots),
            resp_scores=cat(scores),
            cp_size=cp_size,
            cp_rank=cp_rank,
            pixel_values=None if pixel_values is None else pixel_values.to(device),
            image_feature_index=(
                None if feature_index is None else split_for_cp(feature_index, cp_size, cp_rank).to(device)
            ),
        )

    @classmethod
    def for_this_rank(cls, rows: Sequence[PackedRow], device: torch.device | str | None = None) -> MicroBatch:
        """``from_rows`` with the CP size/rank from megatron's parallel state and the default device."""
        from megatron.core import parallel_state

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return cls.from_rows(
            rows,
            cp_size=parallel_state.get_context_parallel_world_size(),
            cp_rank=parallel_state.get_context_parallel_rank(),
            device=device,
        )

    def forward(self, model: Any, **kwargs: Any) -> Tensor:
        """``model(tokens, position_ids, None, packed_seq_params=params, **kwargs)`` (any pipeline stage),
        plus ``pixel_values=`` and ``image_feature_index=`` when the micro-batch has images."""
        if self.pixel_values is not None:
            kwargs = {"pixel_values": self.pixel_values, "image_feature_index": self.image_feature_index, **kwargs}
        return model(self.tokens, self.position_ids, None, packed_seq_params=self.params, **kwargs)


def _images(rows: Sequence[PackedRow], t: int) -> tuple[Tensor | None, Tensor | None]:
    """``(pixel_values [N_total, C, H, W], image_feature_index [b, T])`` of full rows, or (None, None)."""
    if all(r.images is None for r in rows):
        return None, None
    pixels, index, offset = [], np.full((len(rows), t), -1, dtype=np.int64), 0
    for b, row in enumerate(rows):
        if row.images is None:
            continue
        idx = row.image_index.astype(np.int64)
        at = idx >= 0
        index[b, at] = idx[at] + offset
        offset += int(at.sum())
        pixels.append(row.images)
    return torch.from_numpy(np.concatenate(pixels).astype(np.float32, copy=False)), torch.from_numpy(index)
