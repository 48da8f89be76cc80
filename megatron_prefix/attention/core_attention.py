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
[s, b, np*hn]. Every derived structure is built once per micro-batch and cached in ``params.cache``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prefix.attention import backends, context_parallel, masks, varlen
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.attention.params import SharedPrefixParams

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
    """Core attention over prefix-shared packed rows (dense / flex / varlen backends, optional CP)."""

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
        backends.check_available(self.attn_cfg)
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
        if self.dropout_p > 0 and self.attn_cfg.backend != "dense":
            raise ValueError(
                f"attention_dropout: backend {self.attn_cfg.backend!r} has no attention dropout, got "
                f"{self.dropout_p}; set TransformerConfig.attention_dropout=0.0 or use backend=dense"
            )
        self.pg_collection = pg_collection
        self._cp_size = int(getattr(config, "context_parallel_size", 1) or 1)

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
        s_local, b, nh, hd = query.shape
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

        backend = self.attn_cfg.backend
        if backend == "varlen":
            out_thd = self._varlen(query, key, value, params, cp_size, cp_rank)
            # [b*s, np, hn] -> [s, b, np*hn]
            return out_thd.view(b, s_local, nh * hd).transpose(0, 1).contiguous()
        q_bhsd = query.permute(1, 2, 0, 3)
        k_bhsd = key.permute(1, 2, 0, 3)
        v_bhsd = value.permute(1, 2, 0, 3)
        if backend == "dense":
            if t > self.attn_cfg.max_dense_tokens:
                raise ValueError(
                    f"attention.max_dense_tokens: row of {t} tokens exceeds {self.attn_cfg.max_dense_tokens} "
                    "for the dense backend (O(T^2) mask); use backend flex or varlen, or raise the limit"
                )
            mask = self._cached(
                params,
                "dense",
                cp_size,
                cp_rank,
                query.device,
                lambda q_pos: masks.build_dense_mask(
                    params.doc_ids.to(query.device), params.segment_ids.to(query.device), q_pos
                ),
            )
            dropout = self.dropout_p if self.training else 0.0
            if dropout > 0 and query.is_cuda and not self.config.sequence_parallel:
                from megatron.core import tensor_parallel  # same RNG stream policy as DotProductAttention

                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out_bhsd = backends.dense_attention(
                        q_bhsd, k_bhsd, v_bhsd, mask, self.softmax_scale, dropout
                    )
            else:
                out_bhsd = backends.dense_attention(q_bhsd, k_bhsd, v_bhsd, mask, self.softmax_scale, dropout)
        else:
            block_mask = self._cached(
                params,
                f"flex{self.attn_cfg.flex_block_size}",
                cp_size,
                cp_rank,
                query.device,
                lambda q_pos: backends.build_block_mask(
                    masks.make_mask_mod(
                        params.doc_ids.to(query.device), params.segment_ids.to(query.device), q_pos
                    ),
                    b,
                    s_local,
                    t,
                    query.device,
                    self.attn_cfg.flex_block_size,
                ),
            )
            compile_ = self.attn_cfg.flex_compile if self.attn_cfg.flex_compile is not None else query.is_cuda
            out_bhsd = backends.flex_attention_bhsd(
                q_bhsd, k_bhsd, v_bhsd, block_mask, self.softmax_scale, compile_
            )
        # [b, np, s, hn] -> [s, b, np*hn]
        return out_bhsd.permute(2, 0, 1, 3).reshape(s_local, b, nh * hd)

    def _varlen(self, query, key, value, params, cp_size, cp_rank) -> torch.Tensor:
        s_local, b, nh, hd = query.shape
        plan = self._cached(
            params,
            "varlen",
            cp_size,
            cp_rank,
            query.device,
            lambda q_pos: masks.build_varlen_plan(
                params.doc_ids.cpu().numpy(),
                params.segment_ids.cpu().numpy(),
                None if q_pos is None else q_pos.cpu().numpy(),
            ).to(query.device),
        )
        q_thd = query.transpose(0, 1).reshape(b * s_local, nh, hd)
        k_thd = key.transpose(0, 1).reshape(b * key.shape[0], key.shape[2], hd)
        v_thd = value.transpose(0, 1).reshape(b * value.shape[0], value.shape[2], hd)
        return varlen.varlen_attention(
            q_thd, k_thd, v_thd, plan, self.softmax_scale, self.attn_cfg.allow_cpu_reference
        )

    @staticmethod
    def _cached(params: SharedPrefixParams, kind: str, cp_size: int, cp_rank: int, device, build):
        """``params.cache[kind/cp/device]``, built on first use with the local query positions."""
        key = f"{kind}/cp{cp_size}.{cp_rank}/{device}"
        if key not in params.cache:
            q_pos = None
            if cp_size > 1:
                q_pos = context_parallel.local_positions(params.seq_len, cp_size, cp_rank, device=device)
            params.cache[key] = build(q_pos)
        return params.cache[key]
