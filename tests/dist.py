"""Run a script under torchrun with the gloo backend, so that a multi-process test is one function.

Usage in a test::

    from tests.dist import run_torchrun
    out = run_torchrun("tests/dist_scripts/my_check.py", nproc=2, args=["--tp", "2"])
    assert "OK" in out

The script runs with ``torch.distributed`` initialised by itself (``megatron_prefix.parallel``);
this helper only launches it on CPU, forwards arguments, and fails with the combined output of all
ranks when any rank fails or the timeout passes. Scripts need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, args: list[str] | None = None, timeout: float = 600) -> str:
    """Launch ``script`` on ``nproc`` CPU processes; return the combined output, raise on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(ROOT / script), *(args or []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"torchrun {script} timed out after {timeout}s:\n{err.stdout}\n{err.stderr}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) failed with {proc.returncode}:\n{out[-8000:]}")
    return out
