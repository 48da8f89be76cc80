"""The loss plumbing around the TRL options: WPO's per-token statistic from the vocab-parallel pass,
LD-DPO's token positions under CP, the loss config's list form and the cross-section rules.

TP = 2 for the WPO statistic runs through ``tests/dist_scripts/wpo_tp.py`` (gloo, 2 processes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prefix.config import apply_overrides, from_dict
from megatron_prefix.data.row import pack_row
from megatron_prefix.data.unit import Unit
from megatron_prefix.losses import LossConfig, trl
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.model.logprobs import response_logprobs, token_logprobs_and_wpo
from megatron_prefix.training.config import TrainConfig
from megatron_prefix.training.step import token_positions
from tests.dist import run_torchrun


def wpo_denominator_full(logits: torch.Tensor) -> torch.Tensor:
    """Direct full-vocabulary computation: ``logsumexp(2 x) - 2 logsumexp(x)`` (TRL's ``log_denom``)."""
    x = logits.double()
    return torch.logsumexp(2.0 * x, dim=-1) - 2.0 * torch.logsumexp(x, dim=-1)


def test_wpo_denominator_matches_full_vocabulary_tp1():
    torch.manual_seed(0)
    s, b, v = 6, 2, 37
    logits = torch.randn(s, b, v) * 6
    logits[2, 1, 5] = 80.0  # one dominant token: denominator near 0
    logits[3, 0] = -30.0  # flat row: denominator -log V
    pred_s, pred_b = torch.tensor([0, 2, 3, 5, 2]), torch.tensor([1, 1, 0, 0, 1])
    targets = torch.tensor([3, 5, 0, 36, 7])
    lp, denom = token_logprobs_and_wpo(logits, pred_s, pred_b, targets, chunk_elems=2 * v)
    want = wpo_denominator_full(logits[pred_s, pred_b])
    torch.testing.assert_close(denom.double(), want, rtol=0, atol=2e-6)
    assert abs(float(denom[2]) + np.log(v)) < 1e-5
    want_lp = torch.log_softmax(logits.double(), -1)[pred_s, pred_b].gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-6)
    # the WPO weight of a response (TRL: exp(mean(logp - denom))) from the per-response sum
    logw = trl.wpo_log_weight(lp, denom, torch.tensor([0, 0, 1, 1, 1]), 2)
    want_w = torch.stack([(want_lp[:2] - want[:2]).mean(), (want_lp[2:] - want[2:]).mean()]).exp()
    torch.testing.assert_close((logw.double() / torch.tensor([2.0, 3.0])).exp(), want_w, rtol=1e-5, atol=0)


def test_wpo_denominator_has_no_gradient_and_logps_keep_theirs():
    logits = torch.randn(4, 1, 9, requires_grad=True)
    lp, denom = token_logprobs_and_wpo(logits, torch.tensor([0, 3]), torch.tensor([0, 0]), torch.tensor([1, 8]))
    assert not denom.requires_grad and lp.requires_grad
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.dist
def test_wpo_denominator_tp2_matches_full_vocabulary():
    out = run_torchrun("tests/dist_scripts/wpo_tp.py", nproc=2, timeout=300)
    assert "WPO_TP_OK" in out


def _rows(cp_pack: int = 64):
    rng = np.random.default_rng(3)
    units = [
        Unit(rng.integers(1, 50, rng.integers(2, 6)), [rng.integers(1, 50, rng.integers(1, 9)) for _ in range(k)],
             np.arange(k, dtype=np.float64), unit_id=i)
        for i, k in enumerate((2, 4, 3))
    ]  # fmt: skip
    return [pack_row(units, cp_pack, 0)], units


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_token_positions_are_positions_inside_each_response(cp):
    """Every (response, position) pair appears exactly once over the CP ranks, 0..n-1 per response."""
    rows, units = _rows()
    full = MicroBatch.from_rows(rows)
    lengths = full.index.resp_lengths.tolist()
    seen = []
    for rank in range(cp):
        mb = MicroBatch.from_rows(rows, cp_size=cp, cp_rank=rank)
        pos = token_positions(mb)
        seen += list(zip(mb.index.resp_ids.tolist(), pos.tolist(), mb.index.targets.tolist()))
    assert sorted((r, p) for r, p, _ in seen) == sorted((r, p) for r, n in enumerate(lengths) for p in range(n))
    # the target at position p is the response's p-th token
    responses = [resp for u in units for resp in u.response_ids]
    for r, p, target in seen:
        assert int(responses[r][p]) == target


