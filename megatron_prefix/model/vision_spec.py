"""megatron-core modules of a LLaVA model's vision side: ``CLIPViTModel`` and ``MultimodalProjector``.

- ``vision_transformer_config(vision, lm_config)``: the CLIP tower's ``TransformerConfig`` (LayerNorm
  with bias, QKV / linear biases, ``hidden_act`` MLP without gating, no dropout, all layers on this
  rank: ``pipeline_model_parallel_size=1``, ``context_parallel_size=1`` (the tower sees whole images),
  no sequence parallelism); TP, dtype and initialisation follow the language model's config.
- ``projector_transformer_config(vision, lm_config)``: the 2-layer MLP projector (``linear_fc1``
  vision hidden -> LM hidden, ``projector_hidden_act``, ``linear_fc2`` LM hidden -> LM hidden, biases).
- ``vision_layer_spec(impl)``: megatron's ``get_vit_layer_with_local_spec`` with the attention mask
  type set to ``no_mask`` (CLIP attends over all patches; megatron's local ViT spec says ``causal``),
  the project's ``TorchNorm`` as norms (as for the text spec), and the keys map of the GPT local spec
  (``input_layernorm.*`` saved as ``self_attention.linear_qkv.layer_norm_*``), so checkpoints are the
  same as with ``get_vit_layer_with_transformer_engine_spec`` (``impl="te"``, already ``no_mask``).
- ``build_vision_modules(...)``: ``(CLIPViTModel, MultimodalProjector)`` as megatron-core's
  ``LLaVAModel`` builds them (subtype ``clip``: class token, ``ln_pre``, learned position embeddings,
  no conv bias), plus ``vision_model.post_layernorm`` (HF's ``post_layernorm``: never used by LLaVA,
  kept so that every HF tensor round-trips).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prefix.model.norm import TorchNorm
from megatron_prefix.model.vision_config import VisionConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF ``gelu_pytorch_tanh``: ``F.gelu(x, approximate="tanh")``."""
    return F.gelu(x, approximate="tanh")


# HF ACT2FN names -> the same function (megatron's quick_gelu is x * sigmoid(1.702 x), as HF's)
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh, "relu": F.relu,
               "silu": F.silu}
# the local spec keeps the norms apart and saves them under the TE spec's fused names
LOCAL_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                  "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _common(lm: TransformerConfig) -> dict[str, Any]:
    """Fields the vision configs take from the language model's config (TP, dtype, init, no fusions)."""
    return {
        "tensor_model_parallel_size": lm.tensor_model_parallel_size,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "sequence_parallel": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "add_bias_linear": True,
        "gated_linear_unit": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "attention_softmax_in_fp32": True,
        "init_method_std": lm.init_method_std,
        "use_cpu_initialization": lm.use_cpu_initialization,
        "perform_initialization": lm.perform_initialization,
        "params_dtype": lm.params_dtype,
        "bf16": lm.bf16,
        "fp16": lm.fp16,
        "pipeline_dtype": lm.params_dtype,
    }


def vision_transformer_config(vision: VisionConfig, lm: TransformerConfig) -> TransformerConfig:
    """The CLIP tower's ``TransformerConfig`` (see the module docstring)."""
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,
        kv_channels=vision.hidden_size // vision.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layer_norm_eps,
        activation_func=ACTIVATIONS[vision.hidden_act],
        add_qkv_bias=True,
        **_common(lm),
    )


def projector_transformer_config(vision: VisionConfig, lm: TransformerConfig) -> TransformerConfig:
    """The projector MLP's ``TransformerConfig``: ``hidden_size`` = ``ffn_hidden_size`` = the LM's hidden."""
    return TransformerConfig(
        num_layers=1,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        activation_func=ACTIVATIONS[vision.projector_hidden_act],
        **_common(lm),
    )


def vision_layer_spec(impl: str) -> ModuleSpec:
    """The CLIP layer spec for a resolved ``impl`` (``local`` or ``te``)."""
    if impl == "te":
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        return get_vit_layer_with_transformer_engine_spec()
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    spec = copy.deepcopy(get_vit_layer_with_local_spec())
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params,
                                             "attn_mask_type": AttnMaskType.no_mask}
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    spec.submodules.sharded_state_dict_keys_map = dict(LOCAL_KEYS_MAP)
    return spec


def _pre_norm(impl: str) -> Any:
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def build_vision_modules(vision: VisionConfig, lm: TransformerConfig, impl: str,
                         vp_stage: int | None = None) -> tuple[CLIPViTModel, MultimodalProjector]:
    """``(vision_model, vision_projection)`` for a resolved ``impl`` (see the module docstring)."""
    vcfg = vision_transformer_config(vision, lm)
    vision_model = CLIPViTModel(
        vcfg,
        vision_layer_spec(impl),
        ln_pre_impl=_pre_norm(impl),
        add_class_token=True,
        class_token_len=1,
        patch_dim=vision.patch_size,
        img_h=vision.image_size,
        img_w=vision.image_size,
        model_subtype="clip",
        vp_stage=vp_stage,
    )
    vision_model.conv1.to(dtype=vcfg.params_dtype)  # megatron builds it in fp32 (Float16Module casts it there)
    vision_model.post_layernorm = torch.nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps,
                                                     dtype=vcfg.params_dtype)
    pcfg = projector_transformer_config(vision, lm)
    projection = MultimodalProjector(
        pcfg,
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        projector_type="mlp",
        input_size=vision.hidden_size,
    )
    return vision_model, projection
