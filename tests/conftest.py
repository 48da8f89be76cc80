"""Test tiers: pure CPU (default), CPU multi-process with gloo (marked ``dist``), GPU (marked ``gpu``).

GPU tests are skipped without CUDA. Tests needing the real preference files use the ``shared_data``
fixture, which skips with a clear reason when ``../shared/data`` is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEGATRON_PREFIX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tier); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real preference files (../shared/data), or skip naming what is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see the project README: ../shared/data)")
    return SHARED_DATA


def shared_file(name: str) -> Path:
    """One real file from ../shared/data, or skip naming it."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (../shared/data is not beside this checkout)")
    return path
