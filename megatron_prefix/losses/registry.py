"""Loss config, inputs/outputs, the ``LOSSES`` registry and ``compute_loss``.

Normalisation (the design every trainer relies on)
--------------------------------------------------
``compute_loss`` never averages. It returns ``loss_sum`` (a 0-dim tensor: the SUM of the per-pair, or
for listwise types per-group, losses of the micro-batch), ``count`` (the number of preference pairs the
micro-batch contributes) and ``metrics`` (per-pair SUMS). The trainer forms the step loss as

    step_loss = sum over micro-batches and data-parallel ranks of loss_sum  /  global_count

where ``global_count`` is the all-reduced sum of the counts of the whole global batch. Because a
unit's responses always sit in one micro-batch, the pair set of the global batch does not depend on how
units are packed into rows, rows into micro-batches or micro-batches onto ranks, so the step loss is the
mean over all preference pairs of the global batch, invariant to packing, micro-batching and DP size
(and equal to a single big-batch computation). The count depends only on ``unit_ids``, ``scores`` and the
config, so a trainer can get it before any forward pass with ``count_pairs`` and scale each
micro-batch's backward by ``1 / global_count`` (gradient accumulation needs the normaliser up front).
Metrics are reported as ``metrics[k] / global_count`` (pair means, like TRL's logged means).

Listwise types (``dpo_pl``, ``rm_pl``): ``loss_sum`` is the sum of the Plackett-Luce NLLs of the groups
(plus per-pair ``rpo_alpha`` / centering terms), and ``count`` is the number of ordered pairs the groups
imply (= ``pairs="all"``'s count: strictly ordered pairs within a unit); the metrics are sums over those
implied pairs. So a unit's weight in the gradient does not depend on the normaliser (the normaliser is
one global constant per step), K = 2 gives exactly the pairwise ``sigmoid`` / ``bt`` mean, and pairwise
and listwise metrics are comparable.

Registry names: DPO family (needs ``ref_logps``) ``sigmoid``, ``hinge``, ``ipo``, ``robust``, ``dpo_pl``;
reference-free ``simpo``, ``orpo``; reward model (needs ``rewards``) ``bt``, ``rm_pl``. Formulas and option
names follow TRL; see ``losses/dpo.py`` and ``losses/reward.py``.

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_prefix.config import require
from megatron_prefix.losses import dpo, reward
from megatron_prefix.losses.pairs import PAIR_MODES, Groups, groups, preference_pairs

Metrics = dict[str, torch.Tensor]

DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust", "dpo_pl")
REF_FREE_TYPES = ("simpo", "orpo")
REWARD_TYPES = ("bt", "rm_pl")
LISTWISE_TYPES = ("dpo_pl", "rm_pl")

# Our metric keys -> the names TRL logs (for users reading TRL dashboards).
TRL_METRIC_NAMES = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "margins": "rewards/margins",
    "accuracy": "rewards/accuracies",
    "policy_chosen_logps": "logps/chosen",
    "policy_rejected_logps": "logps/rejected",
    "nll": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
    "log_odds_chosen": "log_odds_chosen",
}


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LossConfig:
    """The ``loss:`` section. Names follow TRL (DPOConfig, CPOConfig, ORPOConfig, RewardConfig).

    - ``type``: a ``LOSSES`` name.
    - ``beta``: DPO/IPO/SimPO temperature; for ``orpo`` it is ORPO's lambda (TRL ``ORPOConfig.beta``).
      Unused by ``bt`` / ``rm_pl``.
    - ``label_smoothing``: conservative DPO (``sigmoid``), ``robust`` and ``simpo``; in [0, 0.5).
    - ``rpo_alpha``: weight of the chosen-response NLL added to any DPO-family loss (TRL DPOConfig).
    - ``simpo_gamma``: TRL CPOConfig's SimPO target margin (absolute, not the gamma/beta ratio).
    - ``cpo_alpha``: TRL CPOConfig's NLL weight, used with ``simpo`` (default 0 here = pure SimPO).
    - ``margin``: ``bt`` only: ``None``, ``"scores"`` (score_chosen - score_rejected) or a constant.
    - ``center_rewards_coefficient``: TRL RewardConfig's centering weight (``bt``, ``rm_pl``).
    - ``pairs``: ``"all"`` or ``"best_worst"`` (pairwise types; listwise types always use ``"all"``).
    """

    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    margin: float | str | None = None
    center_rewards_coefficient: float | None = None
    pairs: str = "all"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending ``loss.*`` field."""
        t = self.type
        require(t in LOSSES, "loss.type", f"must be one of {sorted(LOSSES)}, got {t!r}")
        require(
            _is_number(self.beta) and self.beta > 0,
            "loss.beta",
            f"must be a positive number, got {self.beta!r}",
        )
        ls = self.label_smoothing
        require(_is_number(ls) and 0 <= ls < 0.5, "loss.label_smoothing", f"must be in [0, 0.5), got {ls!r}")
        require(
            ls == 0 or t in ("sigmoid", "robust", "simpo"),
            "loss.label_smoothing",
            f"is only used by sigmoid, robust and simpo, not {t!r}; set it to 0",
        )
        if self.rpo_alpha is not None:
            a = self.rpo_alpha
            require(_is_number(a) and a >= 0, "loss.rpo_alpha", f"must be null or >= 0, got {a!r}")
            require(t in DPO_TYPES, "loss.rpo_alpha", f"applies to the DPO family {DPO_TYPES}, not {t!r}")
        require(
            _is_number(self.simpo_gamma), "loss.simpo_gamma", f"must be a number, got {self.simpo_gamma!r}"
        )
        c = self.cpo_alpha
        require(_is_number(c) and c >= 0, "loss.cpo_alpha", f"must be >= 0, got {c!r}")
        require(c == 0 or t == "simpo", "loss.cpo_alpha", f"is only used by simpo, not {t!r}; set it to 0")
        m = self.margin
        require(
            m is None or m == "scores" or _is_number(m),
            "loss.margin",
            f"must be null, 'scores' or a number, got {m!r}",
        )
        require(m is None or t == "bt", "loss.margin", f"is only used by bt, not {t!r}")
        cr = self.center_rewards_coefficient
        if cr is not None:
            require(
                _is_number(cr) and cr >= 0,
                "loss.center_rewards_coefficient",
                f"must be null or >= 0, got {cr!r}",
            )
            require(
                t in REWARD_TYPES, "loss.center_rewards_coefficient", f"applies to {REWARD_TYPES}, not {t!r}"
            )
        require(self.pairs in PAIR_MODES, "loss.pairs", f"must be one of {PAIR_MODES}, got {self.pairs!r}")
        require(
            self.pairs == "all" or t not in LISTWISE_TYPES,
            "loss.pairs",
            f"listwise type {t!r} ranks whole units; use pairs='all'",
        )


