"""TRL 1.x parity: every DPOTrainer loss type and option against TRL's formulas, written out here.

``trl_dpo_loss`` below is a transcription of ``DPOTrainer._compute_loss`` (huggingface/trl
``trl/trainer/dpo_trainer.py`` at f2cd577, 1.10.0.dev0; the newest TRL available to this project, see
``docs/losses.md``) on TRL's own layout: padded per-token log-probs [2P, T], chosen rows first, a
completion mask, the per-token WPO denominators. It imports nothing from ``megatron_prefix``. The project's
side gets per-response sums (plus the per-pair LD tails and per-response WPO sums, from the project's
helpers) on K = 2 units, as the trainer does. fp32, rtol 1e-6 on the loss and every logged metric; the
gradients w.r.t. the policy's token log-probs are compared too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_prefix.losses import LossConfig, LossInputs, compute_loss, trl

P, T = 24, 40  # pairs, max completion length


# ------------------------------------------------------------------------------- TRL, transcribed


def trl_dpo_loss(tok, ref_tok, mask, log_denom, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                 use_weighting=False, ld_alpha=None):  # fmt: skip
    """TRL's loss and logged metrics; ``tok`` / ``ref_tok`` [2P, T] per-token log-probs (chosen rows
    first), ``mask`` [2P, T] completion mask, ``log_denom`` [2P, T] = lse(2 logits) - 2 lse(logits)."""
    loss_types = loss_type if isinstance(loss_type, list) else [loss_type]
    loss_weights = loss_weights or [1.0] * len(loss_types)
    per_token_logps = tok * mask
    ref_per_token_logps = ref_tok * mask
    if ld_alpha is None:
        logps = per_token_logps.sum(dim=1)
        ref_logps = ref_per_token_logps.sum(dim=1)
    else:
        comp_pos = mask.cumsum(dim=1)
        comp_lens = mask.sum(dim=1).long()
        chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
        shared_lens = torch.minimum(chosen_lens, rejected_lens)
        shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
        tail_mask = comp_pos > shared_lens.unsqueeze(1)
        logps = (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)
        ref_logps = (ref_per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (
            ref_per_token_logps * tail_mask
        ).sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores, rejected_scores = -torch.exp(-chosen_logratios), -torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores, rejected_scores = F.logsigmoid(chosen_logratios), F.logsigmoid(rejected_logratios)
    else:  # alpha_divergence
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
        else:
            coef = 1.0 / (f_alpha_divergence_coef - 1.0)
            t_chosen = (f_alpha_divergence_coef - 1.0) * chosen_logratios
            t_rejected = (f_alpha_divergence_coef - 1.0) * rejected_logratios
            chosen_scores = torch.exp(torch.clamp(t_chosen.float(), max=80.0)) * coef
            rejected_scores = torch.exp(torch.clamp(t_rejected.float(), max=80.0)) * coef
    delta_score = chosen_scores - rejected_scores
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    loss = 0.0
    for lt, weight in zip(loss_types, loss_weights, strict=True):
        if lt == "sigmoid":
            per = -F.logsigmoid(beta * delta_score)
        elif lt == "hinge":
            per = torch.relu(1 - beta * delta_score)
        elif lt == "ipo":
            ipo_delta = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0) - rejected_scores / rejected_mask.sum(
                dim=1).clamp(min=1.0)  # fmt: skip
            per = (ipo_delta - 1 / (2 * beta)) ** 2
        elif lt == "exo_pair":
            epsilon = torch.tensor(label_smoothing)
            qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
            ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
            per = qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
        elif lt == "nca_pair":
            cr, rr = beta * chosen_scores, beta * rejected_scores
            per = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif lt == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
            per = (clean - flipped) / (1 - 2 * label_smoothing)
        elif lt == "bco_pair":
            per = -F.logsigmoid(beta * chosen_scores) - F.logsigmoid(-beta * rejected_scores)
        elif lt == "sppo_hard":
            per = (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
        elif lt == "aot":
            delta = torch.sort(chosen_logps - rejected_logps, dim=0)[0] - torch.sort(
                ref_chosen_logps - ref_rejected_logps, dim=0)[0]  # fmt: skip
            per = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
        elif lt == "aot_unpaired":
            delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
            per = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
        elif lt == "apo_zero":
            per = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif lt == "apo_down":
            per = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * delta_score))
        elif lt == "discopop":
            logits = delta_score * beta
            modulation = torch.sigmoid(logits / discopop_tau)
            per = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif lt == "sft":
            chosen_tok, _ = tok.chunk(2, dim=0)
            per = (-chosen_tok[chosen_mask.bool()]).mean().expand(chosen_tok.size(0))  # F.cross_entropy
        elif lt == "sigmoid_norm":
            d = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0) - rejected_scores / rejected_mask.sum(
                dim=1).clamp(min=1.0)  # fmt: skip
            per = -F.logsigmoid(beta * d)
        else:
            raise AssertionError(lt)
        if use_weighting:
            lengths = mask.sum(dim=1).clamp_min(1)
            with torch.no_grad():
                aligned = (tok - log_denom) * mask
            weights = torch.exp(aligned.sum(dim=1) / lengths)
            cw, rw = weights.chunk(2, dim=0)
            per = per * (cw * rw)
        loss = loss + per.mean() * weight
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    metrics = {
        "chosen_rewards": chosen_rewards.mean(), "rejected_rewards": rejected_rewards.mean(),
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margins": (chosen_rewards - rejected_rewards).mean(),
        "policy_chosen_logps": chosen_logps.detach().mean(), "policy_rejected_logps": rejected_logps.detach().mean(),
    }  # fmt: skip
    return loss, metrics


# ------------------------------------------------------------------------------- data, project side


def make_data(kind: str, seed: int = 0):
    """Per-token log-probs [2P, T] (chosen rows first), completion mask, WPO denominators.

    ``moderate``: log-ratios of a few units. ``extreme``: per-token log-probs down to -80 and near 0,
    lengths 1..T, some pairs of equal length, log-ratios in the hundreds.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * P,), generator=g)
    lengths[P:P + 4] = lengths[:4]  # equal-length pairs: no LD tail
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if kind == "moderate":
        tok = -torch.rand(2 * P, T, generator=g) * 0.6
        ref_tok = tok + 0.05 * torch.randn(2 * P, T, generator=g)
    else:
        tok = -torch.exp(torch.randn(2 * P, T, generator=g) * 2.5).clamp(max=80.0)
        tok[0, :] = -1e-7  # a response of probability ~1
        ref_tok = -torch.exp(torch.randn(2 * P, T, generator=g) * 2.5).clamp(max=80.0)
    log_denom = -torch.rand(2 * P, T, generator=g) * 3.0  # lse(2x) - 2 lse(x) <= 0
    return tok, ref_tok.clamp(max=0.0), mask, log_denom


