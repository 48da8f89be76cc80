"""End-to-end training (launch/train_dpo.py, launch/train_rm.py) on CPU: exactness, resume, parallelism.

Tolerances: shared vs unshared and parallel layouts vs one process agree to 1e-5 absolute on the per-step
loss (fp32 CPU; differences are float rounding of reordered sums, measured around 1e-7); a resume on the
same layout is bitwise identical.
"""

from __future__ import annotations

import json
import random
import signal

import pytest
import yaml

from megatron_prefix.training.checkpoint import LATEST
from megatron_prefix.training.config import TrainConfig
from megatron_prefix.training.exit_codes import EXIT_PREEMPTED
from tests import train_helpers as th

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.build_demo_dataset(tmp_path_factory.mktemp("train") / "data")


def test_shared_and_unshared_layouts_give_the_same_training(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "shared", train={"max_steps": 20, "eval_interval": 10},
                             data={"eval_fraction": 0.2, "eval_units": 16})
    out = th.train(recipe)
    # progress: the training lines have elapsed time and ETA, evaluation and the reference precompute a
    # progress line (no terminal here); the run directory keeps the console and the resolved config
    assert "step    20/20 |" in out and "| elapsed " in out and "| eta 0:00" in out
    assert "eval step 10: 16/16 units (100%) | elapsed" in out
    assert "reference: " in out and " units (100%) | elapsed" in out
    console = (tmp_path / "shared" / "console.log").read_text()
    assert "step    20/20 |" in console and "eval step 20: 16/16 units" in console
    resolved = yaml.safe_load((tmp_path / "shared" / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 20 and resolved["data"]["layout"] == "shared"
    meta = json.loads((data / "meta.json").read_text())
    assert resolved["model"]["vocab_size"] == meta["tokenizer"]["vocab_size"]  # as built, not the recipe's
    th.train(recipe, ["data.layout=unshared", f"checkpoint.dir={tmp_path / 'unshared'}"])
    shared, unshared = th.metrics(tmp_path / "shared"), th.metrics(tmp_path / "unshared")
    assert len(shared) == len(unshared) == 20
    for a, b in zip(shared, unshared):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["margin"] - b["margin"]) <= 1e-5
        assert a["pairs"] == b["pairs"]
    assert shared[-1]["loss"] < shared[0]["loss"]  # it trains
    # the shared layout processes fewer tokens for the same pairs
    assert sum(r["tokens"] for r in shared) < 0.7 * sum(r["tokens"] for r in unshared)


def test_resume_after_sigkill_is_bitwise(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "ref",
                             train={"max_steps": 10}, checkpoint={"interval": 2, "dir": str(tmp_path / "ref")})
    th.train(recipe)
    kill_at = random.Random().randint(3, 8)
    proc = th.start(recipe, [f"checkpoint.dir={tmp_path / 'killed'}"])
    th.wait_for_step(tmp_path / "killed", kill_at, proc)
    assert th.kill(proc) != 0
    th.train(recipe, [f"checkpoint.dir={tmp_path / 'killed'}"])
    ref, resumed = th.metrics(tmp_path / "ref"), th.metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 11)), f"killed at step {kill_at}"
    for a, b in zip(ref, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (kill_at, a["step"])


def test_kill_during_save_keeps_latest_on_the_last_good_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    recipe = th.write_recipe(tmp_path / "r.yaml", data, run, train={"max_steps": 6},
                             checkpoint={"interval": 2, "dir": str(run)})
    th.train(recipe, expect_rc=-signal.SIGKILL, extra_env={"MEGATRON_PREFIX_FAULT": "kill_in_save:4"})
    assert (run / LATEST).read_text().strip() == "iter_0000002"
    assert (run / "iter_0000004.tmp").is_dir() and not (run / "iter_0000004").exists()
    out = th.train(recipe)
    assert "resumed from" in out and "iter_0000002" in out
    assert not (run / "iter_0000004.tmp").exists()
    assert (run / LATEST).read_text().strip() == "iter_0000006"
    th.train(recipe, [f"checkpoint.dir={tmp_path / 'clean'}"])
    assert th.losses(run) == th.losses(tmp_path / "clean")


def test_sigterm_saves_and_exits_preempted(tmp_path, data):
    run = tmp_path / "run"
    recipe = th.write_recipe(tmp_path / "r.yaml", data, run, train={"max_steps": 400})
    proc = th.start(recipe)
    th.wait_for_step(run, 2, proc)
    assert th.kill(proc, signal.SIGTERM) == EXIT_PREEMPTED  # saved, not finished: a scheduler requeues
    latest = (run / LATEST).read_text().strip()
    assert latest == f"iter_{th.metrics(run)[-1]['step']:07d}"


def test_nonfinite_loss_stops_naming_the_step(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", train={"max_steps": 6},
                             optimizer={"lr": 1.0e30, "min_lr": 0.0, "clip_grad": 0.0})
    out = th.train(recipe, expect_rc=3)
    assert "non-finite" in out and "at step" in out and "Last good checkpoint: none" in out


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2", "data.seed=1234"])
def test_parallel_layouts_match_one_process(tmp_path, data, layout):
    """TP=2, CP=2, and DP=2 (the last: 2 processes with tp=cp=1) match the single-process loss curve."""
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "one", train={"max_steps": 4})
    th.train(recipe)
    th.train(recipe, [layout, f"checkpoint.dir={tmp_path / 'two'}"], nproc=2)
    one, two = th.metrics(tmp_path / "one"), th.metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (layout, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])


