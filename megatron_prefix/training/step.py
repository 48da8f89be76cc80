"""One optimizer step's forward/backward through megatron's schedules, and its metric reduction.

Normalisation: the step loss is the mean over all preference pairs of the global batch. Each
micro-batch's ``loss_func`` returns ``(loss_sum, pair_count, report)``; with megatron's
``calculate_per_token_loss`` the schedule does not divide, and ``finalize_model_grads`` scales the
gradients by ``1 / (pair count all-reduced over data-parallel x context-parallel ranks)``. Under CP every
rank of a CP group computes the same loss (log-probs are CP-all-reduced with identity backward, so each
rank's gradients are its own tokens' share and their CP sum is the whole), so only CP rank 0 reports
the count.

The reported values are sums; ``reduce_report`` adds them over micro-batches and DP ranks and divides
by the global count, giving the same numbers however the batch was packed or split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prefix.data.row import PackedRow
from megatron_prefix.losses.registry import LossConfig, LossInputs, compute_loss
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.model.logprobs import last_token_hidden, response_logprobs

RefLookup = Callable[[MicroBatch], torch.Tensor]


@dataclass
class StepContext:
    """What a forward step needs besides the batch."""

    task: str  # dpo | rm
    loss: LossConfig
    device: torch.device
    cp_size: int
    cp_rank: int
    needs_reference: bool


def make_microbatches(rows: Sequence[PackedRow], ctx: StepContext) -> list[MicroBatch]:
    """One ``MicroBatch`` (one row, this CP rank's slice) per row, on the step's device."""
    return [MicroBatch.from_rows([r], ctx.cp_size, ctx.cp_rank, ctx.device) for r in rows]


def response_positions(mb: MicroBatch) -> torch.Tensor:
    """[R] index of each response inside its unit (responses of a unit are contiguous and ordered)."""
    units = mb.resp_unit.tolist()
    out, prev, n = [], None, 0
    for u in units:
        n = n + 1 if u == prev else 0
        out.append(n)
        prev = u
    return torch.tensor(out, dtype=torch.long)


def policy_outputs(ctx: StepContext, mb: MicroBatch, output_sbv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [R], token counts [R]): summed log-probs (DPO) or rewards at the last token (RM)."""
    cp_group = ps.get_context_parallel_group() if ctx.cp_size > 1 else None
    if ctx.task == "rm":
        rewards = last_token_hidden(output_sbv, mb.index, cp_group)[:, 0].float()
        return rewards, mb.index.resp_lengths.to(rewards.device)
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    lp = response_logprobs(output_sbv, mb.index, tp_group=tp_group, cp_group=cp_group)
    return lp.logps, lp.num_tokens


def loss_func(ctx: StepContext, mb: MicroBatch, output_sbv: torch.Tensor):
    """megatron loss_func: ``(loss_sum, pair_count, report)``; see the module docstring."""
    values, counts = policy_outputs(ctx, mb, output_sbv)
    inputs = LossInputs(
        unit_ids=mb.resp_unit.to(values.device),
        scores=mb.resp_scores.to(values.device),
        slots=mb.resp_slot.to(values.device),
        token_counts=counts,
        **({"rewards": values} if ctx.task == "rm" else {"policy_logps": values}),
        ref_logps=getattr(mb, "ref_logps", None) if ctx.needs_reference else None,
    )
    out = compute_loss(ctx.loss, inputs)
    # keep the graph connected for rows without pairs (all-padding rows), so every rank runs backward
    loss_sum = out.loss_sum + output_sbv.sum() * 0.0
    count = out.count if ctx.cp_rank == 0 else 0
    report = {"loss_sum": loss_sum.detach().clone().float(), "count": torch.tensor(float(count))}
    for key, value in out.metrics.items():
        report[key] = value.detach().clone().float()
    report["responses"] = torch.tensor(float(mb.num_responses))
    return loss_sum, torch.tensor(count, dtype=torch.int, device=loss_sum.device), report


def logprob_collector(ctx: StepContext, store: list[torch.Tensor], mb: MicroBatch, output_sbv: torch.Tensor):
    """A forward-only loss_func that records each micro-batch's per-response values (reference pass)."""
    with torch.no_grad():
        values, _ = policy_outputs(ctx, mb, output_sbv)
    store.append(values.detach().float().cpu())
    zero = output_sbv.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int, device=zero.device), {}


def run_schedule(
    model: list[torch.nn.Module],
    microbatches: list[MicroBatch],
    loss_fn: Callable,
    seq_length: int,
    forward_only: bool,
) -> list[dict]:
    """Run megatron's forward/backward schedule over ``microbatches``; returns the last stage's reports."""

    def forward_step(data_iterator: Iterable[MicroBatch], model_chunk: torch.nn.Module):
        mb = next(data_iterator)
        out = model_chunk(mb.tokens, mb.position_ids, None, packed_seq_params=mb.params)
        return out, partial(loss_fn, mb)

    fb = get_forward_backward_func()
    return fb(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


REPORT_KEYS = (
    "loss_sum", "count", "responses", "chosen_rewards", "rejected_rewards", "margins", "accuracy",
    "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "nll",
)


def reduce_report(reports: list[dict], device: torch.device) -> dict[str, float]:
    """Sum the micro-batch reports of the last stage, all-reduce over DP, average per pair.

    Every rank must call it (ranks that are not the last pipeline stage contribute zeros), and the
    result is broadcast to all ranks so that every rank can decide on NaN / stopping identically.
    """
    totals = torch.zeros(len(REPORT_KEYS), dtype=torch.float64, device=device)
    counted_here = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if counted_here:
        for rep in reports:
            for i, key in enumerate(REPORT_KEYS):
                if key in rep:
                    totals[i] += float(rep[key])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # counts only on cp rank 0, metrics identical across CP: sum over the whole world then fix CP
        dist.all_reduce(totals)
        cp = ps.get_context_parallel_world_size()
        if cp > 1:
            count_idx = REPORT_KEYS.index("count")
            count = totals[count_idx].clone()
            totals /= cp
            totals[count_idx] = count
    values = dict(zip(REPORT_KEYS, totals.tolist()))
    pairs = max(values["count"], 1.0)
    out = {"pairs": values["count"], "responses": values["responses"], "loss": values["loss_sum"] / pairs}
    for key in REPORT_KEYS[3:]:
        if any(key in rep for rep in reports) or not counted_here:
            out[key if key != "margins" else "margin"] = values[key] / pairs
    return out
