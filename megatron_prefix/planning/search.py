"""A plan for one layout (memory per rank, fit, step time), the search over layouts, the start-up check.

``make_plan`` reads the recipe through duck typing (a ``TrainConfig``: ``parallel``, ``data``, ``train``,
``reference``, ``attention``, ``task``, ``cluster``) so that this module stays free of megatron.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.planning.flops import (
    StepTime,
    Workload,
    assumed_workload,
    step_time,
    workload_from_stats,
)
from megatron_prefix.planning.memory import GIB, Layout, MemoryInputs, StageMemory, rank_memory

RECOMPUTES = ("none", "selective", "full")
DEFAULT_HEADROOM = 0.10
SAME_SPEED = 0.02  # relative step-time difference below the time model's resolution


@dataclass(frozen=True)
class Target:
    """The machines: total GPUs, memory per GPU (GiB), peak TFLOP/s and assumed MFU."""

    gpus: int
    gpu_mem_gib: float
    peak_tflops: float = 989.0
    mfu: float = 0.4
    gpus_per_node: int = 8
    reserve_gib: float = 3.0


@dataclass
class Plan:
    """Memory of every stage of one layout, whether the worst fits, and the predicted speed."""

    model: ModelConfig
    layout: Layout
    target: Target
    stages: list[StageMemory]
    shared: StepTime | None
    unshared: StepTime | None
    workload_source: str
    layout_name: str  # the recipe's data.layout (shared | unshared): what the step time is for

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak_gib(self) -> float:
        return self.peak.total / GIB

    @property
    def headroom(self) -> float:
        """Fraction of GPU memory left on the fullest rank (negative: does not fit)."""
        return 1 - self.peak_gib / self.target.gpu_mem_gib

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.target.gpu_mem_gib

    @property
    def time(self) -> StepTime | None:
        return self.shared if self.layout_name == "shared" else self.unshared

    def refusal(self) -> str:
        """Why the layout does not fit (empty when it fits)."""
        if self.fits:
            return ""
        top = sorted(self.peak.items.items(), key=lambda kv: -kv[1])[:3]
        biggest = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in top)
        lay = self.layout
        hints = ["raise parallel.tp / parallel.pp"]
        if not lay.distributed_optimizer:
            hints.append("set parallel.use_distributed_optimizer=true")
        if lay.recompute != "full":
            hints.append("set train.recompute=full")
        return (f"{lay.describe()} needs {self.peak_gib:.1f} GiB on pipeline stage {self.peak.stage} "
                f"but a GPU has {self.target.gpu_mem_gib:g} GiB (largest: {biggest}); "
                f"{', '.join(hints)}, or see tools/plan.py --search")


def layout_of(cfg, gpus: int) -> Layout:
    """The recipe's layout on ``gpus`` GPUs (dp = what tp*pp*cp leaves)."""
    p = cfg.parallel
    mp = p.tp * p.pp * p.cp
    if gpus % mp:
        raise ValueError(f"parallel.tp: {gpus} GPUs are not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp}")
    return Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=gpus // mp, sequence_parallel=bool(p.sequence_parallel) and p.tp > 1,
                  distributed_optimizer=bool(p.use_distributed_optimizer), recompute=cfg.train.recompute)


def load_stats(path: str | Path | None, cfg) -> tuple[dict | None, str]:
    """``stats.json`` from ``path`` (a file or a dataset folder), else ``<data.path>/stats.json`` if present."""
    candidates = [Path(path)] if path else [Path(cfg.data.path)] if cfg.data.path else []
    for c in candidates:
        f = c / "stats.json" if c.is_dir() else c
        if f.is_file():
            try:
                return json.loads(f.read_text()), str(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}: invalid JSON: {err}") from err
        if path:
            raise ValueError(f"--stats: no stats.json at {f} (build the dataset with tools/build_dataset.py)")
    return None, ""


def workloads(cfg, stats: dict | None, source: str) -> dict[str, Workload | None]:
    """Shared and unshared per-unit workloads (from stats, or the stated assumption)."""
    out: dict[str, Workload | None] = {}
    for name in ("shared", "unshared"):
        if stats is None:
            out[name] = assumed_workload(cfg.data.pack_tokens, name)
            continue
        try:
            out[name] = workload_from_stats(stats, name, source)
        except ValueError:
            if name == "shared":
                raise
            out[name] = None  # the unshared layout does not fit pack_tokens (or is not in the stats)
    return out


def make_plan(cfg, model: ModelConfig, target: Target, layout: Layout | None = None,
              stats: dict | None = None, stats_source: str = "") -> Plan:
    """Plan ``layout`` (default: the recipe's) of ``cfg`` with ``model`` on ``target``."""
    layout = layout or layout_of(cfg, target.gpus)
    work = workloads(cfg, stats, stats_source)
    dtype = "float32" if cfg.train.dtype == "float32" else "bfloat16"
    times: dict[str, StepTime | None] = {}
    for name, w in work.items():
        times[name] = None if w is None else step_time(
            model, w, cfg.data.global_batch_units, gpus=layout.gpus, pp=layout.pp, dp=layout.dp,
            recompute=layout.recompute, online_reference=cfg.reference.mode == "online",
            peak_tflops=target.peak_tflops, mfu=target.mfu)
    w = work[cfg.data.layout] or work["shared"]
    micro = math.ceil(cfg.data.global_batch_units / w.units_per_row / layout.dp)
    inp = MemoryInputs(pack_tokens=cfg.data.pack_tokens, micro_batches=micro, dtype=dtype,
                       backend=cfg.attention.backend, reference=cfg.reference.mode, task=cfg.task,
                       reserve_gib=target.reserve_gib)
    return Plan(model=model, layout=layout, target=target, stages=rank_memory(model, layout, inp),
                shared=times["shared"], unshared=times["unshared"], workload_source=w.source,
                layout_name=cfg.data.layout if work[cfg.data.layout] else "shared")


