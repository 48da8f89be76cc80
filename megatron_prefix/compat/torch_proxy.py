"""A module-scoped stand-in for the name ``torch`` inside selected megatron-core modules on CPU.

megatron-core 0.16 writes ``torch.cuda.current_device()``, ``torch.cuda.synchronize()``,
``torch.cuda.manual_seed(...)`` and ``torch.zeros(..., device="cuda")`` in code that is otherwise device
agnostic. On a CPU-only host we rebind the global ``torch`` of exactly those modules (see
``megatron_prefix.compat.cpu``) to a :class:`TorchOnCpu` object: it forwards every attribute to the real
``torch`` module except

- tensor factories (``tensor``, ``zeros``, ``empty``, ...): a CUDA ``device=`` ("cuda", "cuda:0", an int,
  a cuda ``torch.device``) becomes the CPU device;
- ``torch.cuda``: a :class:`CudaOnCpu` view in which ``current_device()`` is the CPU device,
  ``synchronize``/``empty_cache`` are no-ops and the RNG calls (``get_rng_state``, ``set_rng_state``,
  ``manual_seed``, ``random.*``) act on the CPU generator, which is the generator CPU kernels
  (dropout, ``init.normal_``) draw from. Everything else is the real ``torch.cuda``.

The real ``torch`` and ``torch.cuda`` modules are never modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

CPU = torch.device("cpu")

# Factories that megatron-core 0.16 calls with a CUDA device (and close relatives, for robustness).
FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange",
    "rand", "randn", "randint", "zeros_like", "ones_like", "empty_like", "full_like",
)


def to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (str, int, ``torch.device``) to the CPU device; leave others unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return CPU
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _CudaRandomOnCpu:
    """``torch.cuda.random`` whose state functions act on the CPU generator."""

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda.random, name)


class CudaOnCpu:
    """``torch.cuda`` as seen by a patched megatron module on a CPU-only host."""

    random = _CudaRandomOnCpu()
    get_rng_state = staticmethod(random.get_rng_state)
    set_rng_state = staticmethod(random.set_rng_state)
    manual_seed = staticmethod(random.manual_seed)
    manual_seed_all = staticmethod(random.manual_seed)
    synchronize = staticmethod(_noop)
    empty_cache = staticmethod(_noop)

    @staticmethod
    def current_device() -> torch.device:
        return CPU

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class TorchOnCpu:
    """Forwards to ``torch``; CUDA devices in factories and ``torch.cuda`` get their CPU meaning."""

    cuda = CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in FACTORIES:
            value = _cpu_factory(value)
        setattr(self, name, value)  # cache: later look-ups skip __getattr__
        return value

    def __repr__(self) -> str:
        return "<megatron_prefix.compat TorchOnCpu proxy of torch>"


TORCH_ON_CPU = TorchOnCpu()
