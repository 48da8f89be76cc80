#!/usr/bin/env python3
"""End-to-end DPO step with prefix sharing on and off, on any built dataset, in one process.

    python benchmarks/train_step.py --data BUILT_DIR [--preset cpu-tiny|gpu-1b] [--steps N] [--warmup W]
        [--backend dense|flex|varlen|te] [--sort-window N | --sort-windows 0,1,4] [--json OUT]

Builds one ``Run`` (the trainer of ``launch/train_dpo.py``, same code path) on the shared layout and a
second trainable, same seed and so the same initial weights, on the unshared layout of the same
dataset. Optimizer step ``i`` of both sees the same units (the loader's plan does not depend on the
layout). Steps are interleaved (shared, unshared, unshared, shared, ...) so that machine load drifts
hit both alike. ``time_ratio`` is the median, over the ``--steps`` steps after ``--warmup`` steps, of
each step's unshared / shared wall time (the same units in both; steps differ in size, so a ratio of
per-layout medians could pair different steps); ``median_step_s`` per layout is reported too.
Reference log-probs are zeros: in training they come from a precomputed table (a lookup), which is
not what is measured here.

Peak memory: one extra step per layout after the timed ones. On GPU ``torch.cuda.max_memory_allocated``
(weights, gradients and optimizer state included); on CPU the high-water mark of the bytes of tensor
storages allocated *during* the step (tracked with a ``TorchDispatchMode``; weights, gradient buffers
and optimizer state allocated before the step are not in it).

``--sort-windows`` repeats the shared run's timed steps with the loader re-planned for each
``data.sort_window`` (0: no sorting, 1: sorted within each global batch, N: across N batches) and
reports fill, micro-batches (rows) per step, padding and step time for each.

Every number in the JSON comes from this run; ``loadavg`` records how busy the machine was. On a busy
machine wall time is noisy; ``cpu_time_ratio`` (the same ratio of process CPU time) much less so, as
long as the process runs one thread (``OMP_NUM_THREADS=1``) on CPU. ``rows_ratio`` is the ratio of
rows (micro-batches) per step: every row is ``pack_tokens`` long, padding included, so it is what a
row-shaped step costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PRESETS = {
    "cpu-tiny": {
        "model": {"family": "llama", "hidden_size": 96, "ffn_hidden_size": 256, "num_layers": 3,
                  "num_attention_heads": 4, "num_query_groups": 2, "max_position_embeddings": 8192},
        "pack_tokens": 4096, "global_batch_units": 16, "dtype": "float32",
    },
    "gpu-1b": {  # llama-style 1.2B shape (hidden 2048, 16 layers, GQA 32/8, SwiGLU 8192)
        "model": {"family": "llama", "hidden_size": 2048, "ffn_hidden_size": 8192, "num_layers": 16,
                  "num_attention_heads": 32, "num_query_groups": 8, "max_position_embeddings": 16384},
        "pack_tokens": 4096, "global_batch_units": 64, "dtype": "bfloat16",
    },
}


class StorageHighWater(TorchDispatchMode):
    """High-water mark of tensor-storage bytes allocated while the mode is active (CPU memory proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and st.nbytes() > 0:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def recipe(args, preset: dict, tmp: Path) -> dict:
    """The training recipe of this benchmark (the same sections as configs/*.yaml)."""
    return {
        "task": "dpo",
        "model": dict(preset["model"]),
        "data": {"path": str(args.data), "layout": "shared", "pack_tokens": args.pack_tokens or preset["pack_tokens"],
                 "global_batch_units": args.global_batch_units or preset["global_batch_units"],
                 "eval_fraction": 0.0, "sort_window": args.sort_window},
        "optimizer": {"lr": 1e-4},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "attention": {"backend": args.backend},
        "logging": {"tensorboard": False, "interval": 1},
        "checkpoint": {"dir": str(tmp / "run"), "interval": 0, "save_at_end": False},
        "train": {"max_steps": 10**6, "dtype": args.dtype or preset["dtype"], "seed": args.seed},
    }


def build_runs(cfg_dict: dict):
    """(shared run, unshared run): one ``Run`` and a copy with the unshared dataset, loader and model."""
    from megatron_prefix.config import from_dict
    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.parallel import seed_everything
    from megatron_prefix.training.config import TrainConfig
    from megatron_prefix.training.loader import StepLoader
    from megatron_prefix.training.runner import Run
    from megatron_prefix.training.setup import build_trainable

    class BenchRun(Run):
        def _precompute_reference(self) -> None:
            self.ref_cache = ZeroReference()

    cfg = from_dict(TrainConfig, copy.deepcopy(cfg_dict))
    cfg.model_source = None
    shared = BenchRun(cfg)
    unshared = copy.copy(shared)
    unshared.dataset = PreferenceDataset(cfg.data.path, "unshared")
    unshared.loader = StepLoader(unshared.dataset, shared.train_ids, cfg.data.batch_config(), 0, 1)
    unshared.t = build_trainable(cfg, shared.model_cfg, shared.cuda, partial(seed_everything, cfg.train.seed))
    return shared, unshared


class ZeroReference:
    """Stands in for the precomputed reference table: zeros, one per response."""

    def lookup(self, mb, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(positions), dtype=torch.float32)


def timed_step(run, step: int, track_memory: bool = False) -> dict:
    """One optimizer step of ``run`` (``Run.train_step``); adds wall time and, if asked, peak memory."""
    cuda = run.cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    tracker = StorageHighWater() if track_memory and not cuda else None
    t0, c0 = time.perf_counter(), time.process_time()
    if tracker is not None:
        with tracker:
            rec = run.train_step(step)
    else:
        rec = run.train_step(step)
    if cuda:
        torch.cuda.synchronize()
    rec["wall_s"] = time.perf_counter() - t0
    rec["process_s"] = time.process_time() - c0  # CPU time of this process: robust to a busy machine
    if track_memory:
        if cuda:
            rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            rec["peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
        else:
            rec["peak_memory_bytes"] = rec["peak_step_bytes"] = tracker.peak
    rows = run.loader.rows(step)
    rec["rows"] = len(rows)
    rec["row_tokens"] = [int(r.num_tokens) for r in rows]
    return rec


def row_stats(run, step: int) -> dict:
    """Tokens, attention pairs, rows and padding of step ``step`` (the loader's rows)."""
    from megatron_prefix.training.flops import row_attention_pairs

    rows = run.loader.rows(step)
    tokens = sum(int(r.num_tokens) for r in rows)
    slots = sum(int(r.pack_tokens) for r in rows)
    return {"tokens": tokens, "pairs": sum(row_attention_pairs(r) for r in rows), "rows": len(rows),
            "padding": slots - tokens}


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def compare(shared, unshared, warmup: int, steps: int) -> dict:
    """Interleaved shared/unshared steps; the headline ratios."""
    recs: dict[str, list[dict]] = {"shared": [], "unshared": []}
    stats: dict[str, list[dict]] = {"shared": [], "unshared": []}
    runs = {"shared": shared, "unshared": unshared}
    for i in range(warmup + steps + 1):
        order = ("shared", "unshared") if i % 2 == 0 else ("unshared", "shared")
        for name in order:
            last = i == warmup + steps  # the memory step, not timed
            rec = timed_step(runs[name], i, track_memory=last)
            rec["timed"] = warmup <= i < warmup + steps
            recs[name].append(rec)
            if rec["timed"]:
                stats[name].append(row_stats(runs[name], i))
        print(f"step {i}: shared {recs['shared'][-1]['wall_s']:.3f}s unshared {recs['unshared'][-1]['wall_s']:.3f}s "
              f"loss {recs['shared'][-1]['loss']:.6f} / {recs['unshared'][-1]['loss']:.6f}", flush=True)
    out: dict = {}
    for name in runs:
        timed = [r for r in recs[name] if r["timed"]]
        tot = {k: sum(s[k] for s in stats[name]) for k in ("tokens", "pairs", "rows", "padding")}
        step_s = median([r["wall_s"] for r in timed])
        out[name] = {
            "median_step_s": step_s,
            "step_s": [round(r["wall_s"], 4) for r in timed],
            "process_s": [round(r["process_s"], 4) for r in timed],
            "median_process_s": median([r["process_s"] for r in timed]),
            "tokens": tot["tokens"], "attention_pairs": tot["pairs"],
            "rows_per_step": tot["rows"] / steps, "fill": tot["tokens"] / (tot["tokens"] + tot["padding"]),
            "tokens_per_s": tot["tokens"] / steps / step_s,
            "pairs_per_s": median([r["pairs"] / r["wall_s"] for r in timed]),
            "tflops_per_device": median([r["tflops_per_device"] for r in timed]),
            "mfu": median([r["mfu"] for r in timed]) if "mfu" in timed[0] else None,
            "peak_memory_bytes": recs[name][-1]["peak_memory_bytes"],
            "peak_step_bytes": recs[name][-1]["peak_step_bytes"],
            "losses": [r["loss"] for r in recs[name]],
        }
    s, u = out["shared"], out["unshared"]
    pairs = [(a, b) for a, b in zip(recs["shared"], recs["unshared"]) if a["timed"]]
    return {
        "ideal_token_ratio": u["tokens"] / s["tokens"],
        "ideal_pair_ratio": u["attention_pairs"] / s["attention_pairs"],
        # the same step (same units) in both layouts: median over steps of the per-step ratio
        "time_ratio": median([b["wall_s"] / a["wall_s"] for a, b in pairs]),
        "cpu_time_ratio": median([b["process_s"] / a["process_s"] for a, b in pairs]),
        "total_time_ratio": sum(b["wall_s"] for _, b in pairs) / sum(a["wall_s"] for a, _ in pairs),
        "rows_ratio": u["rows_per_step"] / s["rows_per_step"],
        "peak_memory_ratio": u["peak_memory_bytes"] / s["peak_memory_bytes"],
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(s["losses"], u["losses"])),
        "preference_pairs_per_step": median([r["pairs"] for r in recs["shared"] if r["timed"]]),
        "shared": s, "unshared": u,
    }


def sort_sweep(shared, unshared, windows: list[int], warmup: int, steps: int) -> list[dict]:
    """Each ``sort_window``: fill, rows and padding over a whole epoch (both layouts), shared step time."""
    from dataclasses import replace

    from megatron_prefix.training.loader import StepLoader

    out = []
    for w in windows:
        batch = replace(shared.cfg.data.batch_config(), sort_window=w)
        entry: dict = {"sort_window": w}
        runs = {}
        for name, base in (("shared", shared), ("unshared", unshared)):
            run = runs[name] = copy.copy(base)
            run.loader = StepLoader(base.dataset, base.train_ids, batch, 0, 1)
            epoch = [row_stats(run, i) for i in range(run.loader.steps_per_epoch)]
            tokens, padding = sum(e["tokens"] for e in epoch), sum(e["padding"] for e in epoch)
            entry[name] = {"fill": tokens / (tokens + padding), "rows_per_step": sum(e["rows"] for e in epoch) / len(epoch),
                           "padding_tokens_per_step": padding / len(epoch)}
        entry["epoch_steps"] = runs["shared"].loader.steps_per_epoch
        entry["rows_ratio"] = entry["unshared"]["rows_per_step"] / entry["shared"]["rows_per_step"]
        times = [timed_step(runs["shared"], i)["wall_s"] for i in range(warmup + steps)][warmup:]
        entry["shared"]["median_step_s"] = median(times)
        entry["timed_steps"] = len(times)
        out.append(entry)
        print(f"sort_window {w}: fill {entry['shared']['fill']:.3f} / {entry['unshared']['fill']:.3f}, rows/step "
              f"{entry['shared']['rows_per_step']:.2f} / {entry['unshared']['rows_per_step']:.2f}, shared step "
              f"{entry['shared']['median_step_s']:.3f}s", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="a dataset built by tools/build_dataset.py")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per layout (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backend", default="dense", help="attention.backend")
    ap.add_argument("--dtype", default=None, help="train.dtype (default: the preset's)")
    ap.add_argument("--pack-tokens", type=int, default=None, help="data.pack_tokens (default: the preset's)")
    ap.add_argument("--global-batch-units", type=int, default=None)
    ap.add_argument("--sort-window", type=int, default=1, help="data.sort_window of the shared/unshared runs")
    ap.add_argument("--sort-windows", default=None, help="comma list: also sweep data.sort_window (e.g. 0,1,4)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args(argv)
    if not (args.data / "meta.json").is_file():
        ap.error(f"--data: {args.data} is not a built dataset (no meta.json); build it with tools/build_dataset.py")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dict = recipe(args, preset, Path(tmp))
        try:
            shared, unshared = build_runs(cfg_dict)
        except ValueError as err:
            print(f"train_step: config error: {err}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        result = compare(shared, unshared, args.warmup, args.steps)
        windows = [int(w) for w in args.sort_windows.split(",")] if args.sort_windows else []
        sweep = sort_sweep(shared, unshared, windows, args.warmup, min(args.steps, 3)) if windows else None
        wall = time.perf_counter() - t0
    out = {
        "benchmark": "train_step: DPO step, prefix sharing on vs off",
        "date": time.strftime("%Y-%m-%d"), "device": device_name(), "torch": torch.__version__,
        "data": str(args.data), "preset": args.preset, "model": preset["model"], "attention_backend": args.backend,
        "dtype": cfg_dict["train"]["dtype"], "pack_tokens": cfg_dict["data"]["pack_tokens"],
        "global_batch_units": cfg_dict["data"]["global_batch_units"], "sort_window": args.sort_window,
        "steps": args.steps, "warmup": args.warmup,
        **result,
        "sort_sweep": sweep,
        "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
        "threads": torch.get_num_threads(), "wall_s": wall,
    }
    keys = ("ideal_token_ratio", "ideal_pair_ratio", "time_ratio", "cpu_time_ratio", "rows_ratio", "peak_memory_ratio")
    print(json.dumps({k: round(out[k], 3) for k in keys}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
