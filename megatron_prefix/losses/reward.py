"""Reward-model losses on the scalar outputs ``r`` of the reward head.

- ``bt`` (TRL ``trl/trainer/reward_trainer.py::RewardTrainer.compute_loss``): per pair
  ``-logsigmoid(r_c - r_r - margin)`` plus ``center_rewards_coefficient * (r_c + r_r)^2`` (TRL adds
  ``coef * mean((r_c + r_r)^2)`` to the mean loss, i.e. the same term per pair). The margin is TRL's
  optional per-example ``margin`` column; here it is configured as ``"scores"`` (the score difference of
  the pair), a constant, or ``None``.
- ``rm_pl`` (listwise, not in TRL): Plackett-Luce over the rewards (``pairs.plackett_luce_nll``); the
  centering term, if configured, is added per implied pair so that it matches ``bt``. With K = 2 and no
  margin it equals ``bt``.

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prefix.losses.pairs import Groups, plackett_luce_nll

Metrics = dict[str, torch.Tensor]


def center_term(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, coefficient: float
) -> torch.Tensor:
    """TRL's reward-centering regulariser per pair: ``coefficient * (r_c + r_r)^2``."""
    return coefficient * (chosen_rewards + rejected_rewards) ** 2


def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry loss per pair [P]: ``-logsigmoid(r_c - r_r - margin) [+ coef (r_c + r_r)^2]``."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_term(chosen_rewards, rejected_rewards, center_rewards_coefficient)
    return losses, {"chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach()}


def rm_plackett_luce(rewards: torch.Tensor, scores: torch.Tensor, grp: Groups) -> torch.Tensor:
    """Listwise reward-model loss: Plackett-Luce NLL per group [G] of the score ranking under ``rewards``."""
    return plackett_luce_nll(rewards, scores, grp)
