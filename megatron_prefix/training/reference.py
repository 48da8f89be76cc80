"""Reference log-probs for DPO: precomputed once per dataset and reference model, or looked up online.

``reference.mode: precompute`` (default) runs a forward-only pass of the *initial* policy (the
reference) over every unit of the dataset before training and stores one float per response::

    <reference.path, or <data.path>/reference/<hash of the key>>/
        logps.npy     float64 [R] in the dataset's response order (unit u's responses at
                      resp_offsets[u] .. resp_offsets[u+1])
        done.npy      bool [U]: units already computed (the pass resumes where it stopped)
        key.json      what the values depend on: the dataset (meta.json digest, unit count), the
                      reference (model config, initial checkpoint and its step, or the init seed) and
                      the compute dtype (an fp32 cache is never reused by a bf16 run, or vice versa)

By default every (dataset, reference) pair gets its own directory, named by a hash of the key; an explicit
``reference.path`` whose key differs from the run's is refused with an error naming both. Either way a
changed dataset or reference checkpoint never silently reuses stale values. Training then needs no
reference model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.faults import fault_point
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.progress import Progress

CHUNK_ROWS = 32  # rows per DP rank between progress saves


def dataset_digest(dataset: PreferenceDataset) -> str:
    """sha256 of the dataset's meta.json and index arrays' sizes (changes whenever the data does).

    An image dataset's ``meta.json["images"]`` (processor settings: resize, crop, mean/std; pixel
    shape and dtype; image token id and count) is part of meta.json; the size of ``images.bin`` is
    added as well."""
    h = hashlib.sha256((dataset.path / "meta.json").read_bytes())
    h.update(str((len(dataset), int(dataset.store.unit_offsets[-1]))).encode())
    images = dataset.path / "images.bin"
    if images.is_file():
        h.update(f"images.bin:{images.stat().st_size}".encode())
    return h.hexdigest()


KEY_IGNORED_MODEL_FIELDS = ("freeze_vision", "freeze_projector")  # what trains, not what the reference computes


def reference_key(dataset: PreferenceDataset, model: dict, reference: dict, dtype: str) -> dict:
    """The cache key: dataset digest and unit count, model config, reference identity, compute dtype.

    ``dtype`` is the dtype the reference forward runs in (``TrainConfig.resolved_dtype``): log-probs of
    a bf16 forward differ from fp32 ones by far more than DPO's margins, so it is part of the key. For a
    vision-language model everything that changes an image's log-probs is in it: the pixels (the
    dataset digest: processor settings and images), ``model.vision`` (tower shape, ``feature_layer``,
    ``select_strategy``, projector, image token id) and the weights (the reference checkpoint);
    ``model.freeze_*`` are left out (they decide what trains, not what the initial policy computes).
    """
    model = {k: v for k, v in model.items() if k not in KEY_IGNORED_MODEL_FIELDS}
    return {"dataset": dataset_digest(dataset), "units": len(dataset), "model": model, "reference": reference,
            "dtype": str(dtype)}


def key_digest(key: dict) -> str:
    """sha256 of a cache key (canonical JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def checkpoint_fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of a checkpoint's files: changes whenever it is rewritten in place."""
    entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in Path(path).rglob("*") if p.is_file())
    return key_digest({"files": entries})


