"""Progress lines with ETA (megatron_prefix.progress), the training console line, the demo summary."""

from __future__ import annotations

import sys

from megatron_prefix.progress import Progress, eta_seconds, format_duration
from megatron_prefix.training.metrics import console_line
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))

from demo_summary import summary


def test_durations_and_eta():
    assert format_duration(75) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(-1) == "?"
    assert format_duration(float("nan")) == "?"
    assert eta_seconds(25, 100, 10.0) == 30.0
    assert eta_seconds(0, 100, 10.0) == -1.0


def test_progress_prints_periodic_lines_without_a_terminal():
    lines: list[str] = []
    bar = Progress(4, "reference", unit="units", every_s=0.0, log=lines.append, tty=False)
    bar.update(1)
    bar.update(2)
    bar.close()
    assert lines[0].startswith("reference: 1/4 units (25%) | elapsed 0:00 | eta")
    assert lines[-1].startswith("reference: 3/4 units (75%)")
    assert len(lines) == 3
    quiet: list[str] = []
    off = Progress(4, "eval", enabled=False, every_s=0.0, log=quiet.append, tty=False)  # not rank 0
    off.update(4)
    off.close()
    assert quiet == []


def test_console_line_has_elapsed_and_eta():
    line = console_line({"step": 10, "loss": 0.5, "elapsed_s": 65.0, "eta_s": 130.0}, 30)
    assert line.startswith("step    10/30 | loss 0.5000")
    assert line.endswith("elapsed 1:05 | eta 2:10")


def _runs():
    shared = [{"step": s, "tokens": 1000.0, "step_time_s": 1.0, "pairs": 10, "loss": 1.0 / s} for s in range(1, 5)]
    unshared = [{"step": s, "tokens": 2500.0, "step_time_s": 2.0, "pairs": 10, "loss": 1.0 / s} for s in range(1, 4)]
    shared += [{"step": 2, "split": "eval", "accuracy": 0.61, "pairs": 50.0},
               {"step": 4, "split": "eval", "accuracy": 0.72, "pairs": 50.0}]
    return shared, unshared


def test_demo_summary_speedup_ideal_and_accuracy():
    shared, unshared = _runs()
    text = "\n".join(summary(shared, unshared, "out/demo/curves.png", seconds=150))
    assert "make demo took 2.5 min" in text
    assert "2.00x measured (same 3 steps" in text
    assert "2.50x ideal" in text
    assert "before not measured (at step 0" in text  # no eval at step 0: the baseline is stated, not claimed
    assert "after  0.720 at step 4 of 4" in text
    assert "out/demo/curves.png" in text
    shared.append({"step": 0, "split": "eval", "accuracy": 0.0, "pairs": 50.0})
    assert "before 0.000 at step 0" in "\n".join(summary(shared, unshared, "p.png"))
