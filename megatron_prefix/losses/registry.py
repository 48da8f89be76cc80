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

Registry names: the TRL 1.x DPOTrainer types (``losses/trl.py``: ``sigmoid``, ``hinge``, ``ipo``,
``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``,
``apo_zero``, ``apo_down``, ``discopop``, ``sft``, ``sigmoid_norm``; a list of them with ``weights`` is a
weighted sum, as TRL's), listwise ``dpo_pl``; reference-free ``simpo``, ``orpo``; reward model (needs
``rewards``) ``bt``, ``rm_pl``. Formulas and option names follow TRL; see ``losses/trl.py``,
``losses/dpo.py``, ``losses/reward.py`` and ``docs/losses.md``.

Batch-level TRL types (``aot``, ``aot_unpaired`` sort the batch; ``sft`` is a token mean over the batch)
read the global batch's statistics from ``LossInputs.plan``, so a micro-batch computes exactly its share of
the global-batch loss; without a plan the batch given is taken as the whole batch.

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_prefix.losses import dpo, reward, trl
from megatron_prefix.losses.config import (
    DPO_TYPES,
    LISTWISE_TYPES,
    NO_REFERENCE,
    REF_FREE_TYPES,
    REWARD_TYPES,
    TRL_TYPES,
    LossConfig,
)
from megatron_prefix.losses.pairs import Groups, groups, preference_pairs
from megatron_prefix.losses.plan import BatchPlan

Metrics = dict[str, torch.Tensor]

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

__all__ = [
    "DPO_TYPES", "LISTWISE_TYPES", "LOSSES", "REF_FREE_TYPES", "REWARD_TYPES", "TRL_METRIC_NAMES", "TRL_TYPES",
    "BatchPlan", "LossConfig", "LossInputs", "LossOutput", "LossSpec", "compute_loss", "count_pairs", "loss_pairs",
]  # fmt: skip


@dataclass(kw_only=True)
class LossInputs:
    """Per-response tensors of one micro-batch, all [R] in the same response order (unless noted).

    ``policy_logps`` / ``ref_logps``: summed log-probs of each response; ``token_counts``: response
    lengths; ``unit_ids`` / ``scores``: ``PackedRow.resp_unit`` / ``resp_scores``; ``rewards``: reward-model
    outputs; ``slots``: optional ``PackedRow.resp_slot``, the tie-break of ``pairs="best_worst"``
    (without it ties go to the first response in input order). Which are required depends on the loss
    type (``LossSpec.needs``). ``unit_ids`` and ``scores`` may stay on the CPU (pair indices are built
    there and moved to the values' device).

    TRL options: ``wpo_logw`` [R] (``use_weighting``): the per-response sum of WPO's aligned token
    log-probs (``trl.wpo_log_weight``); ``ld_tails`` / ``ref_ld_tails`` (``ld_alpha``): per-pair
    ``(tail_c, tail_r)`` [P] in ``loss_pairs`` order (``trl.ld_tails``, complete across CP); ``plan``:
    the global batch's statistics (``BatchPlan``; None: this batch is the whole batch).
    """

    unit_ids: torch.Tensor
    scores: torch.Tensor
    policy_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    wpo_logw: torch.Tensor | None = None
    ld_tails: tuple[torch.Tensor, torch.Tensor] | None = None
    ref_ld_tails: tuple[torch.Tensor, torch.Tensor] | None = None
    plan: BatchPlan | None = None

    def check(self, needs: tuple[str, ...], loss_type: str) -> None:
        """Raise ``ValueError`` if a needed tensor is missing or any per-response tensor is not [R]."""
        r = self.unit_ids.shape
        names = ("unit_ids", "scores", "policy_logps", "ref_logps", "token_counts", "rewards", "slots", "wpo_logw")
        for name in names + ("ld_tails", "ref_ld_tails"):
            value = getattr(self, name)
            if value is None:
                if name in needs:
                    raise ValueError(f"loss inputs: {name} is required by loss.type={loss_type!r}")
                continue
            if name in names and (value.dim() != 1 or value.shape != r):
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
    """A registry entry: ``kind`` is ``"pair"`` (``fn: PairFn``, returns per-pair losses), ``"sum"``
    (``fn: PairFn``, returns the summed loss) or ``"list"`` (``fn: ListFn``)."""

    kind: str
    needs: tuple[str, ...]
    fn: Callable


