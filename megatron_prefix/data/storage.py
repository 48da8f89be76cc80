"""The on-disk unit store: a flat token file plus a few index arrays, memory-mapped on read.

A built dataset directory holds::

    tokens.bin          int32 token ids of every unit in the shared layout [prompt, r1, ..., rK], back to back
    index/*.npy         int64 unit_offsets [U+1] (into tokens.bin), int32 prompt_lens [U],
                        int64 resp_offsets [U+1] (into the per-response arrays), int32 resp_lens [R],
                        float32 resp_scores [R], int32 resp_slots [R], int64 unit_records [U]
                        (record ordinal the unit came from); plain .npy (deterministic, mmap-able)
    images.bin          (image datasets only) float32 [I, C, H, W] preprocessed images, unit by unit, in
                        token order; index/unit_image_offsets.npy int64 [U+1] (into images.bin)
    meta.json           tokenizer (kind, path, vocab size, special ids, hash), build options, inputs,
                        max_token_id (the largest id in tokens.bin); for image datasets ``images``:
                        processor settings, shape, dtype, image_token_id, tokens_per_image, count and
                        the sha256 of images.bin
    stats.json          see ``megatron_prefix.data.stats``
    skipped.jsonl       one line per skipped record: file, line, reason, detail

Writing streams tokens to disk as units arrive (the index stays in compact ``array`` buffers: a few
integers per unit), so memory stays flat in the input size. Files are written under a temporary name and
renamed when complete; the same input gives byte-identical files (no timestamps, sorted JSON keys).

Pure numpy: no torch, no megatron.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prefix.data.unit import Unit

TOKENS_FILE = "tokens.bin"
INDEX_DIR = "index"
INDEX_ARRAYS = ("unit_offsets", "prompt_lens", "resp_offsets", "resp_lens", "resp_scores", "resp_slots", "unit_records")
META_FILE = "meta.json"
IMAGES_FILE = "images.bin"
IMAGE_OFFSETS = "unit_image_offsets"
FORMAT_VERSION = 1


def write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indentation), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class UnitWriter:
    """Append units to a dataset directory; ``close(meta)`` writes the index and metadata."""

    def __init__(self, out_dir: str | Path, images: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tmp_tokens = self.dir / (TOKENS_FILE + ".tmp")
        self._fh = open(self._tmp_tokens, "wb")
        self.unit_offsets = array("q", [0])
        self.prompt_lens = array("i")
        self.resp_offsets = array("q", [0])
        self.resp_lens = array("i")
        self.resp_scores = array("f")
        self.resp_slots = array("i")
        self.unit_records = array("q")
        self.max_token_id = -1  # recorded in meta.json: checked against a model's vocabulary before training
        self._img_fh = open(self.dir / (IMAGES_FILE + ".tmp"), "wb") if images else None
        self.image_offsets = array("q", [0])
        self._img_hash = hashlib.sha256()
        self.image_shape: tuple[int, ...] | None = None

    @property
    def num_units(self) -> int:
        return len(self.prompt_lens)

    def add(self, unit: Unit, record_ordinal: int) -> int:
        """Append one unit; returns its global unit id."""
        tokens = unit.tokens()
        self._fh.write(tokens.astype("<i4", copy=False).tobytes())
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self.unit_offsets.append(self.unit_offsets[-1] + len(tokens))
        self.prompt_lens.append(unit.prompt_len)
        self.resp_lens.extend(int(n) for n in unit.response_lens)
        self.resp_scores.extend(float(s) for s in unit.scores)
        self.resp_slots.extend(int(s) for s in unit.slots)
        self.resp_offsets.append(len(self.resp_lens))
        self.unit_records.append(record_ordinal)
        if self._img_fh is not None:
            n = 0
            if unit.images is not None:
                pixels = np.ascontiguousarray(unit.images, dtype="<f4")
                if self.image_shape is None:
                    self.image_shape = tuple(pixels.shape[1:])
                assert tuple(pixels.shape[1:]) == self.image_shape, "images of one dataset share a shape"
                data = pixels.tobytes()
                self._img_fh.write(data)
                self._img_hash.update(data)
                n = len(pixels)
            self.image_offsets.append(self.image_offsets[-1] + n)
        elif unit.images is not None:
            raise ValueError("a unit with images, but the dataset writer was opened without images")
        return self.num_units - 1

    def close(self, meta: dict) -> None:
        """Flush tokens, write the index arrays and meta.json (last: its presence marks completion)."""
        self._fh.close()
        os.replace(self._tmp_tokens, self.dir / TOKENS_FILE)
        meta = dict(meta)
        extra: dict[str, np.ndarray] = {}
        if self._img_fh is not None:
            self._img_fh.close()
            os.replace(self.dir / (IMAGES_FILE + ".tmp"), self.dir / IMAGES_FILE)
            extra[IMAGE_OFFSETS] = np.frombuffer(self.image_offsets, dtype=np.int64)
            meta["images"] = {**meta["images"], "count": int(self.image_offsets[-1]),
                              "sha256": self._img_hash.hexdigest()}
        arrays = {
            "unit_offsets": np.frombuffer(self.unit_offsets, dtype=np.int64),
            "prompt_lens": np.frombuffer(self.prompt_lens, dtype=np.int32),
            "resp_offsets": np.frombuffer(self.resp_offsets, dtype=np.int64),
            "resp_lens": np.frombuffer(self.resp_lens, dtype=np.int32),
            "resp_scores": np.frombuffer(self.resp_scores, dtype=np.float32),
            "resp_slots": np.frombuffer(self.resp_slots, dtype=np.int32),
            "unit_records": np.frombuffer(self.unit_records, dtype=np.int64),
            **extra,
        }
        index_dir = self.dir / INDEX_DIR
        index_dir.mkdir(exist_ok=True)
        for name, arr in arrays.items():
            tmp = index_dir / f"{name}.tmp.npy"
            np.save(tmp, arr)  # .npy: header + data, no timestamps (np.savez's zip entries carry mtimes)
            os.replace(tmp, index_dir / f"{name}.npy")
        write_json(self.dir / META_FILE, {"format_version": FORMAT_VERSION, **meta, "max_token_id": self.max_token_id})


def _load_index(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: corrupt index array ({err}); rebuild the dataset with "
                         "tools/build_dataset.py") from err


class UnitStore:
    """Read-only, memory-mapped view of a built dataset's units."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        for name in (TOKENS_FILE, META_FILE, *(f"{INDEX_DIR}/{a}.npy" for a in INDEX_ARRAYS)):
            if not (self.dir / name).is_file():
                raise ValueError(
                    f"{self.dir}: not a built dataset ({name} missing); build one with tools/build_dataset.py"
                )
        try:
            self.meta = json.loads((self.dir / META_FILE).read_text())
            if not isinstance(self.meta, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.dir / META_FILE}: corrupt ({err}); rebuild the dataset") from err
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.dir / META_FILE}: format_version {self.meta.get('format_version')} is not "
                f"{FORMAT_VERSION}; rebuild the dataset with this version of tools/build_dataset.py"
            )
        idx = {a: _load_index(self.dir / INDEX_DIR / f"{a}.npy") for a in INDEX_ARRAYS}
        self.unit_offsets = idx["unit_offsets"]
        self.prompt_lens = idx["prompt_lens"]
        self.resp_offsets = idx["resp_offsets"]
        self.resp_lens = idx["resp_lens"]
        self.resp_scores = idx["resp_scores"]
        self.resp_slots = idx["resp_slots"]
        self.unit_records = idx["unit_records"]
        size = os.path.getsize(self.dir / TOKENS_FILE)
        if size % 4:
            raise ValueError(f"{self.dir / TOKENS_FILE}: corrupt dataset ({size} bytes is not a whole number of "
                             "int32 tokens); rebuild it with tools/build_dataset.py")
        self.tokens = (
            np.memmap(self.dir / TOKENS_FILE, dtype="<i4", mode="r") if size else np.zeros(0, dtype=np.int32)
        )
        self.images_meta: dict | None = self.meta.get("images")
        self.images: np.ndarray | None = None  # [I, C, H, W] float32, memory-mapped
        self.image_offsets: np.ndarray | None = None
        if self.images_meta is not None:
            self._open_images()
        self._check()

    def _open_images(self) -> None:
        """Memory-map images.bin as [I, C, H, W] float32 and load unit_image_offsets (checked)."""
        meta = self.images_meta
        offsets_path = self.dir / INDEX_DIR / f"{IMAGE_OFFSETS}.npy"
        for path in (self.dir / IMAGES_FILE, offsets_path):
            if not path.is_file():
                raise ValueError(f"{self.dir}: an image dataset (meta.json has 'images') without {path.name}; "
                                 "rebuild it with tools/build_dataset.py")
        try:
            shape = tuple(int(x) for x in meta["shape"])
            count = int(meta["count"])
            self.image_token_id = int(meta["image_token_id"])
            self.tokens_per_image = int(meta["tokens_per_image"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.dir / META_FILE}: corrupt 'images' entry ({err}); rebuild the dataset") from err
        if meta.get("dtype") != "float32":
            raise ValueError(f"{self.dir / META_FILE}: images dtype {meta.get('dtype')!r} is not float32")
        size = os.path.getsize(self.dir / IMAGES_FILE)
        if size != count * 4 * int(np.prod(shape)):
            raise ValueError(f"{self.dir / IMAGES_FILE}: corrupt dataset ({size} bytes for {count} images of "
                             f"shape {list(shape)}); rebuild it with tools/build_dataset.py")
        self.images = (np.memmap(self.dir / IMAGES_FILE, dtype="<f4", mode="r", shape=(count, *shape))
                       if count else np.zeros((0, *shape), dtype=np.float32))
        self.image_offsets = _load_index(offsets_path)
        if len(self.image_offsets) != len(self.prompt_lens) + 1 or int(self.image_offsets[-1]) != count:
            raise ValueError(f"{offsets_path}: corrupt dataset ({len(self.image_offsets)} offsets ending at "
                             f"{int(self.image_offsets[-1]) if len(self.image_offsets) else None} for "
                             f"{len(self.prompt_lens)} units, {count} images); rebuild it")

    def _check(self) -> None:
        """Cheap consistency checks: a corrupt or mixed dataset is an error naming the file."""
        units, resps = len(self.prompt_lens), len(self.resp_lens)

        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{self.dir / name}: corrupt dataset ({what}); rebuild it with "
                              "tools/build_dataset.py")

        for name, n in (("unit_offsets", units + 1), ("resp_offsets", units + 1), ("unit_records", units),
                        ("resp_scores", resps), ("resp_slots", resps)):
            arr = getattr(self, name)
            if arr.ndim != 1 or len(arr) != n:
                raise bad(f"{INDEX_DIR}/{name}.npy", f"{len(arr)} entries, expected {n}")
        if len(self.unit_offsets) and int(self.unit_offsets[-1]) != len(self.tokens):
            raise bad(TOKENS_FILE, f"{len(self.tokens)} tokens, the index says {int(self.unit_offsets[-1])}")
        if int(self.resp_offsets[-1]) != resps:
            raise bad(f"{INDEX_DIR}/resp_offsets.npy", f"ends at {int(self.resp_offsets[-1])}, expected {resps}")
        units_meta = self.meta.get("units")
        if units_meta is not None and units_meta != units:
            raise bad(META_FILE, f"says {units_meta} units, the index has {units}")

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def shared_lengths(self) -> np.ndarray:
        """[U] tokens of each unit in the shared layout."""
        return np.diff(self.unit_offsets)

    def unshared_lengths(self) -> np.ndarray:
        """[U] tokens of each unit in the duplicated layout (K copies of the prompt)."""
        k = np.diff(self.resp_offsets)
        return np.diff(self.unit_offsets) + (k - 1) * self.prompt_lens

    def responses_per_unit(self) -> np.ndarray:
        """[U] K of each unit."""
        return np.diff(self.resp_offsets)

    def get_unit(self, i: int) -> Unit:
        """Unit ``i`` with its global id."""
        if not 0 <= i < len(self):
            raise IndexError(f"unit {i} out of range (dataset has {len(self)})")
        toks = np.asarray(self.tokens[self.unit_offsets[i] : self.unit_offsets[i + 1]], dtype=np.int32)
        p = int(self.prompt_lens[i])
        r0, r1 = int(self.resp_offsets[i]), int(self.resp_offsets[i + 1])
        cuts = p + np.cumsum(self.resp_lens[r0:r1])[:-1]
        responses = np.split(toks[p:], cuts - p)
        images, image_token_id = None, None
        if self.images is not None:
            image_token_id = self.image_token_id
            a, b = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
            images = np.array(self.images[a:b], dtype=np.float32) if b > a else None
        return Unit(toks[:p], responses, np.array(self.resp_scores[r0:r1]), i, np.array(self.resp_slots[r0:r1]),
                    images=images, image_token_id=image_token_id)

    def image_counts(self) -> np.ndarray:
        """[U] images of each unit (zeros for a text dataset)."""
        if self.image_offsets is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.diff(self.image_offsets)
