"""Policy-side preference losses outside TRL's DPOTrainer: SimPO, ORPO, listwise DPO, the RPO NLL term.

The TRL 1.x DPOTrainer loss types (``sigmoid``, ``hinge``, ``ipo``, ``robust`` and the rest) are in
``losses/trl.py``; the notes below on them describe the TRL < 1.0 behaviour this project started from.

Every function takes per-pair tensors (already gathered by ``chosen_idx`` / ``rejected_idx``) and returns
``(losses [P], metrics)`` where ``metrics`` holds per-pair ``chosen_rewards`` / ``rejected_rewards`` (and
loss-specific extras); nothing is reduced here. Log-probs are *summed* over the response tokens; the
functions that need averages divide by ``*_tokens`` themselves, exactly where TRL does.

TRL correspondence (huggingface/trl; DPO as of v0.28 ``trl/trainer/dpo_trainer.py::DPOTrainer.dpo_loss``
and ``get_batch_loss_metrics``, which still carried ``rpo_alpha`` and the conservative ``label_smoothing``
sigmoid; CPO/ORPO in ``trl/experimental/{cpo,orpo}/*_trainer.py``):

- ``sigmoid``: ``-(1-ls) logsigmoid(beta*z) - ls logsigmoid(-beta*z)`` with
  ``z = (pi_c - pi_r) - (ref_c - ref_r)`` (``ls = label_smoothing``: conservative DPO / cDPO).
- ``hinge``: ``relu(1 - beta*z)``.
- ``ipo``: ``(z_avg - 1/(2 beta))^2`` where TRL divides policy *and* reference log-probs by the response
  length before forming the logits (``if "ipo" in self.loss_type: all_logps = all_logps / loss_mask.sum(-1)``),
  so ``z_avg = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r``; its implicit rewards use the same averages.
- ``robust``: ``(-(1-ls) logsigmoid(beta*z) + ls logsigmoid(-beta*z)) / (1 - 2 ls)``.
- ``rpo_alpha``: TRL adds ``rpo_alpha * nll_loss`` to every per-pair loss, ``nll_loss`` being the
  cross-entropy of the chosen tokens. Here the NLL is averaged over the tokens of each chosen response,
  ``-pi_c / n_c`` (TRL averages over all chosen tokens of its batch; the two agree for one pair and for
  equal lengths, and the per-response form is what keeps the loss invariant to packing).
- ``simpo`` (``CPOTrainer.cpo_loss``, ``loss_type="simpo"``): length-averaged log-probs,
  ``z = pi_c/n_c - pi_r/n_r - simpo_gamma/beta``, then the label-smoothed sigmoid of ``beta*z``; TRL's
  ``simpo_gamma`` is the absolute target margin (not SimPO's gamma/beta ratio), default 0.5. ``cpo_alpha``
  adds ``cpo_alpha * NLL(chosen)`` as TRL's CPO does (our default 0 = pure SimPO). Rewards:
  ``beta * pi/n``.
- ``orpo`` (``ORPOTrainer.odds_ratio_loss`` + ``get_batch_loss_metrics``): averaged log-probs ``a_c, a_r``,
  ``log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))``, loss ``NLL(chosen) - beta *
  logsigmoid(log_odds)``; TRL's ORPO calls lambda ``beta`` (ORPOConfig.beta, default 0.1), so do we.
  Rewards ``beta * a``; extra metrics ``log_odds_ratio`` (= logsigmoid(log_odds)) and ``log_odds_chosen``.
- ``dpo_pl`` (listwise, not in TRL): Plackett-Luce over implicit rewards ``beta (pi - ref)``; see
  ``pairs.plackett_luce_nll``. With K = 2 it equals ``sigmoid`` with ``label_smoothing = 0``.

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prefix.losses.pairs import Groups, plackett_luce_nll

Metrics = dict[str, torch.Tensor]

def _avg(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.to(logps.dtype).clamp(min=1.0)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def smoothed_sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1-ls) logsigmoid(beta*logits) - ls logsigmoid(-beta*logits)`` (DPO ``sigmoid``, SimPO)."""
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )


def rpo_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair NLL of the chosen response, averaged over its tokens: ``-logp / n`` [P]."""
    return -_avg(chosen_logps, chosen_tokens)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO as TRL's ``CPOTrainer`` (``loss_type="simpo"``) computes it, per pair [P].

    ``smoothed_sigmoid(a_c - a_r - simpo_gamma / beta)`` on length-averaged log-probs ``a``, plus
    ``cpo_alpha * NLL(chosen)`` when ``cpo_alpha > 0`` (then reported as metric ``nll``).
    """
    a_c, a_r = _avg(chosen_logps, chosen_tokens), _avg(rejected_logps, rejected_tokens)
    losses = smoothed_sigmoid(a_c - a_r - simpo_gamma / beta, beta, label_smoothing)
    metrics = {"chosen_rewards": (beta * a_c).detach(), "rejected_rewards": (beta * a_r).detach()}
    if cpo_alpha:
        nll = -a_c
        losses = losses + cpo_alpha * nll
        metrics["nll"] = nll.detach()
    return losses, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x < 0`` (TRL ``orpo_trainer.log1mexp``)."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO as TRL's ``ORPOTrainer``: ``NLL(chosen) - beta * logsigmoid(log_odds)`` per pair [P].

    Averaged log-probs are computed in at least float32 (TRL: ``.float()``) and clamped to ``<= -1e-6`` so that a response of
    probability 1 does not make ``log(1 - p)`` infinite (TRL does not clamp; it only matters at p ~ 1).
    """
    chosen_logps, rejected_logps = _at_least_fp32(chosen_logps), _at_least_fp32(rejected_logps)
    a_c = _avg(chosen_logps, chosen_tokens).clamp(max=-1e-6)
    a_r = _avg(rejected_logps, rejected_tokens).clamp(max=-1e-6)
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    ratio = F.logsigmoid(log_odds)
    nll = -_avg(chosen_logps, chosen_tokens)
    losses = nll - beta * ratio
    metrics = {
        "chosen_rewards": (beta * a_c).detach(),
        "rejected_rewards": (beta * a_r).detach(),
        "nll": nll.detach(),
        "log_odds_ratio": ratio.detach(),
        "log_odds_chosen": log_odds.detach(),
    }
    return losses, metrics


def dpo_plackett_luce(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    grp: Groups,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Listwise DPO: ``(group_losses [G], rewards [R])`` with implicit rewards ``beta * (pi - ref)``."""
    rewards = beta * (policy_logps - ref_logps)
    return plackett_luce_nll(rewards, scores, grp), rewards
