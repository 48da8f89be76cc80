"""TRL 1.x ``DPOTrainer`` loss types, f-divergences, WPO weights and LD-DPO, as small pure functions.

Source: huggingface/trl ``trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss`` at commit ``f2cd577``
(``1.10.0.dev0``, 2026-07-24; the newest TRL we could read). The formulas did not change between 1.0 and
that commit; ``docs/losses.md`` lists each with its TRL name. Every function here works per preference
pair ([P] tensors in, [P] out); reductions happen in ``losses/registry.py``.

Notation (TRL's): ``clr = pi_c - ref_c`` and ``rlr = pi_r - ref_r`` are the chosen / rejected log-ratios
(summed log-probs; LD-DPO-weighted when ``ld_alpha`` is set), ``cs`` / ``rs`` their f-divergence scores
(``f_scores``; = ``clr`` / ``rlr`` for ``reverse_kl``) and ``delta = cs - rs``. ``n_c`` / ``n_r`` are the
response lengths. ``pi_c`` / ``pi_r`` are the policy's (LD-weighted) summed log-probs.

Batch-level types (``aot``, ``aot_unpaired``) sort over the batch. They are written here through a *plan*
(``aot_plan``, ``aot_unpaired_plan``): for each pair, the sorted value it is matched with. Given the plan
the loss is a per-pair function, so a micro-batch computes its share of the global-batch loss once the plan
of the global batch is known (``training/step.py`` builds it from a forward-only pre-pass).

Pure torch (no megatron, no torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_prefix.losses.config import F_DIVERGENCES


@dataclass
class PairTerms:
    """Per-pair inputs of a TRL loss type (all [P]); see the module docstring for the names."""

    clr: torch.Tensor
    rlr: torch.Tensor
    cs: torch.Tensor
    rs: torch.Tensor
    n_c: torch.Tensor
    n_r: torch.Tensor
    pi_c: torch.Tensor
    pi_r: torch.Tensor
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    # aot / aot_unpaired plans (filled by the registry): the sorted values each pair is matched with
    aot_ref: torch.Tensor | None = None
    unpaired_r: torch.Tensor | None = None
    unpaired_c: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.cs - self.rs


@dataclass(frozen=True)
class TrlParams:
    """The scalar options TRL's loss types read (``DPOConfig`` names)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05


def f_scores(logratio: torch.Tensor, f_divergence: str = "reverse_kl", alpha: float = 1.0) -> torch.Tensor:
    """TRL's f-divergence score of a log-ratio (``f_divergence_type``, ``f_alpha_divergence_coef``)."""
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return -torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(t.dtype, 80.0)
        return torch.exp(torch.clamp(t.float(), max=clamp_max)).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"loss.f_divergence: must be one of {F_DIVERGENCES}, got {f_divergence!r}")


