"""Scored-token log-probs, their backward, and the micro-batch scoring index (incl. CP slicing).

No process group needed: TP is exercised in ``tests/test_model.py`` (torchrun); here the vocabulary is
local (``tp_group=None``).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_prefix.attention.context_parallel import local_positions
from megatron_prefix.data.row import pack_row
from megatron_prefix.data.unit import Unit
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.model.logprobs import last_token_hidden, response_logprobs, token_logprobs


def _units(seed: int = 0) -> list[Unit]:
    rng = np.random.default_rng(seed)
    return [
        Unit(rng.integers(1, 50, rng.integers(1, 6)), [rng.integers(1, 50, rng.integers(1, 6)) for _ in range(k)],
             np.zeros(k), unit_id=i)
        for i, k in enumerate((2, 3, 4, 2))
    ]


def _rows(pack_tokens: int = 48):
    u = _units()
    return [pack_row(u[:2], pack_tokens, 0), pack_row(u[2:], pack_tokens, 0)]


def test_token_logprobs_match_log_softmax_with_duplicates_and_chunks():
    """Forward and backward equal ``log_softmax`` + gather, with repeated rows and tiny chunks."""
    torch.manual_seed(0)
    s, b, v = 7, 3, 11
    logits = (torch.randn(s, b, v) * 4).requires_grad_(True)
    pred_s = torch.tensor([0, 0, 0, 3, 6, 2, 2, 5])  # row (0, 1) predicts three targets
    pred_b = torch.tensor([1, 1, 1, 0, 2, 2, 2, 1])
    targets = torch.tensor([4, 9, 4, 0, 10, 3, 7, 1])
    w = torch.randn(8)
    got = token_logprobs(logits, pred_s, pred_b, targets, chunk_elems=3 * v)  # 3 rows per chunk
    (w * got).sum().backward()
    grad_got = logits.grad.clone()
    logits.grad = None
    want = torch.log_softmax(logits, -1)[pred_s, pred_b].gather(1, targets[:, None]).squeeze(1)
    (w * want).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_got, logits.grad, rtol=0, atol=1e-6)


def test_token_logprobs_bf16_logits_keep_dtype_and_fp32_math():
    """bf16 logits: fp32 result from the bf16 values; the gradient comes back in bf16."""
    torch.manual_seed(1)
    logits = (torch.randn(5, 2, 13) * 3).bfloat16().requires_grad_(True)
    idx = (torch.tensor([0, 4, 2]), torch.tensor([1, 0, 1]), torch.tensor([3, 12, 0]))
    got = token_logprobs(logits, *idx)
    want = torch.log_softmax(logits.detach().float(), -1)[idx[0], idx[1]].gather(1, idx[2][:, None]).squeeze(1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_scoring_index_follows_pred_index():
    """Every scored token is predicted from pred_index (t-1, or the last prompt position)."""
    rows = _rows()
    mb = MicroBatch.from_rows(rows)
    ix = mb.index
    for n in range(ix.num_scored):
        row = rows[int(ix.pred_b[n])]
        t = np.nonzero((row.pred_index == int(ix.pred_s[n])) & (row.tokens == int(ix.targets[n])))[0]
        assert len(t) >= 1
    assert ix.num_scored == sum(int(r.loss_mask.sum()) for r in rows)
    assert mb.num_responses == sum(r.num_responses for r in rows) == ix.num_responses
    assert ix.resp_lengths.tolist() == [e - s for r in rows for s, e in r.resp_spans.tolist()]
    # a response's first token is predicted by its prompt's last position: K tokens share that row
    first = rows[0].resp_spans[rows[0].resp_doc == 0, 0]
    assert len(first) == 2 and len(set(rows[0].pred_index[first].tolist())) == 1


def test_response_logprobs_segment_sums():
    torch.manual_seed(2)
    rows = _rows()
    mb = MicroBatch.from_rows(rows)
    logits = torch.randn(rows[0].pack_tokens, len(rows), 50)
    out = response_logprobs(logits, mb.index)
    tok = torch.log_softmax(logits, -1)
    for r, (b, (s, e)) in enumerate(zip(mb.resp_row.tolist(), mb.resp_spans.tolist())):
        row = rows[b]
        want = sum(float(tok[row.pred_index[t], b, row.tokens[t]]) for t in range(s, e))
        assert abs(float(out.logps[r]) - want) < 1e-5
    assert out.token_logps.shape == out.token_resp.shape == (mb.index.num_scored,)


def test_cp_ranks_partition_the_scored_tokens_and_last_tokens():
    """Over CP ranks, each scored token is scored exactly once, at its pred position's local index."""
    rows = _rows(pack_tokens=48)
    full = MicroBatch.from_rows(rows).index
    want = sorted(zip(full.pred_b.tolist(), full.pred_s.tolist(), full.targets.tolist(), full.resp_ids.tolist()))
    for cp in (2, 3):
        got, owners = [], torch.zeros(full.num_responses, dtype=torch.long)
        for rank in range(cp):
            mb = MicroBatch.from_rows(rows, cp_size=cp, cp_rank=rank)
            pos = local_positions(48, cp, rank)
            ix = mb.index
            assert mb.tokens.shape == (2, 48 // cp)
            torch.testing.assert_close(mb.position_ids[0], torch.from_numpy(rows[0].position_ids).long()[pos])
            got += zip(ix.pred_b.tolist(), pos[ix.pred_s].tolist(), ix.targets.tolist(), ix.resp_ids.tolist())
            owners += ix.last_owned.long()
            owned = ix.last_owned.nonzero().squeeze(1)
            torch.testing.assert_close(pos[ix.last_s[owned]], mb.resp_spans[owned, 1] - 1)
        assert sorted(got) == want
        assert owners.tolist() == [1] * full.num_responses


def test_last_token_hidden_without_cp():
    rows = _rows()
    mb = MicroBatch.from_rows(rows)
    hidden_sbh = torch.randn(48, 2, 5)
    last = last_token_hidden(hidden_sbh, mb.index)
    for r, (b, (s, e)) in enumerate(zip(mb.resp_row.tolist(), mb.resp_spans.tolist())):
        torch.testing.assert_close(last[r], hidden_sbh[e - 1, b])
