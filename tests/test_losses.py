"""Losses: pair construction, every registry loss against hand-computed numbers, reductions, normalisation.

Expected values are written out with ``math`` (never by calling the function under test).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prefix.config import from_dict
from megatron_prefix.losses import (
    LOSSES,
    LossConfig,
    LossInputs,
    compute_loss,
    count_pairs,
    groups,
    preference_pairs,
)
from megatron_prefix.losses.plan import make_plans, needs_plan, pair_stats

D = torch.float64


def cfg_for(loss_type: str, **kwargs) -> LossConfig:
    """A valid config for ``loss_type`` (exo_pair needs label_smoothing > 0)."""
    if loss_type == "exo_pair":
        kwargs.setdefault("label_smoothing", 1e-3)
    cfg = LossConfig(type=loss_type, **kwargs)
    cfg.validate()
    return cfg


def nls(x: float) -> float:
    """-log(sigmoid(x)) by hand."""
    return math.log(1.0 + math.exp(-x))


def t(xs, dtype=D) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


# Two units: 10 = responses 0..2 (scores 1, 0, 0.5), 20 = responses 3..4 (scores 0, 1).
UNIT = [10, 10, 10, 20, 20]
SCORE = [1.0, 0.0, 0.5, 0.0, 1.0]
PI = [-4.0, -6.0, -5.0, -3.0, -7.0]
REF = [-4.5, -5.5, -5.0, -3.5, -6.0]
N = [2, 3, 4, 1, 5]
RW = [0.7, -0.2, 0.1, 0.4, 1.3]
ALL_PAIRS = [(0, 1), (0, 2), (2, 1), (4, 3)]


def inputs(requires_grad: bool = False) -> LossInputs:
    return LossInputs(
        unit_ids=torch.tensor(UNIT),
        scores=t(SCORE),
        policy_logps=t(PI).requires_grad_(requires_grad),
        ref_logps=t(REF),
        token_counts=torch.tensor(N),
        rewards=t(RW).requires_grad_(requires_grad),
    )


def run(pairs_expected=ALL_PAIRS, **cfg_kwargs):
    cfg = LossConfig(**cfg_kwargs)
    cfg.validate()
    out = compute_loss(cfg, inputs())
    assert out.count == len(pairs_expected)
    assert out.loss_sum.dim() == 0
    return out


# ----------------------------------------------------------------------------------------------- pairs


def test_pairs_all_k4_with_ties_and_order():
    # unit 7 (K=4, tie 3 == 3), unit 3 (K=3 all tied: no pair), unit 5 (K=2).
    u = torch.tensor([7, 7, 3, 7, 7, 3, 5, 3, 5])
    s = t([3.0, 1.0, 2.0, 3.0, 0.0, 2.0, 0.5, 2.0, 0.7])
    c, r = preference_pairs(u, s, "all")
    # ascending unit id: 5 first (8 > 6), then unit 7 by (chosen pos, rejected pos); tie (0, 3) skipped
    assert list(zip(c.tolist(), r.tolist())) == [(8, 6), (0, 1), (0, 4), (1, 4), (3, 1), (3, 4)]
    c, r = preference_pairs(u, s, "best_worst")
    assert list(zip(c.tolist(), r.tolist())) == [(8, 6), (0, 4)]  # first of the tied best
    slots = torch.tensor([3, 1, 0, 0, 2, 1, 1, 2, 0])  # response 3 is slot 0 of unit 7: it wins the tie
    c, r = preference_pairs(u, s, "best_worst", slots)
    assert list(zip(c.tolist(), r.tolist())) == [(8, 6), (3, 4)]


def test_pairs_k3_distinct_and_empty():
    c, r = preference_pairs(torch.tensor([1, 1, 1]), t([0.1, 0.9, 0.5]), "all")
    assert list(zip(c.tolist(), r.tolist())) == [(1, 0), (1, 2), (2, 0)]
    c, r = preference_pairs(torch.tensor([1, 1, 1]), t([0.1, 0.9, 0.5]), "best_worst")
    assert list(zip(c.tolist(), r.tolist())) == [(1, 0)]
    e = torch.zeros(0, dtype=torch.long)
    for mode in ("all", "best_worst"):
        c, r = preference_pairs(e, t([]), mode)
        assert c.numel() == r.numel() == 0


def test_pairs_reject_bad_input():
    with pytest.raises(ValueError, match="loss.pairs"):
        preference_pairs(torch.tensor([1, 1]), t([0.0, 1.0]), "some")
    with pytest.raises(ValueError, match="finite"):
        preference_pairs(torch.tensor([1, 1]), t([0.0, float("nan")]), "all")


def test_groups_sorted_stable_and_dropped():
    u = torch.tensor([4, 4, 4, 9, 9, 1, 2, 2])
    s = t([1.0, 3.0, 1.0, 2.0, 2.0, 5.0, 0.0, 1.0])
    g = groups(u, s)
    assert g.unit_ids.tolist() == [2, 4]  # 9 all tied, 1 has K=1
    assert g.index.tolist() == [[7, 6, -1], [1, 0, 2]]
    assert g.sizes.tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------- DPO family


def dpo_logits(c, r, avg=False):
    nc, nr = (N[c], N[r]) if avg else (1, 1)
    return (PI[c] - REF[c]) / nc - (PI[r] - REF[r]) / nr


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_sigmoid_and_conservative(ls):
    beta = 0.5
    out = run(type="sigmoid", beta=beta, label_smoothing=ls)
    want = sum(
        (1 - ls) * nls(beta * dpo_logits(c, r)) + ls * nls(-beta * dpo_logits(c, r)) for c, r in ALL_PAIRS
    )
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-12)
    m = out.metrics
    assert m["chosen_rewards"].item() == pytest.approx(sum(beta * (PI[c] - REF[c]) for c, _ in ALL_PAIRS))
    assert m["rejected_rewards"].item() == pytest.approx(sum(beta * (PI[r] - REF[r]) for _, r in ALL_PAIRS))
    assert m["margins"].item() == pytest.approx(sum(beta * dpo_logits(c, r) for c, r in ALL_PAIRS))
    assert m["accuracy"].item() == sum(dpo_logits(c, r) > 0 for c, r in ALL_PAIRS)
    assert m["policy_chosen_logps"].item() == pytest.approx(sum(PI[c] for c, _ in ALL_PAIRS))
    assert m["ref_rejected_logps"].item() == pytest.approx(sum(REF[r] for _, r in ALL_PAIRS))
    assert "nll" not in m


def test_sigmoid_best_worst():
    pairs = [(0, 1), (4, 3)]
    out = run(pairs_expected=pairs, type="sigmoid", beta=0.1, pairs="best_worst")
    assert out.loss_sum.item() == pytest.approx(sum(nls(0.1 * dpo_logits(c, r)) for c, r in pairs))


def test_hinge():
    out = run(type="hinge", beta=2.0)
    want = sum(max(0.0, 1 - 2.0 * dpo_logits(c, r)) for c, r in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(want)


def test_ipo_uses_length_averaged_logps():
    beta = 0.1
    out = run(type="ipo", beta=beta)
    want = sum((dpo_logits(c, r, avg=True) - 1 / (2 * beta)) ** 2 for c, r in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(want)
    # TRL 1.x logs the plain (summed) implicit rewards for every loss type, ipo included
    assert out.metrics["chosen_rewards"].item() == pytest.approx(sum(beta * (PI[c] - REF[c]) for c, _ in ALL_PAIRS))


def test_robust():
    beta, ls = 0.3, 0.1
    out = run(type="robust", beta=beta, label_smoothing=ls)
    want = sum(
        ((1 - ls) * nls(beta * dpo_logits(c, r)) - ls * nls(-beta * dpo_logits(c, r))) / (1 - 2 * ls)
        for c, r in ALL_PAIRS
    )
    assert out.loss_sum.item() == pytest.approx(want)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "dpo_pl"])
def test_rpo_alpha_adds_chosen_token_mean_nll(loss_type):
    base = run(type=loss_type, beta=0.1)
    out = run(type=loss_type, beta=0.1, rpo_alpha=0.7)
    nll = sum(-PI[c] / N[c] for c, _ in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(base.loss_sum.item() + 0.7 * nll)
    assert out.metrics["nll"].item() == pytest.approx(nll)


# ----------------------------------------------------------------------------------------- reference-free


def test_simpo_trl_gamma():
    beta, gamma = 2.0, 0.5
    out = run(type="simpo", beta=beta, simpo_gamma=gamma)
    # TRL CPOTrainer: logits = a_c - a_r - simpo_gamma / beta; loss = -logsigmoid(beta * logits)
    want = sum(nls(beta * (PI[c] / N[c] - PI[r] / N[r]) - gamma) for c, r in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(want)
    assert out.metrics["chosen_rewards"].item() == pytest.approx(
        sum(beta * PI[c] / N[c] for c, _ in ALL_PAIRS)
    )
    out = run(type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.1, cpo_alpha=0.5)
    want = sum(
        0.9 * nls(beta * (PI[c] / N[c] - PI[r] / N[r]) - gamma)
        + 0.1 * nls(-(beta * (PI[c] / N[c] - PI[r] / N[r]) - gamma))
        + 0.5 * (-PI[c] / N[c])
        for c, r in ALL_PAIRS
    )
    assert out.loss_sum.item() == pytest.approx(want)


def test_orpo():
    beta = 0.1
    out = run(type="orpo", beta=beta)

    def log_odds(c, r):
        ac, ar = PI[c] / N[c], PI[r] / N[r]
        return (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))

    want = sum(-PI[c] / N[c] + beta * nls(log_odds(c, r)) for c, r in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-6)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(
        sum(log_odds(c, r) for c, r in ALL_PAIRS), rel=1e-6
    )
    assert out.metrics["nll"].item() == pytest.approx(sum(-PI[c] / N[c] for c, _ in ALL_PAIRS), rel=1e-6)


# ------------------------------------------------------------------------------------------ reward model


def test_bt_plain_margin_and_centering():
    out = run(type="bt")
    assert out.loss_sum.item() == pytest.approx(sum(nls(RW[c] - RW[r]) for c, r in ALL_PAIRS))
    assert out.metrics["accuracy"].item() == sum(RW[c] > RW[r] for c, r in ALL_PAIRS)
    out = run(type="bt", margin="scores", center_rewards_coefficient=0.01)
    want = sum(nls(RW[c] - RW[r] - (SCORE[c] - SCORE[r])) + 0.01 * (RW[c] + RW[r]) ** 2 for c, r in ALL_PAIRS)
    assert out.loss_sum.item() == pytest.approx(want)
    out = run(type="bt", margin=0.25)
    assert out.loss_sum.item() == pytest.approx(sum(nls(RW[c] - RW[r] - 0.25) for c, r in ALL_PAIRS))


# ----------------------------------------------------------------------------------------------- listwise


def pl_nll(vals_in_rank_order: list[float]) -> float:
    """Plackett-Luce NLL of a strict ranking, by hand."""
    total = 0.0
    for k in range(len(vals_in_rank_order) - 1):
        rest = vals_in_rank_order[k:]
        total -= vals_in_rank_order[k] - math.log(sum(math.exp(v) for v in rest))
    return total


def test_dpo_pl_hand():
    beta = 0.5
    out = run(type="dpo_pl", beta=beta)
    rw = [beta * (p - q) for p, q in zip(PI, REF)]
    want = pl_nll([rw[0], rw[2], rw[1]]) + pl_nll([rw[4], rw[3]])  # score order 0 > 2 > 1 and 4 > 3
    assert out.loss_sum.item() == pytest.approx(want)
    assert out.metrics["chosen_rewards"].item() == pytest.approx(sum(rw[c] for c, _ in ALL_PAIRS))


def test_rm_pl_tie_aware():
    # one unit, scores 2, 2, 1, 0: tied top responses never compete; the bottom response has no term
    r = [0.3, -0.4, 0.9, 0.2]
    b = LossInputs(unit_ids=torch.tensor([1, 1, 1, 1]), scores=t([2.0, 2.0, 1.0, 0.0]), rewards=t(r))
    out = compute_loss(LossConfig(type="rm_pl"), b)
    e = [math.exp(x) for x in r]
    want = (
        -(r[0] - math.log(e[0] + e[2] + e[3]))
        - (r[1] - math.log(e[1] + e[2] + e[3]))
        - (r[2] - math.log(e[2] + e[3]))
    )
    assert out.loss_sum.item() == pytest.approx(want)
    assert out.count == 5  # implied strict pairs: (0,2) (0,3) (1,2) (1,3) (2,3)
    # order of the tied responses does not matter
    b2 = LossInputs(
        unit_ids=torch.tensor([1, 1, 1, 1]), scores=t([2.0, 2.0, 1.0, 0.0]), rewards=t([r[1], r[0], *r[2:]])
    )
    assert compute_loss(LossConfig(type="rm_pl"), b2).loss_sum.item() == pytest.approx(want)


@pytest.mark.parametrize("pl_type,pair_type", [("dpo_pl", "sigmoid"), ("rm_pl", "bt")])
def test_k2_listwise_equals_pairwise(pl_type, pair_type):
    g = torch.Generator().manual_seed(0)
    r = 12
    b = LossInputs(
        unit_ids=torch.arange(r) // 2,
        scores=torch.randint(0, 3, (r,), generator=g).to(D),  # some units tied: dropped by both
        policy_logps=-10 * torch.rand(r, generator=g, dtype=D),
        ref_logps=-10 * torch.rand(r, generator=g, dtype=D),
        token_counts=torch.randint(1, 9, (r,), generator=g),
        rewards=torch.randn(r, generator=g, dtype=D),
    )
    a = compute_loss(LossConfig(type=pl_type, beta=0.3), b)
    p = compute_loss(LossConfig(type=pair_type, beta=0.3), b)
    assert a.count == p.count > 0
    assert a.loss_sum.item() == pytest.approx(p.loss_sum.item(), rel=1e-12)
    for k in p.metrics:
        assert a.metrics[k].item() == pytest.approx(p.metrics[k].item(), rel=1e-12), k


# ----------------------------------------------------------------------------------- gradients, contract


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_finite(loss_type, dtype):
    pi = t([-1e-9, -900.0, -5.0, -0.0, -300.0], dtype).requires_grad_(True)  # extreme, incl. p == 1
    rw = t([50.0, -60.0, 0.1, 0.0, 80.0], dtype).requires_grad_(True)
    b = LossInputs(
        unit_ids=torch.tensor(UNIT), scores=t(SCORE), policy_logps=pi, ref_logps=t(REF, dtype),
        token_counts=torch.tensor(N), rewards=rw,
    )  # fmt: skip
    out = compute_loss(cfg_for(loss_type), b)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum)
    grad = rw.grad if loss_type in ("bt", "rm_pl") else pi.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_no_pairs_keeps_graph(loss_type):
    pi = t([-1.0, -2.0]).requires_grad_(True)
    rw = t([0.5, 0.1]).requires_grad_(True)
    b = LossInputs(unit_ids=torch.tensor([1, 1]), scores=t([1.0, 1.0]), policy_logps=pi, ref_logps=t([-1.0, -1.0]),
                   token_counts=torch.tensor([1, 1]), rewards=rw)  # fmt: skip
    out = compute_loss(cfg_for(loss_type), b)
    assert out.count == 0 and out.loss_sum.item() == 0.0
    out.loss_sum.backward()  # attached to the graph: DDP-safe on a micro-batch with no pairs


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("pairs", ["all", "best_worst"])
def test_normalisation_invariant_to_micro_batching(loss_type, pairs):
    if pairs == "best_worst" and loss_type in ("dpo_pl", "rm_pl"):
        pytest.skip("listwise types always use every pair")
    g = torch.Generator().manual_seed(1)
    units = torch.tensor([3, 3, 3, 3, 8, 8, 1, 1, 1, 5, 5, 5])
    r = units.numel()
    full = {
        "unit_ids": units,
        "scores": torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.2, 1.0, 3.0, 2.0], dtype=D),
        "policy_logps": -(5 * torch.rand(r, generator=g, dtype=D) + 0.1),
        "ref_logps": -5 * torch.rand(r, generator=g, dtype=D),
        "token_counts": torch.randint(1, 7, (r,), generator=g),
        "rewards": torch.randn(r, generator=g, dtype=D),
        "slots": torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]),
    }
    cfg = cfg_for(loss_type, pairs=pairs)
    one = compute_loss(cfg, LossInputs(**full))
    assert one.count == count_pairs(cfg, full["unit_ids"], full["scores"])
    # two micro-batches by unit (units 3 and 5 | units 8 and 1), responses shuffled inside each (the tied
    # best of unit 3 and tied best of unit 1 change input order: best_worst follows slots, not positions)
    parts = [torch.tensor([10, 2, 9, 1, 0, 3, 11]), torch.tensor([7, 4, 6, 5, 8])]
    batches = [LossInputs(**{k: v[idx] for k, v in full.items()}) for idx in parts]
    if needs_plan(cfg):  # batch-level types (aot, aot_unpaired, sft): the global batch's plan, as the step makes it
        stats = [pair_stats(cfg, b) for b in batches]
        plans = make_plans(cfg, torch.cat(stats), [s.shape[0] for s in stats])
        for b, plan in zip(batches, plans):
            b.plan = plan
    outs = [compute_loss(cfg, b) for b in batches]
    total = sum(o.count for o in outs)
    assert total == one.count > 0
    got = sum(o.loss_sum for o in outs) / total
    assert got.item() == pytest.approx((one.loss_sum / one.count).item(), rel=1e-12)
    for k in one.metrics:
        assert sum(o.metrics[k] for o in outs).item() == pytest.approx(
            one.metrics[k].item(), rel=1e-12, abs=1e-12
        )


def test_missing_inputs_named():
    b = LossInputs(unit_ids=torch.tensor([1, 1]), scores=t([1.0, 0.0]), policy_logps=t([-1.0, -2.0]))
    with pytest.raises(ValueError, match="ref_logps"):
        compute_loss(LossConfig(type="sigmoid"), b)
    with pytest.raises(ValueError, match="rewards"):
        compute_loss(LossConfig(type="bt"), b)
    with pytest.raises(ValueError, match="token_counts"):
        compute_loss(LossConfig(type="simpo"), b)
    with pytest.raises(ValueError, match="policy_logps"):
        compute_loss(
            LossConfig(type="orpo"), LossInputs(unit_ids=b.unit_ids, scores=b.scores, policy_logps=t([1.0]))
        )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"type": "dpo"}, "loss.type"),
        ({"beta": 0.0}, "loss.beta"),
        ({"beta": "0.1"}, "loss.beta"),
        ({"label_smoothing": 0.5}, "loss.label_smoothing"),
        ({"type": "robust", "label_smoothing": -0.1}, "loss.label_smoothing"),
        ({"type": "hinge", "label_smoothing": 0.1}, "loss.label_smoothing"),
        ({"rpo_alpha": -1.0}, "loss.rpo_alpha"),
        ({"type": "simpo", "rpo_alpha": 1.0}, "loss.rpo_alpha"),
        ({"type": "simpo", "simpo_gamma": None}, "loss.simpo_gamma"),
        ({"type": "sigmoid", "cpo_alpha": 1.0}, "loss.cpo_alpha"),
        ({"type": "bt", "margin": "score"}, "loss.margin"),
        ({"type": "sigmoid", "margin": 1.0}, "loss.margin"),
        ({"type": "bt", "center_rewards_coefficient": -0.01}, "loss.center_rewards_coefficient"),
        ({"type": "sigmoid", "center_rewards_coefficient": 0.01}, "loss.center_rewards_coefficient"),
        ({"pairs": "best"}, "loss.pairs"),
        ({"type": "dpo_pl", "pairs": "best_worst"}, "loss.pairs"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LossConfig(**kwargs).validate()


def test_config_from_yaml_dict():
    cfg = from_dict(
        LossConfig, {"type": "bt", "margin": "scores", "center_rewards_coefficient": 0.01}, "loss"
    )
    cfg.validate()
    for name in LOSSES:
        if name != "exo_pair":  # EXO needs label_smoothing > 0 (as TRL)
            LossConfig(type=name).validate()  # defaults are valid for every other type
    with pytest.raises(ValueError, match="loss.gamma"):
        from_dict(LossConfig, {"gamma": 1.0}, "loss")
