#!/usr/bin/env python3
"""Vision-language DPO with prefix sharing on and off: images encoded, vision FLOPs, step time, memory.

    python benchmarks/vision_sharing.py --out OUT_DIR [--hf HF_LLAVA_DIR] [--ks 2,4] [--records 64]
        [--steps 8] [--warmup 1] [--pack-tokens 512] [--global-batch-units 16]

For each K (responses per prompt) it writes an image preference dataset in TRL's vision format (real
photographs from ``skimage.data`` and generated pictures; ``tests/vision_helpers.py``), builds it with
``tools/build_dataset.py --image-processor``, and trains the same DPO steps twice in one process (the
``Run`` of ``launch/train_dpo.py``, same seed and so the same initial weights; ``benchmarks/train_step.py``'s
harness): ``data.layout=shared`` (each image encoded once per unit) and ``data.layout=unshared`` (each
``[prompt, r_i]`` carries its own copy: K encodings per image). Steps are interleaved so machine load
hits both alike. The model is a tiny LLaVA (``tests/llava_fixtures.make_tiny_llava``, or ``--hf``),
random weights, vision tower frozen (``model.freeze_vision``, the default), projector trained.

Measured side by side, each with its ideal ratio (unshared / shared):

- images encoded per step: counted from the micro-batches' pixel tensors (``PackedRow.images``); ideal
  ``sum_u K_u n_u / sum_u n_u`` over the units of the timed steps (= K);
- vision-encoder FLOPs: the forward FLOPs of the tower and projector counted by
  ``torch.utils.flop_counter.FlopCounterMode`` in a forward pass over the timed steps' rows; beside it
  the analytic count (images x ``training.flops.vision_flops_per_image``: patch embedding, the CLIP
  layers up to ``feature_layer``, the projector); ideal as above;
- step time: median over the timed steps of the per-step wall time, and the median per-step ratio;
  ideal = the ratio of the step's analytic FLOPs (language model over real tokens and allowed attention
  pairs, plus the vision part: ``training.flops.step_flops``);
- peak memory: on CPU the high-water mark of tensor-storage bytes allocated during one step
  (``benchmarks/train_step.StorageHighWater``: a ``TorchDispatchMode`` over every op; weights,
  gradient buffers and optimizer state allocated before the step are not in it), on GPU
  ``torch.cuda.max_memory_allocated``. Ideal 1.0: a row holds ``pack_tokens`` slots in both layouts
  and the schedule keeps one row's activations at a time, so sharing removes rows (time), not the
  per-row peak; what differs is the images per row (more in unshared rows: their prompts repeat).

Writes ``OUT_DIR/vision_sharing.json`` and ``OUT_DIR/vision_sharing.md`` (the README table).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch


def _train_step_module():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TS = _train_step_module()


def recipe(args, model: dict, data: Path, tmp: Path) -> dict:
    """The DPO recipe of one measurement (the sections of configs/*.yaml)."""
    return {
        "task": "dpo",
        "model": model,
        "data": {"path": str(data), "layout": "shared", "pack_tokens": args.pack_tokens,
                 "global_batch_units": args.global_batch_units, "eval_fraction": 0.0},
        "optimizer": {"lr": 1e-4},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "attention": {"backend": "dense"},
        "logging": {"tensorboard": False, "interval": 1},
        "checkpoint": {"dir": str(tmp / "run"), "interval": 0, "save_at_end": False},
        "train": {"max_steps": 10**6, "dtype": "float32", "seed": args.seed},
    }


def image_counts(run, step: int) -> tuple[int, int, int]:
    """(images encoded in step ``step``'s rows, sum over its units of images n_u, and of K_u * n_u)."""
    from megatron_prefix.training.flops import row_images

    encoded = sum(row_images(r) for r in run.loader.rows(step))
    once = per_response = 0
    for i in run.loader.step_units(step):
        unit = run.dataset.get_unit(int(i))
        n = 0 if getattr(unit, "images", None) is None else len(unit.images)
        once += n
        per_response += unit.k * n
    return encoded, once, per_response


def counted_vision_flops(run, steps: range) -> float:
    """Forward FLOPs of the vision tower + projector over ``steps``, counted by torch
    (``torch.utils.flop_counter.FlopCounterMode`` around ``SharedPrefixLLaVAModel.image_features``) in a
    forward-only pass over the steps' rows (no optimizer step: the weights are unchanged)."""
    from torch.utils.flop_counter import FlopCounterMode

    core = run.t.core
    original = core.image_features
    total = [0]

    def counted(pixel_values):
        with FlopCounterMode(display=False) as mode:
            out = original(pixel_values)
        total[0] += mode.get_total_flops()
        return out

    core.image_features = counted
    try:
        for i in steps:
            run._forward_values([run.t.model], run.loader.rows(i))
    finally:
        del core.image_features  # back to the class's method
    return float(total[0])


def measure(args, hf: Path, data: Path, k: int) -> dict:
    """Shared vs unshared on the dataset of one K (``train_step.compare``), plus the vision counts."""
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.training.flops import step_flops, vision_flops_per_image, vision_step_flops

    model_cfg = ModelConfig.from_hf_config(hf)
    model = asdict(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shared, unshared = TS.build_runs(recipe(args, model, data, Path(tmp)))
        result = TS.compare(shared, unshared, args.warmup, args.steps)
        timed = range(args.warmup, args.warmup + args.steps)
        out: dict = {"K": k}
        for name, run in (("shared", shared), ("unshared", unshared)):
            counts = [image_counts(run, i) for i in timed]
            rows = [run.loader.rows(i) for i in timed]
            m = run.model_cfg
            out[name] = {
                "images_encoded_per_step": sum(c[0] for c in counts) / len(counts),
                "vision_gflops_per_step": counted_vision_flops(run, timed) / len(rows) / 1e9,
                "vision_gflops_per_step_analytic": sum(vision_step_flops(m, r) for r in rows) / len(rows) / 1e9,
                "step_gflops": sum(step_flops(m, r) for r in rows) / len(rows) / 1e9,
                "median_step_s": result[name]["median_step_s"],
                "median_process_s": result[name]["median_process_s"],
                "peak_step_bytes": result[name]["peak_step_bytes"],
                "rows_per_step": result[name]["rows_per_step"],
                "tokens_per_step": result[name]["tokens"] / args.steps,
                "images_once_per_unit": sum(c[1] for c in counts) / len(counts),
                "images_once_per_response": sum(c[2] for c in counts) / len(counts),
            }
        s, u = out["shared"], out["unshared"]
        tower, projector = vision_flops_per_image(model_cfg.vision, model_cfg.hidden_size)
        counted_per_image = s["vision_gflops_per_step"] * 1e9 / s["images_encoded_per_step"]
        out.update(
            vision_mflops_per_image={"tower_forward": tower / 1e6, "projector_forward": projector / 1e6,
                                     "counted_forward": counted_per_image / 1e6},
            images_ratio=u["images_encoded_per_step"] / s["images_encoded_per_step"],
            images_ideal=s["images_once_per_response"] / s["images_once_per_unit"],
            vision_flops_ratio=u["vision_gflops_per_step"] / s["vision_gflops_per_step"],
            step_time_ratio=result["time_ratio"],
            step_time_ideal=u["step_gflops"] / s["step_gflops"],
            cpu_time_ratio=result["cpu_time_ratio"],
            peak_memory_ratio=u["peak_step_bytes"] / s["peak_step_bytes"],
            peak_memory_ideal=1.0,
            max_abs_loss_diff=result["max_abs_loss_diff"],
            pairs_per_step=result["preference_pairs_per_step"],
        )
        out["vision_flops_ideal"] = out["images_ideal"]
    return out


def markdown(results: list[dict], meta: dict) -> str:
    """The README table: one row per (K, quantity), shared / unshared / measured ratio / ideal ratio."""
    lines = [
        (f"Tiny LLaVA ({meta['model']}), CPU ({meta['device']}, {meta['threads']} thread(s)), fp32, "
         f"{meta['steps']} timed steps after {meta['warmup']} warm-up, `pack_tokens` {meta['pack_tokens']}, "
         f"{meta['global_batch_units']} prompts per step, vision tower frozen; {meta['date']}, load average "
         f"{meta['loadavg_before']:.1f} at the start."),
        "",
        "| K | quantity (per step) | shared | unshared | ratio measured | ratio ideal |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s, u = r["shared"], r["unshared"]
        rows = (
            ("images encoded", f"{s['images_encoded_per_step']:.1f}", f"{u['images_encoded_per_step']:.1f}",
             r["images_ratio"], r["images_ideal"]),
            ("vision-encoder GFLOPs (forward, counted)", f"{s['vision_gflops_per_step']:.3f}", f"{u['vision_gflops_per_step']:.3f}",
             r["vision_flops_ratio"], r["vision_flops_ideal"]),
            ("step time, median (s)", f"{s['median_step_s']:.3f}", f"{u['median_step_s']:.3f}",
             r["step_time_ratio"], r["step_time_ideal"]),
            ("step CPU time of the process, median (s)", f"{s['median_process_s']:.3f}",
             f"{u['median_process_s']:.3f}", r["cpu_time_ratio"], r["step_time_ideal"]),
            ("rows (micro-batches of `pack_tokens`)", f"{s['rows_per_step']:.2f}", f"{u['rows_per_step']:.2f}",
             u["rows_per_step"] / s["rows_per_step"], u["tokens_per_step"] / s["tokens_per_step"]),
            ("peak memory in the step (MiB)", f"{s['peak_step_bytes'] / 2**20:.1f}",
             f"{u['peak_step_bytes'] / 2**20:.1f}", r["peak_memory_ratio"], r["peak_memory_ideal"]),
        )
        for name, a, b, ratio, ideal in rows:
            lines.append(f"| {r['K']} | {name} | {a} | {b} | {ratio:.2f}x | {ideal:.2f}x |")
    lines += [
        "",
        ("Ratios are unshared / shared. Images: counted from the micro-batches' pixel tensors; their ideal is "
         "K (each image once per unit vs once per response). Vision-encoder FLOPs: the tower's and projector's "
         "forward FLOPs counted by `torch.utils.flop_counter` during the steps' forward passes (per image "
         f"{results[0]['vision_mflops_per_image']['counted_forward']:.2f} MFLOPs counted, "
         f"{sum(v for key, v in results[0]['vision_mflops_per_image'].items() if key != 'counted_forward'):.2f} "
         "analytic). Step time: the median over steps of the per-step ratio (the same units in both "
         "layouts); its ideal is the ratio of the step's analytic FLOPs; the process CPU time (one thread) is "
         "the same ratio, robust on a busy machine. Rows: their ideal is the ratio of real tokens (rows are "
         "padded to `pack_tokens`). Peak memory: high-water mark of tensor-storage bytes allocated during one "
         "step (CPU; weights, gradient buffers and optimizer state excluded); ideal 1.0 since a row is "
         "`pack_tokens` slots in both layouts."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for vision_sharing.json and .md")
    ap.add_argument("--hf", type=Path, default=None, help="an HF LLaVA folder (default: the tiny test LLaVA)")
    ap.add_argument("--ks", default="2,4", help="responses per prompt, comma list")
    ap.add_argument("--records", type=int, default=64, help="preference records per dataset")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per layout (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pack-tokens", type=int, default=512)
    ap.add_argument("--global-batch-units", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.llava_fixtures import make_tiny_llava
    from tests.vision_helpers import build_image_dataset, write_image_preferences

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        hf = args.hf or make_tiny_llava(work)
        for k in [int(x) for x in args.ks.split(",")]:
            jsonl = write_image_preferences(work / f"raw_k{k}", records=args.records, k=k, seed=args.seed)
            data = build_image_dataset(jsonl, hf, work / f"data_k{k}", pack_tokens=args.pack_tokens)
            r = measure(args, hf, data, k)
            results.append(r)
            print(f"K={k}: images x{r['images_ratio']:.2f} (ideal {r['images_ideal']:.2f}), vision FLOPs "
                  f"x{r['vision_flops_ratio']:.2f}, step time x{r['step_time_ratio']:.2f} (ideal "
                  f"{r['step_time_ideal']:.2f}), peak memory x{r['peak_memory_ratio']:.2f}", flush=True)
        hf_config = json.loads((Path(hf) / "config.json").read_text())
    tc, vc = hf_config["text_config"], hf_config["vision_config"]
    meta = {
        "benchmark": "vision_sharing: vision-language DPO step, prefix sharing on vs off",
        "date": time.strftime("%Y-%m-%d"), "device": TS.device_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "loadavg_before": load_before[0], "pack_tokens": args.pack_tokens,
        "global_batch_units": args.global_batch_units, "records": args.records,
        "model": (f"llama {tc['num_hidden_layers']} layers hidden {tc['hidden_size']}, CLIP "
                  f"{vc['num_hidden_layers']} layers hidden {vc['hidden_size']}, {vc['image_size']} px / "
                  f"patch {vc['patch_size']}"),
    }
    out = {**meta, "results": results, "wall_s": time.perf_counter() - t0,
           "loadavg": {"before": list(load_before), "after": list(os.getloadavg())}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision_sharing.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "vision_sharing.md").write_text(markdown(results, meta))
    print(f"wrote {args.out / 'vision_sharing.json'} and {args.out / 'vision_sharing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
