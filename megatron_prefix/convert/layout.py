"""The name table between megatron-core (local spec) and Hugging Face llama / qwen2 / mistral, and the
tensor transforms between the two layouts.

Per transformer layer ``i`` (``L`` = ``model.layers.{i}``; megatron parameter names are those of
``build_model(..., impl="local")``; the dist_checkpointing key stacks all layers on a leading axis)::

    megatron parameter                              checkpoint key (layer axis first)                    Hugging Face
    decoder.layers.i.input_layernorm.weight         decoder.layers.self_attention.linear_qkv.layer_norm_weight   L.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight decoder.layers.self_attention.linear_qkv.weight  L.self_attn.{q,k,v}_proj.weight (interleaved per group)
    decoder.layers.i.self_attention.linear_qkv.bias   decoder.layers.self_attention.linear_qkv.bias    L.self_attn.{q,k,v}_proj.bias (qwen2)
    decoder.layers.i.self_attention.linear_proj.weight decoder.layers.self_attention.linear_proj.weight L.self_attn.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight       decoder.layers.mlp.linear_fc1.layer_norm_weight      L.post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight          decoder.layers.mlp.linear_fc1.weight                 cat(L.mlp.gate_proj.weight, L.mlp.up_proj.weight)
    decoder.layers.i.mlp.linear_fc2.weight          decoder.layers.mlp.linear_fc2.weight                 L.mlp.down_proj.weight

and outside the layers ``embedding.word_embeddings.weight`` <-> ``model.embed_tokens.weight``,
``decoder.final_layernorm.weight`` <-> ``model.norm.weight``, ``output_layer.weight`` <->
``lm_head.weight`` (absent when the embeddings are tied) or, for a reward model, ``score.weight``.

Fused QKV: megatron holds, per query group ``g`` (= key/value head), ``[q heads of g; k_g; v_g]``:
the weight is ``[num_groups, (q_per_group + 2) * head_dim, hidden]`` flattened on the first two axes.
HF's ``repeat_kv`` lets key/value head ``g`` serve query heads ``g*q_per_group .. (g+1)*q_per_group-1``,
so the q rows of group ``g`` are a contiguous block of ``q_proj``. A tensor-parallel shard of
``linear_qkv`` is a contiguous range of groups, so every rank reads only its rows of q/k/v.

SwiGLU: ``linear_fc1`` is ``[gate; up]`` (megatron applies ``silu(first half) * second half``); its TP
shard is ``[gate rows of rank r; up rows of rank r]``.

Pure torch: no megatron import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_prefix.model.config import ModelConfig

# megatron parameter suffix inside a layer -> (HF suffix(es) inside ``model.layers.{i}.``, TP split dim or None)
LAYER_TABLE: dict[str, tuple[tuple[str, ...], int | None]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), None),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), 0),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), 0),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), 1),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), 1),
}
# megatron parameter outside the layers -> (HF name, TP split dim or None)
GLOBAL_TABLE: dict[str, tuple[str, int | None]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", None),
    "output_layer.weight": ("lm_head.weight", 0),
}
# Transformer Engine's layer spec fuses the two RMSNorms into the following linear layer
# (``TELayerNormColumnParallelLinear``); megatron's local spec keeps them apart and saves them under the
# fused names (its ``sharded_state_dict_keys_map``), so checkpoints are canonical in both specs.
TE_FUSED_NORMS: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# layer submodules that are Transformer Engine modules in the TE spec (each holds an ``_extra_state``)
TE_LINEAR_MODULES: tuple[str, ...] = (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
)


def te_param_name(local_suffix: str) -> str:
    """The name of a local-spec layer parameter (``input_layernorm.weight``) in a TE-spec layer."""
    return TE_FUSED_NORMS.get(local_suffix, local_suffix)


# dist_checkpointing keys of the layer parameters (layer axis first; TE names in both specs)
CKPT_LAYER_KEYS: dict[str, str] = {k: "decoder.layers." + te_param_name(k) for k in LAYER_TABLE}
# ... and the ``_extra_state`` objects of the linear layers (None from the local spec; FP8 metadata from TE)
CKPT_EXTRA_STATE_KEYS: tuple[str, ...] = tuple(f"decoder.layers.{m}._extra_state" for m in TE_LINEAR_MODULES)
REWARD_HEAD = "score.weight"
HF_LAYER_PREFIX = "model.layers.{}."


@dataclass(frozen=True)
class HeadLayout:
    """Attention head geometry of a model: ``heads`` query heads in ``groups`` key/value groups of ``dim``."""

    heads: int
    groups: int
    dim: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> HeadLayout:
        return cls(cfg.num_attention_heads, cfg.kv_heads, cfg.kv_channels)

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.<i>.<suffix>`` -> (i, suffix); None for a parameter outside the layers."""
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        return None
    return int(parts[2]), ".".join(parts[3:])


