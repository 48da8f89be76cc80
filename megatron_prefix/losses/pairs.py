"""Preference structure inside units: pairwise index tensors and listwise groups.

Every response carries ``unit_id`` (its prompt group, ``PackedRow.resp_unit``) and ``score`` (higher is
better, ties allowed, ``PackedRow.resp_scores``). All responses of a unit must be in the same call (the
packer never splits a unit across rows, and a row is never split across micro-batches).

Pairs (``preference_pairs``):

- ``"all"``: every ordered pair ``(i, j)`` of one unit with ``score_i > score_j``; tied pairs are skipped.
  A unit of K responses with distinct scores yields K(K-1)/2 pairs.
- ``"best_worst"``: one pair per unit, best vs worst; among tied best (worst) responses the one with the
  lowest ``slots`` value (``PackedRow.resp_slot``, the index in the original unit) wins, or the first in
  input order when no slots are given (pass slots so the choice does not depend on packing order); a unit
  whose scores are all equal yields no pair.

Order (deterministic): ascending unit id, then the chosen response's input position, then the rejected
response's input position.

Groups (``groups``, for the listwise Plackett-Luce losses): per unit, the response indices sorted by score
descending (stable: ties keep input order), padded with -1. Units with fewer than two responses or with
all scores equal carry no preference and are dropped.

Ties in Plackett-Luce (``plackett_luce_nll``): response k's term normalises over itself and the responses
scored *strictly lower*, ``r_k - logsumexp({r_k} U {r_j : s_j < s_k})``; tied responses never compete
with each other, so the loss does not depend on the order of tied responses (no arbitrary tie-breaking),
and responses with no strictly lower-scored response (the bottom tie block) contribute no term. Without
ties this is exactly the Plackett-Luce likelihood of the score ranking; with K = 2 it is
``-logsigmoid(r_chosen - r_rejected)`` (the pairwise DPO / Bradley-Terry loss). A top tie block {a, b}
over c gives ``-logsigmoid(r_a - r_c) - logsigmoid(r_b - r_c)``, consistent with ``pairs="all"``
skipping the tied pair.

Pure torch (no megatron, no torch.distributed). Index construction is O(R^2) in the responses of one
micro-batch (R is tens to hundreds), which is negligible next to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAIR_MODES = ("all", "best_worst")


def _check(unit_ids: torch.Tensor, scores: torch.Tensor) -> None:
    if unit_ids.dim() != 1 or scores.dim() != 1 or unit_ids.shape != scores.shape:
        raise ValueError(
            f"unit_ids and scores must be 1-D of equal length, got {tuple(unit_ids.shape)} and {tuple(scores.shape)}"
        )
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: every score must be finite")


def preference_pairs(
    unit_ids: torch.Tensor, scores: torch.Tensor, mode: str = "all", slots: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(chosen_idx, rejected_idx)`` (int64, length P) of the preference pairs.

    ``mode`` is ``"all"`` or ``"best_worst"``; see the module docstring for the pair set, its order and
    the tie-break by ``slots`` [R] (optional; only ``best_worst`` uses it). Indices are on ``unit_ids.device``.
    """
    _check(unit_ids, scores)
    if mode == "best_worst" and slots is not None:
        perm = torch.sort(slots.to(unit_ids.device), stable=True).indices
        c, r = preference_pairs(unit_ids[perm], scores[perm], mode)
        return perm[c], perm[r]
    if mode == "all":
        same = unit_ids[:, None] == unit_ids[None, :]
        better = scores[:, None] > scores[None, :]
        chosen, rejected = torch.nonzero(
            same & better, as_tuple=True
        )  # row-major: (chosen pos, rejected pos)
        order = torch.sort(unit_ids[chosen], stable=True).indices  # then group by ascending unit id
        return chosen[order], rejected[order]
    if mode == "best_worst":
        n = unit_ids.numel()
        empty = torch.zeros(0, dtype=torch.long, device=unit_ids.device)
        if n == 0:
            return empty, empty
        units, inverse = torch.unique(unit_ids, sorted=True, return_inverse=True)
        g = units.numel()
        pos = torch.arange(n, device=unit_ids.device)
        s = scores.to(torch.float64)
        hi = torch.full((g,), -torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(
            0, inverse, s, "amax"
        )
        lo = torch.full((g,), torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(0, inverse, s, "amin")
        big = torch.full((g,), n, dtype=torch.long, device=unit_ids.device)
        best = big.scatter_reduce(0, inverse, torch.where(s == hi[inverse], pos, n), "amin")
        worst = big.scatter_reduce(0, inverse, torch.where(s == lo[inverse], pos, n), "amin")
        keep = hi > lo
        return best[keep], worst[keep]
    raise ValueError(f"loss.pairs: must be one of {PAIR_MODES}, got {mode!r}")


@dataclass
class Groups:
    """Listwise view of the responses: one row per unit that carries a preference.

    ``index`` [G, Kmax] response indices sorted by score descending (stable), -1 as padding;
    ``unit_ids`` [G] ascending; ``sizes`` [G] responses per group.
    """

    index: torch.Tensor
    unit_ids: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.index.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """[G, Kmax] True where ``index`` holds a response."""
        return self.index >= 0


def groups(unit_ids: torch.Tensor, scores: torch.Tensor) -> Groups:
    """Group responses by unit, each sorted by score descending; drop units without a strict preference."""
    _check(unit_ids, scores)
    dev = unit_ids.device
    if unit_ids.numel() == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return Groups(index=z.view(0, 0), unit_ids=z, sizes=z)
    # Sort by (unit asc, score desc, position asc): stable sorts from the least significant key.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(unit_ids[order], stable=True).indices]
    units, counts = torch.unique_consecutive(unit_ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    kmax = int(counts.max())
    col = torch.arange(kmax, device=dev)
    valid = col[None, :] < counts[:, None]
    flat = (starts[:, None] + col[None, :]).clamp(max=order.numel() - 1)
    index = torch.where(valid, order[flat], -1)
    s = scores[index.clamp(min=0)]
    first, last = s[:, 0], s.gather(1, (counts - 1)[:, None])[:, 0]
    keep = (counts >= 2) & (first > last)
    return Groups(index=index[keep], unit_ids=units[keep], sizes=counts[keep])


def plackett_luce_nll(values: torch.Tensor, scores: torch.Tensor, grp: Groups) -> torch.Tensor:
    """Per-group Plackett-Luce negative log-likelihood [G] of the score ranking under ``values`` [R].

    ``values`` are the per-response utilities (DPO implicit rewards or reward-model outputs). Tie rule:
    see the module docstring (each term normalises over itself and the strictly lower-scored responses).
    """
    if grp.num_groups == 0:
        return values[:0]  # empty but attached to the graph
    idx = grp.index.clamp(min=0).to(values.device)
    valid = grp.valid.to(values.device)
    v = values[idx]  # [G, K]
    s = scores.to(values.device)[idx]
    below = valid[:, None, :] & (
        s[:, None, :] < s[:, :, None]
    )  # [G, k, j]: j valid and strictly worse than k
    eye = torch.eye(idx.shape[1], dtype=torch.bool, device=values.device)[None]
    pool = below | eye
    neg_inf = torch.finfo(v.dtype).min
    lse = torch.logsumexp(torch.where(pool, v[:, None, :], neg_inf), dim=-1)  # [G, K]
    active = valid & below.any(dim=-1)
    return -torch.where(active, v - lse, 0.0).sum(dim=-1)