@pytest.mark.dist
def test_resharding_save_tp2_resume_tp1_and_pp2(tmp_path, data):
    """Save at TP=2, resume at TP=1 and at PP=2 (tied embeddings: the shared weight crosses stages)."""
    import shutil

    tied = "model.tie_word_embeddings=true"
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", train={"max_steps": 6})
    th.train(recipe, ["parallel.tp=2", "train.exit_interval=3", tied], nproc=2)
    assert (tmp_path / "run" / LATEST).read_text().strip() == "iter_0000003"
    shutil.copytree(tmp_path / "run", tmp_path / "run_pp")
    assert "resumed from" in th.train(recipe, [tied])  # same run dir, one process: resumes at TP=1
    assert "resumed from" in th.train(recipe, [tied, "parallel.pp=2", f"checkpoint.dir={tmp_path / 'run_pp'}"],
                                      nproc=2)
    th.train(recipe, [tied, f"checkpoint.dir={tmp_path / 'tp1'}"])
    reference = th.metrics(tmp_path / "tp1")
    for resumed in ("run", "run_pp"):
        got = th.metrics(tmp_path / resumed)
        assert [r["step"] for r in got] == [r["step"] for r in reference]
        for a, b in zip(got, reference):
            assert abs(a["loss"] - b["loss"]) <= 1e-5, (resumed, a["step"], a["loss"], b["loss"])


def test_config_errors_name_the_field(tmp_path):
    cfg = TrainConfig()
    cfg.data.path = str(tmp_path)
    cfg.model.num_attention_heads, cfg.model.num_query_groups = 4, 2
    cfg.parallel.tp = 4
    with pytest.raises(ValueError, match="model.num_query_groups"):
        cfg.validate(world_size=4)
    cfg.parallel.tp, cfg.parallel.pp, cfg.model.num_layers = 1, 2, 3
    with pytest.raises(ValueError, match="model.num_layers"):
        cfg.validate(world_size=2)
    cfg.parallel.pp, cfg.parallel.cp, cfg.data.pack_tokens = 1, 3, 2048
    with pytest.raises(ValueError, match="data.pack_tokens"):
        cfg.validate(world_size=3)
    cfg.parallel.cp = 1
    cfg.attention.backend = "flex"
    with pytest.raises(ValueError, match="attention.backend"):
        cfg.validate(world_size=1, cuda=False)
    cfg.attention.backend = "dense"
    cfg.parallel.tp = 3
    with pytest.raises(ValueError, match="parallel.tp"):
        cfg.validate(world_size=4)
    cfg.parallel.tp, cfg.loss.type = 1, "bt"
    with pytest.raises(ValueError, match="loss.type"):
        cfg.validate(world_size=1)


def test_unknown_override_is_an_error(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    out = th.train(recipe, ["train.max_stpes=3"], expect_rc=2)
    assert "train.max_stpes" in out


def test_reference_cache_is_refused_for_another_reference(tmp_path, data):
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "a", train={"max_steps": 1},
                             reference={"mode": "precompute", "path": str(tmp_path / "ref")})
    th.train(recipe)
    assert (tmp_path / "ref" / "key.json").is_file()
    # another reference model (a different init) with the same explicit cache: refused, naming the field
    out = th.train(recipe, ["model.init_method_std=0.07", f"checkpoint.dir={tmp_path / 'b'}"], expect_rc=2)
    assert "reference.path" in out and "another dataset or reference model" in out


def test_online_reference_matches_precomputed(tmp_path, data):
    """A frozen copy of the initial policy in the same step gives the precomputed reference's losses."""
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "pre", train={"max_steps": 3})
    th.train(recipe)
    th.train(recipe, ["reference.mode=online", f"checkpoint.dir={tmp_path / 'online'}"])
    pre, online = th.metrics(tmp_path / "pre"), th.metrics(tmp_path / "online")
    assert len(pre) == len(online) == 3
    for a, b in zip(pre, online):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) <= 1e-4
