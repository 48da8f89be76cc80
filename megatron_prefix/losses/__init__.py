"""Preference losses (pure torch functions, one registry).

Entry point: ``compute_loss(cfg: LossConfig, batch: LossInputs) -> LossOutput`` (sums, not means; the
normalisation contract is in ``losses/registry.py``). Pair/group construction is in ``losses/pairs.py``,
TRL 1.x DPOTrainer losses in ``losses/trl.py``, other policy losses (SimPO, ORPO, listwise DPO) in
``losses/dpo.py``, the ``loss:`` config in ``losses/config.py``, reward-model losses in
``losses/reward.py``.
"""

from megatron_prefix.losses.dpo import dpo_plackett_luce, orpo_loss, rpo_nll, simpo_loss
from megatron_prefix.losses.pairs import PAIR_MODES, Groups, groups, plackett_luce_nll, preference_pairs
from megatron_prefix.losses.registry import (
    DPO_TYPES,
    LISTWISE_TYPES,
    LOSSES,
    REF_FREE_TYPES,
    REWARD_TYPES,
    TRL_METRIC_NAMES,
    TRL_TYPES,
    BatchPlan,
    LossConfig,
    LossInputs,
    LossOutput,
    LossSpec,
    compute_loss,
    count_pairs,
    loss_pairs,
)
from megatron_prefix.losses.reward import bt_loss, rm_plackett_luce

__all__ = [
    "DPO_TYPES",
    "LISTWISE_TYPES",
    "LOSSES",
    "PAIR_MODES",
    "REF_FREE_TYPES",
    "REWARD_TYPES",
    "TRL_METRIC_NAMES",
    "TRL_TYPES",
    "BatchPlan",
    "Groups",
    "LossConfig",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "bt_loss",
    "compute_loss",
    "count_pairs",
    "dpo_plackett_luce",
    "groups",
    "loss_pairs",
    "orpo_loss",
    "plackett_luce_nll",
    "preference_pairs",
    "rm_plackett_luce",
    "rpo_nll",
    "simpo_loss",
]
