"""The attention-backend seam: one object per backend, registered by name, asked before any model is built.

A backend is a subclass of ``AttentionBackend`` in its own module that calls ``register`` at import:

- ``name`` (the ``attention.backend`` value) and ``caps`` (``Capabilities``: devices it trains on, dtypes
  per device, a CPU reference path and whether it has a backward, context-parallel support, attention
  dropout, an optional package it needs);
- ``prepare(params, cp) -> plan``: everything derived from the micro-batch's ``SharedPrefixParams``
  (mask, block mask, gather plan), built once per micro-batch and CP slice and shared by all layers
  (``SharedPrefixCoreAttention`` caches it in ``params.cache[backend.plan_key() + cp key]``);
- ``attend(q_sbhd, k_sbhd, v_sbhd, plan, scale, dropout_p) -> out [s, b, np*hn]``: this rank's queries
  ``[s, b, np, hn]`` against the whole row's keys/values ``[T, b, ng, hn]`` (already CP-gathered).

``check(cfg, device=..., dtype=..., cp=..., backward=...)`` is the one place that decides whether a
combination can run; ``TrainConfig.validate`` and the layer constructor both call it, so an impossible
backend x device x dtype x cp is refused with the field named before any model exists.

Adding a backend = one new module + its name in ``_BUILTIN_MODULES``. Imports neither megatron nor
torch.distributed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from megatron_prefix.config import require

# Registration imports: each module defines one backend and calls ``register`` on import.
_BUILTIN_MODULES = (
    "megatron_prefix.attention.dense",
    "megatron_prefix.attention.flex",
    "megatron_prefix.attention.varlen",
    "megatron_prefix.attention.te",
)

ALL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; ``check`` reads nothing else."""

    devices: tuple[str, ...]  # devices it trains on (forward + backward)
    dtypes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per device; missing = ALL_DTYPES
    cpu_reference: bool = False  # a slow CPU path for tests/eval, enabled by attention.allow_cpu_reference
    cpu_backward: bool = False  # that CPU path has a backward
    context_parallel: bool = True
    dropout: bool = False
    package: str | None = None  # importable module the backend needs (checked, never imported here)

    def dtypes_on(self, device: str) -> tuple[str, ...]:
        """Dtypes supported on ``device``."""
        return tuple(self.dtypes.get(device, ALL_DTYPES))


@dataclass(frozen=True)
class CPSlice:
    """Which part of the row this rank's queries are: context-parallel size/rank and the device."""

    size: int = 1
    rank: int = 0
    device: torch.device | str = "cpu"

    def q_positions(self, seq_len: int) -> torch.Tensor | None:
        """Global row positions [T/cp] of the local queries (None without CP: all of them, in order)."""
        if self.size == 1:
            return None
        from megatron_prefix.attention.context_parallel import local_positions  # torch.distributed: lazy

        return local_positions(seq_len, self.size, self.rank, device=self.device)

    def key(self) -> str:
        return f"cp{self.size}.{self.rank}/{self.device}"


class AttentionBackend:
    """Base class of a shared-prefix attention backend (see the module docstring)."""

    name: ClassVar[str] = ""
    caps: ClassVar[Capabilities] = Capabilities(devices=())

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the layer's AttentionConfig

    def plan_key(self) -> str:
        """Cache key of the plan (include any config field the plan depends on)."""
        return self.name

    def prepare(self, params: Any, cp: CPSlice) -> Any:  # pragma: no cover - interface
        """The per-micro-batch structure every layer's ``attend`` reads."""
        raise NotImplementedError

    def attend(
        self,
        q_sbhd: torch.Tensor,
        k_sbhd: torch.Tensor,
        v_sbhd: torch.Tensor,
        plan: Any,
        scale: float,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:  # pragma: no cover - interface
        """``[s, b, np, hn]`` queries against ``[T, b, ng, hn]`` keys/values -> ``[s, b, np*hn]``."""
        raise NotImplementedError


BACKENDS: dict[str, type[AttentionBackend]] = {}
_loaded = False


def register(backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """Add a backend class under its ``name`` (usable as a class decorator)."""
    assert backend.name and backend.name not in BACKENDS, f"backend name {backend.name!r} missing or taken"
    BACKENDS[backend.name] = backend
    return backend


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Registered backend names."""
    _load()
    return tuple(BACKENDS)


def get(name: str) -> type[AttentionBackend]:
    """The backend class called ``name`` (``ValueError`` naming ``attention.backend`` otherwise)."""
    _load()
    require(name in BACKENDS, "attention.backend", f"must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def package_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check(cfg: Any, *, device: str, dtype: str | None = None, cp: int = 1, backward: bool = True) -> None:
    """Refuse a backend x device x dtype x cp combination that cannot run, naming the field.

    ``device``: ``cpu`` or ``cuda``; ``dtype``: ``float32``/``bfloat16``/``float16`` or None (not known
    yet); ``backward``: whether gradients are needed. On CPU a backend with ``caps.cpu_reference`` runs
    only when ``cfg.allow_cpu_reference`` is set, and trains only if the reference has a backward.
    """
    backend = get(cfg.backend)
    caps, name = backend.caps, cfg.backend
    if caps.package:
        require(package_available(caps.package), "attention.backend",
                f"{name} needs the {caps.package!r} package, which is not installed here; pick another backend")
    if device not in caps.devices:
        if device == "cpu" and caps.cpu_reference:
            require(bool(cfg.allow_cpu_reference), "attention.backend",
                    f"{name}: needs CUDA; this machine has none. Use backend=dense, or set "
                    "attention.allow_cpu_reference=true for the slow CPU reference path (tests/eval only)")
            require(caps.cpu_backward or not backward, "attention.backend",
                    f"{name}: its CPU path has no backward (PyTorch limitation), so it cannot train on CPU; "
                    "use backend=dense for CPU training")
        else:
            require(False, "attention.backend", f"{name}: cannot run on {device} (runs on {caps.devices})")
    if dtype is not None and device in caps.devices:
        ok = caps.dtypes_on(device)
        require(dtype in ok, "train.dtype",
                f"{dtype} is not supported by attention.backend={name} on {device} (supported: {ok}); "
                "change train.dtype or attention.backend")
    if cp > 1:
        require(caps.context_parallel, "parallel.cp",
                f"attention.backend={name} does not support context parallelism (cp={cp}); use cp=1 or "
                "another backend (dense, flex, varlen gather K/V across the CP group)")


def make(cfg: Any) -> AttentionBackend:
    """An instance of ``cfg.backend`` configured by ``cfg``."""
    return get(cfg.backend)(cfg)
