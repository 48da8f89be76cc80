"""Sequence parallelism with megatron's local spec on CPU (gloo): TP=2 + SP equals TP=1.

The model-level test compares per-response log-probs, the reward head's last-token hidden states (the RM path) and
every parameter gradient with the single-process run (TP=2 and TP=2 x CP=2, with the native gloo
collectives and with the fallback ones of ``megatron_prefix.compat.sp_collectives``). The training tests
run ``launch/train_dpo.py`` with ``parallel.sequence_parallel=true`` for three steps and
compare the per-step loss and gradient norm with one process; without the norm-weight gradient
reduction (measured) the gradient norm is 1e-4 off at step 1, so the tolerance here is 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from tests import train_helpers as th
from tests.dist import run_torchrun
from tests.dist_scripts.model_common import loss_weights, randomize_, shared_logps, tiny_config

ABS_TOL = 1e-5  # per-response summed log-prob (as tests/test_model.py)
GRAD_RTOL = 1e-5
TRAIN_TOL = 1e-6  # per-step loss and grad norm (measured SP vs one process: < 1e-7)


@pytest.fixture(scope="module")
def single():
    """Single-process log-probs, last-token hidden states and gradients of the parity model."""
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import last_token_hidden
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.parallel import init_parallel
    from tests.dist_scripts.model_parity import MODEL_SEED, parity_rows
    from tests.dist_scripts.sp_parity import FAMILY

    init_parallel(1, 1, 1, seed=1234)
    cfg = tiny_config(FAMILY)
    model = build_model(cfg, "dense", impl="local")
    assert not any(getattr(p, "sequence_parallel", False) for p in model.parameters())
    randomize_(model, MODEL_SEED)
    rows = parity_rows(cfg)
    with torch.no_grad():
        mb = MicroBatch.from_rows(rows)
        last = last_token_hidden(mb.forward(model, return_hidden=True), mb.index)
    out = shared_logps(model, rows)
    (loss_weights(len(out.logps)) * out.logps).sum().backward()
    return out.logps.detach(), last, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.dist
@pytest.mark.parametrize("collectives", ["native", "fallback"])
def test_tp2_and_tp2cp2_with_sequence_parallel_match_one_process(single, tmp_path, collectives):
    logps, last, grads = single
    path = tmp_path / "sp.pt"
    run_torchrun("tests/dist_scripts/sp_parity.py", nproc=4,
                 args=["--out", str(path), "--collectives", collectives], timeout=300)
    results = torch.load(path)
    assert set(results) == {"tp2sp", "tp2cp2sp"}
    for layout, res in results.items():
        assert any("final_layernorm" in n for n in res["marked"]), res["marked"]
        diff = (res["logps"] - logps).abs().max().item()
        assert diff <= ABS_TOL, f"{layout}: max |logp diff| {diff:.3g}"
        torch.testing.assert_close(res["last_hidden"], last, rtol=1e-5, atol=1e-5)
        assert set(res["grads"]) == set(grads)
        for name, g in grads.items():
            rel = float((res["grads"][name] - g).norm() / g.norm())
            assert rel <= GRAD_RTOL, f"{layout}: grad of {name} off by {rel:.3g}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A tiny dataset, a 3-step DPO recipe and its single-process metrics."""
    tmp = tmp_path_factory.mktemp("sp")
    data = th.build_demo_dataset(tmp / "data", records=64)
    recipe = th.write_recipe(tmp / "r.yaml", data, tmp / "one", train={"max_steps": 3})
    th.train(recipe)
    return recipe, th.metrics(tmp / "one")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [(["parallel.tp=2"], 2), (["parallel.tp=2", "parallel.cp=2"], 4)])
def test_training_with_sequence_parallel_matches_one_process(tmp_path, one_process, layout, nproc):
    recipe, one = one_process
    th.train(recipe, [*layout, "parallel.sequence_parallel=true", f"checkpoint.dir={tmp_path / 'sp'}"], nproc=nproc)
    sp = th.metrics(tmp_path / "sp")
    assert len(one) == len(sp) == 3
    for a, b in zip(one, sp):
        assert abs(a["loss"] - b["loss"]) <= TRAIN_TOL, (layout, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TRAIN_TOL * max(1.0, a["grad_norm"]), (
            layout, a["step"], a["grad_norm"], b["grad_norm"])


def test_sp_collectives_are_pinned(monkeypatch):
    from megatron.core.tensor_parallel import mappings

    from megatron_prefix.compat import CompatError
    from megatron_prefix.compat.sp_collectives import patch_sp_collectives

    monkeypatch.delattr(mappings, "dist_reduce_scatter_func")
    with pytest.raises(CompatError, match=r"mappings\.dist_reduce_scatter_func is missing"):
        patch_sp_collectives()


def test_local_norms_are_marked_only_with_sequence_parallel():
    from megatron_prefix.model.config import ModelConfig  # noqa: F401 (tiny_config returns one)
    from megatron_prefix.model.norm import TorchNorm

    cfg = tiny_config("llama")
    for sp in (False, True):
        tc = cfg.to_transformer_config(tp=2, sequence_parallel=sp)
        norm = TorchNorm(tc, cfg.hidden_size, eps=1e-5)
        assert isinstance(norm, torch.nn.RMSNorm)
        assert norm.weight.sequence_parallel is sp
