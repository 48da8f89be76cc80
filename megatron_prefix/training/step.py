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

Batch-level TRL loss types (``aot``, ``aot_unpaired``, ``sft``; ``losses/plan.py``) need statistics of the
whole global batch before any micro-batch's loss: ``attach_plans`` (called by the runner after the
reference is attached) gathers per-pair statistics of every micro-batch over the data-parallel group and
attaches each micro-batch's ``BatchPlan``. ``sft`` only needs counts (no forward pass); ``aot`` and
``aot_unpaired`` sort the policy's margins, so their plan costs one extra forward-only pass of the policy
per step (the model has no dropout, so that pass gives the training pass's values exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prefix.attention.context_parallel import local_positions
from megatron_prefix.data.row import PackedRow
from megatron_prefix.losses import trl
from megatron_prefix.losses.plan import make_plans, needs_forward, needs_plan, pair_stats
from megatron_prefix.losses.registry import LossConfig, LossInputs, compute_loss, loss_pairs
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.model.logprobs import all_reduce_sum_identity_grad, last_token_hidden, response_logprobs

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


def token_positions(mb: MicroBatch) -> torch.Tensor:
    """[N] position of each of this CP rank's scored tokens inside its response (0 = first token).

    A response token at row position ``t`` is predicted from ``t - 1``, except the first, predicted from
    the last prompt position (before ``start``); so ``t = pred + 1`` when that is past ``start``, else
    ``t = start``.
    """
    ix = mb.index
    full = mb.tokens.shape[1] * mb.cp_size
    pred = local_positions(full, mb.cp_size, mb.cp_rank)[ix.pred_s.cpu().long()]
    spans = mb.resp_spans.cpu()[ix.resp_ids.cpu().long()]
    t = torch.where((pred + 1 > spans[:, 0]) & (pred + 1 < spans[:, 1]), pred + 1, spans[:, 0])
    return (t - spans[:, 0]).to(ix.targets.device)


def _groups(ctx: StepContext):
    cp_group = ps.get_context_parallel_group() if ctx.cp_size > 1 else None
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    return tp_group, cp_group


def loss_inputs(ctx: StepContext, mb: MicroBatch, output_sbv: torch.Tensor, reference: bool = False) -> LossInputs:
    """What ``compute_loss`` takes for one micro-batch: rewards (RM) or summed log-probs (DPO), plus WPO
    weights (``use_weighting``), LD-DPO tails (``ld_alpha``, complete across CP) and the attached
    reference / plan. ``reference``: a reference pass (log-probs and LD tails only)."""
    tp_group, cp_group = _groups(ctx)
    dev = output_sbv.device
    base = {"unit_ids": mb.resp_unit.to(dev), "scores": mb.resp_scores.to(dev), "slots": mb.resp_slot.to(dev)}
    if ctx.task == "rm":
        rewards = last_token_hidden(output_sbv, mb.index, cp_group)[:, 0].float()
        return LossInputs(**base, rewards=rewards, token_counts=mb.index.resp_lengths.to(rewards.device))
    cfg = ctx.loss
    wpo = cfg.use_weighting and not reference
    lp = response_logprobs(output_sbv, mb.index, tp_group=tp_group, cp_group=cp_group, with_wpo=wpo)
    inputs = LossInputs(
        **base, policy_logps=lp.logps, token_counts=lp.num_tokens,
        ref_logps=getattr(mb, "ref_logps", None) if ctx.needs_reference and not reference else None,
        ref_ld_tails=getattr(mb, "ref_ld_tails", None), plan=getattr(mb, "plan", None),
    )  # fmt: skip
    if wpo:
        logw = trl.wpo_log_weight(lp.token_logps, lp.token_log_denom, lp.token_resp, mb.num_responses)
        if cp_group is not None:
            dist.all_reduce(logw, group=cp_group)
        inputs.wpo_logw = logw
    if cfg.ld_alpha is not None:
        c, r = loss_pairs(cfg, mb.resp_unit, mb.resp_scores, mb.resp_slot)
        dev = lp.token_logps.device
        tails = trl.ld_tails(lp.token_logps, lp.token_resp, token_positions(mb), c.to(dev), r.to(dev),
                             lp.num_tokens)  # fmt: skip
        inputs.ld_tails = tuple(all_reduce_sum_identity_grad(x, cp_group) for x in tails)
    return inputs


def loss_func(ctx: StepContext, mb: MicroBatch, output_sbv: torch.Tensor):
    """megatron loss_func: ``(loss_sum, pair_count, report)``; see the module docstring."""
    inputs = loss_inputs(ctx, mb, output_sbv)
    assert inputs.plan is not None or not needs_plan(ctx.loss), "attach_plans must run before the schedule"
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
    """A forward-only loss_func that records each micro-batch's per-response values (reference pass).

    Under ``loss.ld_alpha`` it also attaches the micro-batch's LD tails as ``mb.ref_ld_tails``.
    """
    with torch.no_grad():
        inputs = loss_inputs(ctx, mb, output_sbv, reference=True)
    values = inputs.rewards if ctx.task == "rm" else inputs.policy_logps
    store.append(values.detach().float().cpu())
    if inputs.ld_tails is not None:
        mb.ref_ld_tails = tuple(x.detach() for x in inputs.ld_tails)
    zero = output_sbv.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int, device=zero.device), {}


def _stats_collector(ctx: StepContext, store: list[torch.Tensor], mb: MicroBatch, output_sbv: torch.Tensor):
    """A forward-only loss_func recording each micro-batch's per-pair plan statistics."""
    with torch.no_grad():
        store.append(pair_stats(ctx.loss, loss_inputs(ctx, mb, output_sbv)))
    zero = output_sbv.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int, device=zero.device), {}


def _gather_dp(local: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """All-gather [n_i, k] blocks over the data-parallel group: (concatenation in rank order, own offset)."""
    if not (dist.is_initialized() and ps.get_data_parallel_world_size() > 1):
        return local, 0
    group = ps.get_data_parallel_group()
    size = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(x) for x in sizes]
    padded = torch.zeros(max(max(sizes), 1), local.shape[1], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu(), sum(sizes[:rank])


def attach_plans(ctx: StepContext, model: list[torch.nn.Module], mbs: list[MicroBatch], seq_length: int) -> None:
    """Attach each micro-batch's ``BatchPlan`` when the loss has a batch-level type (else nothing).

    Every rank calls it after the reference is attached and before ``run_schedule``; see the module doc.
    """
    cfg = ctx.loss
    if ctx.task != "dpo" or not needs_plan(cfg):
        return
    if needs_forward(cfg):
        store: list[torch.Tensor] = []
        with torch.no_grad():
            run_schedule(model, mbs, partial(_stats_collector, ctx, store), seq_length, forward_only=True)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return  # only the last stage computes losses
    else:
        store = [pair_stats(cfg, LossInputs(unit_ids=mb.resp_unit, scores=mb.resp_scores, slots=mb.resp_slot,
                                            token_counts=mb.index.resp_lengths)) for mb in mbs]  # fmt: skip
    local = torch.cat(store) if store else torch.zeros(0, 5, dtype=torch.float64)
    stats, start = _gather_dp(local, ctx.device)
    for mb, plan in zip(mbs, make_plans(cfg, stats, [x.shape[0] for x in store], start)):
        mb.plan = plan


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
        # MicroBatch.forward adds pixel_values / image_feature_index for image rows (every stage gets
        # them; the vision encoder runs on the first stage only): the one path of the step, the
        # reference precompute, the online reference and evaluation
        out = mb.forward(model_chunk)
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
    "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "nll", "wpo_weight",
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