@dataclass(kw_only=True)
class LossInputs:
    """Per-response tensors of one micro-batch, all [R] in the same response order.

    ``policy_logps`` / ``ref_logps``: summed log-probs of each response; ``token_counts``: response
    lengths; ``unit_ids`` / ``scores``: ``PackedRow.resp_unit`` / ``resp_scores``; ``rewards``: reward-model
    outputs; ``slots``: optional ``PackedRow.resp_slot``, the tie-break of ``pairs="best_worst"``
    (without it ties go to the first response in input order). Which are required depends on the loss type (``LossSpec.needs``). ``unit_ids`` and ``scores``
    may stay on the CPU (pair indices are built there and moved to the values' device).
    """

    unit_ids: torch.Tensor
    scores: torch.Tensor
    policy_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    def check(self, needs: tuple[str, ...], loss_type: str) -> None:
        """Raise ``ValueError`` if a needed tensor is missing or any tensor is not [R]."""
        r = self.unit_ids.shape
        for name in ("unit_ids", "scores", "policy_logps", "ref_logps", "token_counts", "rewards", "slots"):
            value = getattr(self, name)
            if value is None:
                if name in needs:
                    raise ValueError(f"loss inputs: {name} is required by loss.type={loss_type!r}")
                continue
            if value.dim() != 1 or value.shape != r:
                raise ValueError(f"loss inputs: {name} must have shape {tuple(r)}, got {tuple(value.shape)}")


@dataclass
class LossOutput:
    """``loss_sum`` (0-dim, sum over pairs/groups), ``count`` (pairs) and per-pair metric sums."""

    loss_sum: torch.Tensor
    count: int
    metrics: Metrics = field(default_factory=dict)


