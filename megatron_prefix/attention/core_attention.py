"""``SharedPrefixCoreAttention``: a drop-in ``submodules.core_attention`` for megatron-core 0.16.

Use it in a layer spec in place of ``DotProductAttention``/``TEDotProductAttention``::

    SelfAttentionSubmodules(..., core_attention=SharedPrefixCoreAttention, ...)
    # or, to pick the backend per spec:
    core_attention=functools.partial(SharedPrefixCoreAttention, attention_config=AttentionConfig("flex"))

Backend selection, first match wins:
1. the ``attention_config`` constructor kwarg (``AttentionConfig``, dict of its fields, or a backend name);
2. attribute ``shared_prefix_attention`` on the ``TransformerConfig`` instance (same accepted types);
3. attribute ``shared_prefix_backend`` on the ``TransformerConfig`` instance (a backend name);
4. ``AttentionConfig()`` (dense).

Forward contract: ``query`` [s, b, np, hn], ``key``/``value`` [s, b, ng, hn] (GQA: ng | np) in megatron's
sbhd layout, where ``s = T / cp`` is this rank's slice of the row (megatron's load-balanced CP split;
see ``context_parallel.split_for_cp``); ``packed_seq_params`` must be a ``SharedPrefixParams`` describing
the full rows ``[b, T]``; ``attention_mask`` is ignored (the mask is derived from the params). Returns
[s, b, np*hn]. Dispatch goes through ``registry`` only: the backend's ``prepare`` runs once per
micro-batch (and CP slice), cached in ``params.cache``; every layer calls its ``attend``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prefix.attention import backends, context_parallel, registry
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.attention.registry import CPSlice

__all__ = ["AttentionConfig", "SharedPrefixCoreAttention", "resolve_attention_config"]


def resolve_attention_config(config: Any, attention_config: Any = None) -> AttentionConfig:
    """The ``AttentionConfig`` for a layer, following the order in the module docstring."""
    if attention_config is not None:
        return AttentionConfig.coerce(attention_config)
    if getattr(config, "shared_prefix_attention", None) is not None:
        return AttentionConfig.coerce(config.shared_prefix_attention)
    if getattr(config, "shared_prefix_backend", None) is not None:
        return AttentionConfig.coerce(str(config.shared_prefix_backend))
    return AttentionConfig()


class SharedPrefixCoreAttention(MegatronModule):
    """Core attention over prefix-shared packed rows (any registered backend, optional CP)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        attention_config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.attn_cfg = resolve_attention_config(config, attention_config)
        self._cp_size = int(getattr(config, "context_parallel_size", 1) or 1)
        backends.check_available(self.attn_cfg, cp=self._cp_size)
        self.backend = registry.make(self.attn_cfg)
        if attention_type not in (None, "self"):
            raise ValueError(
                f"attention_type: shared-prefix attention is self-attention only, got {attention_type!r}"
            )
        if cp_comm_type not in (None, "all_gather", "p2p", "a2a"):
            raise ValueError(f"cp_comm_type: unsupported {cp_comm_type!r}")
        # megatron's layer scaling divides the scale by layer_number and multiplies it back in its
        # softmax, so the effective scale is always softmax_scale (or 1/sqrt(hn)).
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        if self.dropout_p > 0 and not self.backend.caps.dropout:
            raise ValueError(
                f"attention_dropout: backend {self.attn_cfg.backend!r} has no attention dropout, got "
                f"{self.dropout_p}; set TransformerConfig.attention_dropout=0.0 or use backend=dense"
            )
        self.pg_collection = pg_collection

    # ------------------------------------------------------------------------------------------ CP
    def _cp_group(self):
        """The context-parallel process group, or None when CP is off."""
        if self._cp_size == 1:
            return None
        group = getattr(self.pg_collection, "cp", None) if self.pg_collection is not None else None
        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_context_parallel_group()
        return group

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: SharedPrefixParams | None = None,
    ) -> torch.Tensor:
        """Attention over the shared-prefix rows described by ``packed_seq_params``; see module doc."""
        params = packed_seq_params
        if not isinstance(params, SharedPrefixParams):
            raise TypeError(
                "SharedPrefixCoreAttention needs packed_seq_params=SharedPrefixParams (got "
                f"{type(params).__name__}); pass it to GPTModel.forward(packed_seq_params=...)"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by shared-prefix attention")
        s_local, b, nh, _hd = query.shape
        if key.shape[2] == 0 or nh % key.shape[2]:
            raise ValueError(f"query heads {nh} must be a multiple of key/value heads {key.shape[2]}")
        t = params.seq_len
        group = self._cp_group()
        cp_size, cp_rank = context_parallel.group_size_rank(group)
        if b != params.batch_size or s_local * cp_size != t:
            raise ValueError(
                f"query [s={s_local}, b={b}] does not match SharedPrefixParams rows [b={params.batch_size}, "
                f"T={t}] with context_parallel_size={cp_size}"
            )
        if cp_size > 1:
            key, value = context_parallel.gather_kv(key, value, group, cp_size, cp_rank)

        cp = CPSlice(cp_size, cp_rank, query.device)
        cache_key = f"{self.backend.plan_key()}/{cp.key()}"
        if cache_key not in params.cache:
            params.cache[cache_key] = self.backend.prepare(params, cp)
        plan = params.cache[cache_key]
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0 and query.is_cuda and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel  # same RNG stream policy as DotProductAttention

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.backend.attend(query, key, value, plan, self.softmax_scale, dropout)
        return self.backend.attend(query, key, value, plan, self.softmax_scale, dropout)