def project_loss(cfg: LossConfig, tok, ref_tok, mask, log_denom):
    """The project's loss on K = 2 units: responses 2i (chosen) and 2i+1 (rejected)."""
    order = torch.stack([torch.arange(P), torch.arange(P) + P], dim=1).reshape(-1)  # c0 r0 c1 r1 ...
    tok_m, ref_m, msk, den = tok[order] * mask[order], ref_tok[order] * mask[order], mask[order], log_denom[order]
    lengths = msk.sum(1).long()
    flat = msk.bool()
    token_resp = torch.arange(2 * P)[:, None].expand(-1, T)[flat]
    token_pos = torch.arange(T)[None, :].expand(2 * P, -1)[flat]
    c, r = torch.arange(0, 2 * P, 2), torch.arange(1, 2 * P, 2)
    b = LossInputs(
        unit_ids=torch.arange(2 * P) // 2, scores=torch.tensor([1.0, 0.0] * P),
        policy_logps=tok_m.sum(1), ref_logps=ref_m.sum(1), token_counts=lengths,
    )  # fmt: skip
    if cfg.use_weighting:
        b.wpo_logw = trl.wpo_log_weight(tok_m[flat], den[flat], token_resp, 2 * P)
    if cfg.ld_alpha is not None:
        b.ld_tails = trl.ld_tails(tok_m[flat], token_resp, token_pos, c, r, lengths)
        b.ref_ld_tails = trl.ld_tails(ref_m[flat], token_resp, token_pos, c, r, lengths)
    out = compute_loss(cfg, b)
    assert out.count == P
    return out.loss_sum / out.count, {k: v / out.count for k, v in out.metrics.items()}


# ------------------------------------------------------------------------------- the table

