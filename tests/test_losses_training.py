"""End-to-end training with the TRL loss options on CPU (launch/train_dpo.py, tiny model, 3 steps).

- ``loss.type=[sigmoid,sft] loss.weights=[1.0,0.5]`` trains, and the shared and unshared layouts give the
  same losses (1e-5 absolute, as ``tests/test_training.py``);
- batch-level types (``aot``, ``aot_unpaired``, ``sft``) with LD-DPO and an online reference give the same
  loss and gradient norm with 2 data-parallel ranks as in one process: the global-batch plan
  (``training/step.py::attach_plans``) makes the split invisible.
"""

from __future__ import annotations

import pytest

from tests import train_helpers as th

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.build_demo_dataset(tmp_path_factory.mktemp("train") / "data", records=48)  # 3 steps of 16 units


def test_sigmoid_sft_mix_trains_and_layouts_agree(tmp_path, data):
    mix = ["loss.type=[sigmoid,sft]", "loss.weights=[1.0,0.5]", "reference.mode=online"]
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "shared", train={"max_steps": 3})
    out = th.train(recipe, mix)
    assert "['sigmoid', 'sft']" in out
    th.train(recipe, mix + ["data.layout=unshared", f"checkpoint.dir={tmp_path / 'unshared'}"])
    shared, unshared = th.metrics(tmp_path / "shared"), th.metrics(tmp_path / "unshared")
    assert len(shared) == len(unshared) == 3
    for a, b in zip(shared, unshared):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["margin"] - b["margin"]) <= 1e-5
        assert a["pairs"] == b["pairs"]
    assert shared[-1]["loss"] < shared[0]["loss"]  # it trains
    assert shared[0]["loss"] > 0.5 * 5.0  # the sft half is there: byte-level NLL ~ log(256) per token


@pytest.mark.dist
def test_batch_level_losses_are_invariant_to_data_parallelism(tmp_path, data):
    opts = ["loss.type=[aot,aot_unpaired,sft]", "loss.weights=[0.5,0.5,0.2]", "loss.ld_alpha=0.5",
            "reference.mode=online"]  # fmt: skip
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "one", train={"max_steps": 3})
    th.train(recipe, opts)
    th.train(recipe, opts + ["data.seed=1234", f"checkpoint.dir={tmp_path / 'two'}"], nproc=2)
    one, two = th.metrics(tmp_path / "one"), th.metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])
