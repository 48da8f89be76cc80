"""Per-response log-probabilities from vocab-parallel logits, scored tokens only.

Indexing (``megatron_prefix.data.row``): response token at row position ``t`` is predicted by the
logits at ``pred_index[t]`` (``t - 1`` inside a response, the last prompt position for a response's
first token, so one row position can predict K targets). ``ScoringIndex`` (built by
``megatron_prefix.model.batch``) lists, for this CP rank, every scored token whose *pred* position it
holds: the local (s, b) coordinates of that position, the target id and the response it belongs to.

``token_logprobs`` computes ``logit[target] - logsumexp(logits)`` for those N rows without gathering the
vocabulary and without an fp32 copy of all logits:

- rows are read from ``logits_sbv`` [s, b, V/tp] chunk by chunk (``chunk_elems`` fp32 elements at a
  time); the local max and the local sum of ``exp(x - local max)`` come from one pass; the max is
  all-reduced (MAX) over the TP group, local sums are rescaled and all-reduced (SUM);
- the target logit lives on exactly one TP rank (the others contribute 0; all-reduced SUM);
- backward (no communication): ``d logp / d x_v = 1[v == target] - softmax_v`` on this rank's shard,
  accumulated (``index_add_``) into a zero gradient of ``logits_sbv``'s shape and dtype. Only the
  lse [N] is saved; rows are re-read from the logits tensor (already held by autograd).

WPO (``loss.use_weighting``) also needs ``logsumexp(2x) - 2 logsumexp(x)`` per scored token (the log of
the probability's squared norm): the same pass sums ``exp(2 (x - local max))`` too, rescaled to the global
max and SUM-all-reduced like the plain sum, again without gathering the vocabulary (no gradient).

``response_logprobs`` segment-sums the token log-probs per response and all-reduces across the CP
group (forward SUM, backward identity: each CP rank's parameter gradients are the contribution of its
own tokens; the full gradient is their SUM over CP ranks, which megatron's gradient reduction over the
data-parallel-with-CP group performs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_CHUNK_ELEMS = 1 << 26  # fp32 elements per chunk: 256 MiB


@dataclass
class ScoringIndex:
    """What to score on this rank; all tensors on the logits' device.

    - ``pred_s``, ``pred_b`` [N] int64: local (sequence, batch) coordinates of each scored token's pred
      position (the rows of ``logits_sbv``);
    - ``targets`` [N] int64: the token ids to score;
    - ``resp_ids`` [N] int64: the micro-batch response (0..R-1, row-major over rows then spans) of each;
    - ``num_responses`` R; ``resp_lengths`` [R] int64: tokens per response (all CP ranks together);
    - ``last_s``, ``last_b`` [R] int64 and ``last_owned`` [R] bool: local coordinates of each response's
      last token, and whether this rank holds it (reward heads).
    """

    pred_s: Tensor
    pred_b: Tensor
    targets: Tensor
    resp_ids: Tensor
    num_responses: int
    resp_lengths: Tensor
    last_s: Tensor
    last_b: Tensor
    last_owned: Tensor

    @property
    def num_scored(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> ScoringIndex:
        return ScoringIndex(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})


@dataclass
class ResponseLogprobs:
    """``logps`` [R] fp32 summed log-prob per response (complete across CP), ``num_tokens`` [R] int64,
    ``token_logps`` [N] fp32 for this rank's scored tokens and ``token_resp`` [N] their response ids;
    ``token_log_denom`` [N] WPO's ``lse(2x) - 2 lse(x)`` per scored token (only when asked for)."""

    logps: Tensor
    num_tokens: Tensor
    token_logps: Tensor
    token_resp: Tensor
    token_log_denom: Tensor | None = None


def _world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _vocab_start(group, v_local: int) -> int:
    return (dist.get_rank(group) if _world(group) > 1 else 0) * v_local


class _ScoredTokenLogprob(torch.autograd.Function):
    """logp[n] = x[rows[n], targets[n]] - logsumexp(x[rows[n], :]) over the TP-sharded vocabulary."""

    @staticmethod
    def forward(ctx, logits_2d: Tensor, rows: Tensor, targets: Tensor, tp_group, chunk_rows: int,
                with_wpo: bool = False) -> tuple[Tensor, Tensor]:
        n, v_local = rows.numel(), logits_2d.shape[1]
        start = _vocab_start(tp_group, v_local)
        local_t = targets - start
        owned = (local_t >= 0) & (local_t < v_local)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        row_max = torch.empty(n, dtype=torch.float32, device=logits_2d.device)
        row_sum = torch.empty_like(row_max)
        row_sum2 = torch.empty_like(row_max) if with_wpo else None  # sum exp(2 (x - max)): WPO
        target_logit = torch.empty_like(row_max)
        for a in range(0, n, chunk_rows):
            z = min(n, a + chunk_rows)
            x = logits_2d.index_select(0, rows[a:z]).float()
            m = x.max(dim=-1).values
            row_max[a:z] = m
            e = torch.exp(x - m[:, None])
            row_sum[a:z] = e.sum(dim=-1)
            if with_wpo:
                row_sum2[a:z] = e.square_().sum(dim=-1)
            target_logit[a:z] = x.gather(1, local_t[a:z, None]).squeeze(1)
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
        if _world(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            scale = torch.exp(row_max - global_max)
            row_sum = row_sum * scale
            dist.all_reduce(row_sum, group=tp_group)
            if with_wpo:
                row_sum2 = row_sum2 * scale.square()
                dist.all_reduce(row_sum2, group=tp_group)
            dist.all_reduce(target_logit, group=tp_group)
            row_max = global_max
        lse = torch.log(row_sum) + row_max
        # lse(2x) - 2 lse(x) = log(sum2) - 2 log(sum): the shared max cancels
        log_denom = torch.log(row_sum2) - 2.0 * torch.log(row_sum) if with_wpo else row_max.new_empty(0)
        ctx.mark_non_differentiable(log_denom)
        ctx.save_for_backward(logits_2d, rows, local_t, owned, lse)
        ctx.chunk_rows = chunk_rows
        return target_logit - lse, log_denom

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_denom: Tensor | None = None):
        logits_2d, rows, local_t, owned, lse = ctx.saved_tensors
        grad_2d = torch.zeros_like(logits_2d)
        grad_logp = grad_logp.float()
        for a in range(0, rows.numel(), ctx.chunk_rows):
            z = min(rows.numel(), a + ctx.chunk_rows)
            g = grad_logp[a:z]
            x = logits_2d.index_select(0, rows[a:z]).float()
            d = torch.exp(x - lse[a:z, None]).mul_(-g[:, None])
            d.scatter_add_(1, local_t[a:z, None], torch.where(owned[a:z], g, torch.zeros_like(g))[:, None])
            grad_2d.index_add_(0, rows[a:z], d.to(grad_2d.dtype))
        return grad_2d, None, None, None, None, None