ROWS = [
    *[{"loss_type": t} for t in trl.PAIR_LOSSES if t not in ("exo_pair", "robust")],
    {"loss_type": "sft"},
    {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    {"loss_type": "exo_pair", "label_smoothing": 0.2, "beta": 0.5},
    {"loss_type": "robust", "label_smoothing": 0.1},
    {"loss_type": "aot", "label_smoothing": 0.1},
    {"loss_type": "aot_unpaired", "label_smoothing": 0.25},
    {"loss_type": "discopop", "discopop_tau": 0.5, "beta": 0.05},
    {"loss_type": "hinge", "beta": 2.0},
    *[{"loss_type": "sigmoid", "f_divergence_type": f} for f in ("forward_kl", "js_divergence")],
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence"},
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": "bco_pair", "f_divergence_type": "js_divergence"},
    {"loss_type": "ipo", "f_divergence_type": "forward_kl"},
    {"loss_type": "sppo_hard", "f_divergence_type": "alpha_divergence"},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"loss_type": ["aot", "aot_unpaired", "apo_down"], "loss_weights": [0.3, 0.3, 0.4]},
    {"loss_type": "sigmoid", "use_weighting": True},
    {"loss_type": ["ipo", "nca_pair"], "use_weighting": True},
    {"loss_type": "sigmoid", "ld_alpha": 0.5},
    {"loss_type": "sigmoid_norm", "ld_alpha": 0.0},
    {"loss_type": ["aot", "sft"], "ld_alpha": 0.3},
    {"loss_type": ["apo_zero", "sigmoid"], "ld_alpha": 0.7, "use_weighting": True,
     "f_divergence_type": "js_divergence"},
]  # fmt: skip

TRL_TO_OURS = {"loss_type": "type", "loss_weights": "weights", "f_divergence_type": "f_divergence"}


def _id(row: dict) -> str:
    return "-".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in row.items()).replace(" ", "")


@pytest.mark.parametrize("kind", ["moderate", "extreme"])
@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_loss_and_metrics_match_trl(row, kind):
    tok, ref_tok, mask, log_denom = make_data(kind, seed=len(_id(row)))
    cfg = LossConfig(**{TRL_TO_OURS.get(k, k): v for k, v in row.items()})
    cfg.validate()
    tok_a = tok.clone().requires_grad_(True)
    want, want_m = trl_dpo_loss(tok_a, ref_tok, mask, log_denom, **row)
    tok_b = tok.clone().requires_grad_(True)
    got, got_m = project_loss(cfg, tok_b, ref_tok, mask, log_denom)
    assert got.dtype == torch.float32
    discopop_overflow = "discopop" in cfg.types and not torch.isfinite(want)
    if discopop_overflow:  # TRL's exp(-x) * sigmoid(x / tau) is inf * 0 = NaN there; ours stays finite
        assert kind == "extreme" and torch.isfinite(got)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0, equal_nan=True)
    for key, value in want_m.items():
        torch.testing.assert_close(got_m[key], value, rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    if torch.isfinite(want):
        want.backward()
        got.backward()
        torch.testing.assert_close(tok_b.grad * mask, tok_a.grad * mask, rtol=1e-5, atol=1e-7)


def test_discopop_finite_where_trl_overflows():
    cfg = LossConfig(type="discopop")
    b = LossInputs(unit_ids=torch.tensor([0, 0]), scores=torch.tensor([1.0, 0.0]),
                   policy_logps=torch.tensor([-2000.0, -1.0], requires_grad=True), ref_logps=torch.tensor([-1.0, -1.0]))
    out = compute_loss(cfg, b)
    out.loss_sum.backward()
    # x = beta * delta = -199.9: sigmoid(x / tau) == 0, so the loss is -logsigmoid(x) = 199.9
    assert out.loss_sum.item() == pytest.approx(199.9, rel=1e-6)
    assert torch.isfinite(b.policy_logps.grad).all()


def test_per_pair_functions_match_trl_per_sequence():
    """Per pair (not only the mean): each per-pair type against the TRL transcription, pair by pair."""
    tok, ref_tok, mask, log_denom = make_data("moderate", seed=3)
    for name in trl.PAIR_LOSSES:
        if name in ("aot", "aot_unpaired"):
            continue  # batch-level; their per-pair values are by rank, compared through the mean above
        row = {"loss_type": name, "label_smoothing": 1e-2 if name in ("exo_pair", "robust") else 0.0}
        per = []
        for i in range(P):  # a batch of one pair is TRL's per-sequence loss of that pair
            rows = torch.tensor([i, P + i])
            want, _ = trl_dpo_loss(tok[rows], ref_tok[rows], mask[rows], log_denom[rows], **row)
            per.append(want)
        want = torch.stack(per)
        lp, rp = (tok * mask).sum(1), (ref_tok * mask).sum(1)
        n = mask.sum(1)
        clr, rlr = lp[:P] - rp[:P], lp[P:] - rp[P:]
        terms = trl.PairTerms(clr=clr, rlr=rlr, cs=clr, rs=rlr, n_c=n[:P], n_r=n[P:], pi_c=lp[:P], pi_r=lp[P:],
                              ref_c=rp[:P], ref_r=rp[P:])  # fmt: skip
        got = trl.PAIR_LOSSES[name](terms, trl.TrlParams(beta=0.1, label_smoothing=row["label_smoothing"]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0, msg=lambda m, k=name: f"{k}: {m}")
