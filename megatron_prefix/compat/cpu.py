"""CPU accommodations for megatron-core 0.16.1 (applied only when CUDA is absent).

Four kinds, each pinned to named megatron symbols (``pins.require``) and listed in docs/compat.md:

1. ``PROXIED``: modules whose global name ``torch`` is rebound to ``torch_proxy.TORCH_ON_CPU`` (CUDA device
   strings, ``current_device``, ``synchronize``, CUDA RNG calls get their CPU meaning inside that module only).
2. RNG state: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` are replaced by CPU
   versions (the stock setter goes through ``torch.cuda._lazy_call``, which on a CPU build queues the
   callback forever: the state would silently never be restored), and the tracker's "CPU RNG state changed
   within GPU RNG context" warning, meaningless when both are the same generator, is filtered.
3. CUDA type names: ``clip_grad_by_total_norm_fp32``, ``DistributedOptimizer.__init__`` and
   ``Float16OptimizerWithFloat16Params.__init__`` compare ``tensor.type()`` with ``"torch.cuda.FloatTensor"``
   (etc.). For the duration of those calls only, the CPU tensors involved answer ``type()`` with the CUDA
   name of their dtype (an instance attribute, removed afterwards; ``torch.Tensor`` itself is untouched).
4. ``CLIPViTModel``'s ``position_ids`` ``.cuda()`` at construction (``compat.vision``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from megatron_prefix.compat.pins import CompatError, require, require_module
from megatron_prefix.compat.sp_collectives import patch_sp_collectives
from megatron_prefix.compat.torch_proxy import TORCH_ON_CPU
from megatron_prefix.compat.vision import patch_clip_vit_position_ids

MARK = "__megatron_prefix_compat__"

# module -> (symbols the accommodation is about, what breaks on CPU)
PROXIED: dict[str, tuple[tuple[str, ...], str]] = {
    "megatron.core.tensor_parallel.random": (
        ("model_parallel_cuda_manual_seed", "CudaRNGStatesTracker.add", "CudaRNGStatesTracker.fork"),
        "torch.cuda.manual_seed/get_rng_state seed and snapshot the RNG tracker states",
    ),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        ("RotaryEmbedding.get_emb",),
        "inv_freq is moved to torch.cuda.current_device()",
    ),
    "megatron.core.pipeline_parallel.schedules": (
        ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving"),
        "total_num_tokens is allocated with device='cuda' even at PP=1",
    ),
    "megatron.core.pipeline_parallel.p2p_communication": (
        ("P2PCommunicator",),
        "shape/receive buffers on torch.cuda.current_device(); torch.cuda.synchronize()",
    ),
    "megatron.core.distributed.param_and_grad_buffer": (
        ("_ParamAndGradBuffer", "_ParamAndGradBucketGroup"),
        "buffers and shard views allocated on torch.cuda.current_device()",
    ),
    "megatron.core.optimizer.optimizer": (
        ("MegatronOptimizer", "FP32Optimizer", "MixedPrecisionOptimizer"),
        "found_inf/_scale_one/dummy overflow buffers with device='cuda'",
    ),
    "megatron.core.optimizer.clip_grads": (
        ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"),
        "norm and overflow buffers with device='cuda'",
    ),
    "megatron.core.utils": (
        ("GlobalMemoryBuffer.get_tensor", "local_multi_tensor_l2_norm"),
        "the l2 norm result and the global memory buffer on CUDA",
    ),
    "megatron.core.optimizer.distrib_optimizer": (
        ("DistributedOptimizer",),
        "state shards allocated on torch.cuda.current_device()",
    ),
    "megatron.core.tensor_parallel.mappings": (
        ("_gather_along_first_dim", "_gather_along_last_dim", "_reduce_scatter_along_first_dim"),
        "gather/scatter outputs allocated on torch.cuda.current_device()",
    ),
    "megatron.core.tensor_parallel.layers": (
        ("LinearWithGradAccumulationAndAsyncCommunication.backward",),
        "sequence parallelism: the backward's reduce-scatter output on torch.cuda.current_device()",
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        ("FileSystemWriterAsync.preload_tensors",),
        "torch.cuda.synchronize() after preloading tensors for a torch_dist save",
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        ("verify_global_md_reuse", "save_state_dict_async_finalize"),
        "result flags allocated on CUDA for the all-reduce/broadcast of a torch_dist save",
    ),
}

_RNG_MODULE = "megatron.core.tensor_parallel.random"
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _marked(fn: Callable) -> Callable:
    setattr(fn, MARK, True)
    return fn


def proxy_torch_in(module_name: str) -> None:
    """Rebind the global ``torch`` of one ``PROXIED`` module to the CPU proxy (idempotent)."""
    symbols, why = PROXIED[module_name]
    module = require_module(module_name, why)
    for symbol in symbols:
        require(module_name, symbol, why)
    current = getattr(module, "torch", None)
    if current is TORCH_ON_CPU:
        return
    if current is not torch:
        raise CompatError(f"megatron_prefix.compat: {module_name}.torch is {current!r}, expected the torch module")
    module.torch = TORCH_ON_CPU


# --- 2. RNG state -------------------------------------------------------------------------------------------


@_marked
def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU stand-in for ``random._get_cuda_rng_state``: the CPU generator's state (always a copy)."""
    if graph_safe:
        raise ValueError("use_cudagraphable_rng: CUDA graphs are not available on CPU")
    return torch.get_rng_state()


