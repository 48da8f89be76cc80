"""Text rendering of a ``Plan`` and of a layout search (what ``tools/plan.py`` prints)."""

from __future__ import annotations

from megatron_prefix.planning.memory import GIB
from megatron_prefix.planning.params import format_count, total_params
from megatron_prefix.planning.search import Plan


def _time_line(name: str, t) -> str:
    if t is None:
        return f"  {name:<9} n/a (the dataset's unshared rows do not fit pack_tokens)"
    hours = "n/a (unknown dataset size)" if t.gpu_hours_per_epoch is None else f"{t.gpu_hours_per_epoch:,.1f}"
    return (f"  {name:<9} {t.model_flops / 1e15:9.1f} PFLOP/step  {t.seconds:8.2f} s/step  "
            f"{t.pairs_per_s:8.3g} pairs/s  GPU-hours/epoch {hours}")


def format_plan(plan: Plan, title: str = "") -> str:
    """Model size, per-rank memory by item for the fullest stage, fit verdict, FLOPs and step time."""
    m, lay, tg = plan.model, plan.layout, plan.target
    lines = [title] if title else []
    lines.append(f"model: {m.family} {format_count(total_params(m))} parameters "
                 f"({total_params(m):,}; {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size})")
    lines.append(f"layout: {lay.describe()} distributed_optimizer={lay.distributed_optimizer} "
                 f"on {lay.gpus} GPUs of {tg.gpu_mem_gib:g} GiB")
    peak = plan.peak
    lines.append(f"memory per GPU, pipeline stage {peak.stage} (the fullest of {lay.pp}; "
                 f"{format_count(peak.params)} parameters on it):")
    for name, value in peak.items.items():
        lines.append(f"  {name:<44} {value / GIB:8.2f} GiB")
    lines.append(f"  {'total':<44} {plan.peak_gib:8.2f} GiB")
    if lay.pp > 1:
        lines.append("  per stage: " + ", ".join(f"{s.stage}: {s.total / GIB:.1f}" for s in plan.stages) + " GiB")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: {plan.peak_gib:.1f} of {tg.gpu_mem_gib:g} GiB, headroom {plan.headroom:.0%}")
    lines.append(f"step ({plan.shared and plan.shared.micro_batches or '?'} micro-batches per DP rank) at "
                 f"MFU {tg.mfu:g} of {tg.peak_tflops:g} TFLOP/s per GPU; workload: {plan.workload_source}")
    lines.append(_time_line("shared", plan.shared))
    lines.append(_time_line("unshared", plan.unshared))
    if not plan.fits:
        lines.append("refused: " + plan.refusal())
    return "\n".join(lines)


def format_search(plans: list[Plan], headroom: float, limit: int = 20) -> str:
    """The fitting layouts, fastest first."""
    if not plans:
        return f"no layout fits with {headroom:.0%} headroom"
    lines = [f"layouts that fit with >= {headroom:.0%} headroom, fastest first ({len(plans)}):",
             f"  {'tp':>3} {'pp':>3} {'cp':>3} {'dp':>3} {'recompute':<10} {'GiB/GPU':>8} {'headroom':>8} {'s/step':>8}"]
    for p in plans[:limit]:
        lay = p.layout
        lines.append(f"  {lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {lay.dp:>3} {lay.recompute:<10} "
                     f"{p.peak.total / GIB:8.1f} {p.headroom:8.0%} {p.time.seconds:8.2f}")
    if len(plans) > limit:
        lines.append(f"  ... {len(plans) - limit} more")
    return "\n".join(lines)