def token_logprobs(
    logits_sbv: Tensor,
    pred_s: Tensor,
    pred_b: Tensor,
    targets: Tensor,
    tp_group=None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tensor:
    """fp32 log-prob [N] of ``targets`` under the logits at (``pred_s``, ``pred_b``) of ``logits_sbv``.

    ``logits_sbv`` is [s, b, V/tp] (this rank's vocabulary shard); ``tp_group`` the TP group (None or
    size 1: the full vocabulary is local). Differentiable w.r.t. ``logits_sbv``.
    """
    return token_logprobs_and_wpo(logits_sbv, pred_s, pred_b, targets, tp_group, chunk_elems, with_wpo=False)[0]


def token_logprobs_and_wpo(
    logits_sbv: Tensor,
    pred_s: Tensor,
    pred_b: Tensor,
    targets: Tensor,
    tp_group=None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    with_wpo: bool = True,
) -> tuple[Tensor, Tensor]:
    """``token_logprobs`` plus, when ``with_wpo``, WPO's per-token denominator [N] (no gradient):
    ``logsumexp(2 x) - 2 logsumexp(x)`` over the whole vocabulary, the log of ``sum_v p_v^2``.

    Same single pass over the rows, no vocabulary gather: each TP rank sums ``exp(2 (x - local max))``
    next to ``exp(x - local max)``; both are rescaled to the global max and all-reduced (SUM).
    """
    s, b, v_local = logits_sbv.shape
    rows = (pred_s.long() * b + pred_b.long()).to(logits_sbv.device)
    chunk_rows = max(1, chunk_elems // max(1, v_local))
    logits_2d = logits_sbv.reshape(s * b, v_local)
    targets = targets.long().to(logits_sbv.device)
    return _ScoredTokenLogprob.apply(logits_2d, rows, targets, tp_group, chunk_rows, with_wpo)


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Forward: SUM all-reduce over ``group``. Backward: the gradient unchanged (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def all_reduce_sum_identity_grad(x: Tensor, group) -> Tensor:
    """SUM over ``group`` (no-op for None / size 1); gradient passed through unchanged."""
    if _world(group) == 1:
        return x
    return _AllReduceSumIdentityGrad.apply(x, group)


def response_logprobs(
    logits_sbv: Tensor,
    index: ScoringIndex,
    tp_group=None,
    cp_group=None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    with_wpo: bool = False,
) -> ResponseLogprobs:
    """Summed log-prob and token count of every response of the micro-batch (see the module doc);
    ``with_wpo`` also fills ``token_log_denom`` (``token_logprobs_and_wpo``)."""
    tok, denom = token_logprobs_and_wpo(
        logits_sbv, index.pred_s, index.pred_b, index.targets, tp_group, chunk_elems, with_wpo=with_wpo
    )
    resp = index.resp_ids.to(tok.device)
    local = torch.zeros(index.num_responses, dtype=torch.float32, device=tok.device).index_add(0, resp, tok)
    return ResponseLogprobs(
        logps=all_reduce_sum_identity_grad(local, cp_group),
        num_tokens=index.resp_lengths.to(tok.device),
        token_logps=tok,
        token_resp=resp,
        token_log_denom=denom if with_wpo else None,
    )


def last_token_hidden(hidden_sbh: Tensor, index: ScoringIndex, cp_group=None) -> Tensor:
    """[R, h] hidden state at each response's last token (e.g. for a reward head), complete across CP.

    ``hidden_sbh`` is the final hidden states [s, b, h] (``model(..., return_hidden=True)``). Each CP
    rank fills the responses whose last token it holds; a CP SUM (identity backward) completes it.
    """
    last_s = index.last_s.to(hidden_sbh.device)
    last_b = index.last_b.to(hidden_sbh.device)
    owned = index.last_owned.to(hidden_sbh.device)
    picked = hidden_sbh[last_s.clamp(min=0), last_b]
    picked = torch.where(owned[:, None], picked, torch.zeros_like(picked))
    return all_reduce_sum_identity_grad(picked, cp_group)


def last_token_hidden_from_spans(hidden_sbh: Tensor, resp_spans: Tensor, resp_rows: Tensor | None = None) -> Tensor:
    """[R, h] hidden at each response's last token, no CP: ``resp_spans`` [R, 2] (start, end) in row
    ``resp_rows`` [R] (default 0)."""
    ends = resp_spans[:, 1].long().to(hidden_sbh.device) - 1
    rows = torch.zeros_like(ends) if resp_rows is None else resp_rows.long().to(hidden_sbh.device)
    return hidden_sbh[ends, rows]
