#!/usr/bin/env python3
"""Will it fit? Per-rank memory, FLOPs and step time of a recipe's layout, before a job is queued.

    python tools/plan.py --config configs/qwen2.5-72b-dpo.yaml [--stats DATASET/stats.json] [--gpus N]
        [--gpu-mem GB] [--mfu 0.4] [--peak-tflops 989] [--search] [--headroom 0.1] [a.b=c ...]

The architecture comes from the recipe's ``model.hf_config`` (a Hugging Face config.json or folder; the
shapes of the project's recipes live in configs/hf_shapes/) or its ``model:`` section. GPUs and memory
come from the flags, else the recipe's ``cluster:`` section. Without ``--stats`` (and no stats.json in
``data.path``) the FLOPs use a stated assumption. Exit 0: fits; 2: does not fit (the reason is printed)
or bad input. See megatron_prefix/planning/ for the model of memory and time.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prefix.config import apply_overrides, from_dict, load_yaml  # noqa: E402
from megatron_prefix.model.config import ModelConfig  # noqa: E402
from megatron_prefix.planning.report import format_plan, format_search  # noqa: E402
from megatron_prefix.planning.search import (  # noqa: E402
    DEFAULT_HEADROOM, Target, load_stats, make_plan, search_layouts,
)


def resolve_model_source(hf: str) -> Path:
    """``model.hf_config`` relative to the working directory, else to the repository root."""
    path = Path(hf)
    if not path.exists() and not path.is_absolute() and (ROOT / path).exists():
        return ROOT / path
    return path


def load_recipe(config: str, overrides: list[str]):
    """(TrainConfig, ModelConfig) of a recipe with overrides (the same parsing as the launchers)."""
    from megatron_prefix.training.config import TrainConfig

    data = apply_overrides(load_yaml(config), overrides)
    data.setdefault("task", "dpo")
    hf = (data.get("model") or {}).pop("hf_config", None)
    cfg = from_dict(TrainConfig, data)
    model = ModelConfig.from_hf_config(resolve_model_source(hf)) if hf else cfg.model
    for section in (cfg.data, cfg.train, cfg.cluster):
        section.validate()
    model.validate(cfg.parallel.tp)
    return cfg, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="plan.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    ap.add_argument("--stats", help="the dataset's stats.json (or its folder) for FLOPs and epoch time")
    ap.add_argument("--gpus", type=int, help="total GPUs (default: cluster.gpus)")
    ap.add_argument("--gpu-mem", type=float, help="GiB per GPU (default: cluster.gpu_mem_gb)")
    ap.add_argument("--mfu", type=float, help="assumed MFU for the step time (default: cluster.mfu, 0.4)")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per GPU (default: cluster, 989 = H100)")
    ap.add_argument("--search", action="store_true", help="list the layouts that fit, fastest first")
    ap.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                    help="memory fraction a searched layout must leave free (default 0.1)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4 train.recompute=full")
    args = ap.parse_args(argv)
    try:
        cfg, model = load_recipe(args.config, args.overrides)
        c = cfg.cluster
        gpus = args.gpus or c.gpus
        mem = args.gpu_mem or c.gpu_mem_gb
        if gpus is None or mem is None:
            raise ValueError("cluster.gpus / cluster.gpu_mem_gb: not in the recipe; pass --gpus N --gpu-mem GB")
        target = Target(gpus=gpus, gpu_mem_gib=mem, peak_tflops=args.peak_tflops or c.peak_tflops,
                        mfu=args.mfu or c.mfu, gpus_per_node=c.gpus_per_node, reserve_gib=c.reserve_gb)
        stats, source = load_stats(args.stats, cfg)
        if args.search:
            plans = search_layouts(cfg, model, target, args.headroom, stats, source)
            print(format_search(plans, args.headroom))
            return 0 if plans else 2
        plan = make_plan(cfg, model, target, stats=stats, stats_source=source)
    except ValueError as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, title=f"plan for {args.config}"))
    return 0 if plan.fits else 2


if __name__ == "__main__":
    sys.exit(main())
