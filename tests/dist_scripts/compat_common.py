"""Shared helpers of the compat_* scripts: a tiny stock megatron GPTModel and a training step on CPU/gloo.

Not a test by itself (imported by the scripts). The model is identical for every TP/PP layout because
``use_cpu_initialization=True`` initialises each full weight on CPU from the same seed, then slices it.
"""

from __future__ import annotations

import argparse

import torch

from megatron_prefix.parallel import ParallelInfo, init_parallel

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, MBS = 128, 64, 2, 4, 16, 2


def parse_args(extra: dict | None = None) -> argparse.Namespace:
    """--tp/--pp/--seed plus script-specific ``extra`` {flag: default}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    for flag, default in (extra or {}).items():
        parser.add_argument(f"--{flag}", type=type(default) if default is not None else str, default=default)
    return parser.parse_args()


def transformer_config(tp: int, pp: int, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, perform_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, pipeline_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(info: ParallelInfo, seed: int = 1234, **config_overrides):
    """A tiny GPTModel (local spec, RoPE) for this rank's pipeline stage, initialised from ``seed``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    config = transformer_config(info.tp_size, info.pp_size, **config_overrides)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=info.is_first_pp_stage, post_process=info.is_last_pp_stage,
        position_embedding_type="rope",
    )


def batch(step: int, n: int = MBS) -> dict:
    """A deterministic batch, identical on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(n, SEQ).contiguous(),
        "attention_mask": torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).logical_not()[None, None],
    }


def forward_step_fn():
    """The ``forward_step_func`` of megatron's schedules: mean token loss of one micro-batch."""

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    return forward_step


def wrap_ddp(model, use_distributed_optimizer: bool = False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer
    )
    from megatron.core.distributed import finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads  # DP all-reduce (and PP embedding sync)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def make_optimizer(ddp_model, use_distributed_optimizer: bool = False, lr: float = 1e-3, clip_grad: float = 1.0):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=clip_grad, bf16=False, fp16=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [ddp_model])


def train_step(ddp_model, optimizer, info: ParallelInfo, step: int, num_microbatches: int = 1) -> float | None:
    """One step through ``get_forward_backward_func``; the loss (last pp stage) or None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    data = iter([batch(step * num_microbatches + i) for i in range(num_microbatches)])
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_fn(), data_iterator=data, model=[ddp_model],
        num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step failed"
    if not info.is_last_pp_stage:
        return None
    return float(sum(float(d["loss"]) for d in losses) / len(losses))


def setup(tp: int, pp: int, seed: int) -> ParallelInfo:
    """``init_parallel`` with the model-parallel layout of a script."""
    return init_parallel(tp=tp, pp=pp, seed=seed)


def reinit_by_global_name(model, info: ParallelInfo) -> None:
    """Re-draw every matrix from a generator seeded by its *global* name (layout-independent init for PP).

    Only for TP=1: a pipeline stage numbers its layers from 0, so ``decoder.layers.{i}`` is renamed with
    the stage's layer offset. 1-D params (norm weights, biases) keep their constant init.
    """
    import re
    import zlib

    assert info.tp_size == 1, "reinit_by_global_name is for TP=1 layouts"
    offset = info.pp_rank * (LAYERS // info.pp_size)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        global_name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", name)
        g = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
