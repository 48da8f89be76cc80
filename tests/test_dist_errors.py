"""Errors in a multi-process run (issue 12 item 4): printed once, and an error on one rank ends every rank.

The fault hook (``MEGATRON_PREFIX_FAULT=error_in_setup:0``, ``MEGATRON_PREFIX_FAULT_RANK=1``) raises a data
error on rank 1 only, after the process groups exist and before the model is built; rank 0 goes on into the
reference precompute's collectives, where it would wait forever for rank 1 without the failure handling.
"""

from __future__ import annotations

import time

import pytest

from tests import train_helpers as th

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.build_demo_dataset(tmp_path_factory.mktemp("errors") / "data", records=48)


def test_error_on_one_rank_ends_the_job_printed_once(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", reference={"mode": "precompute"})
    t0 = time.monotonic()
    out = th.train(recipe, ["data.global_batch_units=8"], nproc=2, expect_rc=1, timeout=120,
                   extra_env={"MEGATRON_PREFIX_FAULT": "error_in_setup:0", "MEGATRON_PREFIX_FAULT_RANK": "1"})
    assert time.monotonic() - t0 < 90  # ended, no rank left in a collective
    assert out.count("injected fault at setup:0 on rank 1") == 1, out[-4000:]
    assert "[rank 1] train_dpo: config error:" in out
    assert 'File "' + str(th.ROOT / "megatron_prefix") not in out  # no traceback of ours


def test_same_error_on_every_rank_is_printed_once_by_rank0(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    out = th.train(recipe, ["data.global_batch_units=8"], nproc=2, expect_rc=1, timeout=120,
                   extra_env={"MEGATRON_PREFIX_FAULT": "error_in_setup:0"})
    assert out.count("injected fault at setup:0") == 1, out[-4000:]
    assert "train_dpo: config error:\n  injected fault at setup:0 (" in out and "[rank " not in out


def test_config_error_under_torchrun_is_printed_once(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    out = th.train(recipe, ["optimizer.lr=abc"], nproc=2, expect_rc=1, timeout=120)
    assert out.count("optimizer.lr: expected a float, got 'abc'") == 1, out[-4000:]
