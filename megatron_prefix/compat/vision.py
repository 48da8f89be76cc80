"""CPU accommodation for megatron-core 0.16.1's ``CLIPViTModel`` (applied only when CUDA is absent).

``CLIPViTModel.__init__`` builds ``self.position_ids = torch.arange(seq_length).expand(1, -1).cuda()``:
a CUDA move of a plain attribute that fails on a CPU-only build. The module-scoped proxy of
``compat.torch_proxy`` cannot help (``.cuda()`` is a ``Tensor`` method, not a ``torch`` function), so
the global ``torch`` of ``megatron.core.models.vision.clip_vit_model`` is rebound to a proxy whose
``arange`` returns a ``_CpuArange`` tensor: a ``torch.Tensor`` subclass for which ``.cuda()`` returns
the same values as a plain CPU tensor (views such as ``expand`` keep the subclass until then).
Everything else the module reads from ``torch`` (``nn``, ``randn``, ``cat``) is the real one; the real
``torch`` and ``torch.Tensor`` are never modified.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_prefix.compat.pins import CompatError, require, require_module

MODULE = "megatron.core.models.vision.clip_vit_model"
WHY = "CLIPViTModel.__init__ moves position_ids to CUDA with Tensor.cuda()"


class _CpuArange(torch.Tensor):
    """A CPU tensor whose ``.cuda()`` is a no-op returning a plain tensor (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.cuda:
            return args[0].as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})


class _TorchForClipVit:
    """``torch`` as seen by ``clip_vit_model`` on CPU: ``arange`` yields ``_CpuArange``."""

    @staticmethod
    def arange(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.arange(*args, **kwargs).as_subclass(_CpuArange)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<megatron_prefix.compat proxy of torch for CLIPViTModel>"


TORCH_FOR_CLIP_VIT = _TorchForClipVit()


def patch_clip_vit_position_ids() -> None:
    """Rebind ``clip_vit_model.torch`` to the proxy (idempotent; pinned to ``CLIPViTModel``)."""
    module = require_module(MODULE, WHY)
    require(MODULE, "CLIPViTModel", WHY)
    current = getattr(module, "torch", None)
    if current is TORCH_FOR_CLIP_VIT:
        return
    if current is not torch:
        raise CompatError(f"megatron_prefix.compat: {MODULE}.torch is {current!r}, expected the torch module")
    module.torch = TORCH_FOR_CLIP_VIT