@_marked
def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU stand-in for ``random._set_cuda_rng_state``: set the CPU generator's state now."""
    if graph_safe:
        raise ValueError("use_cudagraphable_rng: CUDA graphs are not available on CPU")
    torch.set_rng_state(new_state)


class _DropSameGeneratorWarning(logging.Filter):
    """On CPU the "CUDA" and CPU generators are one: the tracker's change warning is always a false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def patch_rng_state() -> None:
    """Replace the tracker's CUDA RNG state getter/setter by CPU ones; filter the false-alarm warning."""
    why = "CPU RNG state for the tracker and activation recompute"
    module = require_module(_RNG_MODULE, why)
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CheckpointFunction", "_fork_rng"):
        require(_RNG_MODULE, name, why)
    if not getattr(module._get_cuda_rng_state, MARK, False):
        module._get_cuda_rng_state = _get_cpu_rng_state
        module._set_cuda_rng_state = _set_cpu_rng_state
    log = logging.getLogger(_RNG_MODULE)
    if not any(isinstance(f, _DropSameGeneratorWarning) for f in log.filters):
        log.addFilter(_DropSameGeneratorWarning())


# --- 3. CUDA type names -------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_type_names(tensors: Iterable[torch.Tensor | None]) -> Iterator[None]:
    """Within the block, CPU float tensors among ``tensors`` answer ``type()`` with their CUDA type name."""
    touched = []
    real = torch.Tensor.type
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.dtype not in _CUDA_TYPE_NAMES or "type" in t.__dict__:
            continue

        def fake_type(dtype: Any = None, non_blocking: bool = False, _t=t, _name=_CUDA_TYPE_NAMES[t.dtype], **kw):
            return _name if dtype is None else real(_t, dtype, non_blocking, **kw)

        t.type = fake_type
        touched.append(t)
    try:
        yield
    finally:
        for t in touched:
            del t.type


def _params_of(torch_optimizer: Any) -> list[torch.Tensor]:
    if torch_optimizer is None:
        return []
    return [p for group in torch_optimizer.param_groups for p in group["params"]]


def _wrap_init(cls: type) -> None:
    """Wrap ``cls.__init__(self, optimizer, ...)`` so the optimizer's params carry CUDA type names."""
    init = cls.__init__
    if getattr(init, MARK, False):
        return

    @functools.wraps(init)
    def __init__(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        with cuda_type_names(_params_of(optimizer)):
            init(self, optimizer, *args, **kwargs)

    cls.__init__ = _marked(__init__)


def patch_type_checks() -> None:
    """Present CPU tensors with CUDA type names to the three megatron ``tensor.type()`` checks."""
    why = "tensor.type() == 'torch.cuda.FloatTensor' checks"
    clip = require("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", why)
    optimizer_mod = require_module("megatron.core.optimizer.optimizer", why)
    alias = require("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", why)
    if alias is not clip and not getattr(alias, MARK, False):
        raise CompatError("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32 is not clip_grads'")
    dist_opt = require("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", why)
    fp16_opt = require("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", why)

    if not getattr(clip, MARK, False):

        @functools.wraps(clip)
        def clip_grad_by_total_norm_fp32(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            with cuda_type_names(p.grad for p in params):
                return clip(params, *args, **kwargs)

        wrapped = _marked(clip_grad_by_total_norm_fp32)
        require_module("megatron.core.optimizer.clip_grads", why).clip_grad_by_total_norm_fp32 = wrapped
        optimizer_mod.clip_grad_by_total_norm_fp32 = wrapped
    _wrap_init(dist_opt)
    _wrap_init(fp16_opt)


class _UninitialisedDistTorch:
    """``torch`` for one call: forwards everything, but ``distributed.is_initialized()`` is False."""

    def __init__(self, real: Any):
        self._real = real
        self.distributed = type("_Dist", (), {"is_initialized": staticmethod(lambda: False)})()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def patch_tied_embedding_sync() -> None:
    """Tied embeddings at PP > 1: megatron copies the shared weight with ``weight.data.cuda()`` (a Tensor
    method, out of reach of the module proxy) before all-reducing it between the first and last stage.
    On CPU we run the stock method with that block skipped, then do the same all-reduce on CPU."""
    why = "setup_embeddings_and_output_layer moves the shared embedding weight with Tensor.cuda()"
    cls = require("megatron.core.models.common.language_module.language_module", "LanguageModule", why)
    module = require_module("megatron.core.models.common.language_module.language_module", why)
    original = cls.setup_embeddings_and_output_layer
    for name in ("_is_in_embd_group", "shared_embedding_or_output_weight"):
        require("megatron.core.models.common.language_module.language_module", f"LanguageModule.{name}", why)
    if getattr(original, MARK, False):
        return

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self: Any) -> None:
        printed = getattr(cls, "embedding_warning_printed", False)
        module.torch, cls.embedding_warning_printed = _UninitialisedDistTorch(torch), True
        try:
            original(self)
        finally:
            module.torch, cls.embedding_warning_printed = torch, printed
        if torch.distributed.is_initialized() and self._is_in_embd_group():
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)

    cls.setup_embeddings_and_output_layer = _marked(setup_embeddings_and_output_layer)


def apply_cpu_accommodations() -> None:
    """Apply all CPU accommodations (each pinned; idempotent)."""
    for module_name in PROXIED:
        proxy_torch_in(module_name)
    patch_rng_state()
    patch_type_checks()
    patch_tied_embedding_sync()
    patch_sp_collectives()
    patch_clip_vit_position_ids()
