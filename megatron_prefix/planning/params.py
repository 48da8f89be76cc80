"""Per-rank parameter counts of the megatron model, as megatron-core shards it.

A decoder layer of ``megatron_prefix.model.spec`` (RMSNorm, GQA self-attention with optional QKV bias,
SwiGLU MLP, no other bias) holds, on one tensor-parallel rank:

- two RMSNorm weights of ``h`` (replicated over TP; in the Transformer-Engine spec they are fused into
  ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, same count);
- ``linear_qkv``: ``(q + 2 kv) * h / tp`` (+ ``(q + 2 kv) / tp`` bias), ``q = heads * head_dim``,
  ``kv = groups * head_dim``;
- ``linear_proj``: ``q * h / tp``; ``linear_fc1``: ``2 f * h / tp``; ``linear_fc2``: ``f * h / tp``.

Stage ``i`` of ``pp`` holds ``layers / pp`` layers; the first stage adds the vocab-parallel embedding
``V / tp * h``, the last the final norm ``h`` and the output layer ``V / tp * h`` (untied; with tied
embeddings and ``pp > 1`` megatron still allocates the last stage's copy of the embedding).
``tests/test_plan_meta.py`` checks these counts against the real model built on the ``meta`` device.
"""

from __future__ import annotations

from megatron_prefix.model.config import ModelConfig


def layer_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank."""
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.kv_heads * m.kv_channels
    qkv = (q + 2 * kv) * h + ((q + 2 * kv) if m.qkv_bias else 0)
    sharded = qkv + q * h + 3 * f * h
    assert sharded % tp == 0, "layer weights not divisible by tp (ModelConfig.validate(tp) refuses this)"
    return 2 * h + sharded // tp


def embedding_params(m: ModelConfig, tp: int = 1) -> int:
    """The vocab-parallel word embedding (or output layer) on one tensor-parallel rank."""
    return m.vocab_size // tp * m.hidden_size


def stage_params(m: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (any TP rank: the shards are equal)."""
    assert m.num_layers % pp == 0 and 0 <= stage < pp
    n = m.num_layers // pp * layer_params(m, tp)
    if stage == 0:
        n += embedding_params(m, tp)
    if stage == pp - 1:
        n += m.hidden_size  # final norm
        if not m.tie_word_embeddings or pp > 1:
            n += embedding_params(m, tp)
    return n


def total_params(m: ModelConfig) -> int:
    """Parameters of the whole model (tied embeddings counted once)."""
    return stage_params(m, 1, 1, 0)


def format_count(n: float) -> str:
    """``72.7B`` / ``494.0M`` / ``12.3K``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
