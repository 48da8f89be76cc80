"""megatron_prefix.compat and megatron_prefix.parallel: CPU accommodations, AdamW-fallback fix, process groups.

In-process tests cover the pure parts (device mapping, upgrade guard, type-name scope, step repair, size
validation). Multi-process tests (``dist``) run stock megatron-core on gloo through tests/dist_scripts/compat_*.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_prefix import compat
from megatron_prefix.compat import CompatError, cpu, pins
from megatron_prefix.compat.adamw import repair_adam_steps
from megatron_prefix.compat.torch_proxy import TORCH_ON_CPU, to_cpu_device
from megatron_prefix.parallel import _validate_sizes
from tests.dist import run_torchrun

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU accommodations are off with CUDA")


# --- in-process -----------------------------------------------------------------------------------------------


def test_proxy_maps_cuda_devices_and_forwards_the_rest():
    for spec in ("cuda", "cuda:1", 0, torch.device("cuda", 0)):
        assert to_cpu_device(spec) == torch.device("cpu")
    assert to_cpu_device("cpu") == "cpu" and to_cpu_device(None) is None
    assert TORCH_ON_CPU.zeros(2, device="cuda").device.type == "cpu"
    assert TORCH_ON_CPU.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert TORCH_ON_CPU.cuda.current_device() == torch.device("cpu")
    assert TORCH_ON_CPU.cuda.synchronize() is None
    assert TORCH_ON_CPU.Tensor is torch.Tensor and TORCH_ON_CPU.distributed is torch.distributed


def test_proxy_rng_calls_act_on_the_cpu_generator():
    TORCH_ON_CPU.cuda.manual_seed(11)
    a = torch.randn(3)
    state = TORCH_ON_CPU.cuda.get_rng_state()
    b = torch.randn(3)
    TORCH_ON_CPU.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(3), b)
    torch.manual_seed(11)
    assert torch.equal(torch.randn(3), a)


@CPU_ONLY
def test_apply_is_idempotent_and_module_scoped():
    assert compat.apply_cpu_compat() is True
    assert compat.apply_cpu_compat() is True
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch is TORCH_ON_CPU
    assert mrandom._set_cuda_rng_state is cpu._set_cpu_rng_state
    assert not isinstance(torch.cuda, type(TORCH_ON_CPU.cuda))  # the real torch.cuda is untouched
    for name in cpu.PROXIED:
        assert __import__(name, fromlist=["torch"]).torch is TORCH_ON_CPU


def test_upgrade_guard_names_the_missing_symbol(monkeypatch):
    import megatron.core.tensor_parallel.random as mrandom

    monkeypatch.delattr(mrandom, "_set_cuda_rng_state")
    with pytest.raises(CompatError, match=r"tensor_parallel\.random\._set_cuda_rng_state is missing"):
        cpu.patch_rng_state()
    with pytest.raises(CompatError, match="no_such_symbol"):
        pins.require("megatron.core.utils", "GlobalMemoryBuffer.no_such_symbol", "test")
    with pytest.raises(CompatError, match="cannot import"):
        pins.require_module("megatron.core.no_such_module", "test")


def test_upgrade_guard_on_a_proxied_module(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.delattr(schedules, "forward_backward_no_pipelining")
    with pytest.raises(CompatError, match="forward_backward_no_pipelining"):
        cpu.proxy_torch_in("megatron.core.pipeline_parallel.schedules")


def test_cuda_type_names_are_scoped_to_the_block():
    f32, bf16, i64 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long)
    with cpu.cuda_type_names([f32, bf16, i64, None]):
        assert f32.type() == "torch.cuda.FloatTensor" and bf16.type() == "torch.cuda.BFloat16Tensor"
        assert i64.type() == "torch.LongTensor"
        assert f32.type(torch.float64).dtype == torch.float64
    assert f32.type() == "torch.FloatTensor" and "type" not in f32.__dict__


def test_repair_adam_steps_unshares_and_fills():
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = torch.optim.AdamW(params)
    shared = torch.tensor(5.0)
    opt.state[params[0]] = {"step": shared, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    opt.state[params[1]] = {"step": shared, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    opt.state[params[2]] = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}  # as init_state_fn makes it
    repair_adam_steps(opt)
    steps = [opt.state[p]["step"] for p in params]
    assert len({id(s) for s in steps}) == 3 and [float(s) for s in steps] == [5.0, 5.0, 0.0]
    for p in params:
        p.grad = torch.ones(2)
    opt.step()  # no KeyError: 'step'; each counter advances once
    assert [float(opt.state[p]["step"]) for p in params] == [6.0, 6.0, 1.0]


@pytest.mark.parametrize("tp,pp,cp,field", [(3, 1, 1, "parallel.tp/pp/cp"), (0, 1, 1, "parallel.tp"), (1, -1, 1, "parallel.pp")])
def test_parallel_sizes_are_validated(tp, pp, cp, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _validate_sizes(4, tp, pp, cp)


# --- multi-process (gloo) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def units_output() -> str:
    return run_torchrun("tests/dist_scripts/compat_units.py", nproc=2, args=["--tp", "2"], timeout=180)


@pytest.mark.dist
@pytest.mark.parametrize("check", ["rng", "recompute", "schedules", "clip", "rope", "mappings", "membuf", "l2norm"])
def test_accommodation(units_output, check):
    """Each accommodation on a TP=2 gloo world (see compat_units.py for what each check asserts)."""
    assert f"OK {check}" in units_output.splitlines()


def _losses(out: str) -> list[float]:
    lines = [line for line in out.splitlines() if line.startswith("LOSSES ")]
    assert len(lines) == 1 and "OK" in out.splitlines(), out[-3000:]
    return json.loads(lines[0][len("LOSSES "):])


@pytest.fixture(scope="module")
def tp1_losses() -> list[float]:
    return _losses(run_torchrun("tests/dist_scripts/compat_train.py", nproc=1, timeout=120))


@pytest.mark.dist
@pytest.mark.parametrize("args", [["--tp", "2"], ["--dist_opt", "1"], ["--tp", "2", "--dist_opt", "1"]],
                         ids=["tp2", "dp2-distopt", "tp2-distopt"])
def test_training_matches_tp1(tp1_losses, args):
    """TP=2 and DP=2 (distributed optimizer) training steps match TP=1 losses within 1e-5."""
    losses = _losses(run_torchrun("tests/dist_scripts/compat_train.py", nproc=2, args=args, timeout=120))
    assert losses == pytest.approx(tp1_losses, abs=1e-5)


@pytest.mark.dist
def test_pipeline_pp2_matches_pp1():
    """A PP=2 1F1B schedule runs on gloo and matches PP=1 (layout-independent init by global name)."""
    pp1 = _losses(run_torchrun("tests/dist_scripts/compat_train.py", nproc=1, args=["--name_init", "1"], timeout=120))
    pp2 = _losses(run_torchrun("tests/dist_scripts/compat_train.py", nproc=2,
                               args=["--pp", "2", "--name_init", "1"], timeout=120))
    assert pp2 == pytest.approx(pp1, abs=1e-5)


@pytest.mark.dist
def test_torch_dist_checkpoint_reshards_tp2_to_tp1(tmp_path):
    """dist_checkpointing.save (torch_dist) at TP=2, load at TP=1: identical weights."""
    run_torchrun("tests/dist_scripts/compat_ckpt.py", nproc=2, args=["--tp", "2", "--mode", "save", "--dir", str(tmp_path)])
    out = run_torchrun("tests/dist_scripts/compat_ckpt.py", nproc=1, args=["--mode", "load", "--dir", str(tmp_path)])
    assert "OK" in out.splitlines()


@pytest.mark.dist
@pytest.mark.parametrize("dist_opt", ["0", "1"], ids=["fp32-optimizer", "distributed-optimizer"])
def test_adamw_fallback_resume_is_bitwise(tmp_path, dist_opt):
    """Save/load (model + optimizer) mid-run on DP=2: per-parameter Adam steps, bitwise-identical resume."""
    out = run_torchrun("tests/dist_scripts/compat_ckpt.py", nproc=2,
                       args=["--mode", "resume", "--dir", str(tmp_path), "--dist_opt", dist_opt], timeout=180)
    assert "OK" in out.splitlines()