class ReferenceCache:
    """Per-response reference log-probs of one dataset under one reference model."""

    def __init__(self, root: str | Path, dataset: PreferenceDataset, key: dict):
        self.root = Path(root)
        self.dataset = dataset
        self.key = key
        self.num_responses = int(dataset.store.resp_offsets[-1])
        self.logps: np.ndarray | None = None

    def _paths(self) -> tuple[Path, Path, Path]:
        return self.root / "logps.npy", self.root / "done.npy", self.root / "key.json"

    def check_key(self) -> None:
        """Raise if an existing cache was made for another dataset or reference."""
        _, _, key_path = self._paths()
        if key_path.is_file():
            old = json.loads(key_path.read_text())
            if old != self.key:
                raise ValueError(
                    f"reference.path: {self.root} holds reference log-probs for another dataset or "
                    f"reference model ({key_path}: {old}) than this run ({self.key}); delete it or set "
                    "reference.path to a new directory"
                )

    def load_progress(self) -> tuple[np.ndarray, np.ndarray]:
        """(logps [R] float64, done [U] bool): existing values or fresh arrays."""
        logps_path, done_path, _ = self._paths()
        if logps_path.is_file() and done_path.is_file():
            return np.load(logps_path), np.load(done_path)
        return np.zeros(self.num_responses, dtype=np.float64), np.zeros(len(self.dataset), dtype=bool)

    def save_progress(self, logps: np.ndarray, done: np.ndarray) -> None:
        """Write values and the done mask atomically (rank 0)."""
        self.root.mkdir(parents=True, exist_ok=True)
        logps_path, done_path, key_path = self._paths()
        for path, arr in ((logps_path, logps), (done_path, done)):
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
        key_path.write_text(json.dumps(self.key, indent=2, sort_keys=True))

    def is_complete(self) -> bool:
        _, done_path, _ = self._paths()
        return done_path.is_file() and bool(np.load(done_path).all())

    def lookup(self, mb: MicroBatch, positions: torch.Tensor) -> torch.Tensor:
        """[R] reference log-probs of a micro-batch's responses (``positions``: index within the unit)."""
        if self.logps is None:
            self.logps = np.load(self._paths()[0], mmap_mode="r")
        offsets = np.asarray(self.dataset.store.resp_offsets)[mb.resp_unit.cpu().numpy()]
        idx = offsets + positions.cpu().numpy()
        return torch.from_numpy(np.asarray(self.logps[idx], dtype=np.float32))


def precompute(
    cache: ReferenceCache,
    rows_for: Callable[[list[int]], list],
    compute: Callable[[list], list[tuple[MicroBatch, torch.Tensor]]],
    is_writer_source: bool,
    log: Callable[[str], None],
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Fill the cache (collective over all ranks); True when complete, False when ``stop()`` said so.

    ``stop()`` (the same answer on every rank: a preemption notice) is asked after each chunk is saved;
    when it says True the progress is on disk, a line says so, and a rerun resumes from there.

    ``rows_for(unit_ids)`` packs this DP rank's share of ``unit_ids`` into rows (equal counts on every
    rank); ``compute(rows)`` runs the forward-only pass and returns (micro-batch, values [R]) pairs on
    ranks that hold results (last pipeline stage), an empty list elsewhere. Only ``is_writer_source``
    ranks (last stage, TP rank 0, CP rank 0) contribute values; rank 0 writes.
    """
    from megatron_prefix.training.step import response_positions

    cache.check_key()
    logps, done = cache.load_progress()
    pending = np.nonzero(~done)[0]
    if len(pending) == 0:
        return True
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log(f"reference: computing log-probs of {len(pending)} units into {cache.root}")
    dp_size = _dp_world()
    bar = Progress(len(pending), "reference", unit="units", enabled=rank0, log=log)
    step = CHUNK_ROWS * dp_size * 8  # units per chunk, all ranks together (rough: several units per row)
    step = int(os.environ.get("MEGATRON_PREFIX_REFERENCE_CHUNK_UNITS", step))  # test hook: small chunks
    for number, start in enumerate(range(0, len(pending), step), 1):
        chunk = pending[start : start + step].tolist()
        results = compute(rows_for(chunk)) if chunk else []
        local = []
        if is_writer_source:
            for mb, values in results:
                pos = response_positions(mb).numpy()
                offsets = np.asarray(cache.dataset.store.resp_offsets)[mb.resp_unit.cpu().numpy()]
                local.append((offsets + pos, values.double().numpy(), np.unique(mb.resp_unit.cpu().numpy())))
        fault_point("precompute", number)
        gathered = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        if rank0:
            for part in gathered:
                for idx, values, units in part:
                    logps[idx] = values
                    done[units] = True
            cache.save_progress(logps, done)
        if dist.is_initialized():
            dist.barrier()
        bar.update(len(chunk))
        if stop is not None and start + step < len(pending) and stop():
            left = len(pending) - min(start + step, len(pending))
            log(f"reference: preempted: progress saved in {cache.root} ({left} of {len(done)} units left); "
                "rerun the same command to resume the precompute")
            bar.close()
            return False
    bar.close()
    if rank0 and not done.all():
        raise RuntimeError(f"reference: {int((~done).sum())} units were not computed; rerun to resume")
    return True


def _dp_world() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1
