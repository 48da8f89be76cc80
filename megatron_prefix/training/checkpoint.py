"""Checkpoints with megatron ``dist_checkpointing``: atomic, resumable, reshardable.

Layout of ``checkpoint.dir``::

    iter_0000020/            a complete checkpoint: megatron torch_dist shards of model + optimizer,
        train_state.json     step, scheduler state, data position, config, world layout
        rng/rank_00000.pt    per-rank torch / CUDA / megatron-tracker RNG states (tensors only)
    latest                   text: the directory name of the newest complete checkpoint
    metrics.jsonl            one JSON object per optimizer step (written by the trainer)

A save goes to ``iter_XXXXXXX.tmp`` and is renamed when every rank has finished; ``latest`` is then
replaced atomically (write + ``os.replace``), so a kill at any moment leaves ``latest`` on the previous
good checkpoint. Stale ``.tmp`` directories are removed at start-up. Only the last ``keep_last``
complete checkpoints are kept.

Resharding (resume at another TP/PP/DP) is dist_checkpointing's job: model and optimizer are saved as
sharded tensors. RNG states are restored only when the world layout is unchanged (they are per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import random as mcore_random

from megatron_prefix.config import require

EXTRA_STATE = "._extra_state"  # Transformer Engine modules' FP8 metadata (megatron's local modules: None)
LATEST = "latest"
STATE_FILE = "train_state.json"


@dataclass
class CheckpointConfig:
    """``checkpoint.*``: where to save, how often, how many to keep, what to start from."""

    dir: str = "out/run"
    interval: int = 0  # save every N steps (0: only at the end and on preemption)
    keep_last: int = 2
    load: str | None = None  # a checkpoint dir (or a run dir with `latest`) to start from
    load_optimizer: bool = True  # False: weights only (fine-tuning from a converted checkpoint)
    save_at_end: bool = True

    def validate(self) -> None:
        require(bool(self.dir), "checkpoint.dir", "must be set")
        require(self.interval >= 0, "checkpoint.interval", f"must be >= 0, got {self.interval}")
        require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from a run dir (via ``latest``) or a checkpoint dir itself; None if none."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        return path / name
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


def _fault_point(where: str, step: int) -> None:
    """Test hook: ``MEGATRON_PREFIX_FAULT=kill_in_save:STEP`` SIGKILLs the job mid-save at STEP (shards
    written, nothing renamed) so tests can prove ``latest`` never points at a partial save. The whole
    process group when this process leads it (as a scheduler kills a job: megatron's checkpoint helper
    processes go too), else this process."""
    fault = os.environ.get("MEGATRON_PREFIX_FAULT", "")
    if fault == f"kill_in_{where}:{step}":
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    """Save and load training checkpoints under ``cfg.dir``."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        if _rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, if any."""
        return resolve(self.dir)

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
        _fault_point("save", step)
        _barrier()
        if _rank() == 0:
            (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker = self.dir / (LATEST + ".tmp")
            marker.write_text(final.name + "\n")
            os.replace(marker, self.dir / LATEST)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_train_state(path: Path) -> dict:
        """``train_state.json`` of a checkpoint directory."""
        return json.loads((path / STATE_FILE).read_text())

    @staticmethod
    def load(path: Path, sharded_state_fn: Callable[[], dict], restore_rng: bool) -> tuple[dict, dict]:
        """Load shards into the structure ``sharded_state_fn()`` describes; returns (state, train_state)."""
        train_state = CheckpointManager.read_train_state(path)
        state = load_sharded(sharded_state_fn(), path)
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
