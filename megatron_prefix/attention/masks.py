"""Mask logic of shared-prefix attention, built from per-token doc/segment ids.

The rule is ``megatron_prefix.sharing.visible`` (query q may attend key k iff ``doc[q] == doc[k] != -1``,
``k <= q`` and ``seg[k] in (0, seg[q])``; a padding query attends to itself only); pair counts are
``sharing.ids_pairs`` / ``sharing.bottom_right_pairs``. Nothing here restates them.

Three derived forms, one per backend, all in *global* row positions (before context parallelism):

- ``build_dense_mask``: boolean ``[b, 1, Tq, T]`` for SDPA (``Tq`` = the queries this rank holds);
- ``make_mask_mod``: a ``flex_attention`` ``mask_mod`` reading the same ids (used by ``create_block_mask``);
- ``build_varlen_plan``: gather indices and cumulative lengths for a varlen kernel, with no dense mask:
  every maximal run of this rank's queries inside one segment becomes one query sequence whose key
  sequence is ``[prompt of its doc; its own segment up to the run's end]`` (bottom-right causal);
  padding queries are not attended at all (their output is their own value row, which is exactly what
  self-only attention gives).

Imports torch only (no megatron, no torch.distributed), so it is usable from any layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_prefix import sharing
from megatron_prefix.sharing import PAD_DOC

allowed = sharing.visible  # the one visibility rule (kept under its old name for callers)


def build_dense_mask(
    doc_ids_bt: torch.Tensor, segment_ids_bt: torch.Tensor, q_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask ``[b, 1, Tq, T]`` (True = attend) for the queries at global ``q_positions`` ([Tq]).

    ``q_positions`` defaults to ``arange(T)`` (no context parallelism).
    """
    _b, t = doc_ids_bt.shape
    k_pos = torch.arange(t, device=doc_ids_bt.device)
    q_pos = k_pos if q_positions is None else q_positions.to(doc_ids_bt.device, torch.long)
    q_doc = doc_ids_bt[:, q_pos][:, :, None]
    q_seg = segment_ids_bt[:, q_pos][:, :, None]
    mask = allowed(
        q_doc,
        q_seg,
        q_pos[None, :, None],
        doc_ids_bt[:, None, :],
        segment_ids_bt[:, None, :],
        k_pos[None, None, :],
    )
    return mask[:, None]


def make_mask_mod(
    doc_ids_bt: torch.Tensor, segment_ids_bt: torch.Tensor, q_positions: torch.Tensor | None = None
):
    """A flex ``mask_mod(b, h, q_idx, kv_idx)``; ``q_idx`` is local, mapped to global by ``q_positions``."""
    doc = doc_ids_bt.to(torch.int32)
    seg = segment_ids_bt.to(torch.int32)
    qmap = None if q_positions is None else q_positions.to(doc.device, torch.long)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx if qmap is None else qmap[q_idx]
        return allowed(doc[b, q_pos], seg[b, q_pos], q_pos, doc[b, kv_idx], seg[b, kv_idx], kv_idx)

    return mask_mod


# ---------------------------------------------------------------------------------------------- varlen


@dataclass
class VarlenPlan:
    """Indices for one micro-batch of varlen attention (queries local ``[b*Tq]``, keys global ``[b*T]``).

    ``q_index``/``kv_index`` gather rows of the flattened ``[b*Tq, h, d]`` queries and ``[b*T, h, d]``
    keys/values into the packed sequences described by ``cu_seqlens_q``/``cu_seqlens_k``;
    ``pad_q_index``/``pad_kv_index`` are padding queries and their own key rows. ``inverse`` maps the
    concatenation ``[attended outputs; padding outputs]`` back to the ``[b*Tq]`` layout.
    """

    q_index: torch.Tensor  # [Nq] int64
    kv_index: torch.Tensor  # [Nk] int64
    cu_seqlens_q: torch.Tensor  # [S+1] int32
    cu_seqlens_k: torch.Tensor  # [S+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    pad_q_index: torch.Tensor  # [Np] int64
    pad_kv_index: torch.Tensor  # [Np] int64
    inverse: torch.Tensor  # [b*Tq] int64

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens_q.numel() - 1)

    def pairs(self) -> int:
        """Query-key pairs the kernel computes: sum over sequences of bottom-right causal pairs."""
        m = np.diff(self.cu_seqlens_q.cpu().numpy()).astype(np.int64)
        n = np.diff(self.cu_seqlens_k.cpu().numpy()).astype(np.int64)
        return int(np.sum(sharing.bottom_right_pairs(m, n)))

    def to(self, device: torch.device | str) -> VarlenPlan:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return VarlenPlan(**move)


