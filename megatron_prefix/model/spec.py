"""Layer specs and model builders.

``layer_spec(attention, impl)`` is megatron's own GPT layer spec with
``submodules.self_attention.submodules.core_attention`` replaced by ``SharedPrefixCoreAttention``
(``ModuleSpec`` with the backend in ``params={"attention_config": ...}``, so the backend is fixed per
model, not read from globals):

- ``impl="local"``: ``get_gpt_layer_local_spec(normalization="RMSNorm")`` (megatron-core modules only;
  CPU and GPU; state-dict keys ``input_layernorm.*`` / ``pre_mlp_layernorm.*``);
- ``impl="te"``: ``get_gpt_layer_with_transformer_engine_spec()`` (needs CUDA and Transformer Engine;
  the norms are fused into ``linear_qkv`` / ``linear_fc1``, keys ``*.layer_norm_weight``);
- ``impl="auto"``: ``te`` when CUDA and Transformer Engine are available, else ``local``.

``build_model`` builds a ``SharedPrefixGPTModel`` for the current parallel state (megatron's
``parallel_state`` must be initialised, e.g. by ``megatron_prefix.parallel.init_parallel``), or a
``SharedPrefixLLaVAModel`` (``model.llava``) when ``model_cfg.vision`` is set (its vision layer spec:
``model.vision_spec``, megatron's ViT spec for the same ``impl``).
``build_reference_model`` builds megatron's *stock* ``GPTModel`` (stock causal core attention, stock
``RotaryEmbedding`` over ``0..s-1``) with the same parameter names: loading a shared model's
``state_dict`` into it gives the ordinary unshared computation, used by tests and
``tools/verify_sharing.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_prefix.attention.core_attention import AttentionConfig, SharedPrefixCoreAttention
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.gpt import SharedPrefixGPTModel
from megatron_prefix.model.norm import TorchNorm
from megatron_prefix.model.rope import PositionRotary

IMPLS = ("auto", "local", "te")


def te_available() -> bool:
    """Transformer Engine importable and CUDA present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``te`` or ``local``; validates the name and TE availability."""
    if impl not in IMPLS:
        raise ValueError(f"model.transformer_impl: must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "te" if te_available() else "local"
    if impl == "te" and not te_available():
        raise ValueError("model.transformer_impl=te: needs CUDA and transformer_engine; use local")
    return impl


def stock_layer_spec(impl: str = "auto") -> ModuleSpec:
    """megatron's unmodified GPT layer spec (RMSNorm, SwiGLU via the config) for ``impl``."""
    impl = resolve_impl(impl)
    if impl == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def layer_spec(attention: AttentionConfig | str | dict | None = "dense", impl: str = "auto") -> ModuleSpec:
    """The stock layer spec with ``SharedPrefixCoreAttention`` (backend ``attention``) as core attention.

    With the local spec, megatron's torch norms are replaced by ``TorchNorm`` (same modules and keys,
    but allows sequence parallelism; see ``megatron_prefix.model.norm``).
    """
    attn_cfg = AttentionConfig.coerce(attention)
    spec = copy.deepcopy(stock_layer_spec(impl))
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SharedPrefixCoreAttention, params={"attention_config": attn_cfg}
    )
    if resolve_impl(impl) == "local":
        _use_torch_norm(spec)
    return spec


def _use_torch_norm(spec: ModuleSpec) -> None:
    """Sequence parallelism, local spec: every ``WrappedTorchNorm`` of the layer spec -> ``TorchNorm``."""
    layer, attn = spec.submodules, spec.submodules.self_attention.submodules
    for owner, name in ((layer, "input_layernorm"), (layer, "pre_mlp_layernorm"),
                        (attn, "q_layernorm"), (attn, "k_layernorm")):
        if getattr(owner, name, None) is WrappedTorchNorm:
            setattr(owner, name, TorchNorm)


