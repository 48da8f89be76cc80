"""Fix megatron-core 0.16's torch-Adam/AdamW fallback (used whenever neither apex nor TE is installed).

Applies on GPU too: a GPU user without apex/TE gets the same fallback. Three bugs, one repair:

1. ``DistributedOptimizer.state_dict`` asserts that all inner states hold exactly one common ``step``. Before
   the first step (saving an initial checkpoint, or the ``sharded_state_dict(is_loading=True)`` that every
   dist-checkpoint load performs on a fresh optimizer) there is none: ``AssertionError``.
2. ``init_state_fn`` (used by ``FP32Optimizer``/``Float16OptimizerWithFloat16Params`` before a sharded load)
   creates ``exp_avg``/``exp_avg_sq`` but no ``step``, and ``FP32Optimizer.sharded_state_dict`` drops a zero
   step (``if step:``): after such a load torch Adam fails with ``KeyError: 'step'``. A ``param_group``
   saved without ``step`` makes ``DistributedOptimizer.load_state_dict`` fail with the same ``KeyError``, and
   so does ``DistributedOptimizer._set_main_param_and_optimizer_states`` during every dist-checkpoint load
   (it copies each state key, ``step`` included, from checkpoint tensors that deliberately omit ``step``);
   we hand it the ``step`` that ``load_state_dict`` already set from ``param_groups``.
3. ``DistributedOptimizer.load_state_dict`` puts *one* ``step`` tensor object in every parameter's state.
   torch's single-tensor Adam increments ``step`` in place, so after a resume the shared counter advances
   once per parameter per iteration and Adam's bias correction is silently wrong.

The repair (``repair_adam_steps``): every parameter state of a torch Adam/AdamW gets its *own* ``step``
tensor, ``0`` where it was missing (a state without ``step`` has never been stepped). It runs after each
``load_state_dict`` of the three megatron optimizer classes and before ``DistributedOptimizer.state_dict``;
an empty state is reported as step 0. Only torch Adam/AdamW inner optimizers are touched (apex/TE FusedAdam
keep the stock path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from megatron_prefix.compat.pins import require

MARK = "__megatron_prefix_adamw_fix__"
_WHY = "torch Adam/AdamW fallback step handling"


def is_torch_adam(optimizer: Any) -> bool:
    """True for torch's Adam/AdamW (megatron's fallback), False for apex/TE FusedAdam and others."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _step_device(group: dict, param: torch.Tensor) -> torch.device:
    # torch keeps ``step`` on the param's device only for capturable/fused Adam (see Optimizer.load_state_dict)
    return param.device if group.get("capturable") or group.get("fused") else torch.device("cpu")


def repair_adam_steps(optimizer: Any) -> None:
    """Give every parameter state of a torch Adam/AdamW its own ``step`` tensor (0 where missing)."""
    if not is_torch_adam(optimizer):
        return
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state is None:
                continue
            if not state:  # an empty entry (e.g. created by a defaultdict look-up) carries nothing
                del optimizer.state[p]
                continue
            step = state.get("step")
            if step is None:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=_step_device(group, p))
            elif not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=_step_device(group, p))
            elif id(step) in seen:
                state["step"] = step.detach().clone()
            seen.add(id(state["step"]))


def _fill_missing_group_steps(state_dict: dict) -> dict:
    """A shallow copy of a DistributedOptimizer state dict whose param_groups all carry ``step``."""
    groups = state_dict.get("optimizer", {}).get("param_groups", [])
    if all(g.get("step") is not None for g in groups):
        return state_dict
    known = {float(g["step"]) for g in groups if g.get("step") is not None}
    fill = known.pop() if len(known) == 1 else 0.0
    new_groups = [{**g, "step": fill if g.get("step") is None else g["step"]} for g in groups]
    return {**state_dict, "optimizer": {**state_dict["optimizer"], "param_groups": new_groups}}


def _wrap(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(cls, name)
    if getattr(original, MARK, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, MARK, True)
    setattr(cls, name, wrapped)


def fix_adamw_fallback() -> None:
    """Install the step repair around megatron's optimizer (de)serialisation (idempotent, pinned)."""
    dist_module = require("megatron.core.optimizer", "distrib_optimizer", _WHY)
    require("megatron.core.optimizer.distrib_optimizer", "HAVE_APEX_OR_TE", _WHY)
    dist_cls = require("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", _WHY)
    fp32_cls = require("megatron.core.optimizer.optimizer", "FP32Optimizer", _WHY)
    fp16_cls = require("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", _WHY)
    for cls in (dist_cls, fp32_cls, fp16_cls):
        require(cls.__module__, f"{cls.__name__}.load_state_dict", _WHY)
    require(dist_cls.__module__, "DistributedOptimizer.state_dict", _WHY)
    require(dist_cls.__module__, "DistributedOptimizer._set_main_param_and_optimizer_states", _WHY)

    def applies(opt: Any) -> bool:
        return not dist_module.HAVE_APEX_OR_TE and is_torch_adam(getattr(opt, "optimizer", None))

    def make_state_dict(original: Callable) -> Callable:
        def state_dict(self: Any) -> dict:
            if not applies(self):
                return original(self)
            inner = self.optimizer
            repair_adam_steps(inner)
            if inner.state:
                return original(self)
            params = [p for g in inner.param_groups for p in g["params"]]
            for p in params:  # no step taken yet: report step 0 (temporary entries, removed below)
                inner.state[p] = {"step": torch.tensor(0.0)}
            try:
                return original(self)
            finally:
                for p in params:
                    inner.state.pop(p, None)

        return state_dict

    def make_dist_load(original: Callable) -> Callable:
        def load_state_dict(self: Any, state_dict: dict) -> None:
            if applies(self) and isinstance(state_dict, dict) and "optimizer" in state_dict:
                state_dict = _fill_missing_group_steps(state_dict)
            original(self, state_dict)
            if applies(self):
                repair_adam_steps(self.optimizer)

        return load_state_dict

    def make_load(original: Callable) -> Callable:
        def load_state_dict(self: Any, state_dict: dict) -> None:
            original(self, state_dict)
            repair_adam_steps(getattr(self, "optimizer", None))

        return load_state_dict

    def make_set_states(original: Callable) -> Callable:
        def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
            if applies(self) and "step" not in tensors:
                group_index, group_order = self.model_param_group_index_map[model_param]
                main_param = self.optimizer.param_groups[group_index]["params"][group_order]
                step = self.optimizer.state.get(main_param, {}).get("step")
                if step is not None:  # step comes from param_groups; keep the one load_state_dict set
                    tensors = {**tensors, "step": step}
            original(self, model_param, tensors)

        return _set_main_param_and_optimizer_states

    _wrap(dist_cls, "_set_main_param_and_optimizer_states", make_set_states)
    _wrap(dist_cls, "state_dict", make_state_dict)
    _wrap(dist_cls, "load_state_dict", make_dist_load)
    _wrap(fp32_cls, "load_state_dict", make_load)
    _wrap(fp16_cls, "load_state_dict", make_load)
