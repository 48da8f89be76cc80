"""tools/plan.py and the launchers' start-up fit check: every recipe is planned; the acceptance layouts."""

from __future__ import annotations

import importlib.util
import re

import pytest

from megatron_prefix.planning.flops import workload_from_stats
from megatron_prefix.planning.search import DEFAULT_HEADROOM, Target, make_plan, search_layouts
from tests.conftest import ROOT

RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
GPU_RECIPES = [n for n in RECIPES if n != "demo-cpu.yaml"]


def _tool():
    spec = importlib.util.spec_from_file_location("plan_tool", ROOT / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def plan_tool():
    return _tool()


def _run(plan_tool, capsys, *argv) -> tuple[int, str, str]:
    code = plan_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_planned_and_fits(plan_tool, capsys, name):
    extra = ["--gpus", "1", "--gpu-mem", "80"] if name == "demo-cpu.yaml" else []
    code, out, err = _run(plan_tool, capsys, "--config", f"configs/{name}", *extra)
    assert code == 0, err + out
    assert "FITS" in out and "parameters" in out


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_is_the_planners_first_choice_with_headroom(plan_tool, name):
    cfg, model = plan_tool.load_recipe(str(ROOT / "configs" / name), [])
    c = cfg.cluster
    target = Target(gpus=c.gpus, gpu_mem_gib=c.gpu_mem_gb, peak_tflops=c.peak_tflops, mfu=c.mfu)
    plan = make_plan(cfg, model, target)
    assert plan.fits and plan.headroom >= 0.10
    best = search_layouts(cfg, model, target, DEFAULT_HEADROOM)[0].layout
    assert best == plan.layout, f"{name}: the planner now picks {best.describe()}; update the recipe and its comment"
    assert f"{plan.peak_gib:.1f} GiB of 80" in (ROOT / "configs" / name).read_text()  # the comment is current


def test_qwen_72b_fits_80gb_and_prints_72_7b(plan_tool, capsys):
    code, out, _ = _run(plan_tool, capsys, "--config", "configs/qwen2.5-72b-dpo.yaml")
    assert code == 0
    assert "72.7B parameters" in out
    peak = float(re.search(r"FITS: ([\d.]+) of 80 GiB", out).group(1))
    assert peak <= 72  # at least 10% headroom


def test_qwen_72b_on_one_gpu_is_refused(plan_tool, capsys):
    code, out, _ = _run(plan_tool, capsys, "--config", "configs/qwen2.5-72b-dpo.yaml", "parallel.tp=1",
                        "parallel.pp=1", "--gpus", "1")
    assert code == 2
    assert "DOES NOT FIT" in out and "refused: tp=1 pp=1" in out and "optimizer" in out


def test_launcher_refuses_before_building_anything(capsys):
    """launch/train_dpo.py's runner: the planner's reason, exit 2, no traceback (CPU: the recipe's GPU memory)."""
    from megatron_prefix.training.runner import main

    code = main(["--config", str(ROOT / "configs" / "qwen2.5-72b-dpo.yaml"), "parallel.tp=1", "parallel.pp=1"], "dpo")
    err = capsys.readouterr().err
    assert code == 2
    assert "the planner says this layout cannot fit" in err and "Traceback" not in err
    code = main(["--config", str(ROOT / "configs" / "qwen2.5-72b-dpo.yaml"), "parallel.tp=1", "parallel.pp=1",
                 "cluster.fit_check=false"], "dpo")
    err = capsys.readouterr().err
    assert code == 2 and "planner" not in err  # switched off: config validation speaks next (no CUDA here)


def test_search_lists_fitting_layouts(plan_tool, capsys):
    code, out, _ = _run(plan_tool, capsys, "--config", "configs/llama3.1-70b-dpo.yaml", "--search")
    assert code == 0 and "fastest first" in out
    rows = [line.split() for line in out.splitlines()[2:] if line.strip() and line.split()[0].isdigit()]
    assert rows and all(int(r[0]) * int(r[1]) * int(r[2]) * int(r[3]) == 32 for r in rows)
    assert all(float(r[6].rstrip("%")) >= 10 for r in rows)


def test_stats_give_shared_and_unshared_flops(plan_tool):
    """FLOPs per step from stats.json: the unshared layout costs its token and attention-pair ratios more."""
    stats = {"units": 1000, "responses_per_unit": {"2": 800, "4": 200}, "shared_tokens": 1_500_000,
             "unshared_tokens": 2_600_000, "shared_attention_pairs": 900_000_000,
             "unshared_attention_pairs": 2_000_000_000, "pack_fill": 0.95, "rows": 200,
             "pack_fill_unshared": 0.9, "rows_unshared": 350}
    shared = workload_from_stats(stats, "shared", "stats.json")
    assert shared.pref_pairs_per_unit == (800 * 1 + 200 * 6) / 1000 and shared.units_per_row == 5
    cfg, model = plan_tool.load_recipe(str(ROOT / "configs" / "llama3.1-8b-dpo.yaml"), [])
    plan = make_plan(cfg, model, Target(gpus=8, gpu_mem_gib=80), stats=stats, stats_source="stats.json")
    ratio = plan.unshared.model_flops / plan.shared.model_flops
    assert 2_600_000 / 1_500_000 < ratio < 2_000_000_000 / 900_000_000
    assert plan.shared.gpu_hours_per_epoch == pytest.approx(
        1000 / cfg.data.global_batch_units * plan.shared.seconds * 8 / 3600)


def test_stats_file_on_the_command_line(plan_tool, capsys, tmp_path):
    """--stats DATASET/stats.json (or the folder): GPU-hours per epoch appear; a missing file is an error."""
    import json

    stats = {"units": 50_000, "responses_per_unit": {"2": 50_000}, "shared_tokens": 60_000_000,
             "unshared_tokens": 100_000_000, "shared_attention_pairs": 3 * 10**10,
             "unshared_attention_pairs": 6 * 10**10, "pack_fill": 0.97, "rows": 7500,
             "pack_fill_unshared": 0.95, "rows_unshared": 12_600}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    code, out, _ = _run(plan_tool, capsys, "--config", "configs/llama3.1-8b-dpo.yaml", "--stats", str(tmp_path))
    assert code == 0 and str(tmp_path / "stats.json") in out
    hours = [float(x.replace(",", "")) for x in re.findall(r"GPU-hours/epoch ([\d,.]+)", out)]
    assert len(hours) == 2 and hours[1] > hours[0] > 0  # unshared costs more per epoch
    code, _, err = _run(plan_tool, capsys, "--config", "configs/llama3.1-8b-dpo.yaml", "--stats", str(tmp_path / "x"))
    assert code == 2 and "no stats.json" in err
