"""A built preference dataset, readable in the shared or the duplicated (unshared) layout.

``PreferenceDataset(path)`` opens a directory written by ``tools/build_dataset.py`` (see
``megatron_prefix.data.storage``). The same units drive both layouts: ``layout="shared"`` lays each unit
out once as ``[prompt, r1, ..., rK]``; ``layout="unshared"`` as K documents ``[prompt, r_i]`` packed into
the same row. Which units form which optimizer step never depends on the layout (see
``megatron_prefix.data.batching``), so a with/without-sharing comparison sees the same data.

Pure numpy: no torch, no megatron.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_prefix.data.row import PackedRow, layout_docs, pack_row
from megatron_prefix.data.storage import UnitStore
from megatron_prefix.data.unit import Unit

LAYOUTS = ("shared", "unshared")


class PreferenceDataset:
    """Units of a built dataset plus what a trainer needs: lengths per layout, rows, tokenizer info."""

    def __init__(self, path: str | Path, layout: str = "shared"):
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout: must be one of {LAYOUTS}, got {layout!r}")
        self.path = Path(path)
        self.store = UnitStore(self.path)
        self.layout = layout

    @property
    def meta(self) -> dict:
        return self.store.meta

    @property
    def tokenizer_info(self) -> dict:
        """``kind``, ``path``, ``vocab_size``, ``eos_id``, ``pad_id``, ... as recorded at build time."""
        return self.store.meta["tokenizer"]

    @property
    def images_meta(self) -> dict | None:
        """``meta.json["images"]`` of an image dataset (processor settings, shape, ``image_token_id``,
        ``tokens_per_image``, count); None for a text dataset."""
        return self.store.images_meta

    def image_counts(self) -> np.ndarray:
        """[U] images of each unit (zeros for a text dataset)."""
        return self.store.image_counts()

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer_info["pad_id"])

    def __len__(self) -> int:
        return len(self.store)

    def max_token_id(self, num_units: int | None = None) -> int:
        """The largest token id of the first ``num_units`` units (all by default): ``meta.json``'s
        ``max_token_id`` (recorded at build) for the whole dataset, else one chunked pass over
        ``tokens.bin`` (datasets built before it was recorded); -1 when there are no tokens."""
        n = len(self) if num_units is None else min(num_units, len(self))
        if n == len(self) and "max_token_id" in self.meta:
            return int(self.meta["max_token_id"])
        end, top, step = int(self.store.unit_offsets[n]), -1, 1 << 24
        for start in range(0, end, step):
            top = max(top, int(np.max(self.store.tokens[start : min(start + step, end)])))
        return top

    def get_unit(self, i: int) -> Unit:
        """Unit ``i`` (global id ``i``)."""
        return self.store.get_unit(i)

    def units(self, ids: Sequence[int] | None = None) -> list[Unit]:
        """The units ``ids`` (all when None)."""
        ids = range(len(self)) if ids is None else ids
        return [self.get_unit(int(i)) for i in ids]

    def sort_lengths(self) -> np.ndarray:
        """Layout-independent lengths that decide batching (the shared length)."""
        return self.store.shared_lengths()

    def pack_lengths(self, layout: str | None = None) -> np.ndarray:
        """Tokens each unit takes in a row of ``layout`` (default: this dataset's layout)."""
        layout = layout or self.layout
        return self.store.shared_lengths() if layout == "shared" else self.store.unshared_lengths()

    def row(self, unit_ids: Sequence[int], pack_tokens: int, layout: str | None = None) -> PackedRow:
        """One packed row holding ``unit_ids`` (an empty list gives an all-padding row)."""
        docs = layout_docs(self.units(unit_ids), layout or self.layout)
        return pack_row(docs, pack_tokens, self.pad_id)

    def split_ids(self, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train ids, held-out ids): a deterministic split by a hash of the source record.

        All units split from one record (best-of-n splitting) land on the same side, so no prompt is in
        both. ``eval_fraction`` 0 gives an empty held-out set.
        """
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction: must be in [0, 1), got {eval_fraction}")
        records = np.asarray(self.store.unit_records)
        keys = np.array([zlib.crc32(f"{seed}:{int(r)}".encode()) for r in records], dtype=np.int64)
        held = (keys % 10_000) < int(round(eval_fraction * 10_000))
        ids = np.arange(len(self))
        return ids[~held], ids[held]
