"""``benchmarks/attention_sweep.py --rehearse``: the GPU sweep's code path on CPU writes its JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_sweep_rehearsal_writes_json_and_png(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/attention_sweep.py", "--rehearse", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "attention_sweep.json").read_text())
    assert (tmp_path / "attention_sweep.png").stat().st_size > 1000
    assert {"device", "dtype", "torch", "tokens", "backends", "results", "rehearse"} <= set(doc)
    assert doc["rehearse"] and doc["dtype"] == "float32"
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["dataset"] for r in ok} >= {"Capybara", "HH", "MetaMath", "TLDR", "Tulu-Helpsteer", "UltraFeedback"}
    assert {r["backend"] for r in ok} >= {"dense", "varlen", "flex"}
    for r in ok:
        assert {"time_ratio", "ideal_pair_ratio", "ideal_token_ratio", "shared_ms", "unshared_ms", "tokens",
                "units", "prompt_len", "completion_len", "forward_backward", "baseline"} <= set(r)
        assert r["time_ratio"] > 0 and r["unshared_pairs"] >= r["shared_pairs"] > 0
    assert all(r["forward_backward"] for r in ok if r["backend"] in ("dense", "varlen"))
    assert any(r["status"].startswith("skipped") for r in doc["results"] if r["backend"] == "te") or \
        any(r["backend"] == "te" for r in ok)
    assert "time ratio" in proc.stdout and "ideal (pairs)" in proc.stdout
