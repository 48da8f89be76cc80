"""Offline dataset builder: preference files -> units on disk, with statistics and a skip log.

Stream: ``readers.open_records`` yields records (or counted skips) in file order; chunks of records are
tokenized into units (``units.UnitBuilder``) in worker processes when ``workers > 1``, with results
consumed in input order, so the output is byte-identical for the same input whatever the worker count;
units are appended to the store as they come (memory stays flat in the input size). Every skipped record
lands in ``skipped.jsonl`` with file, line and reason, and in ``stats.json`` by reason.

One build per output folder: the builder takes ``<output>.lock`` beside it (a second build is refused
naming the holder's host and pid; a lock left by a dead process on this host is taken over, saying so),
writes into a temporary folder beside the output (``.<name>.building-<pid>``) and renames it into place
when complete, so a crash or kill never leaves a half-written dataset under the output name. A rebuild
over an existing dataset replaces its files (``meta.json`` last); other files there (e.g. a reference
cache) are kept.

Images: with ``image_processor`` (``--image-processor``, an HF LLaVA folder) the image spec is read once
(``images.load_image_spec``), each worker decodes and preprocesses the images of its records (once per
record, shared by the record's units), and the store gets ``images.bin`` + ``index/unit_image_offsets.npy``
and ``meta.json["images"]``. A record with images and no ``image_processor`` stops the build with an
error naming the flag and the record's file:line (never dropped silently).

Pure Python + numpy + PIL: no torch, no megatron.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_prefix.config import require
from megatron_prefix.data.packing import fill_ratio, pack_bins
from megatron_prefix.data.images import load_image_spec
from megatron_prefix.data.readers import expand_inputs, open_records, parse_field_map
from megatron_prefix.data.records import PreferenceRecord, Skipped, SkipRecord
from megatron_prefix.data.stats import StatsAccumulator
from megatron_prefix.data.storage import (
    IMAGES_FILE,
    INDEX_DIR,
    META_FILE,
    TOKENS_FILE,
    UnitWriter,
    write_json,
)
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig
from megatron_prefix.digests import sha256_file
from megatron_prefix.faults import fault_point
from megatron_prefix.locks import DirLock

CHUNK_RECORDS = 256


@dataclass
class BuildConfig:
    """Options of ``tools/build_dataset.py`` (recorded in ``meta.json``)."""

    inputs: list[str]
    tokenizer: str
    output: str
    format: str = "auto"
    field_map: str | None = None
    units: UnitConfig = field(default_factory=UnitConfig)
    pack_tokens: int = 8192
    workers: int = 1
    image_processor: str | None = None  # HF LLaVA folder: image processor settings and image tokens

    def validate(self) -> None:
        require(len(self.inputs) > 0, "input", "give at least one input file")
        for p in self.inputs:
            require(Path(p).exists(), "input", f"file or folder {p} does not exist")
        require(self.pack_tokens > 0, "pack_tokens", f"must be positive, got {self.pack_tokens}")
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        self.units.validate()
        if self.image_processor is not None:
            require(Path(self.image_processor).is_dir(), "image_processor",
                    f"--image-processor {self.image_processor} is not a folder (give the HF LLaVA model folder)")
        require(
            self.units.max_unit_tokens <= self.pack_tokens,
            "max_unit_tokens",
            f"{self.units.max_unit_tokens} exceeds pack_tokens {self.pack_tokens}: a unit must fit in one row",
        )


# ---- worker side -------------------------------------------------------------------------------------

_WORKER: UnitBuilder | None = None


def _init_worker(tokenizer_spec: str, unit_cfg: UnitConfig, image_processor: str | None = None) -> None:
    global _WORKER
    spec = load_image_spec(image_processor) if image_processor else None
    _WORKER = UnitBuilder(load_tokenizer(tokenizer_spec), unit_cfg, spec)


def _tokenize_chunk(records: list[PreferenceRecord]) -> tuple[list, dict]:
    """Units or a skip for each record, plus this chunk's truncation counts."""
    assert _WORKER is not None
    before = dict(_WORKER.truncated)
    out: list = []
    for rec in records:
        try:
            out.append(_WORKER.build(rec))
        except SkipRecord as skip:
            out.append(Skipped(rec.source, rec.line, skip.reason, skip.detail))
    delta = {k: v - before.get(k, 0) for k, v in _WORKER.truncated.items() if v - before.get(k, 0)}
    return out, delta


# ---- driver ------------------------------------------------------------------------------------------


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _packed_fill(lengths: np.ndarray, capacity: int) -> tuple[float, int]:
    bins = pack_bins(lengths.tolist(), capacity, algorithm="bfd")
    return fill_ratio(bins, lengths.tolist(), capacity), len(bins)


def build_dataset(cfg: BuildConfig, log: Callable[[str], None] = print) -> dict:
    """Build the dataset described by ``cfg``; returns the ``stats.json`` dict.

    Holds ``<output>.lock`` meanwhile (``LockHeld``, a ``ValueError``, when another build holds it).
    """
    cfg.validate()
    if cfg.units.template_date is None:  # pinned and recorded in meta.json: a rebuild with it is identical
        cfg.units.template_date = datetime.now(timezone.utc).date().isoformat()
    final = Path(cfg.output)
    if final.exists() and not final.is_dir():
        raise ValueError(f"output: {final} exists and is not a directory")
    lock = DirLock(final.parent / f"{final.name}.lock", "output")
    note = lock.acquire()
    if note:
        log(note)
    work = final.parent / f".{final.name}.building-{os.getpid()}"
    try:
        for stale in final.parent.glob(f".{final.name}.building-*"):  # a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        result = _build_into(cfg, work, log)
        fault_point("build", 0)
        _move_into_place(work, final)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.release()


