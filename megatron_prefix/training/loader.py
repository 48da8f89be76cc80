"""From a built dataset to this data-parallel rank's packed rows for any optimizer step.

The data position is the step number: the epoch plan is a pure function of (unit lengths, seed, epoch)
(``megatron_prefix.data.batching.plan_epoch``), so resuming at step ``s`` recomputes the plan and lands
on exactly the rows an uninterrupted run would have seen. Which units form a step never depends on the
layout, so shared and unshared runs see the same data.

Pure numpy (no torch, no megatron).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_prefix.data.batching import BatchConfig, EpochPlan, plan_epoch
from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.data.packing import pack_bins
from megatron_prefix.data.row import PackedRow


class StepLoader:
    """Rows of each step for one DP rank, over the units ``unit_ids`` of ``dataset``."""

    def __init__(
        self,
        dataset: PreferenceDataset,
        unit_ids: Sequence[int],
        batch: BatchConfig,
        dp_rank: int,
        dp_size: int,
    ):
        if len(unit_ids) == 0:
            raise ValueError(f"data.path: {dataset.path} has no training units")
        self.dataset = dataset
        self.unit_ids = np.asarray(unit_ids, dtype=np.int64)
        self.batch = batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.sort_lengths = dataset.sort_lengths()[self.unit_ids]
        self.pack_lengths = dataset.pack_lengths()[self.unit_ids]
        self._plan: EpochPlan | None = None
        self.steps_per_epoch = self._epoch_plan(0).num_steps

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = plan_epoch(self.sort_lengths, self.pack_lengths, self.batch, epoch, self.dp_size)
        return self._plan

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def step_units(self, step: int) -> np.ndarray:
        """Global unit ids of step ``step`` (all ranks)."""
        epoch, i = self.locate(step)
        return self.unit_ids[np.asarray(self._epoch_plan(epoch).steps[i].units, dtype=np.int64)]

    def rows(self, step: int) -> list[PackedRow]:
        """This rank's packed rows (micro-batches) of step ``step``; empty rows are all padding."""
        epoch, i = self.locate(step)
        plan = self._epoch_plan(epoch).steps[i]
        return [
            self.dataset.row(self.unit_ids[np.asarray(r, dtype=np.int64)].tolist(), self.batch.pack_tokens)
            for r in plan.rows_per_rank[self.dp_rank]
        ]


def eval_rows(
    dataset: PreferenceDataset, unit_ids: Sequence[int], pack_tokens: int, dp_rank: int, dp_size: int
) -> list[PackedRow]:
    """The held-out units packed into rows, dealt round-robin to DP ranks (equal counts, padded)."""
    ids = np.asarray(unit_ids, dtype=np.int64)
    if len(ids) == 0:
        return []
    bins = pack_bins(dataset.pack_lengths()[ids].tolist(), pack_tokens)
    per_rank = -(-len(bins) // dp_size)
    bins = bins + [[] for _ in range(per_rank * dp_size - len(bins))]
    mine = bins[dp_rank::dp_size]
    return [dataset.row(ids[np.asarray(b, dtype=np.int64)].tolist(), pack_tokens) for b in mine]