def test_ld_tails_from_token_positions_equal_the_split_by_hand():
    rows, _ = _rows()
    mb = MicroBatch.from_rows(rows)
    torch.manual_seed(1)
    logits = torch.randn(64, 1, 50)
    lp = response_logprobs(logits, mb.index)
    c, r = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5])
    tail_c, tail_r = trl.ld_tails(lp.token_logps, lp.token_resp, token_positions(mb), c, r, lp.num_tokens)
    per = [lp.token_logps[lp.token_resp == i] for i in range(mb.num_responses)]  # in position order (CP 1)
    for k, (i, j) in enumerate(zip(c.tolist(), r.tolist())):
        shared = min(len(per[i]), len(per[j]))
        assert float(tail_c[k]) == pytest.approx(float(per[i][shared:].sum()), abs=1e-6)
        assert float(tail_r[k]) == pytest.approx(float(per[j][shared:].sum()), abs=1e-6)
        assert float(tail_c[k]) == 0.0 or float(tail_r[k]) == 0.0  # only the longer one has a tail


def test_list_overrides_parse_and_validate():
    data = apply_overrides({}, ["loss.type=[sigmoid,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]"])
    cfg = from_dict(LossConfig, data["loss"], "loss")
    cfg.validate()
    assert cfg.types == ("sigmoid", "bco_pair", "sft") and cfg.loss_weights == (0.8, 0.2, 1.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"type": ["sigmoid", "simpo"]}, "loss.type"),
        ({"type": ["sigmoid", "nope"]}, "loss.type"),
        ({"type": ["sigmoid", "sft"], "weights": [1.0]}, "loss.weights"),
        ({"type": ["sigmoid", "sft"], "weights": [1.0, "x"]}, "loss.weights"),
        ({"type": "exo_pair"}, "loss.label_smoothing"),
        ({"type": "hinge", "label_smoothing": 0.1}, "loss.label_smoothing"),
        ({"f_divergence": "kl"}, "loss.f_divergence"),
        ({"type": "simpo", "f_divergence": "js_divergence"}, "loss.f_divergence"),
        ({"discopop_tau": 0.0}, "loss.discopop_tau"),
        ({"type": "aot", "use_weighting": True}, "loss.use_weighting"),
        ({"type": ["sigmoid", "sft"], "use_weighting": True}, "loss.use_weighting"),
        ({"type": "orpo", "use_weighting": True}, "loss.use_weighting"),
        ({"ld_alpha": 1.5}, "loss.ld_alpha"),
        ({"type": "dpo_pl", "ld_alpha": 0.5}, "loss.ld_alpha"),
    ],
)
def test_invalid_trl_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LossConfig(**kwargs).validate()


def test_train_config_reference_rules_for_lists(tmp_path):
    cfg = TrainConfig()
    cfg.data.path = str(tmp_path)
    cfg.loss.type = ["sft"]
    cfg.validate()
    assert cfg.reference.mode == "none"  # sft alone reads no reference
    cfg = TrainConfig()
    cfg.data.path = str(tmp_path)
    cfg.loss.type, cfg.reference.mode = ["sigmoid", "sft"], "none"
    with pytest.raises(ValueError, match="reference.mode"):
        cfg.validate()
    cfg.reference.mode, cfg.loss.ld_alpha = "precompute", 0.5
    with pytest.raises(ValueError, match="reference.mode: loss.ld_alpha"):
        cfg.validate()
    cfg.reference.mode = "online"
    cfg.validate()
    cfg.loss.type = ["sigmoid", "bt"]
    with pytest.raises(ValueError, match="loss.type"):
        cfg.validate()
