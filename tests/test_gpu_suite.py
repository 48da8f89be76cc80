"""The GPU suite's rehearsal: ``bash benchmarks/gpu_suite.sh --rehearse`` runs every step on CPU with tiny
sizes, so a plumbing bug never costs device time (issue 13). Checks every output file the device run
returns and each step's status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

EXPECTED_FILES = ("summary.json", "suite.log", "train_step.png", "loss_curve.png", "raw.tar.gz")
STEPS = ("data", "gpu_tests", "attention", "train_dense", "train_flex", "train_varlen", "train_te", "loss_curve")
TRAIN_KEYS = ("ideal_token_ratio", "ideal_pair_ratio", "time_ratio", "peak_memory_ratio", "steps")


def test_rehearsal_writes_every_output(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for name in EXPECTED_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing:\n{log[-3000:]}"
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files
    for png in ("train_step.png", "loss_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert tuple(status) == STEPS, status
    for name in ("data", "gpu_tests", "train_dense", "loss_curve"):
        assert status[name] == "ok", summary["steps"]
    sweep_present = (ROOT / "benchmarks" / "attention_sweep.py").is_file()
    assert status["attention"] == ("ok" if sweep_present else "skipped"), summary["steps"]
    for name in ("train_flex", "train_varlen", "train_te"):  # CPU cannot train these: a config refusal
        assert status[name] in ("ok", "refused"), summary["steps"]
    assert summary["rehearsal"] is True and summary["ok"] is True

    train = summary["results"]["train_dense.json"]
    for key in TRAIN_KEYS:
        assert key in train, key
    assert train["ideal_token_ratio"] > 1.0 and train["time_ratio"] > 0 and train["peak_memory_ratio"] > 0
    assert train["max_abs_loss_diff"] < 1e-4  # sharing must not change the loss
    curve = summary["results"]["loss_curve.json"]
    assert curve["dtypes"] == ["float32", "float32"] and "fp32 against fp32" in curve["note"]
    assert all(d["max_abs_diff"] == 0.0 for d in curve["against_first"].values())  # deterministic on CPU

    with tarfile.open(out / "raw.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"raw/status.tsv", "raw/train_dense.json", "raw/loss_curve.json", "raw/device.txt"} <= names
