"""Upgrade guard: every accommodation names the megatron-core symbol it relies on.

``require("megatron.core.utils", "GlobalMemoryBuffer")`` imports the module and returns the attribute, or
raises :class:`CompatError` saying which accommodation must be revisited. Accommodations resolve all their
pins before changing anything, so a megatron upgrade fails loudly at start-up instead of silently running
stock CUDA code on CPU (or skipping a bug fix).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

SUPPORTED_MEGATRON = "0.16"


class CompatError(RuntimeError):
    """A megatron-core symbol that an accommodation relies on is missing or changed."""


def megatron_version() -> str:
    """The installed megatron-core version string."""
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def require_module(module: str, why: str) -> ModuleType:
    """Import ``module`` or raise CompatError naming the accommodation ``why``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CompatError(
            f"megatron_prefix.compat: cannot import {module} (megatron-core {megatron_version()}, "
            f"written for {SUPPORTED_MEGATRON}); accommodation '{why}' must be revisited: {err}"
        ) from err


def require(module: str, name: str, why: str) -> Any:
    """``module.name`` (dotted ``name`` allowed), or CompatError naming the symbol and ``why``."""
    obj: Any = require_module(module, why)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise CompatError(
                f"megatron_prefix.compat: {module}.{name} is missing in megatron-core {megatron_version()} "
                f"(written for {SUPPORTED_MEGATRON}); accommodation '{why}' must be revisited "
                f"(see docs/compat.md)"
            )
        obj = getattr(obj, part)
    return obj
