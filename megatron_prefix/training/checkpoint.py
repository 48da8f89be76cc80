"""Checkpoints with megatron ``dist_checkpointing``: atomic, resumable, reshardable.

Layout of ``checkpoint.dir``::

    iter_0000020/            a complete checkpoint: megatron torch_dist shards of model + optimizer,
        train_state.json     step, scheduler state, data position, config, world layout
        rng/rank_00000.pt    per-rank torch / CUDA / megatron-tracker RNG states (tensors only)
        manifest.json        size and sha256 of every other file of the checkpoint (written last)
    latest                   text: the directory name of the newest complete checkpoint
    metrics.jsonl            one JSON object per optimizer step (written by the trainer)
    .lock                    host and pid of the job using this directory (see megatron_prefix.locks)

One job per directory: the manager takes ``.lock`` first (a second job is refused naming the holder's host
and pid; a lock left by a dead process on this host is taken over, saying so) and only then removes stale
``iter_*.tmp`` directories. A save goes to ``iter_XXXXXXX.tmp``; when every rank has finished, rank 0
writes ``train_state.json`` and ``manifest.json`` there, renames it, then replaces ``latest`` atomically
(write + fsync + ``os.replace``), so a kill at any moment leaves ``latest`` on the previous good
checkpoint. Only the last ``keep_last`` complete checkpoints are kept.

Before loading, ``verify`` checks a checkpoint against its manifest (every file present, same size, same
sha256; the ranks share the hashing) and reads ``.metadata`` through the safe unpickler
(``compat.safe_metadata``); a bad file is a ``CheckpointError`` naming it. When the checkpoint that
``latest`` names is unreadable the run stops, naming the previous complete checkpoint:
``checkpoint.resume_from=iter_XXXXXXX`` resumes from it (never a silent fallback). Checkpoints written
before manifests existed load with a note.

Resharding (resume at another TP/PP/DP) is dist_checkpointing's job: model and optimizer are saved as
sharded tensors. RNG states are restored only when the world layout is unchanged (they are per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import random as mcore_random

from megatron_prefix.compat.safe_metadata import install_safe_metadata_reader
from megatron_prefix.faults import fault_point
from megatron_prefix.locks import DirLock
from megatron_prefix.training.checkpoint_config import CheckpointConfig  # also the public name here
from megatron_prefix.training.manifest import (  # noqa: F401 - re-exported: the checkpoint API in one place
    _ITER,
    LATEST,
    MANIFEST,
    METADATA,
    STATE_FILE,
    CheckpointError,
    _broadcast,
    read_latest,
    verify,
    write_manifest,
)

LOCK_FILE = ".lock"

EXTRA_STATE = "._extra_state"  # Transformer Engine modules' FP8 metadata (megatron's local modules: None)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from a run dir (via ``latest``) or a checkpoint dir itself; None if none."""
    path = Path(path)
    latest = read_latest(path)
    if latest is not None:
        return latest
    if (path / STATE_FILE).is_file():
        return path
    return None


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors (torch, CUDA, megatron's model-parallel tracker)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = mcore_random.get_cuda_rng_tracker()
    state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointManager:
    """Save and load training checkpoints under ``cfg.dir`` (holding ``cfg.dir/.lock`` meanwhile)."""

    def __init__(self, cfg: CheckpointConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.lock = DirLock(self.dir / LOCK_FILE, "checkpoint.dir")
        install_safe_metadata_reader()
        error, note = None, None
        if _rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                note = self.lock.acquire()
            except ValueError as err:
                error = str(err)
        error, note = _broadcast((error, note))
        if error:
            raise CheckpointError(error)
        if note:
            log(note)
        if _rank() == 0:  # only the lock holder may remove a save in progress
            for stale in self.dir.glob("iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def close(self) -> None:
        """Release the directory lock (also done at interpreter exit)."""
        self.lock.release()

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, if any (as ``latest`` names it)."""
        try:
            return read_latest(self.dir)
        except CheckpointError:
            return None

    def complete(self) -> list[Path]:
        """This run's complete checkpoint directories, oldest first."""
        return sorted(p for p in self.dir.glob("iter_*") if p.is_dir() and _ITER.match(p.name))

    def resume_point(self, log: Callable[[str], None] = print) -> Path | None:
        """The verified checkpoint to resume from (None: a fresh run); collective.

        ``latest`` decides. When the checkpoint it names is unreadable, ``checkpoint.resume_from`` (a
        directory name under ``checkpoint.dir``) is used if set, else a ``CheckpointError`` names the
        problem and the previous complete checkpoint to pass as ``checkpoint.resume_from``.
        """
        asked = self.cfg.resume_from
        try:
            path = read_latest(self.dir)
            if path is None and not asked:
                return None
            if path is not None:
                note = verify(path)
                if note:
                    log(note)
                if asked:
                    log(f"note: checkpoint.resume_from={asked} ignored: {path} (latest) is complete")
                return path
            broken = f"{self.dir / LATEST}: missing"
        except CheckpointError as err:
            broken = str(err)
        if asked:
            chosen = self.dir / asked if not Path(asked).is_absolute() else Path(asked)
            try:
                note = verify(chosen)
            except CheckpointError as err:
                raise CheckpointError(f"checkpoint.resume_from: {err}") from err
            log(f"checkpoint.resume_from: resuming from {chosen} because the latest checkpoint is unusable: "
                f"{broken}")
            if note:
                log(note)
            return chosen
        raise CheckpointError(self._unusable_message(broken))

    def _unusable_message(self, broken: str) -> str:
        bad = self.dir / self.dir.joinpath(LATEST).read_text().strip() if (self.dir / LATEST).is_file() else None
        for cand in reversed(self.complete()):
            if bad is not None and cand.name == bad.name:
                continue
            try:
                verify(cand)
            except CheckpointError:
                continue
            return (f"the latest checkpoint cannot be used: {broken}. The previous complete checkpoint is "
                    f"{cand}; rerun with checkpoint.resume_from={cand.name} to resume from it (steps after "
                    "it are trained again), or move the damaged checkpoint away to start over")
        return (f"the latest checkpoint cannot be used: {broken}. No earlier complete checkpoint in "
                f"{self.dir}: restore the files, or use a new checkpoint.dir to start over")

    def save(self, step: int, sharded_state: dict, train_state: dict) -> Path:
        """Save collectively (all ranks call it); returns the final directory."""
        final = self.dir / f"iter_{step:07d}"
        tmp = self.dir / f"iter_{step:07d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dist_checkpointing.save(sharded_state, str(tmp))  # wants an empty directory
        if _rank() == 0:
            (tmp / "rng").mkdir(exist_ok=True)
        _barrier()
        torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        fault_point("save", step)
        _barrier()
        if _rank() == 0:
            (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
        _barrier()
        write_manifest(tmp)
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker = self.dir / (LATEST + ".tmp")
            with open(marker, "w") as fh:
                fh.write(final.name + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(marker, self.dir / LATEST)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = [p for p in self.complete() if p.name != keep.name]
        for old in done[: max(0, len(done) + 1 - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_train_state(path: Path) -> dict:
        """``train_state.json`` of a checkpoint directory (``CheckpointError`` naming it when unreadable)."""
        try:
            return json.loads((Path(path) / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{Path(path) / STATE_FILE}: unreadable ({err})") from err

    @staticmethod
    def load(path: Path, sharded_state_fn: Callable[[], dict], restore_rng: bool) -> tuple[dict, dict]:
        """Load shards into the structure ``sharded_state_fn()`` describes; returns (state, train_state)."""
        install_safe_metadata_reader()
        train_state = CheckpointManager.read_train_state(path)
        try:
            state = load_sharded(sharded_state_fn(), path)
        except CheckpointError:
            raise
        except Exception as err:  # name the checkpoint whatever megatron/torch raise
            raise CheckpointError(f"{path}: cannot load the checkpoint ({type(err).__name__}: {err})") from err
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        if restore_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state, train_state


def _sharded_keys(tree: Any) -> set[str]:
    """Checkpoint keys (``ShardedBase.key``) in a nested sharded state dict."""
    if isinstance(tree, dict):
        return set().union(*(_sharded_keys(v) for v in tree.values())) if tree else set()
    if isinstance(tree, (list, tuple)):
        return set().union(*(_sharded_keys(v) for v in tree)) if tree else set()
    key = getattr(tree, "key", None)
    return {key} if isinstance(key, str) else set()


def load_sharded(sharded_state: dict, path: str | Path) -> dict:
    """``dist_checkpointing.load`` with the key sets checked; the only tolerated gap is ``*._extra_state``.

    - A key the model asks for that the checkpoint lacks is an error naming it, except ``*._extra_state``:
      a checkpoint written with megatron's local spec (the converter, CPU runs) has no entry for what
      only Transformer Engine modules hold; they keep their fresh defaults (``load_state`` tolerates
      exactly these keys).
    - A checkpoint key in the model's namespaces (``embedding``, ``decoder``, ``output_layer``: the first
      component of the keys under ``sharded_state["model"]``) that no rank asks for is an error naming it,
      else a weight would be dropped silently. Optimizer keys the run does not load are not checked.

    Layer norms need no renaming: megatron's local spec saves them under the Transformer Engine names
    (``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight``), see
    ``megatron_prefix.convert.layout.CKPT_LAYER_KEYS``.
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, unrequested, absent = dist_checkpointing.load(sharded_state, str(path), strict=StrictHandling.RETURN_ALL)
    lacking = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if lacking:
        raise ValueError(f"checkpoint.load: {path} lacks {len(lacking)} keys this model needs: {lacking[:10]}; "
                         "is it a checkpoint of this architecture (model.*)?")
    spaces = {k.split(".", 1)[0] for k in _sharded_keys(sharded_state.get("model", {}))}
    extra = sorted(k for k in unrequested if k.split(".", 1)[0] in spaces and not k.endswith(EXTRA_STATE))
    if extra:
        raise ValueError(f"checkpoint.load: {path} holds {len(extra)} model keys this model has no place for: "
                         f"{extra[:10]}; is it a checkpoint of this architecture (model.*)?")
    return state
