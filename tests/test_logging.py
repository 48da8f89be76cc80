"""Loggers: TensorBoard asked for without the package fails at start with the install command (before any
model is built); W&B logs a run in offline mode (``WANDB_MODE=offline``)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megatron_prefix.training import metrics
from megatron_prefix.training.metrics import LoggingConfig, MetricsLogger
from tests import train_helpers as th


def _errors(cfg: LoggingConfig) -> list[str]:
    return cfg.missing_packages()


def test_missing_packages_are_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr(metrics, "_installed", lambda package: False)
    assert _errors(LoggingConfig()) == []  # the default needs nothing
    msgs = _errors(LoggingConfig(tensorboard=True, wandb_project="p"))
    assert any(m.startswith("logging.tensorboard") and "pip install tensorboard" in m for m in msgs), msgs
    assert any(m.startswith("logging.wandb_project") and "pip install wandb" in m for m in msgs), msgs
    monkeypatch.setattr(metrics, "_installed", lambda package: True)
    assert _errors(LoggingConfig(tensorboard=True, wandb_project="p")) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_train_with_tensorboard_but_no_package_exits_2(tmp_path):
    recipe = th.write_recipe(tmp_path / "r.yaml", tmp_path / "no-data-needed", tmp_path / "run")
    out = th.train(recipe, ["logging.tensorboard=true"], expect_rc=2)
    assert "logging.tensorboard" in out and "pip install tensorboard" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (dev extra)")
def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb_project="megatron-prefix-test", wandb_run="t"), enabled=True)
    for step in (1, 2):
        logger.log({"step": step, "loss": 0.7 / step, "lr": 1e-6})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
