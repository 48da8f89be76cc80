"""``benchmarks/train_step.py``: shared vs unshared DPO steps in one process, with a sort-window sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.train_helpers import build_demo_dataset, env

pytestmark = pytest.mark.slow


def test_train_step_json(tmp_path):
    data = build_demo_dataset(tmp_path / "data", records=24)
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--data", str(data), "--steps", "1", "--warmup", "0",
         "--global-batch-units", "6", "--pack-tokens", "2048", "--sort-windows", "0,2", "--json", str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    for key in ("ideal_token_ratio", "ideal_pair_ratio", "time_ratio", "peak_memory_ratio", "steps", "loadavg"):
        assert key in r, key
    s, u = r["shared"], r["unshared"]
    assert r["ideal_token_ratio"] == pytest.approx(u["tokens"] / s["tokens"]) and r["ideal_token_ratio"] > 1
    assert r["ideal_pair_ratio"] == pytest.approx(u["attention_pairs"] / s["attention_pairs"])
    assert r["time_ratio"] == pytest.approx(u["step_s"][0] / s["step_s"][0], rel=1e-2)  # one timed step
    assert r["peak_memory_ratio"] == pytest.approx(u["peak_memory_bytes"] / s["peak_memory_bytes"])
    assert s["peak_memory_bytes"] > 0 and 0 < s["fill"] <= 1
    assert r["max_abs_loss_diff"] < 1e-4  # same units, same weights: sharing must not change the loss
    assert [w["sort_window"] for w in r["sort_sweep"]] == [0, 2]
    for w in r["sort_sweep"]:
        for layout in ("shared", "unshared"):
            assert 0 < w[layout]["fill"] <= 1 and w[layout]["rows_per_step"] >= 1
        assert w["shared"]["median_step_s"] > 0 and w["rows_ratio"] >= 1


def test_train_step_refuses_a_directory_that_is_not_a_dataset(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--data", str(tmp_path)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--data" in proc.stderr and "build_dataset" in proc.stderr
