"""Helpers shared by ``tests/test_model.py`` and the ``model_*`` torchrun scripts.

- tiny model configs (``configs/models/tiny_*.yaml``) with a large init std so errors show;
- random units / packed rows (several units per row, K in {2, 3, 4}, padding at the row end);
- ``randomize_``: every parameter drawn from a generator seeded by its *name* at its *full* (TP=1)
  shape, then sliced to this TP rank, so every parallel layout holds the same model; ``full_grads``
  is the inverse (all-gather of TP shards to full shapes);
- the shared forward (``shared_logps``) and the unshared reference (``reference_logps``: megatron's
  stock ``GPTModel`` on each ``[prompt + response]`` alone, plain causal attention, positions 0..L-1,
  log-softmax over the full vocabulary).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_prefix.data.row import PackedRow, pack_row
from megatron_prefix.data.unit import Unit
from megatron_prefix.model.batch import MicroBatch
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.unshared import unshared_logps
from megatron_prefix.model.logprobs import ResponseLogprobs, response_logprobs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "models"
FAMILIES = ("llama", "qwen2", "mistral")


def tiny_config(family: str, **overrides) -> ModelConfig:
    """``configs/models/tiny_<family>.yaml`` with ``init_method_std`` 0.15 unless overridden."""
    cfg = ModelConfig.from_yaml(CONFIGS / f"tiny_{family}.yaml")
    for k, v in {"init_method_std": 0.15, **overrides}.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def random_units(seed: int, vocab: int, ks=(2, 3, 4, 3), prompt=(2, 10), resp=(1, 8)) -> list[Unit]:
    """Units with K = ``ks[i]`` responses, random lengths in the given [lo, hi) ranges."""
    rng = np.random.default_rng(seed)
    return [
        Unit(
            rng.integers(1, vocab, rng.integers(*prompt)),
            [rng.integers(1, vocab, rng.integers(*resp)) for _ in range(k)],
            rng.normal(size=k),
            unit_id=i,
        )
        for i, k in enumerate(ks)
    ]


def pack_units(units: list[Unit], per_row: int = 2, pack_tokens: int | None = None, pad_id: int = 0) -> list[PackedRow]:
    """Rows of ``per_row`` consecutive units each (the last row may hold fewer), padded to ``pack_tokens``
    (default: the longest row + at least 3 padding slots, rounded up to a multiple of 8)."""
    groups = [units[i : i + per_row] for i in range(0, len(units), per_row)]
    if pack_tokens is None:
        longest = max(sum(u.shared_len for u in g) for g in groups)
        pack_tokens = -(-(longest + 3) // 8) * 8
    return [pack_row(g, pack_tokens, pad_id) for g in groups]


def loss_weights(n: int) -> torch.Tensor:
    """Distinct per-response weights for a scalar loss on the log-probs."""
    return torch.cos(torch.arange(n, dtype=torch.float32)) + 1.5


# ---------------------------------------------------------------------------- TP-aware parameters


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


def _is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")  # [gate; up] halves, each split over TP


def _full_to_local(name: str, full: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    if _is_glu_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def global_name(model: torch.nn.Module, name: str) -> str:
    """The parameter's name in the whole (PP=1) model: ``decoder.layers.<i>`` uses the global layer index."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Overwrite every parameter with name-seeded N(0, std) values (norm weights: 1 + N(0, std)).

    Seeds use ``global_name``, so a pipeline stage holds exactly its layers of the whole model.
    """
    tp, rank, _ = _tp()
    with torch.no_grad():
        for local_name, p in model.named_parameters():
            name = global_name(model, local_name)
            sharded = getattr(p, "tensor_model_parallel", False) and tp > 1
            dim = getattr(p, "partition_dim", 0)
            shape = list(p.shape)
            if sharded:
                shape[dim] *= tp
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=gen) * std
            if "layernorm" in name or "final_layernorm" in name:
                full += 1.0
            local = _full_to_local(name, full, dim, tp, rank) if sharded else full
            p.copy_(local.to(p.dtype))


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """global name -> gradient at full (TP=1) shape, gathered over the TP group (fp32 copies)."""
    tp, _, group = _tp()
    out = {}
    for local_name, p in model.named_parameters():
        name = global_name(model, local_name)
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            dim = getattr(p, "partition_dim", 0)
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            if _is_glu_fc1(name):
                halves = [x.chunk(2, dim=dim) for x in parts]
                g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
            else:
                g = torch.cat(parts, dim=dim)
        out[name] = g
    return out


# ---------------------------------------------------------------------------- forwards


def shared_logps(model, rows: list[PackedRow], cp_size: int = 1, cp_rank: int = 0, tp_group=None, cp_group=None,
                 positions: str = "shared", segment_ids=None) -> ResponseLogprobs:
    """Per-response log-probs of ``rows`` through the shared model on this rank.

    ``positions="stock"`` replaces the position ids by 0..T-1 and ``segment_ids`` (a [b, T] tensor)
    replaces the params' segment ids: the negative controls.
    """
    device = next(model.parameters()).device
    mb = MicroBatch.from_rows(rows, cp_size=cp_size, cp_rank=cp_rank, device=device)
    if positions == "stock":
        t = rows[0].pack_tokens
        from megatron_prefix.attention.context_parallel import split_for_cp

        stock = torch.arange(t, device=device).expand(len(rows), t).contiguous()
        mb.position_ids = split_for_cp(stock, cp_size, cp_rank)
    if segment_ids is not None:
        mb.params.segment_ids = segment_ids
    logits_sbv = mb.forward(model)
    return response_logprobs(logits_sbv, mb.index, tp_group=tp_group, cp_group=cp_group)


def reference_logps(ref_model, units: list[Unit]) -> torch.Tensor:
    """[R] log-prob of every response of ``units`` (unit order, response order), each run alone."""
    return unshared_logps(ref_model, units)