def _trl(cfg: LossConfig, b: LossInputs, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Every TRL type and mix (``losses/trl.py``): ``(loss_sum, metrics)`` of the pairs ``(c, r)``."""
    pi, n = b.policy_logps, b.token_counts
    ref = b.ref_logps if b.ref_logps is not None else torch.zeros_like(pi)  # sft alone: no reference
    nll = -pi[c]  # sft reads the plain chosen log-probs (TRL: cross-entropy of the logits)
    pi_c, pi_r = trl.ld_weighted(pi[c], pi[r], b.ld_tails, cfg.ld_alpha)
    ref_c, ref_r = trl.ld_weighted(ref[c], ref[r], b.ref_ld_tails if b.ref_logps is not None else None, cfg.ld_alpha)
    n_c = n[c] if n is not None else torch.ones_like(pi_c)
    n_r = n[r] if n is not None else torch.ones_like(pi_r)
    clr, rlr = pi_c - ref_c, pi_r - ref_r
    fd, alpha = cfg.f_divergence, cfg.f_alpha_divergence_coef
    terms = trl.PairTerms(clr=clr, rlr=rlr, cs=trl.f_scores(clr, fd, alpha), rs=trl.f_scores(rlr, fd, alpha),
                          n_c=n_c, n_r=n_r, pi_c=pi_c, pi_r=pi_r, ref_c=ref_c, ref_r=ref_r)  # fmt: skip
    plan = b.plan
    if "aot" in cfg.types:
        terms.aot_ref = plan.aot_ref.to(pi) if plan is not None else trl.aot_plan((pi_c - pi_r).detach(), ref_c - ref_r)
    if "aot_unpaired" in cfg.types:
        if plan is not None:
            terms.unpaired_r, terms.unpaired_c = plan.unpaired_r.to(pi), plan.unpaired_c.to(pi)
        else:
            terms.unpaired_r, terms.unpaired_c = trl.aot_unpaired_plan(clr.detach(), rlr.detach())
    params = trl.TrlParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing, discopop_tau=cfg.discopop_tau)
    pair_w = None
    if cfg.use_weighting:
        w = torch.exp(b.wpo_logw / n.to(b.wpo_logw.dtype).clamp(min=1.0)).to(pi.dtype)
        pair_w = w[c] * w[r]
    total = pi.new_zeros(())
    for loss_type, weight in zip(cfg.types, cfg.loss_weights):
        if loss_type == "sft":
            num_pairs, tokens = (plan.num_pairs, plan.chosen_tokens) if plan is not None else (
                float(c.numel()), float(n_c.sum()))  # fmt: skip
            per_pair = trl.sft_scale(num_pairs, tokens) * nll
        else:
            per_pair = trl.PAIR_LOSSES[loss_type](terms, params)
        if pair_w is not None:
            per_pair = per_pair * pair_w
        total = total + weight * per_pair.sum()
    m = {
        "chosen_rewards": (cfg.beta * clr).detach(),
        "rejected_rewards": (cfg.beta * rlr).detach(),
        "policy_chosen_logps": pi_c.detach(),
        "policy_rejected_logps": pi_r.detach(),
    }
    if b.ref_logps is not None:
        m["ref_chosen_logps"], m["ref_rejected_logps"] = ref_c.detach(), ref_r.detach()
    if pair_w is not None:
        m["wpo_weight"] = pair_w.detach()
    return total, m


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
_COUNTS = ("token_counts",)
_TRL_NEEDS = {
    t: (("policy_logps",) if t in NO_REFERENCE else _POLICY_REF) + (_COUNTS if t in ("ipo", "sigmoid_norm", "sft") else ())
    for t in TRL_TYPES
}  # fmt: skip
LOSSES: dict[str, LossSpec] = {
    **{t: LossSpec("sum", _TRL_NEEDS[t], _trl) for t in TRL_TYPES},
    "dpo_pl": LossSpec("list", _POLICY_REF, _dpo_pl),
    "simpo": LossSpec("pair", ("policy_logps", "token_counts"), _simpo),
    "orpo": LossSpec("pair", ("policy_logps", "token_counts"), _orpo),
    "bt": LossSpec("pair", ("rewards",), _bt),
    "rm_pl": LossSpec("list", ("rewards",), _rm_pl),
}


def _spec(cfg: LossConfig) -> LossSpec:
    for t in cfg.types:
        if t not in LOSSES:
            raise ValueError(f"loss.type: must be one of {sorted(LOSSES)}, got {t!r}")
    return LOSSES[cfg.types[0]]


def _needs(cfg: LossConfig) -> tuple[str, ...]:
    needs = tuple(dict.fromkeys(x for t in cfg.types for x in LOSSES[t].needs))
    if cfg.rpo_alpha is not None or cfg.use_weighting:
        needs += ("token_counts",)
    if cfg.use_weighting:
        needs += ("wpo_logw",)
    if cfg.ld_alpha is not None:
        needs += ("ld_tails",) + (("ref_ld_tails",) if "ref_logps" in needs else ())
    return needs


def _pair_mode(cfg: LossConfig) -> str:
    return "all" if cfg.name in LISTWISE_TYPES else cfg.pairs


def loss_pairs(cfg: LossConfig, unit_ids: torch.Tensor, scores: torch.Tensor,
               slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(chosen_idx, rejected_idx)`` pairs ``compute_loss`` uses, in its order."""
    _spec(cfg)
    return preference_pairs(unit_ids, scores, _pair_mode(cfg), slots)


def count_pairs(cfg: LossConfig, unit_ids: torch.Tensor, scores: torch.Tensor) -> int:
    """The ``count`` ``compute_loss`` will return for these responses (no forward pass needed)."""
    return int(loss_pairs(cfg, unit_ids, scores)[0].numel())  # the tie-break never changes it


def _on_device(batch: LossInputs, cfg: LossConfig) -> LossInputs:
    """Move everything to the device of the differentiable values; half precision is upcast to float32."""
    values = batch.rewards if cfg.name in REWARD_TYPES else batch.policy_logps
    dev = values.device

    def real(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(dev)
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x

    def pair(x: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if x is None else (real(x[0]), real(x[1]))

    return LossInputs(
        unit_ids=batch.unit_ids.to(dev),
        scores=real(batch.scores),
        policy_logps=real(batch.policy_logps),
        ref_logps=real(batch.ref_logps),
        token_counts=real(batch.token_counts),
        rewards=real(batch.rewards),
        slots=batch.slots,
        wpo_logw=real(batch.wpo_logw),
        ld_tails=pair(batch.ld_tails),
        ref_ld_tails=pair(batch.ref_ld_tails),
        plan=batch.plan,
    )


def compute_loss(cfg: LossConfig, batch: LossInputs) -> LossOutput:
    """Loss of one micro-batch: SUM over its pairs (or groups) plus pair count and metric sums.

    See the module docstring for the normalisation. ``cfg`` should have been ``validate()``-d.
    """
    spec = _spec(cfg)
    batch.check(_needs(cfg), cfg.name)
    c, r = loss_pairs(cfg, batch.unit_ids, batch.scores, batch.slots)
    grp = groups(batch.unit_ids, batch.scores) if spec.kind == "list" else None
    batch = _on_device(batch, cfg)
    dev = batch.scores.device
    c, r = c.to(dev), r.to(dev)

    if spec.kind == "sum":
        loss_sum, m = spec.fn(cfg, batch, c, r)
    elif spec.kind == "pair":
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
        m.setdefault("policy_chosen_logps", batch.policy_logps[c].detach())
        m.setdefault("policy_rejected_logps", batch.policy_logps[r].detach())
    if batch.ref_logps is not None:
        m.setdefault("ref_chosen_logps", batch.ref_logps[c].detach())
        m.setdefault("ref_rejected_logps", batch.ref_logps[r].detach())
    metrics = {k: v.sum() for k, v in m.items()}
    return LossOutput(loss_sum=loss_sum, count=int(c.numel()), metrics=metrics)