PairFn = Callable[[LossConfig, LossInputs, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Metrics]]
ListFn = Callable[[LossConfig, LossInputs, Groups], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A registry entry: ``kind`` is ``"pair"`` (``fn: PairFn``) or ``"list"`` (``fn: ListFn``)."""

    kind: str
    needs: tuple[str, ...]
    fn: Callable


def _dpo_pair(
    cfg: LossConfig, b: LossInputs, c: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    pi, ref, n = b.policy_logps, b.ref_logps, b.token_counts
    n_c = n[c] if n is not None else None
    n_r = n[r] if n is not None else None
    return dpo.dpo_loss(
        cfg.type, pi[c], pi[r], ref[c], ref[r], n_c, n_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing
    )


def _simpo(cfg: LossConfig, b: LossInputs, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    pi, n = b.policy_logps, b.token_counts
    return dpo.simpo_loss(
        pi[c], pi[r], n[c], n[r], beta=cfg.beta, simpo_gamma=cfg.simpo_gamma,
        label_smoothing=cfg.label_smoothing, cpo_alpha=cfg.cpo_alpha,
    )  # fmt: skip


def _orpo(cfg: LossConfig, b: LossInputs, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    pi, n = b.policy_logps, b.token_counts
    return dpo.orpo_loss(pi[c], pi[r], n[c], n[r], beta=cfg.beta)


def _bt(cfg: LossConfig, b: LossInputs, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    rw = b.rewards
    margin = cfg.margin
    if margin == "scores":
        s = b.scores.to(device=rw.device, dtype=rw.dtype)
        margin = s[c] - s[r]
    return reward.bt_loss(rw[c], rw[r], margin, cfg.center_rewards_coefficient)


def _dpo_pl(cfg: LossConfig, b: LossInputs, grp: Groups) -> tuple[torch.Tensor, torch.Tensor]:
    return dpo.dpo_plackett_luce(b.policy_logps, b.ref_logps, b.scores, grp, beta=cfg.beta)


def _rm_pl(cfg: LossConfig, b: LossInputs, grp: Groups) -> tuple[torch.Tensor, torch.Tensor]:
    return reward.rm_plackett_luce(b.rewards, b.scores, grp), b.rewards


_POLICY_REF = ("policy_logps", "ref_logps")
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec("pair", _POLICY_REF, _dpo_pair),
    "hinge": LossSpec("pair", _POLICY_REF, _dpo_pair),
    "ipo": LossSpec("pair", _POLICY_REF + ("token_counts",), _dpo_pair),
    "robust": LossSpec("pair", _POLICY_REF, _dpo_pair),
    "dpo_pl": LossSpec("list", _POLICY_REF, _dpo_pl),
    "simpo": LossSpec("pair", ("policy_logps", "token_counts"), _simpo),
    "orpo": LossSpec("pair", ("policy_logps", "token_counts"), _orpo),
    "bt": LossSpec("pair", ("rewards",), _bt),
    "rm_pl": LossSpec("list", ("rewards",), _rm_pl),
}


def _spec(cfg: LossConfig) -> LossSpec:
    if cfg.type not in LOSSES:
        raise ValueError(f"loss.type: must be one of {sorted(LOSSES)}, got {cfg.type!r}")
    return LOSSES[cfg.type]


def _pair_mode(cfg: LossConfig) -> str:
    return "all" if cfg.type in LISTWISE_TYPES else cfg.pairs


def count_pairs(cfg: LossConfig, unit_ids: torch.Tensor, scores: torch.Tensor) -> int:
    """The ``count`` ``compute_loss`` will return for these responses (no forward pass needed)."""
    _spec(cfg)
    return int(preference_pairs(unit_ids, scores, _pair_mode(cfg))[0].numel())  # tie-break never changes it


def _on_device(batch: LossInputs, cfg: LossConfig) -> LossInputs:
    """Move everything to the device of the differentiable values; half precision is upcast to float32."""
    values = batch.rewards if cfg.type in REWARD_TYPES else batch.policy_logps
    dev = values.device

    def real(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(dev)
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x

    return LossInputs(
        unit_ids=batch.unit_ids.to(dev),
        scores=real(batch.scores),
        policy_logps=real(batch.policy_logps),
        ref_logps=real(batch.ref_logps),
        token_counts=real(batch.token_counts),
        rewards=real(batch.rewards),
        slots=batch.slots,
    )


def compute_loss(cfg: LossConfig, batch: LossInputs) -> LossOutput:
    """Loss of one micro-batch: SUM over its pairs (or groups) plus pair count and metric sums.

    See the module docstring for the normalisation. ``cfg`` should have been ``validate()``-d.
    """
    spec = _spec(cfg)
    needs = spec.needs + (("token_counts",) if cfg.rpo_alpha is not None else ())
    batch.check(needs, cfg.type)
    c, r = preference_pairs(batch.unit_ids, batch.scores, _pair_mode(cfg), batch.slots)
    grp = groups(batch.unit_ids, batch.scores) if spec.kind == "list" else None
    batch = _on_device(batch, cfg)
    dev = batch.scores.device
    c, r = c.to(dev), r.to(dev)

    if spec.kind == "pair":
        losses, m = spec.fn(cfg, batch, c, r)
        loss_sum = losses.sum()
    else:
        group_losses, utilities = spec.fn(cfg, batch, grp)
        loss_sum = group_losses.sum()
        m = {"chosen_rewards": utilities[c].detach(), "rejected_rewards": utilities[r].detach()}
        if cfg.center_rewards_coefficient is not None:
            loss_sum = (
                loss_sum
                + reward.center_term(utilities[c], utilities[r], cfg.center_rewards_coefficient).sum()
            )

    if cfg.rpo_alpha is not None:
        nll = dpo.rpo_nll(batch.policy_logps[c], batch.token_counts[c])
        loss_sum = loss_sum + cfg.rpo_alpha * nll.sum()
        m["nll"] = nll.detach()

    m["margins"] = m["chosen_rewards"] - m["rejected_rewards"]
    m["accuracy"] = (m["chosen_rewards"] > m["rejected_rewards"]).to(m["margins"].dtype)
    if batch.policy_logps is not None:
        m["policy_chosen_logps"] = batch.policy_logps[c].detach()
        m["policy_rejected_logps"] = batch.policy_logps[r].detach()
    if batch.ref_logps is not None:
        m["ref_chosen_logps"] = batch.ref_logps[c].detach()
        m["ref_rejected_logps"] = batch.ref_logps[r].detach()
    metrics = {k: v.sum() for k, v in m.items()}
    return LossOutput(loss_sum=loss_sum, count=int(c.numel()), metrics=metrics)
