"""The packed-row contract shared by the data pipeline, the attention backends and the loss.

A row is a fixed budget of ``T = pack_tokens`` token slots holding several *documents* back to back,
then padding (padding only at the row end). In the shared layout a document is a whole unit
``[prompt, r1, ..., rK]``; in the unshared (duplicated) layout it is one ``[prompt, r_i]``, and the K
documents of one unit are always packed into the same row, so a preference group never straddles
rows (the loss of a row is self-contained).

Per token ``t`` (arrays of length T):
- ``tokens``: token ids, ``pad_id`` in the padding tail.
- ``position_ids``: prompt ``0..P-1``, every response restarts at ``P``; 0 in padding.
- ``doc_ids``: index of the document in this row (0..D-1), -1 in padding. ("unit index" of the issue.)
- ``segment_ids``: 0 for prompt tokens, i (1-based) for response i of the document, -1 in padding.
- ``loss_mask``: 1 where the token's log-prob is scored (every response token), else 0.
- ``pred_index``: the row position whose logits predict token t: ``t - 1`` inside a response, the last
  prompt position for a response's first token, -1 where the token is not scored.

The attention rule (``docs/attention.md``, ``megatron_prefix.sharing.visible``): query q may attend key k
iff ``doc_ids[q] == doc_ids[k] != -1``, ``k <= q``, and ``segment_ids[k] in (0, segment_ids[q])``. Padding
attends to itself only. Positions, predictors and pair counts also come from ``megatron_prefix.sharing``.

Per document (length D): ``cu_docs`` [D+1] offsets (cu_seqlens-style; ``cu_docs[-1]`` is the number of
real tokens) and ``doc_prompt_lens`` [D].

Per response (length R, in row order): ``resp_spans`` [R, 2] (start, end) row positions, end exclusive;
``resp_doc`` [R]; ``resp_unit`` [R] the global unit id (the loss groups responses by it, identically in
both layouts); ``resp_slot`` [R] the response's index inside its original unit; ``resp_scores`` [R].

Images (``docs/vision.md``): ``images`` [N, C, H, W] float32, the row's images in token order (the
documents' images one after the other; in the unshared layout each ``[prompt, r_i]`` document brings its
own copy), None for a row without images; ``image_index`` [T] int32: -1, or for an image token the index
of its feature row among the row's ``N * tokens_per_image`` image feature rows (0, 1, 2, ... in token
order, as HF's ``masked_scatter`` fills them).

Pure numpy: no torch, no megatron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from megatron_prefix import sharing
from megatron_prefix.data.unit import Unit
from megatron_prefix.sharing import PAD_DOC, PAD_SEG

__all__ = ["PAD_DOC", "PackedRow", "layout_docs", "pack_row", "row_field_names"]


@dataclass
class PackedRow:
    """One packed row of documents; see the module docstring for every field."""

    tokens: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    pred_index: np.ndarray
    cu_docs: np.ndarray
    doc_prompt_lens: np.ndarray
    resp_spans: np.ndarray
    resp_doc: np.ndarray
    resp_unit: np.ndarray
    resp_slot: np.ndarray
    resp_scores: np.ndarray
    images: np.ndarray | None = None  # [N, C, H, W] float32, None without images
    image_index: np.ndarray | None = None  # [T] int32, -1 for non-image tokens (pack_row always sets it)

    @property
    def num_images(self) -> int:
        """Images of the row (0 without)."""
        return 0 if self.images is None else len(self.images)

    @property
    def pack_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.cu_docs[-1])

    @property
    def num_docs(self) -> int:
        return int(len(self.cu_docs) - 1)

    @property
    def num_responses(self) -> int:
        return len(self.resp_spans)

    def validate(self) -> None:
        """Check the internal invariants of the contract (raises AssertionError)."""
        t = self.pack_tokens
        for f in ("position_ids", "doc_ids", "segment_ids", "loss_mask", "pred_index"):
            assert len(getattr(self, f)) == t, f
        n = self.num_tokens
        assert n <= t and np.all(self.doc_ids[n:] == PAD_DOC) and np.all(self.doc_ids[:n] >= 0)
        assert np.all(np.diff(self.cu_docs) > 0)
        scored = np.nonzero(self.loss_mask)[0]
        assert np.all(self.pred_index[scored] >= 0) and np.all(self.pred_index[scored] < scored)
        assert np.all(self.pred_index[self.loss_mask == 0] == -1)
        for (s, e), d in zip(self.resp_spans.tolist(), self.resp_doc.tolist()):
            assert self.cu_docs[d] <= s < e <= self.cu_docs[d + 1]
        if self.image_index is not None:
            assert len(self.image_index) == t, "image_index"
            where = np.nonzero(self.image_index >= 0)[0]
            assert np.array_equal(self.image_index[where], np.arange(len(where))), "image_index order"
            assert np.all(self.segment_ids[where] == 0), "image token outside a prompt"
            n = self.num_images
            assert (len(where) == 0) == (n == 0) and (n == 0 or len(where) % n == 0), (
                f"{len(where)} image tokens for {n} images"
            )

    def dense_mask(self) -> np.ndarray:
        """[T, T] boolean mask, True where query (row) may attend key (column). O(T^2): tests only."""
        idx = np.arange(self.pack_tokens)
        return sharing.visible(
            self.doc_ids[:, None], self.segment_ids[:, None], idx[:, None],
            self.doc_ids[None, :], self.segment_ids[None, :], idx[None, :],
        )

    def attention_pairs(self) -> int:
        """Query-key pairs the mask allows over the real tokens (``sharing.ids_pairs``)."""
        return sharing.ids_pairs(self.doc_ids, self.segment_ids)


def pack_row(docs: Sequence[Unit], pack_tokens: int, pad_id: int) -> PackedRow:
    """Lay documents out back to back in a row of ``pack_tokens`` slots, padding the tail.

    Each document is a ``Unit``; in the unshared layout pass ``unit.split_unshared()`` pieces.
    Raises ``ValueError`` if the documents do not fit.
    """
    total = sum(d.shared_len for d in docs)
    if total > pack_tokens:
        raise ValueError(f"documents take {total} tokens, more than pack_tokens={pack_tokens}")
    tokens = np.full(pack_tokens, pad_id, dtype=np.int32)
    position_ids = np.zeros(pack_tokens, dtype=np.int32)
    doc_ids = np.full(pack_tokens, PAD_DOC, dtype=np.int32)
    segment_ids = np.full(pack_tokens, PAD_SEG, dtype=np.int32)
    loss_mask = np.zeros(pack_tokens, dtype=np.int8)
    pred_index = np.full(pack_tokens, -1, dtype=np.int32)
    image_index = np.full(pack_tokens, -1, dtype=np.int32)
    images: list[np.ndarray] = []
    features = 0  # image feature rows so far
    cu_docs = np.zeros(len(docs) + 1, dtype=np.int32)
    prompt_lens = np.zeros(len(docs), dtype=np.int32)
    spans, resp_doc, resp_unit, resp_slot, resp_scores = [], [], [], [], []

    offset = 0
    for d, unit in enumerate(docs):
        n = unit.shared_len
        sl = slice(offset, offset + n)
        tokens[sl] = unit.tokens()
        position_ids[sl] = unit.position_ids()
        doc_ids[sl] = d
        segment_ids[sl] = unit.segment_ids()
        prompt_lens[d] = unit.prompt_len
        pred_index[sl] = sharing.unit_pred_index(unit.prompt_len, unit.response_lens.tolist(), offset)
        if unit.images is not None:
            at = offset + np.nonzero(unit.prompt_ids == unit.image_token_id)[0]
            image_index[at] = features + np.arange(len(at), dtype=np.int32)
            features += len(at)
            images.append(unit.images)
        start = offset + unit.prompt_len
        for i, r in enumerate(unit.response_ids):
            end = start + len(r)
            loss_mask[start:end] = 1
            spans.append((start, end))
            resp_doc.append(d)
            resp_unit.append(unit.unit_id)
            resp_slot.append(int(unit.slots[i]))
            resp_scores.append(float(unit.scores[i]))
            start = end
        offset += n
        cu_docs[d + 1] = offset

    return PackedRow(
        tokens=tokens,
        position_ids=position_ids,
        doc_ids=doc_ids,
        segment_ids=segment_ids,
        loss_mask=loss_mask,
        pred_index=pred_index,
        cu_docs=cu_docs,
        doc_prompt_lens=prompt_lens,
        resp_spans=np.asarray(spans, dtype=np.int32).reshape(-1, 2),
        resp_doc=np.asarray(resp_doc, dtype=np.int32),
        resp_unit=np.asarray(resp_unit, dtype=np.int64),
        resp_slot=np.asarray(resp_slot, dtype=np.int32),
        resp_scores=np.asarray(resp_scores, dtype=np.float32),
        images=np.concatenate(images).astype(np.float32, copy=False) if images else None,
        image_index=image_index,
    )


def layout_docs(units: Sequence[Unit], layout: str) -> list[Unit]:
    """The documents of a row for ``layout`` ``shared`` (units as is) or ``unshared`` (split)."""
    if layout == "shared":
        return list(units)
    if layout == "unshared":
        return [piece for u in units for piece in u.split_unshared()]
    raise ValueError(f"layout must be 'shared' or 'unshared', got {layout!r}")


def row_field_names() -> list[str]:
    """Names of the array fields of ``PackedRow`` (for collation and serialization); ``images`` may be
    None (a row without images) and its first dimension varies from row to row."""
    return [f.name for f in fields(PackedRow)]