def block_spec(config: Any, layer: ModuleSpec, impl: str, vp_stage: int | None = None) -> ModuleSpec:
    """Local spec: the decoder block with ``TorchNorm`` as final norm (sequence parallelism).

    megatron builds the final norm of a block given a *layer* spec from a module global (``WrappedTorchNorm``
    without TE/apex, which refuses sequence parallelism); a ``TransformerBlockSubmodules`` names it.
    Other impls keep the layer spec (TE's norms handle sequence parallelism).
    """
    if resolve_impl(impl) != "local":
        return layer
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=TorchNorm
        ),
    )


def _stage_flags(pre_process: bool | None, post_process: bool | None, vp_stage: int | None) -> tuple[bool, bool]:
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    return pre_process, post_process


def transformer_config_for(model_cfg: ModelConfig, dtype: str | None = None, sequence_parallel: bool = False,
                           **overrides: Any):
    """``model_cfg.to_transformer_config`` with tp/pp/cp read from megatron's parallel state."""
    return model_cfg.to_transformer_config(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        dtype=dtype,
        sequence_parallel=sequence_parallel,
        **overrides,
    )


def build_model(
    model_cfg: ModelConfig,
    attention_backend: AttentionConfig | str | dict | None = "dense",
    *,
    transformer_config: Any = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    impl: str = "auto",
    dtype: str | None = None,
    sequence_parallel: bool = False,
    vp_stage: int | None = None,
    **config_overrides: Any,
) -> SharedPrefixGPTModel:
    """A ``SharedPrefixGPTModel`` for this rank's pipeline stage (stage flags default from parallel state).

    ``transformer_config`` (a ``TransformerConfig``) replaces the one derived from ``model_cfg`` (then
    ``dtype``, ``sequence_parallel`` and ``config_overrides`` are ignored). Parameters are on CPU when
    ``use_cpu_initialization`` (no CUDA), else on the current CUDA device.
    """
    config = transformer_config or transformer_config_for(model_cfg, dtype, sequence_parallel, **config_overrides)
    impl = resolve_impl(impl)
    pre_process, post_process = _stage_flags(pre_process, post_process, vp_stage)
    rotary = PositionRotary(config.kv_channels, model_cfg.rope_theta, model_cfg.rope_scaling)
    cls, extra = SharedPrefixGPTModel, {}
    if model_cfg.vision is not None:
        from megatron_prefix.model.llava import SharedPrefixLLaVAModel

        cls, extra = SharedPrefixLLaVAModel, {"vision": model_cfg.vision, "impl": impl,
                                              "freeze_vision": model_cfg.freeze_vision,
                                              "freeze_projector": model_cfg.freeze_projector}
    return cls(
        config=config,
        transformer_layer_spec=block_spec(config, layer_spec(attention_backend, impl), impl, vp_stage),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        rotary=rotary,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        vp_stage=vp_stage,
        **extra,
    )


def build_reference_model(
    model_cfg: ModelConfig,
    *,
    transformer_config: Any = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    impl: str = "local",
    dtype: str | None = None,
    vp_stage: int | None = None,
):
    """megatron's stock ``GPTModel`` (causal core attention, stock RoPE) with our parameter names.

    Meant for ``[prompt + response]`` run alone with positions ``0..L-1``. Needs the CPU compat layer on
    CPU (``init_parallel`` applies it). The llama3 scaling of megatron's ``RotaryEmbedding`` is fixed at
    ``low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192``; other values are
    refused here (our ``PositionRotary`` supports them).
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config or transformer_config_for(model_cfg, dtype)
    pre_process, post_process = _stage_flags(pre_process, post_process, vp_stage)
    scaling = model_cfg.rope_scaling
    kwargs: dict[str, Any] = {}
    if scaling.type == "linear":
        kwargs["seq_len_interpolation_factor"] = scaling.factor
    elif scaling.type == "llama3":
        if (scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings) != (
            1.0, 4.0, 8192
        ):
            raise ValueError("model.rope_scaling: megatron's stock llama3 RoPE only has factors 1/4/8192")
        kwargs.update(rope_scaling=True, rope_scaling_factor=scaling.factor)
    return GPTModel(
        config=config,
        transformer_layer_spec=stock_layer_spec(impl),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model_cfg.rope_theta,
        vp_stage=vp_stage,
        **kwargs,
    )
