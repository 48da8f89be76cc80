"""Global-batch plans for the batch-level TRL loss types (``aot``, ``aot_unpaired``, ``sft``).

The step loss is the mean over the pairs of the global batch (``losses/registry.py``), but these types
are not per-pair functions of one pair: ``aot`` / ``aot_unpaired`` sort the margins / log-ratios of the
whole batch and match them by rank, ``sft`` divides by the chosen tokens of the whole batch. A trainer
makes them exact under any packing, micro-batching and data parallelism in three steps:

1. ``pair_stats`` per micro-batch: per-pair statistics [P, 5] from *detached* per-response values (a
   forward-only pass of the current policy, plus the reference);
2. gather the statistics of every micro-batch of every data-parallel rank, in a fixed order
   (``training/step.py``);
3. ``make_plans``: the global plan, cut back into one ``BatchPlan`` per local micro-batch.

``compute_loss`` with ``LossInputs.plan`` then returns each micro-batch's exact share of TRL's
global-batch loss (value and gradient: the sort permutation is locally constant, so the gradient of a
sorted term flows to the element of that rank, which the plan names). Pairs that tie in a sort are
interchangeable (the loss is symmetric in them), so the tie order does not change the value.

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prefix.losses import trl
from megatron_prefix.losses.config import LossConfig
from megatron_prefix.losses.pairs import preference_pairs

STATS = ("policy_margin", "ref_margin", "clr", "rlr", "chosen_tokens")


@dataclass
class BatchPlan:
    """Statistics of the *global* batch that batch-level loss types need, for one micro-batch's pairs.

    - ``num_pairs`` / ``chosen_tokens``: the global batch's pair count and its chosen-response tokens
      counted per pair (``sft``: TRL's token mean of the chosen NLL);
    - ``aot_ref`` [P]: ``aot``'s matched sorted reference margin (``trl.aot_plan`` over the global batch);
    - ``unpaired_r`` / ``unpaired_c`` [P]: ``aot_unpaired``'s plan (``trl.aot_unpaired_plan``).

    Without a plan ``compute_loss`` treats its batch as the whole batch.
    """

    num_pairs: float
    chosen_tokens: float
    aot_ref: torch.Tensor | None = None
    unpaired_r: torch.Tensor | None = None
    unpaired_c: torch.Tensor | None = None


def needs_plan(cfg: LossConfig) -> bool:
    """Whether ``cfg`` has a batch-level type."""
    return any(t in ("aot", "aot_unpaired", "sft") for t in cfg.types)


def needs_forward(cfg: LossConfig) -> bool:
    """Whether the plan depends on the policy's outputs (``aot``, ``aot_unpaired``), not only on data."""
    return any(t in ("aot", "aot_unpaired") for t in cfg.types)


def pair_stats(cfg: LossConfig, batch) -> torch.Tensor:
    """[P, 5] float64 per-pair ``STATS`` of a micro-batch (``LossInputs``), in ``loss_pairs`` order.

    Columns: ``pi_c - pi_r``, ``ref_c - ref_r``, ``clr``, ``rlr`` (LD-weighted under ``ld_alpha``; zeros
    when no policy values are given) and the chosen response's token count.
    """
    c, r = preference_pairs(batch.unit_ids, batch.scores, cfg.pairs, batch.slots)
    n = batch.token_counts
    out = torch.zeros(c.numel(), len(STATS), dtype=torch.float64)
    if n is not None:
        out[:, 4] = n.detach().cpu().to(torch.float64)[c]
    if batch.policy_logps is None:
        return out

    def cpu(x):
        return None if x is None else (x[0].detach().cpu().double(), x[1].detach().cpu().double())

    pi = batch.policy_logps.detach().cpu().double()
    ref = batch.ref_logps.detach().cpu().double() if batch.ref_logps is not None else torch.zeros_like(pi)
    pi_c, pi_r = trl.ld_weighted(pi[c], pi[r], cpu(batch.ld_tails), cfg.ld_alpha)
    ref_tails = cpu(batch.ref_ld_tails) if batch.ref_logps is not None else None
    ref_c, ref_r = trl.ld_weighted(ref[c], ref[r], ref_tails, cfg.ld_alpha)
    out[:, 0], out[:, 1] = pi_c - pi_r, ref_c - ref_r
    out[:, 2], out[:, 3] = pi_c - ref_c, pi_r - ref_r
    return out


def make_plans(cfg: LossConfig, stats: torch.Tensor, sizes: list[int], start: int = 0) -> list[BatchPlan]:
    """One ``BatchPlan`` per micro-batch from the global batch's ``stats`` [Pg, 5].

    ``sizes`` are the pair counts of this rank's micro-batches, whose pairs sit at rows ``start``,
    ``start + sizes[0]``, ... of ``stats`` (the rank's block in the gathered order).
    """
    num_pairs, tokens = float(stats.shape[0]), float(stats[:, 4].sum())
    aot_ref = unpaired_r = unpaired_c = None
    if "aot" in cfg.types:
        aot_ref = trl.aot_plan(stats[:, 0], stats[:, 1])
    if "aot_unpaired" in cfg.types:
        unpaired_r, unpaired_c = trl.aot_unpaired_plan(stats[:, 2], stats[:, 3])
    plans, a = [], start
    for size in sizes:
        def cut(x):
            return None if x is None else x[a:a + size]  # noqa: B023

        plans.append(BatchPlan(num_pairs, tokens, cut(aot_ref), cut(unpaired_r), cut(unpaired_c)))
        a += size
    return plans
