"""The launchers' entry point: parse and check the recipe before megatron is imported.

``launch/train_dpo.py`` and ``launch/train_rm.py`` call ``main``. A config error (wrong type, broken rule,
a layout that cannot fit) is reported from here, by rank 0 only, without importing megatron-core (several
seconds); only a valid config goes on to ``training.runner``. Imports torch (the CUDA check) but not
megatron: ``tests/test_config_typing.py`` checks it (2.4 s to a config error instead of 5.3 s).
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron_prefix.config import (
    ConfigError,
    apply_overrides,
    collect_errors,
    dump_yaml,
    from_dict,
    load_yaml,
)
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.planning.search import check_fit
from megatron_prefix.training.config import TrainConfig
from megatron_prefix.training.exit_codes import EXIT_OK, EXIT_USER_ERROR
from megatron_prefix.training.failure import fail, user_message
from megatron_prefix.training.resume import TRAINING_FIELDS


def main(argv: list[str], task: str) -> int:
    """Parse the recipe (errors: printed once, exit 2; ``--print-config``: print, exit 0), then train."""
    try:
        cfg = parse_config(argv, task)
    except _PrintedConfig:
        return EXIT_OK
    except ValueError as err:
        return fail(user_message(task, err), EXIT_USER_ERROR, user_error=True)
    from megatron_prefix.training.runner import run_config  # megatron is imported from here on

    return run_config(cfg, task)


def parse_config(argv: list[str], task: str) -> TrainConfig:
    """``--config FILE`` plus ``a.b=c`` overrides -> a validated ``TrainConfig`` for this world and device.

    Raises ``ConfigError`` listing every error of the recipe (wrong types and broken rules) at once."""
    ap = argparse.ArgumentParser(prog=f"train_{task}", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 parallel.tp=2")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved, validated config as YAML and exit (nothing is built)")
    args = ap.parse_args(argv)
    data = load_yaml(args.config)
    apply_overrides(data, args.overrides)
    if data.setdefault("task", task) != task:
        raise ValueError(f"task: the recipe says {data['task']!r} but this launcher trains {task!r}")
    hf = (data.get("model") or {}).pop("hf_config", None)
    explicit = set(data.get("model") or {})
    errors: list[str] = []
    cfg = from_dict(TrainConfig, data, errors=errors)  # wrong types are reported, the field keeps its default
    if "params_dtype" in explicit:  # one dtype per run: train.dtype (model.params_dtype is the converters')
        errors.append(f"model.params_dtype: a training recipe sets the dtype with train.dtype (auto: bfloat16 on "
                      f"GPU, float32 on CPU); remove model.params_dtype and set train.dtype="
                      f"{data['model']['params_dtype']} instead")
    if hf:  # the architecture from the HF config; what trains (model.freeze_*) still from the recipe
        recipe_model, cfg.model = cfg.model, ModelConfig.from_hf_config(hf)
        for name in TRAINING_FIELDS:
            if name in explicit and hasattr(cfg.model, name):
                setattr(cfg.model, name, getattr(recipe_model, name))
    cfg.model_source = hf  # not a dataclass field: where the architecture came from (None: the recipe)
    cfg.model_keys = None if hf else explicit  # not a field: the model keys the recipe set (None: all)
    if not errors:  # the planner refuses a layout that cannot fit (GPU memory, else cluster.gpu_mem_gb)
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
        check_fit(cfg, cfg.model, int(os.environ.get("WORLD_SIZE", "1")), gpu_gib)
    try:  # every error of the recipe at once: types first, then the rules
        with collect_errors():
            cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")), cuda=torch.cuda.is_available())
    except ConfigError as err:
        errors += [m for m in err.messages if m.split(":", 1)[0] not in {e.split(":", 1)[0] for e in errors}]
    if not args.print_config:  # a logger asked for without its package: the install command, before any build
        errors += cfg.logging.missing_packages()
    if errors:
        raise ConfigError(errors)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        raise _PrintedConfig
    return cfg


class _PrintedConfig(Exception):
    """``--print-config`` printed the config: exit 0 without building anything."""
