"""``checkpoint.*``, the config only: importable without megatron (config errors come before megatron is
imported: ``training.cli``). The checkpoints themselves: ``training.checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_prefix.config import require


@dataclass
class CheckpointConfig:
    """``checkpoint.*``: where to save, how often, how many to keep, what to start from."""

    dir: str = "out/run"
    interval: int = 0  # save every N steps (0: only at the end and on preemption)
    keep_last: int = 2
    load: str | None = None  # a checkpoint dir (or a run dir with `latest`) to start from
    load_optimizer: bool = True  # False: weights only (fine-tuning from a converted checkpoint)
    save_at_end: bool = True
    # resume from this checkpoint of `dir` (e.g. iter_0000002) while the one `latest` names is unreadable
    resume_from: str | None = None

    def validate(self) -> None:
        require(bool(self.dir), "checkpoint.dir", "must be set")
        require(self.interval >= 0, "checkpoint.interval", f"must be >= 0, got {self.interval}")
        require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
