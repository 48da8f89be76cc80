"""Preference losses (pure torch functions, one registry).

Entry point: ``compute_loss(cfg: LossConfig, batch: LossInputs) -> LossOutput`` (sums, not means; the
normalisation contract is in ``losses/registry.py``). Pair/group construction is in ``losses/pairs.py``,
policy losses (DPO family, SimPO, ORPO, listwise DPO) in ``losses/dpo.py``, reward-model losses in
``losses/reward.py``.
"""

from megatron_prefix.losses.dpo import dpo_loss, dpo_plackett_luce, orpo_loss, rpo_nll, simpo_loss
from megatron_prefix.losses.pairs import PAIR_MODES, Groups, groups, plackett_luce_nll, preference_pairs
from megatron_prefix.losses.registry import (
    DPO_TYPES,
    LISTWISE_TYPES,
    LOSSES,
    REF_FREE_TYPES,
    REWARD_TYPES,
    TRL_METRIC_NAMES,
    LossConfig,
    LossInputs,
    LossOutput,
    LossSpec,
    compute_loss,
    count_pairs,
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
    "Groups",
    "LossConfig",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "bt_loss",
    "compute_loss",
    "count_pairs",
    "dpo_loss",
    "dpo_plackett_luce",
    "groups",
    "orpo_loss",
    "plackett_luce_nll",
    "preference_pairs",
    "rm_plackett_luce",
    "rpo_nll",
    "simpo_loss",
]
