"""Per-step metrics: a JSONL file (always), the console, TensorBoard and W&B when asked (docs/logging.md).

``MetricsLogger`` runs on the last rank only (the one holding the loss); other ranks get a no-op logger.
Every optimizer step appends one JSON object to ``<checkpoint.dir>/metrics.jsonl`` with at least
``step, loss, accuracy, grad_norm, lr, pairs_per_s``; eval results are logged with ``split: "eval"``.
On resume, records for steps after the resume point are dropped first, so the file stays one record
per step. That trim writes a new file beside the old one (fsync) and renames it over (``os.replace``):
a kill at any moment leaves either the old or the trimmed file, never an empty one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_prefix.config import require
from megatron_prefix.faults import fault_point


@dataclass
class LoggingConfig:
    """``logging.*``."""

    interval: int = 1  # console line every N steps
    tensorboard: bool = False  # write <checkpoint.dir>/tensorboard (needs `pip install tensorboard`)
    wandb_project: str | None = None  # log to this W&B project (needs `pip install wandb`; WANDB_MODE=offline works)
    wandb_run: str | None = None  # W&B run name (default: W&B's)

    def validate(self) -> None:
        require(self.interval >= 1, "logging.interval", f"must be >= 1, got {self.interval}")

    def missing_packages(self) -> list[str]:
        """``logging.<field>: ... pip install X`` for each logger asked for whose package is not installed.

        Checked at the start of a run (``runner.parse_config``), before anything is built; not part of
        ``validate`` (a recipe is valid on a machine without the package)."""
        out = []
        if self.tensorboard and not _installed("tensorboard"):
            out.append("logging.tensorboard: is true but the tensorboard package is not installed: "
                       "pip install tensorboard (or set logging.tensorboard=false)")
        if self.wandb_project and not _installed("wandb"):
            out.append("logging.wandb_project: is set but the wandb package is not installed: pip install wandb "
                       "(or leave it unset)")
        return out


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Writes metrics; ``enabled=False`` makes every call a no-op (non-logging ranks)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if cfg.tensorboard:  # parse_config checked that the package is installed (missing_packages)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run, resume="allow",
                                     dir=str(Path(run_dir)))

    def _truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (and lines cut by a kill), atomically."""
        if not self.path.is_file():
            return
        keep = []
        lines = self.path.read_text().splitlines()
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        if len(keep) == len(lines):
            return  # nothing to drop: leave the file alone
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write("".join(k + "\n" for k in keep))
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("metrics_rewrite", step)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        """Append one record (a dict with ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True) + "\n")
        prefix = record.get("split", "train")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                if self._tb is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(rec: dict, max_steps: int) -> str:
    """One compact progress line for the console."""
    parts = [f"step {rec['step']:>5}/{max_steps}"]
    for key, fmt in (
        ("loss", ".4f"), ("accuracy", ".3f"), ("margin", ".3f"), ("grad_norm", ".3f"), ("lr", ".2e"),
        ("pairs_per_s", ".1f"), ("tokens_per_s", ".0f"), ("step_time_s", ".2f"),
    ):
        if key in rec and isinstance(rec[key], (int, float)):
            parts.append(f"{key} {rec[key]:{fmt}}")
    if "elapsed_s" in rec:  # wall time since this process's first step, and the time left at that pace
        from megatron_prefix.progress import format_duration

        parts.append(f"elapsed {format_duration(rec['elapsed_s'])} | eta {format_duration(rec.get('eta_s', -1))}")
    return " | ".join(parts)