def hf_names(name: str, tied: bool = False) -> tuple[tuple[str, ...], int | None]:
    """HF tensor names feeding the megatron (global-layer) parameter ``name``, and its TP split dim.

    ``output_layer.weight`` of a tied model is read from ``model.embed_tokens.weight``.
    """
    layer = split_layer_name(name)
    if layer is not None:
        index, suffix = layer
        if suffix not in LAYER_TABLE:
            raise ValueError(f"{name}: no Hugging Face counterpart for megatron parameter {suffix!r}")
        hf, dim = LAYER_TABLE[suffix]
        return tuple(HF_LAYER_PREFIX.format(index) + h for h in hf), dim
    if name not in GLOBAL_TABLE:
        raise ValueError(f"{name}: no Hugging Face counterpart for this megatron parameter")
    hf, dim = GLOBAL_TABLE[name]
    if name == "output_layer.weight" and tied:
        hf = GLOBAL_TABLE["embedding.word_embeddings.weight"][0]
    return (hf,), dim


# ---------------------------------------------------------------------------- fused QKV


def qkv_rows(layout: HeadLayout, tp: int, rank: int) -> tuple[slice, slice]:
    """Rows of ``q_proj`` and of ``k_proj`` / ``v_proj`` that TP rank ``rank`` of ``tp`` holds."""
    if layout.groups % tp:
        raise ValueError(f"model.num_query_groups: {layout.groups} key/value heads cannot be split over tp={tp}")
    per_rank = layout.groups // tp
    g0, g1 = rank * per_rank, (rank + 1) * per_rank
    q_rows = layout.q_per_group * layout.dim
    return slice(g0 * q_rows, g1 * q_rows), slice(g0 * layout.dim, g1 * layout.dim)


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, layout: HeadLayout) -> Tensor:
    """HF q/k/v (weights [rows, h] or biases [rows]) of whole groups -> megatron's fused ``linear_qkv``."""
    groups = k.shape[0] // layout.dim
    tail = q.shape[1:]
    q = q.reshape(groups, layout.q_per_group * layout.dim, *tail)
    k = k.reshape(groups, layout.dim, *tail)
    v = v.reshape(groups, layout.dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: Tensor, layout: HeadLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``interleave_qkv`` on the full tensor: megatron ``linear_qkv`` -> HF (q, k, v)."""
    tail = qkv.shape[1:]
    expected = layout.groups * (layout.q_per_group + 2) * layout.dim
    if qkv.shape[0] != expected:
        raise ValueError(f"linear_qkv: {qkv.shape[0]} rows, expected {expected} for {layout}")
    grouped = qkv.reshape(layout.groups, layout.q_per_group + 2, layout.dim, *tail)
    q = grouped[:, : layout.q_per_group].reshape(-1, *tail)
    k = grouped[:, layout.q_per_group].reshape(-1, *tail)
    v = grouped[:, layout.q_per_group + 1].reshape(-1, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def split_fc1(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """megatron ``linear_fc1`` (full) -> HF (gate_proj, up_proj)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def even_slice(size: int, tp: int, rank: int, what: str) -> slice:
    """The ``rank``-th of ``tp`` equal parts of ``size`` (megatron never pads here)."""
    if size % tp:
        raise ValueError(f"{what}: size {size} is not divisible by tp={tp}")
    part = size // tp
    return slice(rank * part, (rank + 1) * part)
