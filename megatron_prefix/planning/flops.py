"""FLOPs per optimizer step, predicted step time, pairs/s and GPU-hours per epoch.

Same counting as ``training/flops.py`` (which measures the FLOPs of real rows): ``6 N`` per token for the
dense matrices (N = attention projections + SwiGLU MLP of every layer + the output projection) and
``12 * layers * heads * head_dim`` per query-key pair the mask allows. Here the tokens and pairs come from
the dataset's ``stats.json`` (``tools/dataset_stats.py``), per unit and per layout; padding tokens of a
row (``1 - pack_fill``) cost their dense FLOPs too.

Executed FLOPs add what the model-FLOPs count leaves out: ``recompute=full`` repeats the forward (+1/3),
``selective`` repeats core attention's forward, an online reference runs one more forward. Predicted step
time = executed FLOPs / (GPUs x peak x MFU) x the 1F1B bubble ``1 + (pp - 1) / m`` (m micro-batches per
data-parallel rank). MFU is the stated assumption (``--mfu``); nothing here is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_prefix.model.config import ModelConfig


@dataclass(frozen=True)
class Workload:
    """Per unit (a prompt with its responses) of one layout: tokens, attention pairs, preference pairs."""

    tokens_per_unit: float
    attn_pairs_per_unit: float
    pref_pairs_per_unit: float
    units_per_row: float  # how many units pack into one row of pack_tokens
    pack_fill: float  # real tokens / row capacity
    units: int | None  # units in the dataset (None: unknown)
    source: str  # where the figures come from (stats.json path or the stated assumption)


def dense_flop_params(m: ModelConfig) -> int:
    """N of ``6 N`` per token (training/flops.py ``step_flops``): projections, MLP, output layer."""
    h, f, q = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.kv_channels
    kv = m.kv_heads * m.kv_channels
    return m.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * f) + h * m.vocab_size


def model_flops(m: ModelConfig, tokens: float, attn_pairs: float) -> float:
    """Forward + backward model FLOPs of ``tokens`` tokens with ``attn_pairs`` allowed query-key pairs."""
    q = m.num_attention_heads * m.kv_channels
    return 6.0 * dense_flop_params(m) * tokens + 12.0 * m.num_layers * q * attn_pairs


def workload_from_stats(stats: dict, layout: str, source: str) -> Workload:
    """Per-unit figures of ``layout`` (shared | unshared) from a ``stats.json`` dict."""
    need = ("units", "responses_per_unit", f"{layout}_tokens", f"{layout}_attention_pairs", "pack_fill", "rows")
    missing = [k for k in need if k not in stats]
    if missing:
        raise ValueError(f"{source}: missing {missing}; rebuild the dataset with tools/build_dataset.py")
    units = int(stats["units"])
    if units == 0:
        raise ValueError(f"{source}: the dataset has no units")
    hist = {int(k): int(v) for k, v in stats["responses_per_unit"].items()}
    pref = sum(n * k * (k - 1) / 2 for k, n in hist.items()) / units
    if layout == "shared":
        fill, rows = stats["pack_fill"], stats["rows"]
    else:
        fill, rows = stats.get("pack_fill_unshared"), stats.get("rows_unshared")
        if fill is None:
            raise ValueError(f"{source}: some unit's unshared layout exceeds pack_tokens; no unshared plan")
    return Workload(tokens_per_unit=stats[f"{layout}_tokens"] / units,
                    attn_pairs_per_unit=stats[f"{layout}_attention_pairs"] / units,
                    pref_pairs_per_unit=pref, units_per_row=units / max(rows, 1), pack_fill=float(fill),
                    units=units, source=source)


def assumed_workload(pack_tokens: int, layout: str) -> Workload:
    """Without stats: one unit per full row, K=2, a prompt as long as both responses (p = 2r)."""
    p, r = pack_tokens // 2, pack_tokens // 4
    if layout == "shared":
        tokens, pairs = p + 2 * r, p * (p + 1) / 2 + 2 * (r * p + r * (r + 1) / 2)
    else:
        tokens, pairs = 2 * (p + r), (p + r) * (p + r + 1)
    return Workload(tokens_per_unit=tokens, attn_pairs_per_unit=pairs, pref_pairs_per_unit=1.0,
                    units_per_row=pack_tokens / tokens, pack_fill=1.0, units=None,
                    source=f"assumed (no --stats): one unit of {pack_tokens} shared tokens per row, "
                           "prompt 1/2, two responses of 1/4 each")


@dataclass(frozen=True)
class StepTime:
    """FLOPs and predicted time of one optimizer step."""

    model_flops: float
    executed_flops: float
    micro_batches: int  # per data-parallel rank
    seconds: float
    pairs_per_s: float
    gpu_hours_per_epoch: float | None


def step_time(m: ModelConfig, w: Workload, units_per_step: int, *, gpus: int, pp: int, dp: int,
              recompute: str, online_reference: bool, peak_tflops: float, mfu: float) -> StepTime:
    """Predicted time of one step of ``units_per_step`` units on ``gpus`` GPUs at ``mfu`` of peak."""
    tokens = units_per_step * w.tokens_per_unit
    pairs = units_per_step * w.attn_pairs_per_unit
    computed = tokens / max(w.pack_fill, 1e-9)  # padding tokens run through the dense layers too
    dense = 6.0 * dense_flop_params(m) * computed
    attn = 12.0 * m.num_layers * m.num_attention_heads * m.kv_channels * pairs
    flops = model_flops(m, tokens, pairs)
    executed = dense + attn
    if recompute == "full":
        executed += (dense + attn) / 3
    elif recompute == "selective":
        executed += attn / 3
    if online_reference:
        executed += (dense + attn) / 3
    rows = units_per_step / w.units_per_row
    micro = max(1, int(-(-rows // dp)))
    seconds = executed / (gpus * peak_tflops * 1e12 * mfu) * (1 + (pp - 1) / micro)
    epoch_steps = None if w.units is None else w.units / units_per_step
    hours = None if epoch_steps is None else epoch_steps * seconds * gpus / 3600
    return StepTime(model_flops=flops, executed_flops=executed, micro_batches=micro, seconds=seconds,
                    pairs_per_s=units_per_step * w.pref_pairs_per_unit / seconds, gpu_hours_per_epoch=hours)
