"""Build what a training run holds: the model stage, megatron DDP, optimizer, LR schedule, state dicts.

Everything goes through megatron-core's own objects (``DistributedDataParallel``,
``get_megatron_optimizer``, ``OptimizerParamScheduler``, ``finalize_model_grads``, ``dist_checkpointing``
sharded state dicts) so that the GPU path is stock; on CPU the compat layer applied by
``megatron_prefix.parallel.init_parallel`` makes the same code run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.utils import unwrap_model

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.llava import held_fixed_parameters
from megatron_prefix.model.spec import build_model
from megatron_prefix.training.checkpoint import EXTRA_STATE
from megatron_prefix.training.config import TrainConfig
from megatron_prefix.training.reward import attach_reward_head

# megatron-core 0.16 rejects the default `fully_sharded_model_space` format with the distributed
# optimizer; `fully_reshardable` loads at any DP/TP/PP.
DISTRIB_OPTIM_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,  # the other gather calls Tensor.cuda()
}


@dataclass
class Trainable:
    """The model chunk (wrapped in DDP), its optimizer and LR scheduler, and the transformer config."""

    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: object
    model_cfg: ModelConfig

    @property
    def core(self) -> torch.nn.Module:
        """The unwrapped ``SharedPrefixGPTModel`` of this stage."""
        return unwrap_model(self.model)


def transformer_config(cfg: TrainConfig, model_cfg: ModelConfig, cuda: bool):
    """megatron ``TransformerConfig`` for the run (per-pair loss normalisation, recomputation)."""
    p = cfg.parallel
    extra = {}
    if cfg.train.recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif cfg.train.recompute == "selective":
        extra.update(recompute_granularity="selective")
    return model_cfg.to_transformer_config(
        tp=p.tp,
        pp=p.pp,
        cp=p.cp,
        dtype=cfg.resolved_dtype(cuda),
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=True,
        **extra,
    )


def build_stage(cfg: TrainConfig, model_cfg: ModelConfig, cuda: bool, seed_fn) -> tuple[torch.nn.Module, object]:
    """This rank's model stage (plus the reward head for ``task: rm``), on its device."""
    if cfg.task == "rm":
        model_cfg = replace(model_cfg, tie_word_embeddings=False)
    tc = transformer_config(cfg, model_cfg, cuda)
    seed_fn()  # identical initial weights for the policy and an online reference
    model = build_model(model_cfg, cfg.attention, transformer_config=tc)
    apply_freeze(model, model_cfg)
    if cfg.task == "rm":
        attach_reward_head(model, tc)
    if cuda:
        model.cuda(torch.cuda.current_device())
    # No Float16Module: parameters are already built in params_dtype (bf16 on GPU), and that wrapper
    # would upcast the last stage's output to fp32, i.e. a full fp32 copy of the vocabulary logits,
    # which megatron_prefix.model.logprobs is written to avoid.
    return model, tc


def apply_freeze(model: torch.nn.Module, model_cfg: ModelConfig) -> None:
    """``model.freeze_vision`` (default true) / ``model.freeze_projector``: the vision tower / projector of
    a vision-language model keep ``requires_grad=False`` (``model.llava.freeze_vision_parts``, the one
    rule; the tower's unused layers stay frozen either way), so megatron's DDP gives them no gradient
    buffer and the optimizer no state: they stay bitwise equal to the loaded weights. ``build_model``
    applies the same flags; this makes the trainer's choice explicit. Text models: no-op. Called before
    DDP wraps the model (DDP collects the trainable parameters at construction)."""
    if getattr(model_cfg, "vision", None) is None:
        return
    from megatron_prefix.model.llava import freeze_vision_parts

    freeze_vision_parts(model, model_cfg.freeze_vision, model_cfg.freeze_projector)


def optimizer_overrides(model: torch.nn.Module, config: MegatronOptimizerConfig) -> dict | None:
    """megatron's standard parameter groups, plus one with learning rate and weight decay 0 for the
    trainable parameters that must not change (``model.llava.held_fixed_parameters``: the tower layers
    after the feature layer, kept in the optimizer because megatron checkpoints a block's layers as one
    stacked tensor). None (megatron's default groups, unchanged) when there are none."""
    fixed = {id(p) for p in held_fixed_parameters(model)}
    if not fixed:
        return None
    overrides = get_standard_config_overrides(config)
    held = ParamKey(predicate=ParamPredicate(name="megatron_prefix_held_fixed", fn=lambda p: id(p) in fixed))
    overrides[held] = ParamGroupOverride(max_lr=0.0, min_lr=0.0, wd_mult=0.0)
    return overrides


def build_trainable(cfg: TrainConfig, model_cfg: ModelConfig, cuda: bool, seed_fn) -> Trainable:
    """Policy stage + DDP + megatron optimizer + LR schedule, wired like megatron's own trainer."""
    model, tc = build_stage(cfg, model_cfg, cuda, seed_fn)
    ddp = DistributedDataParallel(
        config=tc,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        module=model,
    )
    o = cfg.optimizer
    moc = MegatronOptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=tc.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(moc, [ddp], config_overrides=optimizer_overrides(model, moc))
    s = cfg.schedule
    steps = cfg.train.max_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if s.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if s.decay_style != "constant" else o.lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=max(steps, s.warmup_steps + 1),
        lr_decay_style=s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    return Trainable(ddp, optimizer, scheduler, tc, model_cfg)


HEAD_PREFIX = "output_layer."


def sharded_state(t: Trainable, with_optimizer: bool, is_loading: bool, without_head: bool = False) -> dict:
    """The dist_checkpointing structure of the model (and optimizer) of this rank.

    ``without_head`` leaves the output layer out (a reward model starting from a language model's
    checkpoint keeps its freshly initialised scalar head).
    """
    model_sd = t.core.sharded_state_dict()
    if without_head:
        model_sd = {k: v for k, v in model_sd.items() if not k.startswith(HEAD_PREFIX)}
    state = {"model": model_sd}
    if with_optimizer:
        metadata = DISTRIB_OPTIM_METADATA if _is_distrib(t) else None
        state["optimizer"] = t.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return state


def _is_distrib(t: Trainable) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(t.optimizer, "chained_optimizers", [t.optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in opts)


def check_loaded_keys(missing: list[str], unexpected: list[str], without_head: bool = False) -> None:
    """Refuse a ``load_state_dict(strict=False)`` result with gaps other than the tolerated ones.

    Tolerated: ``*._extra_state`` (Transformer Engine metadata absent from a local-spec checkpoint, see
    ``checkpoint.load_sharded``) and, with ``without_head``, the output layer.
    """
    missing = [k for k in missing if not k.endswith(EXTRA_STATE) and not (without_head and k.startswith(HEAD_PREFIX))]
    if missing or unexpected:
        raise ValueError(f"checkpoint.load: the checkpoint does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")


def load_state(t: Trainable, state: dict, without_head: bool = False) -> None:
    """Put a loaded dist_checkpointing state into the model (and optimizer when present)."""
    check_loaded_keys(*t.core.load_state_dict(state["model"], strict=False), without_head=without_head)
    if "optimizer" in state:
        t.optimizer.load_state_dict(state["optimizer"])
