"""Attention backends ``dense`` and ``flex`` (``varlen`` lives in ``varlen.py``) and their config.

Kernel-boundary layouts: ``*_bhsd`` = [batch, heads, seq, head_dim]. Keys/values may have fewer heads
than queries (GQA); every backend handles that natively (``enable_gqa``). Masks come from
``masks.py`` and are built once per micro-batch by ``core_attention`` (cached in ``params.cache``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "flex", "varlen")


@dataclass
class AttentionConfig:
    """Choice and limits of the shared-prefix attention backend.

    - ``backend``: ``dense`` (boolean mask + SDPA, any device, the reference), ``flex`` (flex_attention
      with a block-sparse ``BlockMask``; training needs CUDA), ``varlen`` (per-response K/V gather +
      a varlen flash kernel; needs CUDA).
    - ``max_dense_tokens``: ``dense`` refuses rows longer than this (its mask is O(T^2)).
    - ``flex_block_size``: ``BLOCK_SIZE`` of ``create_block_mask``.
    - ``flex_compile``: compile ``flex_attention`` (None: on CUDA only; eager flex on CPU is the math path).
    - ``allow_cpu_reference``: allow the CPU paths of ``flex`` (forward only) and ``varlen`` (a math loop
      over per-sequence SDPA with the same gather indices). Tests and evaluation only.
    """

    backend: str = "dense"
    max_dense_tokens: int = 16384
    flex_block_size: int = 128
    flex_compile: bool | None = None
    allow_cpu_reference: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.backend not in BACKENDS:
            raise ValueError(f"attention.backend: must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_dense_tokens <= 0:
            raise ValueError(f"attention.max_dense_tokens: must be positive, got {self.max_dense_tokens}")
        if self.flex_block_size <= 0 or self.flex_block_size % 16:
            raise ValueError(
                f"attention.flex_block_size: must be a positive multiple of 16, got {self.flex_block_size}"
            )

    @classmethod
    def coerce(cls, value: Any) -> AttentionConfig:
        """Accept an ``AttentionConfig``, a dict of its fields, a backend name, or None (defaults)."""
        if value is None:
            cfg = cls()
        elif isinstance(value, cls):
            cfg = value
        elif isinstance(value, str):
            cfg = cls(backend=value)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"attention: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
                )
            cfg = cls(**value)
        else:
            raise ValueError(
                f"attention: expected AttentionConfig, dict or backend name, got {type(value).__name__}"
            )
        cfg.validate()
        return cfg


def check_available(cfg: AttentionConfig) -> None:
    """Fail at construction if ``cfg.backend`` cannot run here, naming why."""
    cuda = torch.cuda.is_available()
    if cfg.backend == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as err:  # pragma: no cover
            raise ValueError(
                f"attention.backend=flex: torch {torch.__version__} has no flex_attention ({err})"
            )
        if not cuda and not cfg.allow_cpu_reference:
            raise ValueError(
                "attention.backend=flex: CUDA is not available and PyTorch's flex_attention has no CPU "
                "backward, so it cannot train here; use backend=dense, or allow_cpu_reference=True for "
                "forward-only (eval) use"
            )
    if cfg.backend == "varlen" and not cuda and not cfg.allow_cpu_reference:
        raise ValueError(
            "attention.backend=varlen: needs CUDA (flash varlen kernel); this machine has none. Use "
            "backend=dense, or allow_cpu_reference=True for the slow CPU math fallback (tests only)"
        )


# ---------------------------------------------------------------------------------------------- dense


def dense_attention(
    q_bhsd: torch.Tensor,
    k_bhsd: torch.Tensor,
    v_bhsd: torch.Tensor,
    mask_b1qk: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA with a boolean mask ``[b, 1, Tq, Tk]`` (True = attend); returns ``[b, h, Tq, d]``.

    On CUDA, GQA keys/values are expanded first so that the memory-efficient SDPA kernel (which takes
    a mask) stays eligible; elsewhere SDPA's ``enable_gqa`` avoids the copy.
    """
    groups = q_bhsd.shape[1] // k_bhsd.shape[1]
    if q_bhsd.is_cuda and groups > 1:
        k_bhsd = k_bhsd.repeat_interleave(groups, dim=1)
        v_bhsd = v_bhsd.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q_bhsd,
        k_bhsd,
        v_bhsd,
        attn_mask=mask_b1qk,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k_bhsd.shape[1] != q_bhsd.shape[1],
    )


# ----------------------------------------------------------------------------------------------- flex

_COMPILED_FLEX: dict[str, Any] = {}


def flex_fn(compile_: bool):
    """``flex_attention``, compiled once per process when ``compile_`` (module-level cache)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_:
        return flex_attention
    if "fn" not in _COMPILED_FLEX:
        _COMPILED_FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["fn"]


def build_block_mask(mask_mod, b: int, q_len: int, kv_len: int, device: torch.device, block_size: int):
    """``create_block_mask`` over ``mask_mod`` (heads broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, BLOCK_SIZE=block_size
    )


def count_blocks(block_mask) -> dict[str, int]:
    """Block statistics of a ``BlockMask``: total, full, partial (masked), computed, skipped."""
    partial = int(block_mask.kv_num_blocks.sum())
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    b, h, nq = block_mask.kv_num_blocks.shape
    _q_len, kv_len = block_mask.seq_lengths
    _bq, bk = block_mask.BLOCK_SIZE
    total = b * h * nq * (-(-kv_len // bk))
    return {
        "total": total,
        "full": full,
        "partial": partial,
        "computed": full + partial,
        "skipped": total - full - partial,
    }


def flex_attention_bhsd(
    q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, block_mask, scale: float, compile_: bool
) -> torch.Tensor:
    """Block-sparse flex attention; refuses CPU backward (unsupported by PyTorch)."""
    if (
        q_bhsd.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q_bhsd, k_bhsd, v_bhsd))
    ):
        raise RuntimeError(
            "flex attention on CPU supports only the forward pass (PyTorch has no CPU flex backward); "
            "run under torch.no_grad()/eval, or use the dense backend for CPU training"
        )
    if q_bhsd.device.type == "cpu":  # PyTorch rejects CPU inputs that require grad even under no_grad
        q_bhsd, k_bhsd, v_bhsd = q_bhsd.detach(), k_bhsd.detach(), v_bhsd.detach()
    fn = flex_fn(compile_)
    with warnings.catch_warnings():
        if not compile_:  # eager flex (CPU reference) warns on every call that it is unfused
            warnings.filterwarnings("ignore", message=".*flex_attention.*")
        return fn(
            q_bhsd,
            k_bhsd,
            v_bhsd,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=k_bhsd.shape[1] != q_bhsd.shape[1],
        )
