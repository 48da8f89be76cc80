"""Dataset statistics: what sharing saves, what was skipped or truncated, how well rows pack.

Image datasets (``StatsAccumulator(images=True)``) add ``images`` (stored: one copy per unit),
``image_tokens`` (prompt tokens that are image tokens, counted in the prompt and unit lengths too),
``images_encoded_shared`` (images the vision encoder runs on per epoch in the shared layout: once per
unit) and ``images_encoded_unshared`` (once per ``[prompt, r_i]``: K times per unit), and
``image_encoder_ratio`` (unshared / shared). Text datasets have none of these keys.

``StatsAccumulator`` is fed every unit and every skip while a dataset is built; ``finish()`` returns the
``stats.json`` dictionary. ``format_stats`` renders it as the table ``tools/dataset_stats.py`` prints.

Pure numpy: no torch, no megatron.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from typing import Callable

import numpy as np

from megatron_prefix.data.records import PreferenceRecord
from megatron_prefix.data.unit import Unit

PERCENTILES = (50, 90, 99, 100)


class StatsAccumulator:
    """Running counts for ``stats.json``."""

    def __init__(self, images: bool = False) -> None:
        self.with_images = images
        self.images = 0
        self.image_tokens = 0
        self.images_unshared = 0
        self.records_read = 0
        self.duplicate_records = 0  # records equal (prompt, responses, scores) to an earlier one: kept
        self._seen: set[bytes] = set()  # 8-byte digests of the records read (about 80 bytes a record)
        self.skipped: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self.k_hist: Counter[int] = Counter()
        self.shared_tokens = 0
        self.unshared_tokens = 0
        self.shared_pairs = 0
        self.unshared_pairs = 0
        self.shared_lens = array("q")
        self.unshared_lens = array("q")
        self.prompt_lens = array("q")
        self.response_lens = array("q")

    def add_record(self, record: PreferenceRecord) -> None:
        """Count one parsed record as a duplicate when an earlier record had the same content."""
        content = (record.prompt, record.responses, record.scores)
        if record.images:
            content += (tuple(ref.key() for ref in record.images),)
        key = hashlib.blake2b(repr(content).encode(), digest_size=8)
        digest = key.digest()
        if digest in self._seen:
            self.duplicate_records += 1
        else:
            self._seen.add(digest)

    def add_unit(self, unit: Unit) -> None:
        """Count one kept unit."""
        self.k_hist[unit.k] += 1
        self.shared_tokens += unit.shared_len
        self.unshared_tokens += unit.unshared_len
        self.shared_pairs += unit.shared_attention_pairs()
        self.unshared_pairs += unit.unshared_attention_pairs()
        self.shared_lens.append(unit.shared_len)
        self.unshared_lens.append(unit.unshared_len)
        self.prompt_lens.append(unit.prompt_len)
        self.response_lens.extend(int(n) for n in unit.response_lens)
        self.images += unit.num_images
        self.images_unshared += unit.num_images * unit.k
        self.image_tokens += unit.num_image_tokens

    def finish(self, pack_tokens: int, pack_fill: Callable[[np.ndarray, int], tuple[float, int]]) -> dict:
        """The ``stats.json`` dict; ``pack_fill(lengths, capacity) -> (fill, rows)`` packs each layout."""
        shared = np.frombuffer(self.shared_lens, dtype=np.int64)
        unshared = np.frombuffer(self.unshared_lens, dtype=np.int64)
        fill_s, rows_s = pack_fill(shared, pack_tokens) if len(shared) else (0.0, 0)
        fits = bool(len(unshared) == 0 or unshared.max() <= pack_tokens)
        fill_u, rows_u = pack_fill(unshared, pack_tokens) if len(unshared) and fits else (None, None)
        units = int(len(shared))
        result = {
            "records_read": self.records_read,
            "units": units,
            "responses": int(len(self.response_lens)),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": int(sum(self.skipped.values())),
            "duplicate_records": self.duplicate_records,
            "truncated": dict(sorted(self.truncated.items())),
            "responses_per_unit": {str(k): v for k, v in sorted(self.k_hist.items())},
            "shared_tokens": self.shared_tokens,
            "unshared_tokens": self.unshared_tokens,
            "token_ratio": round(self.unshared_tokens / self.shared_tokens, 4) if self.shared_tokens else None,
            "shared_attention_pairs": self.shared_pairs,
            "unshared_attention_pairs": self.unshared_pairs,
            "attention_pair_ratio": (
                round(self.unshared_pairs / self.shared_pairs, 4) if self.shared_pairs else None
            ),
            "pack_tokens": pack_tokens,
            "pack_fill": round(fill_s, 5),
            "rows": rows_s,
            "pack_fill_unshared": None if fill_u is None else round(fill_u, 5),
            "rows_unshared": rows_u,
            "unshared_fits_pack_tokens": fits,
            "length_percentiles": {
                name: _percentiles(np.frombuffer(buf, dtype=np.int64))
                for name, buf in (
                    ("unit_shared", self.shared_lens),
                    ("unit_unshared", self.unshared_lens),
                    ("prompt", self.prompt_lens),
                    ("response", self.response_lens),
                )
            },
        }
        if self.with_images:
            result.update({
                "images": self.images,
                "image_tokens": self.image_tokens,
                "images_encoded_shared": self.images,
                "images_encoded_unshared": self.images_unshared,
                "image_encoder_ratio": round(self.images_unshared / self.images, 4) if self.images else None,
            })
        return result


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    return {f"p{p}": int(np.percentile(values, p, method="lower")) for p in PERCENTILES}


def format_stats(stats: dict) -> str:
    """A human-readable table of a ``stats.json`` dict."""
    lines = []

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<28} {value}")

    row("records read", stats["records_read"])
    row("units kept", stats["units"])
    row("responses", stats.get("responses"))
    row("skipped", stats.get("skipped_total", sum(stats["skipped"].values())))
    if stats.get("duplicate_records"):
        row("duplicate records (kept)", stats["duplicate_records"])
    for reason, n in stats["skipped"].items():
        row(f"  skipped: {reason}", n)
    for reason, n in stats["truncated"].items():
        row(f"  truncated: {reason}", n)
    row("responses per unit", ", ".join(f"K={k}: {n}" for k, n in stats["responses_per_unit"].items()))
    row("tokens shared", f"{stats['shared_tokens']:,}")
    row("tokens unshared", f"{stats['unshared_tokens']:,}")
    row("token ratio (unshared/shared)", stats["token_ratio"])
    row("attention pairs shared", f"{stats['shared_attention_pairs']:,}")
    row("attention pairs unshared", f"{stats['unshared_attention_pairs']:,}")
    row("attention pair ratio", stats["attention_pair_ratio"])
    if "images" in stats:
        row("images (stored)", stats["images"])
        row("image tokens (in prompts)", f"{stats['image_tokens']:,}")
        row("images encoded shared", stats["images_encoded_shared"])
        row("images encoded unshared", stats["images_encoded_unshared"])
        row("image encoder ratio", stats["image_encoder_ratio"])
    row("pack tokens", stats["pack_tokens"])
    row("pack fill (shared)", f"{stats['pack_fill']} in {stats['rows']} rows")
    if stats.get("pack_fill_unshared") is not None:
        row("pack fill (unshared)", f"{stats['pack_fill_unshared']} in {stats['rows_unshared']} rows")
    else:
        row("pack fill (unshared)", "n/a: some unit's duplicated layout exceeds pack_tokens")
    for name, pct in stats["length_percentiles"].items():
        row(f"length {name}", "  ".join(f"{k}={v}" for k, v in pct.items()))
    return "\n".join(lines)