def candidate_layouts(cfg, model: ModelConfig, target: Target) -> list[Layout]:
    """Every (tp, pp, cp, recompute) the model and the GPU count allow; SP on with tp > 1."""
    out = []
    groups, pack = model.kv_heads, cfg.data.pack_tokens
    for tp in (1, 2, 4, 8, 16):
        if tp > target.gpus_per_node or groups % tp or model.ffn_hidden_size % tp or model.vocab_size % tp:
            continue
        for pp in range(1, model.num_layers + 1):
            if model.num_layers % pp:
                continue
            for cp in (1, 2, 4, 8):
                mp = tp * pp * cp
                if target.gpus % mp or pack % (2 * cp) or (tp > 1 and pack % (tp * 2 * cp)):
                    continue
                for rc in RECOMPUTES:
                    out.append(Layout(tp=tp, pp=pp, cp=cp, dp=target.gpus // mp, sequence_parallel=tp > 1,
                                      distributed_optimizer=True, recompute=rc))
    return out


def search_layouts(cfg, model: ModelConfig, target: Target, headroom: float = DEFAULT_HEADROOM,
                   stats: dict | None = None, stats_source: str = "") -> list[Plan]:
    """Layouts that fit with ``headroom`` left, fastest first.

    Within ``SAME_SPEED`` (2%) of the fastest, the layout with the fewest model-parallel ranks (tp*pp*cp)
    comes first (the time model does not price TP/PP/CP communication; data parallelism overlaps it).
    """
    plans = [make_plan(cfg, model, target, lay, stats, stats_source) for lay in candidate_layouts(cfg, model, target)]
    ok = [p for p in plans if p.headroom >= headroom and p.time is not None]
    ok.sort(key=lambda p: (round(p.time.seconds, 6), p.layout.tp * p.layout.pp * p.layout.cp, p.peak_gib))
    if not ok:
        return ok
    # predicted times within SAME_SPEED of the fastest are a tie (the time model ignores communication):
    # among those, the fewest model-parallel ranks first (more data parallelism, less traffic per step)
    near = [p for p in ok if p.time.seconds <= ok[0].time.seconds * (1 + SAME_SPEED)]
    near.sort(key=lambda p: (p.layout.tp * p.layout.pp * p.layout.cp, p.time.seconds))
    return near + ok[len(near):]


def runtime_target(cfg, world_size: int, device_mem_gib: float | None) -> Target | None:
    """The target of a launcher's fit check, or None when it is skipped (switched off, or memory unknown).

    On a GPU the device's memory counts; on CPU the recipe's ``cluster.gpu_mem_gb`` (a recipe written for
    GPUs is checked against them); neither: skipped. The GPU count is the launcher's world size.
    """
    c = getattr(cfg, "cluster", None)
    if c is not None and not c.fit_check:
        return None
    mem = device_mem_gib if device_mem_gib is not None else (c.gpu_mem_gb if c is not None else None)
    if mem is None:
        return None
    kw = {} if c is None else {"peak_tflops": c.peak_tflops, "mfu": c.mfu, "gpus_per_node": c.gpus_per_node,
                               "reserve_gib": c.reserve_gb}
    return Target(gpus=world_size, gpu_mem_gib=mem, **kw)


def check_fit(cfg, model: ModelConfig, world_size: int, device_mem_gib: float | None) -> Plan | None:
    """The launchers' start-up check: ``ValueError`` naming the layout when the planner says it cannot fit.

    Returns the plan, or None when the check is skipped: switched off (``cluster.fit_check=false``), no
    GPU memory known, or an invalid recipe (left to config validation, which names the field).
    """
    p = cfg.parallel
    try:  # what the plan reads must be valid; if not, config validation reports it (all errors at once)
        for section in (cfg.data, cfg.train, cfg.cluster):
            section.validate()
        model.validate(p.tp)
        stats, source = load_stats(None, cfg)
        if min(p.tp, p.pp, p.cp) < 1 or world_size % (p.tp * p.pp * p.cp):
            return None
    except ValueError:
        return None
    target = runtime_target(cfg, world_size, device_mem_gib)
    if target is None:
        return None  # switched off, or no GPU memory known (CPU run of a recipe without cluster.gpu_mem_gb)
    plan = make_plan(cfg, model, replace(target), stats=stats, stats_source=source)
    if not plan.fits:
        raise ValueError(f"parallel: the planner says this layout cannot fit: {plan.refusal()} "
                         "(cluster.fit_check=false skips this check)")
    return plan