def _move_into_place(work: Path, final: Path) -> None:
    """Rename the finished build to ``final``; over an old dataset, replace its files, ``meta.json`` last."""
    if not final.exists():
        os.replace(work, final)
        return
    (final / META_FILE).unlink(missing_ok=True)  # from here on the old dataset no longer opens
    for name in (TOKENS_FILE, "stats.json", "skipped.jsonl"):
        os.replace(work / name, final / name)
    if (work / IMAGES_FILE).exists():
        os.replace(work / IMAGES_FILE, final / IMAGES_FILE)
    else:  # a text rebuild over an image dataset
        (final / IMAGES_FILE).unlink(missing_ok=True)
    if (final / INDEX_DIR).exists():
        shutil.rmtree(final / INDEX_DIR)
    os.replace(work / INDEX_DIR, final / INDEX_DIR)
    os.replace(work / META_FILE, final / META_FILE)


def _build_into(cfg: BuildConfig, out: Path, log: Callable[[str], None]) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    spec = load_image_spec(cfg.image_processor) if cfg.image_processor else None
    if spec is not None:
        UnitBuilder(tokenizer, cfg.units, spec)  # checks the tokenizer's image token before reading anything
    field_map = parse_field_map(cfg.field_map) if cfg.field_map else None
    out.mkdir(parents=True, exist_ok=True)
    writer = UnitWriter(out, images=spec is not None)
    stats = StatsAccumulator(images=spec is not None)
    skipped_tmp = out / "skipped.jsonl.tmp"

    # Reader skips pass straight through; records are tokenized in chunks (in workers when asked).
    ordinals = itertools.count()
    stream = open_records(cfg.inputs, cfg.format, field_map, log=log)
    progress = tqdm(desc="records", unit="rec", disable=None, mininterval=1.0)

    def record_chunks() -> Iterator[list]:
        yield from _chunks(stream, CHUNK_RECORDS)

    with open(skipped_tmp, "w") as skipped_fh:

        def skip(s: Skipped) -> None:
            stats.skipped[s.reason] += 1
            skipped_fh.write(json.dumps(s.to_json(), sort_keys=True) + "\n")

        def consume(chunk: list, results: list, truncated: dict) -> None:
            for item, result in zip((x for x in chunk if isinstance(x, PreferenceRecord)), results):
                ordinal = next(ordinals)
                stats.add_record(item)
                if isinstance(result, Skipped):
                    skip(result)
                    continue
                for unit in result:
                    writer.add(unit, ordinal)
                    stats.add_unit(unit)
            for k, v in truncated.items():
                stats.truncated[k] += v

        def handle(chunk: list, mapped: tuple[list, dict]) -> None:
            stats.records_read += len(chunk)
            for x in chunk:
                if isinstance(x, Skipped):
                    skip(x)
            consume(chunk, *mapped)
            progress.update(len(chunk))

        def records_of(chunk: list) -> list[PreferenceRecord]:
            recs = [x for x in chunk if isinstance(x, PreferenceRecord)]
            if spec is None:
                for rec in recs:
                    if rec.images:
                        raise ValueError(
                            f"{rec.where()}: the record has {len(rec.images)} image(s) but no --image-processor "
                            "was given; pass --image-processor HF_LLAVA_DIR (the model folder: its image "
                            "processor settings and image token), or remove the images"
                        )
            return recs

        if cfg.workers == 1:
            _init_worker(cfg.tokenizer, cfg.units, cfg.image_processor)
            for chunk in record_chunks():
                handle(chunk, _tokenize_chunk(records_of(chunk)))
        else:
            # A bounded window of chunks in flight (Pool.imap would read the whole input ahead).
            ctx = mp.get_context("spawn")
            with ctx.Pool(cfg.workers, initializer=_init_worker,
                          initargs=(cfg.tokenizer, cfg.units, cfg.image_processor)) as pool:
                pending: deque = deque()
                for chunk in record_chunks():
                    pending.append((chunk, pool.apply_async(_tokenize_chunk, (records_of(chunk),))))
                    if len(pending) >= 4 * cfg.workers:
                        done, res = pending.popleft()
                        handle(done, res.get())
                while pending:
                    done, res = pending.popleft()
                    handle(done, res.get())
    progress.close()
    skipped_tmp.replace(out / "skipped.jsonl")

    result = stats.finish(cfg.pack_tokens, _packed_fill)
    write_json(out / "stats.json", result)
    options = asdict(cfg)
    options.pop("output")
    options.pop("workers")  # does not change the output (byte-identical across worker counts)
    if options["image_processor"] is None:  # text builds: meta.json as before images existed
        options.pop("image_processor")
    options["inputs"] = [{"path": str(p), "sha256": sha256_file(p)} for p in expand_inputs(cfg.inputs)]
    meta = {"tokenizer": tokenizer.describe(), "build": options, "units": writer.num_units}
    if spec is not None:
        meta["images"] = spec.to_meta(0)  # count and sha256 filled by the writer
    writer.close(meta)
    if not result["units"]:  # nothing to train on: an error, with the reasons (files are written to inspect)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result["skipped"].items(), key=lambda kv: -kv[1]))
        raise ValueError(
            f"no unit kept from {result['records_read']} records (skipped: {reasons or 'none'}); "
            f"see {out / 'skipped.jsonl'} for file, line and reason; check --format and --field-map"
        )
    return result
