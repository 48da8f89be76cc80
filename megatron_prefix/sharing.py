"""The sharing rule, in one place: visibility, position ids, predictor index, attention-pair counts.

A unit ``[prompt (P tokens), r1 (n_1), ..., rK (n_K)]`` is written once; every response must compute
exactly what it computes in its own duplicated sequence ``[prompt + r_i]``. Four facts follow, and every
other module derives from the functions here (masks, row building, FLOP counting, dataset stats):

- **visibility** (``visible``): query q may attend key k iff ``doc[q] == doc[k] != PAD_DOC``, ``k <= q``
  and ``seg[k] in (0, seg[q])`` (prompt or own response); a padding query attends to itself only.
- **positions** (``unit_position_ids``): prompt ``0..P-1``; every response restarts at ``P``.
- **predictor** (``unit_pred_index``): the logits predicting a response token sit at the previous
  position of its duplicated sequence: ``t - 1`` inside a response, the last prompt token for its first.
- **pairs** (``shared_pairs``/``unshared_pairs``/``ids_pairs``): query-key pairs the rule allows;
  ``bottom_right_pairs`` counts what a varlen kernel computes for one (m queries, n keys) sequence.

Pure numpy (``visible`` only uses ``== & | <=``, so it also runs on torch tensors, inside flex's
``mask_mod`` too). No torch.distributed, no megatron.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_DOC = -1  # doc id of padding slots
PAD_SEG = -1  # segment id of padding slots
PROMPT_SEG = 0  # segment id of prompt tokens; response i (1-based) has segment i


def visible(q_doc, q_seg, q_pos, k_doc, k_seg, k_pos):
    """Elementwise (broadcasting) visibility rule; True where query may attend key (numpy or torch)."""
    same = (q_doc == k_doc) & (q_doc != PAD_DOC) & (k_pos <= q_pos) & ((k_seg == PROMPT_SEG) | (k_seg == q_seg))
    return same | ((q_doc == PAD_DOC) & (q_pos == k_pos))


def unit_position_ids(prompt_len: int, response_lens: Sequence[int]) -> np.ndarray:
    """Position ids of ``[prompt, r1, ..., rK]``: prompt ``0..P-1``, each response ``P..P+n_i-1``."""
    parts = [np.arange(prompt_len)] + [np.arange(prompt_len, prompt_len + int(n)) for n in response_lens]
    return np.concatenate(parts).astype(np.int32)


def unit_segment_ids(prompt_len: int, response_lens: Sequence[int]) -> np.ndarray:
    """Segment ids: ``PROMPT_SEG`` (0) for the prompt, i (1-based) for response i."""
    parts = [np.full(prompt_len, PROMPT_SEG)] + [np.full(int(n), i + 1) for i, n in enumerate(response_lens)]
    return np.concatenate(parts).astype(np.int32)


def unit_pred_index(prompt_len: int, response_lens: Sequence[int], offset: int = 0) -> np.ndarray:
    """Row position of each token's predictor (-1 for prompt tokens, which are not scored).

    ``offset`` is the unit's first row position: response tokens at ``t`` get ``t - 1``, except each
    response's first token, which gets the last prompt position ``offset + P - 1``.
    """
    out = np.full(prompt_len + int(sum(response_lens)), -1, dtype=np.int32)
    start = prompt_len
    for n in response_lens:
        n = int(n)
        out[start] = offset + prompt_len - 1
        out[start + 1 : start + n] = offset + np.arange(start, start + n - 1)
        start += n
    return out


def causal_pairs(n: int) -> int:
    """Pairs of plain causal attention over ``n`` tokens."""
    return n * (n + 1) // 2


def bottom_right_pairs(m, n):
    """Pairs of bottom-right causal attention of ``m`` queries over ``n >= m`` keys (ints or arrays)."""
    return m * (n - m) + m * (m + 1) // 2


def shared_pairs(prompt_len: int, response_lens: Sequence[int]) -> int:
    """Pairs ``visible`` allows in one unit: the prompt causally, each response over prompt + itself."""
    return causal_pairs(prompt_len) + sum(bottom_right_pairs(int(n), prompt_len + int(n)) for n in response_lens)


def unshared_pairs(prompt_len: int, response_lens: Sequence[int]) -> int:
    """Pairs of plain causal attention over every duplicated sequence ``[prompt + r_i]``."""
    return sum(causal_pairs(prompt_len + int(n)) for n in response_lens)


def _runs(doc: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position of one row: start of its (doc, segment) run, start of its doc, end of its doc's prompt.

    Assumes each document starts with its prompt (the row contract).
    """
    t = len(doc)
    idx = np.arange(t)
    seg_change = np.r_[True, (doc[1:] != doc[:-1]) | (seg[1:] != seg[:-1])]
    doc_change = np.r_[True, doc[1:] != doc[:-1]]
    run_start = np.maximum.accumulate(np.where(seg_change, idx, 0))
    doc_start = np.maximum.accumulate(np.where(doc_change, idx, 0))
    run_end = np.empty(t, dtype=np.int64)
    starts = np.nonzero(seg_change)[0]
    run_end[starts] = np.r_[starts[1:], t]
    prompt_end = run_end[doc_start]
    return run_start, doc_start, prompt_end


def row_runs(doc: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Public form of the run decomposition used by the varlen plan (see ``_runs``)."""
    return _runs(np.asarray(doc), np.asarray(seg))


def ids_pairs(doc_ids: np.ndarray, segment_ids: np.ndarray) -> int:
    """Pairs ``visible`` allows over the real (non-pad) queries of rows ``[T]`` or ``[b, T]``."""
    doc_ids, segment_ids = np.atleast_2d(np.asarray(doc_ids)), np.atleast_2d(np.asarray(segment_ids))
    total = 0
    for doc, seg in zip(doc_ids, segment_ids):
        if not len(doc):
            continue
        run_start, doc_start, prompt_end = _runs(doc, seg)
        real = doc != PAD_DOC
        own = np.arange(len(doc)) - run_start + 1
        prompt = np.where(seg > PROMPT_SEG, prompt_end - doc_start, 0)
        total += int(np.sum((own + prompt)[real]))
    return total
