"""``VisionConfig``: the CLIP vision tower and MLP projector of a LLaVA model, and its HF translation.

A LLaVA model is ``ModelConfig`` (the language model, unchanged) plus ``ModelConfig.vision`` (this
dataclass). ``llava_from_hf(hf, where)`` reads a Hugging Face ``LlavaForConditionalGeneration``
``config.json`` (``model_type: llava``, a llama / qwen2 / mistral ``text_config``, a
``clip_vision_model`` ``vision_config``) and refuses, naming the key, what the megatron modules cannot
reproduce exactly: other vision towers (SigLIP, ...), a list of feature layers, a projector without
bias, activations we do not map, non-RGB input, an ``image_seq_length`` that disagrees with the tower.

Field names are the YAML keys and the names in error messages (``model.vision.patch_size: ...``).
Pure Python: no torch, no megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_prefix.config import require

# HF activation names -> the function megatron applies (``model.vision_spec.ACTIVATIONS``); each one
# computes exactly what transformers' ACT2FN entry computes.
VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
PROJECTOR_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "relu", "silu")
SELECT_STRATEGIES = ("default", "full")
HF_VISION_TYPES = ("clip_vision_model",)

# transformers' CLIPVisionConfig defaults, for keys a vision_config may omit
_CLIP_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
}

# transformers' Llama/Qwen2/MistralConfig defaults: a LLaVA config.json (e.g. llava-hf/llava-1.5-7b-hf)
# often writes only the text_config keys that differ from them
_TEXT_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 32768},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
}


@dataclass
class VisionConfig:
    """The CLIP vision tower and projector of a LLaVA model (``model.vision``; null = a text model).

    - ``feature_layer``: HF's ``vision_feature_layer``: the tower's hidden state fed to the projector
      (``hidden_states[feature_layer]``: 0 = the embeddings after ``ln_pre``, ``i`` = after layer ``i``,
      -1 = the last layer, -2 = the one before, LLaVA-1.5's choice). Only the layers up to it run.
    - ``select_strategy``: ``default`` drops the CLS token, ``full`` keeps it.
    """

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_layers: int = 24
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # the CLIP MLP activation (quick_gelu, gelu, gelu_pytorch_tanh)
    feature_layer: int = -2
    select_strategy: str = "default"
    projector_hidden_act: str = "gelu"  # between the projector's two linear layers
    image_token_id: int = 32000  # HF image_token_index: the placeholder id the image features replace

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Image tokens in the text per image: the patches, plus the CLS token with ``full``."""
        return self.num_patches + (1 if self.select_strategy == "full" else 0)

    @property
    def layers_run(self) -> int:
        """How many tower layers the features need (HF ``hidden_states[feature_layer]``)."""
        f = self.feature_layer
        return f if f >= 0 else self.num_layers + 1 + f

    # ------------------------------------------------------------------ validation

    def validate(self, tp: int = 1, prefix: str = "model.vision") -> None:
        """Raise ``ValueError("model.vision.<field>: ...")`` on an inconsistent config (for ``tp`` shards)."""
        p = prefix + "."
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_layers"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, p + name, f"must be a positive integer, got {value!r}")
        require(self.image_size % self.patch_size == 0, p + "patch_size",
                f"must divide image_size={self.image_size}, got {self.patch_size}")
        require(self.hidden_size % self.num_attention_heads == 0, p + "num_attention_heads",
                f"must divide hidden_size={self.hidden_size}, got {self.num_attention_heads}")
        require(self.num_attention_heads % tp == 0, p + "num_attention_heads",
                f"{self.num_attention_heads} heads cannot be split over tensor parallel size {tp}")
        require(self.intermediate_size % tp == 0, p + "intermediate_size",
                f"{self.intermediate_size} must be divisible by tp={tp}")
        require(self.layer_norm_eps > 0, p + "layer_norm_eps", f"must be positive, got {self.layer_norm_eps}")
        require(self.hidden_act in VISION_ACTS, p + "hidden_act",
                f"must be one of {VISION_ACTS}, got {self.hidden_act!r}")
        require(self.projector_hidden_act in PROJECTOR_ACTS, p + "projector_hidden_act",
                f"must be one of {PROJECTOR_ACTS}, got {self.projector_hidden_act!r}")
        require(self.select_strategy in SELECT_STRATEGIES, p + "select_strategy",
                f"must be one of {SELECT_STRATEGIES}, got {self.select_strategy!r}")
        require(-(self.num_layers + 1) <= self.feature_layer <= self.num_layers, p + "feature_layer",
                f"must be in [{-(self.num_layers + 1)}, {self.num_layers}] for {self.num_layers} layers, "
                f"got {self.feature_layer}")
        require(isinstance(self.image_token_id, int) and self.image_token_id >= 0, p + "image_token_id",
                f"must be a non-negative token id, got {self.image_token_id!r}")


def coerce_vision(value: Any) -> VisionConfig | None:
    """``ModelConfig.vision`` from None, a ``VisionConfig`` or its dict (``asdict`` / train_state.json)."""
    if value is None or isinstance(value, VisionConfig):
        return value
    if isinstance(value, dict):
        from megatron_prefix.config import from_dict

        return from_dict(VisionConfig, value, "model.vision")
    raise ValueError(f"model.vision: expected a mapping of VisionConfig fields or null, got {value!r}")


# ---------------------------------------------------------------------- Hugging Face translation


def vision_from_hf(hf: dict, where: str) -> VisionConfig:
    """The ``VisionConfig`` of a HF LLaVA ``config.json`` (refuses what we cannot run exactly)."""
    vc = hf.get("vision_config")
    if not isinstance(vc, dict):
        raise ValueError(f"{where}: vision_config is missing; a LLaVA config.json needs the CLIP tower's config")
    vtype = vc.get("model_type", "clip_vision_model")
    if vtype not in HF_VISION_TYPES:
        raise ValueError(f"{where}: vision_config.model_type={vtype!r} is not supported; only a CLIP vision "
                         f"tower ({', '.join(HF_VISION_TYPES)}) maps onto megatron's CLIPViTModel")

    def get(key: str) -> Any:
        return vc.get(key, _CLIP_DEFAULTS[key])

    if int(get("num_channels")) != 3:
        raise ValueError(f"{where}: vision_config.num_channels={get('num_channels')} is not supported "
                         "(megatron's CLIPViTModel takes RGB images)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{where}: vision_feature_layer={layer!r} is not supported; only a single layer "
                         "(an int) is (a list concatenates several layers' features)")
    if hf.get("multimodal_projector_bias", True) is not True:
        raise ValueError(f"{where}: multimodal_projector_bias=false is not supported; the projector has biases")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"{where}: vision_feature_select_strategy={strategy!r} is not supported "
                         f"(supported: {', '.join(SELECT_STRATEGIES)})")
    act, proj_act = get("hidden_act"), hf.get("projector_hidden_act", "gelu")
    if act not in VISION_ACTS:
        raise ValueError(f"{where}: vision_config.hidden_act={act!r} is not supported (supported: "
                         f"{', '.join(VISION_ACTS)})")
    if proj_act not in PROJECTOR_ACTS:
        raise ValueError(f"{where}: projector_hidden_act={proj_act!r} is not supported (supported: "
                         f"{', '.join(PROJECTOR_ACTS)})")
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    vision = VisionConfig(
        image_size=int(get("image_size")),
        patch_size=int(get("patch_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_attention_heads=int(get("num_attention_heads")),
        num_layers=int(get("num_hidden_layers")),
        layer_norm_eps=float(get("layer_norm_eps")),
        hidden_act=act,
        feature_layer=layer,
        select_strategy=strategy,
        projector_hidden_act=proj_act,
        image_token_id=int(image_token),
    )
    try:
        vision.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    seq = hf.get("image_seq_length")
    if seq is not None and int(seq) != vision.tokens_per_image:
        raise ValueError(
            f"{where}: image_seq_length={seq} disagrees with the vision tower: image_size "
            f"{vision.image_size} / patch_size {vision.patch_size} with strategy {strategy!r} gives "
            f"{vision.tokens_per_image} image tokens per image"
        )
    return vision


def llava_from_hf(hf: dict, where: str):
    """``ModelConfig`` (language model from ``text_config``, ``vision`` from the rest) of a LLaVA config."""
    from megatron_prefix.model.config import FAMILIES, _from_hf

    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{where}: text_config is missing; a LLaVA config.json needs the language model's config")
    family = text.get("model_type", "llama")
    if family not in FAMILIES:
        raise ValueError(f"{where}: text_config.model_type={family!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    text = {**_TEXT_DEFAULTS[family], **text, "model_type": family}
    if hf.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    top_dtype = hf.get("dtype") or hf.get("torch_dtype")
    if top_dtype:  # the checkpoint's dtype is the LLaVA's (a text_config may carry a stale or default one)
        text.update(dtype=top_dtype, torch_dtype=top_dtype)
    cfg = _from_hf(text, f"{where} (text_config)")
    cfg.vision = vision_from_hf(hf, where)
    if cfg.vision.image_token_id >= cfg.vocab_size:
        raise ValueError(f"{where}: image_token_index={cfg.vision.image_token_id} is outside the vocabulary "
                         f"(text_config.vocab_size={cfg.vocab_size})")
    cfg.validate()
    return cfg
