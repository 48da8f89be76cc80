"""Real weights for the forward-only tools (``tools/score.py``, ``tools/verify_sharing.py``).

A weight source is either one of our megatron checkpoints (a run directory with ``latest``, or an
``iter_XXXXXXX`` directory with ``train_state.json``, as ``tools/convert_hf_to_mcore.py`` and training
write them) or a Hugging Face folder (``config.json`` + ``*.safetensors``), which is converted with the
project's converter (``megatron_prefix.convert.convert_hf_to_mcore``) into a temporary run directory at
the current tensor-parallel size. Loading goes through ``dist_checkpointing`` exactly as
``checkpoint.load`` does in training, so any TP can read any checkpoint.

Collective: every rank calls these functions after ``init_parallel``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.training.checkpoint import CheckpointManager, resolve


@dataclass
class WeightSource:
    """A resolved checkpoint directory, its model config and task (``dpo``: LM head, ``rm``: scalar head)."""

    path: Path
    model: ModelConfig
    task: str
    state: dict = field(default_factory=dict)  # train_state.json
    temp_dir: Path | None = None  # a conversion made for this process (removed by ``cleanup``)

    def cleanup(self) -> None:
        """Remove the temporary conversion (rank 0, after every rank has loaded)."""
        if dist.is_initialized():
            dist.barrier()
        if self.temp_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def is_hf_folder(path: str | Path) -> bool:
    """A folder holding a Hugging Face ``config.json`` and safetensors weights."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _model_config(saved: dict) -> ModelConfig:
    from megatron_prefix.training.vocab import model_config_from_dict

    return model_config_from_dict(saved)


def open_weights(source: str | Path, tp: int, flag: str = "--ckpt", progress: bool = False) -> WeightSource:
    """Resolve ``source`` (megatron checkpoint or HF folder) to a loadable checkpoint at ``tp``.

    Raises ``ValueError`` naming ``flag`` when ``source`` is neither."""
    ckpt = resolve(source) if Path(source).is_dir() else None
    temp = None
    if ckpt is None and is_hf_folder(source):
        from megatron_prefix.convert import convert_hf_to_mcore

        box = [tempfile.mkdtemp(prefix="megatron_prefix_weights_") if _rank() == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        temp = Path(box[0])
        convert_hf_to_mcore(source, temp, tp=tp, pp=1, progress=progress)
        ckpt = resolve(temp)
    if ckpt is None:
        raise ValueError(
            f"{flag}: {source} is neither a megatron checkpoint (a run dir with `latest` or a dir with "
            "train_state.json) nor a Hugging Face folder (config.json + *.safetensors)"
        )
    state = CheckpointManager.read_train_state(ckpt)
    if not state.get("model"):
        raise ValueError(f"{flag}: {ckpt}/train_state.json records no model config")
    return WeightSource(ckpt, _model_config(state["model"]), state.get("task", "dpo"), state, temp)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Fill ``model`` (this rank's stage, any TP) from the checkpoint ``path`` (key ``model``), strictly."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    core = unwrap_model(model)
    loaded = dist_checkpointing.load({"model": core.sharded_state_dict()}, str(path))
    missing, unexpected = core.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
