"""Helpers for the training tests: a tiny built dataset, a tiny recipe, and runs as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.dist import free_port

TINY_MODEL = {
    "family": "llama", "hidden_size": 32, "ffn_hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
    "num_query_groups": 2, "max_position_embeddings": 2048, "init_method_std": 0.05,
}


def build_demo_dataset(out: Path, records: int = 160, seed: int = 0) -> Path:
    """The project's sorting data (K = 2 and 4), byte tokenizer, rows of 2048 tokens."""
    jsonl = out.parent / f"{out.name}.jsonl"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--output", str(jsonl),
                    "--records", str(records), "--seed", str(seed)], check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(jsonl),
                    "--tokenizer", "byte", "--output", str(out), "--max-unit-tokens", "1024",
                    "--pack-tokens", "2048"], check=True, capture_output=True)
    return out


def write_recipe(path: Path, dataset: Path, run_dir: Path, **sections) -> Path:
    """A tiny DPO recipe; ``sections`` replace top-level sections (dicts are merged)."""
    recipe = {
        "model": dict(TINY_MODEL),
        "data": {"path": str(dataset), "pack_tokens": 2048, "global_batch_units": 16, "eval_fraction": 0.0},
        "optimizer": {"lr": 2.0e-3, "min_lr": 2.0e-4, "clip_grad": 1.0},
        "schedule": {"warmup_steps": 2, "decay_style": "cosine"},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "checkpoint": {"dir": str(run_dir), "interval": 0},
        "logging": {"interval": 1, "tensorboard": False},
        "train": {"max_steps": 6, "seed": 7},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def command(recipe: Path, overrides: list[str], nproc: int = 1, task: str = "dpo") -> list[str]:
    script = str(ROOT / "launch" / f"train_{task}.py")
    if nproc == 1:
        return [sys.executable, script, "--config", str(recipe), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", script, "--config", str(recipe), *overrides]


def env(extra: dict | None = None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **(extra or {}))


def train(recipe: Path, overrides: list[str] = (), nproc: int = 1, task: str = "dpo", expect_rc: int = 0,
          extra_env: dict | None = None, timeout: float = 600) -> str:
    """Run a training job to completion; returns its output, asserts on the exit code."""
    # a session of its own, so a kill (like SLURM's) takes megatron's helper processes with it
    proc = subprocess.run(command(recipe, list(overrides), nproc, task), cwd=ROOT, env=env(extra_env),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"exit {proc.returncode} (expected {expect_rc}):\n{out[-6000:]}"
    return out


def start(recipe: Path, overrides: list[str] = ()) -> subprocess.Popen:
    """Start a single-process job in the background."""
    return subprocess.Popen(command(recipe, list(overrides)), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl records ``step`` (or the process ends)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Signal the job; SIGKILL goes to its whole process group (as a scheduler kills a job)."""
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return proc.wait(timeout=120)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split", "train") == split:
            out.append(rec)
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]