def _avg(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return x / n.to(x.dtype).clamp(min=1.0)


def _smoothed(delta: torch.Tensor, p: TrlParams) -> torch.Tensor:
    ls = p.label_smoothing
    if ls == 0:  # not ``... - logsigmoid(-x) * 0``: that is NaN at x = inf (forward_kl overflows)
        return -F.logsigmoid(p.beta * delta)
    return -F.logsigmoid(p.beta * delta) * (1 - ls) - F.logsigmoid(-p.beta * delta) * ls


def sigmoid(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """``-logsigmoid(beta delta)``; ``label_smoothing`` > 0 gives conservative DPO (TRL < 1.0's cDPO)."""
    return _smoothed(t.delta, p)


def hinge(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """``relu(1 - beta delta)``."""
    return torch.relu(1 - p.beta * t.delta)


def ipo(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """``(cs/n_c - rs/n_r - 1/(2 beta))^2`` (length-averaged scores, as TRL)."""
    return (_avg(t.cs, t.n_c) - _avg(t.rs, t.n_r) - 1 / (2 * p.beta)) ** 2


def exo_pair(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """EXO (K = 2): ``KL(softmax(beta [cs, rs]) || [1 - eps, eps])``, ``eps = label_smoothing`` > 0."""
    x = p.beta * t.delta
    eps = torch.tensor(p.label_smoothing, dtype=x.dtype, device=x.device)
    return torch.sigmoid(x) * (F.logsigmoid(x) - torch.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - torch.log(eps)
    )


def nca_pair(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """NCA: ``-logsigmoid(beta cs) - logsigmoid(-beta cs)/2 - logsigmoid(-beta rs)/2``."""
    c, r = p.beta * t.cs, p.beta * t.rs
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def robust(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """Robust DPO: ``(-(1-ls) logsigmoid(beta delta) + ls logsigmoid(-beta delta)) / (1 - 2 ls)``."""
    ls, x = p.label_smoothing, p.beta * t.delta
    clean = -(1 - ls) * F.logsigmoid(x)
    flipped = -ls * F.logsigmoid(-x)
    return (clean - flipped) / (1 - 2 * ls)


def bco_pair(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """BCO (pairwise): ``-logsigmoid(beta cs) - logsigmoid(-beta rs)`` (TRL 1.x: no running-mean delta)."""
    return -F.logsigmoid(p.beta * t.cs) - F.logsigmoid(-p.beta * t.rs)


def sppo_hard(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """SPPO (hard labels): ``(cs - 1/(2 beta))^2 + (rs + 1/(2 beta))^2``."""
    return (t.cs - 0.5 / p.beta) ** 2 + (t.rs + 0.5 / p.beta) ** 2


def aot(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """AOT (paired): smoothed sigmoid of ``sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i`` via the plan."""
    assert t.aot_ref is not None, "aot needs its plan (aot_plan)"
    return _smoothed((t.pi_c - t.pi_r) - t.aot_ref, p)


def aot_unpaired(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """AOT (unpaired): smoothed sigmoid of ``sort(clr)_i - sort(rlr)_i``.

    Term i involves the chosen side of one pair and the rejected side of another. Pair ``q`` carries the
    term of its chosen rank (``clr_q - unpaired_r_q``, the rejected value held fixed) plus, for the term
    of its rejected rank, a zero-valued part that carries the rejected side's gradient
    (``g(c̄ - rlr_q) - g(c̄ - rlr_q).detach()``). The values ``unpaired_*`` come from the same policy
    (a pre-pass or the detached current values), so the sum equals TRL's value and gradient.
    """
    assert t.unpaired_r is not None and t.unpaired_c is not None, "aot_unpaired needs its plan"
    own = _smoothed(t.clr - t.unpaired_r, p)
    other = _smoothed(t.unpaired_c - t.rlr, p)
    return own + (other - other.detach())


def apo_zero(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """APO-zero: ``1 - sigmoid(beta clr) + sigmoid(beta rlr)``."""
    return (1 - torch.sigmoid(p.beta * t.clr)) + torch.sigmoid(p.beta * t.rlr)


def apo_down(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """APO-down: ``sigmoid(beta clr) + 1 - sigmoid(beta delta)``."""
    return torch.sigmoid(p.beta * t.clr) + (1 - torch.sigmoid(p.beta * t.delta))


def discopop(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """DiscoPOP: ``-logsigmoid(x) (1 - m) + exp(-x) m``, ``x = beta delta``, ``m = sigmoid(x / tau)``.

    ``exp(-x)`` is taken of ``max(x, -88)``: TRL's ``exp(-x)`` overflows to inf below -88.7 (fp32) and
    ``inf * m`` is NaN when ``m`` underflows to 0; elsewhere the two agree.
    """
    x = p.beta * t.delta
    m = torch.sigmoid(x / p.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x.clamp(min=-88.0)) * m


def sigmoid_norm(t: PairTerms, p: TrlParams) -> torch.Tensor:
    """Length-normalised sigmoid: ``-logsigmoid(beta (cs/n_c - rs/n_r))``."""
    return -F.logsigmoid(p.beta * (_avg(t.cs, t.n_c) - _avg(t.rs, t.n_r)))


PairLoss = Callable[[PairTerms, TrlParams], torch.Tensor]
PAIR_LOSSES: dict[str, PairLoss] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot,
    "aot_unpaired": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
}  # fmt: skip
# ``sft`` is not a per-pair function: TRL takes the token mean of the chosen NLL over the batch (registry).


def sft_scale(num_pairs: float, chosen_tokens: float) -> float:
    """TRL ``sft`` = ``sum NLL(chosen tokens) / chosen_tokens``, counted per pair; as a pair-mean loss
    each pair carries ``scale * (-pi_c)`` with ``scale = num_pairs / chosen_tokens``."""
    return num_pairs / max(chosen_tokens, 1.0)


def aot_plan(policy_margin: torch.Tensor, ref_margin: torch.Tensor) -> torch.Tensor:
    """For each pair of a batch, the reference margin ``ref_c - ref_r`` of the same *rank* in the sorted
    reference margins as the pair's policy margin ``pi_c - pi_r`` has among the policy margins [P]."""
    order = torch.sort(policy_margin, stable=True).indices
    matched = torch.empty_like(ref_margin)
    matched[order] = torch.sort(ref_margin).values
    return matched


def aot_unpaired_plan(clr: torch.Tensor, rlr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unpaired_r, unpaired_c)`` [P]: the sorted rejected log-ratio at each pair's chosen rank, and the
    sorted chosen log-ratio at each pair's rejected rank."""
    c_order = torch.sort(clr, stable=True).indices
    r_order = torch.sort(rlr, stable=True).indices
    unpaired_r = torch.empty_like(rlr)
    unpaired_r[c_order] = rlr[r_order]
    unpaired_c = torch.empty_like(clr)
    unpaired_c[r_order] = clr[c_order]
    return unpaired_r, unpaired_c


def wpo_log_weight(token_logps: torch.Tensor, log_denom: torch.Tensor, token_resp: torch.Tensor,
                   num_responses: int) -> torch.Tensor:
    """Per-response SUM [R] of WPO's aligned token log-probs ``logp_t - (lse(2x_t) - 2 lse(x_t))``.

    Divided by the response length and exponentiated it is TRL's WPO weight of the response; the pair
    weight is ``w_c * w_r``. Detached (TRL computes it under ``no_grad``)."""
    aligned = (token_logps - log_denom).detach()
    return torch.zeros(num_responses, dtype=aligned.dtype, device=aligned.device).index_add(0, token_resp, aligned)


def ld_tails(token_logps: torch.Tensor, token_resp: torch.Tensor, token_pos: torch.Tensor,
             chosen: torch.Tensor, rejected: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO tails ``(tail_c, tail_r)`` [P]: the summed log-probs of the tokens of each pair's responses at
    response positions ``>= min(n_c, n_r)`` (the part past the shared, "public" length). Sums over the
    tokens given (a CP rank's share; the caller completes them across CP)."""
    shared = torch.minimum(lengths[chosen], lengths[rejected]).long()
    width = int(token_pos.max()) + 2 if token_pos.numel() else 1
    # dense [R, width] by (response, position), then suffix sums: suffix[i, L] = sum over positions >= L
    dense = token_logps.new_zeros(int(lengths.numel()), width).index_put(
        (token_resp.long(), token_pos.long()), token_logps, accumulate=True
    )
    suffix = dense.flip(1).cumsum(1).flip(1)
    shared = shared.clamp(max=width - 1)  # at or past the last held position: an empty tail
    tail_c = suffix[chosen, shared]
    tail_r = suffix[rejected, shared]
    return tail_c, tail_r


def ld_weighted(logp_c: torch.Tensor, logp_r: torch.Tensor, tails: tuple[torch.Tensor, torch.Tensor] | None,
                ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO log-probs ``shared + ld_alpha * tail = total - (1 - ld_alpha) * tail`` (unchanged without
    ``ld_alpha`` or tails)."""
    if ld_alpha is None or tails is None:
        return logp_c, logp_r
    keep = 1.0 - ld_alpha
    return logp_c - keep * tails[0], logp_r - keep * tails[1]