def run_varlen_plan(
    q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, plan: VarlenPlan, kernel
) -> torch.Tensor:
    """Gather by ``plan``, call ``kernel(q_sel, k_sel, v_sel)`` (packed sequences), scatter back.

    Padding queries get their own value row (self-only attention). A plan without sequences (rows of
    padding only, which the batcher uses to top up ranks) never reaches the kernel (varlen kernels
    require at least one sequence): the attended part is empty but stays connected to q/k/v, so
    backward runs and gives zero gradients there.
    """
    q_sel = q_thd.index_select(0, plan.q_index)
    k_sel = k_thd.index_select(0, plan.kv_index)
    v_sel = v_thd.index_select(0, plan.kv_index)
    if plan.num_sequences == 0:
        out_sel = q_sel + 0 * (k_sel.sum() + v_sel.sum())
    else:
        out_sel = kernel(q_sel, k_sel, v_sel)
    groups = q_thd.shape[1] // k_thd.shape[1]
    v_pad = v_thd.index_select(0, plan.pad_kv_index)
    if groups > 1:
        v_pad = v_pad.repeat_interleave(groups, dim=1)
    out_all = torch.cat([out_sel.to(q_thd.dtype), v_pad.to(q_thd.dtype)], dim=0)
    return out_all.index_select(0, plan.inverse)


def useful_pairs_np(doc_ids_bt: np.ndarray, segment_ids_bt: np.ndarray) -> int:
    """Allowed (query, key) pairs over real (non-pad) queries: the only FLOPs attention needs."""
    return sharing.ids_pairs(doc_ids_bt, segment_ids_bt)


def build_varlen_plan(
    doc_ids_bt: np.ndarray, segment_ids_bt: np.ndarray, q_positions: np.ndarray | None = None
) -> VarlenPlan:
    """Gather indices / cu_seqlens for the queries at global ``q_positions`` (default: all). See module doc."""
    doc_ids_bt, segment_ids_bt = np.asarray(doc_ids_bt), np.asarray(segment_ids_bt)
    b, t = doc_ids_bt.shape
    q_pos = np.arange(t) if q_positions is None else np.asarray(q_positions, dtype=np.int64)
    tq = len(q_pos)
    q_idx, kv_idx, pad_q, pad_kv = [], [], [], []
    lens_q, lens_k = [], []
    for r in range(b):
        doc, seg = doc_ids_bt[r], segment_ids_bt[r]
        run_start, doc_start, prompt_end = sharing.row_runs(doc, seg)
        d, s = doc[q_pos], seg[q_pos]
        # local runs: consecutive global positions inside one (doc, segment) run
        brk = np.r_[True, (np.diff(q_pos) != 1) | (d[1:] != d[:-1]) | (s[1:] != s[:-1])]
        starts = np.nonzero(brk)[0]
        stops = np.r_[starts[1:], tq]
        for a, z in zip(starts.tolist(), stops.tolist()):
            first, last = int(q_pos[a]), int(q_pos[z - 1])  # global span [first, last]
            local = np.arange(a, z) + r * tq
            if d[a] == PAD_DOC:
                pad_q.append(local)
                pad_kv.append(q_pos[a:z] + r * t)
                continue
            keys = [np.arange(run_start[first], last + 1)]
            if s[a] > 0:
                keys.insert(0, np.arange(doc_start[first], prompt_end[first]))
            keys = np.concatenate(keys) + r * t
            q_idx.append(local)
            kv_idx.append(keys)
            lens_q.append(z - a)
            lens_k.append(len(keys))

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))

    def cu(lens: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.r_[0, np.cumsum(lens, dtype=np.int64)].astype(np.int32))

    q_index, pad_q_index = cat(q_idx), cat(pad_q)
    order = torch.cat([q_index, pad_q_index])
    inverse = torch.empty(b * tq, dtype=torch.int64)
    inverse[order] = torch.arange(order.numel())
    assert order.numel() == b * tq, "every query slot must be covered exactly once"
    return VarlenPlan(
        q_index=q_index,
        kv_index=cat(kv_idx),
        cu_seqlens_q=cu(lens_q),
        cu_seqlens_k=cu(lens_k),
        max_seqlen_q=max(lens_q, default=0),
        max_seqlen_k=max(lens_k, default=0),
        pad_q_index=pad_q_index,
        pad_kv_index=cat(pad_kv),
        inverse=inverse,
    )
