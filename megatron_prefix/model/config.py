"""``ModelConfig``: the architecture of a llama / qwen2 / mistral style decoder, and its translations.

One dataclass, three ways in and one way out:

- ``ModelConfig.from_yaml(path)`` / ``from_dict`` — the tiny test configs in ``configs/models/``;
- ``ModelConfig.from_hf_config(path_or_dict)`` — a Hugging Face ``config.json`` (a file, a checkpoint
  folder, or the parsed dict). Reads both the transformers 4 keys (``rope_theta``, ``rope_scaling``)
  and the transformers 5 ``rope_parameters`` block; refuses what the megatron layer spec cannot
  reproduce exactly (sliding window, MLP / output-projection bias, non-SiLU MLP, rope types other
  than default / linear / llama3) with a message naming the key;
- ``to_transformer_config(tp, pp, cp, ...)`` — megatron-core's ``TransformerConfig`` (RMSNorm,
  SwiGLU, GQA, optional QKV bias, no other bias, no dropout, unfused RoPE).

A vision-language (LLaVA) model adds ``vision: VisionConfig`` (``model.vision_config``; an HF
``model_type: llava`` config.json is read there) and the ``freeze_vision`` / ``freeze_projector`` flags;
the fields above then describe its language model.

Field names are the YAML keys and the names in error messages (``model.num_attention_heads: ...``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_prefix.config import from_dict, load_yaml, require
from megatron_prefix.model.vision_config import VisionConfig, coerce_vision, llava_from_hf

FAMILIES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RopeScaling:
    """RoPE frequency scaling. ``type``: ``none`` | ``linear`` (positions / factor) | ``llama3``."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def validate(self, prefix: str = "model.rope_scaling") -> None:
        require(self.type in ROPE_TYPES, f"{prefix}.type", f"must be one of {ROPE_TYPES}, got {self.type!r}")
        if self.type != "none":
            require(self.factor > 0, f"{prefix}.factor", f"must be positive, got {self.factor}")
        if self.type == "llama3":
            require(
                self.high_freq_factor > self.low_freq_factor > 0,
                f"{prefix}.high_freq_factor",
                f"llama3 needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}",
            )
            require(
                self.original_max_position_embeddings > 0,
                f"{prefix}.original_max_position_embeddings",
                f"must be positive, got {self.original_max_position_embeddings}",
            )


@dataclass
class ModelConfig:
    """A RMSNorm + SwiGLU + RoPE decoder (llama, qwen2, mistral). Sizes are the full (unsharded) ones."""

    family: str = "llama"
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA: key/value heads; None = num_attention_heads
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    vocab_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    params_dtype: str = "float32"  # converters and tools; a training recipe uses train.dtype (refused here)
    vision: VisionConfig | None = None  # a LLaVA model's CLIP tower and projector; null = a text model
    freeze_vision: bool = True  # LLaVA: the vision tower gets no gradient
    freeze_projector: bool = False  # LLaVA: the projector gets no gradient

    def __post_init__(self) -> None:
        if self.rope_scaling is None:  # ``rope_scaling: null`` in YAML
            self.rope_scaling = RopeScaling()
        elif isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.vision = coerce_vision(self.vision)

    # ------------------------------------------------------------------ validation / sizes

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """Per-head dimension (megatron's ``kv_channels``)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, tp: int = 1) -> None:
        """Raise ``ValueError("model.<field>: ...")`` on an inconsistent config (for ``tp`` shards)."""
        p = "model."
        require(self.family in FAMILIES, p + "family", f"must be one of {FAMILIES}, got {self.family!r}")
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "vocab_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, p + name, f"must be a positive integer, got {value!r}")
        require(self.rope_theta > 0, p + "rope_theta", f"must be positive, got {self.rope_theta}")
        require(self.norm_epsilon > 0, p + "norm_epsilon", f"must be positive, got {self.norm_epsilon}")
        require(self.init_method_std > 0, p + "init_method_std", f"must be positive, got {self.init_method_std}")
        require(self.params_dtype in DTYPES, p + "params_dtype", f"must be one of {DTYPES}, got {self.params_dtype!r}")
        if self.head_dim is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                p + "num_attention_heads",
                f"must divide hidden_size={self.hidden_size} (or set model.head_dim), got {self.num_attention_heads}",
            )
        else:
            require(self.head_dim > 0, p + "head_dim", f"must be positive, got {self.head_dim}")
        require(self.kv_channels % 2 == 0, p + "head_dim", f"RoPE needs an even head dim, got {self.kv_channels}")
        groups = self.kv_heads
        require(
            groups > 0 and self.num_attention_heads % groups == 0,
            p + "num_query_groups",
            f"must divide num_attention_heads={self.num_attention_heads}, got {groups}",
        )
        require(
            groups % tp == 0,
            p + "num_query_groups",
            f"{groups} key/value heads cannot be split over tensor parallel size {tp}",
        )
        require(self.ffn_hidden_size % tp == 0, p + "ffn_hidden_size", f"must be divisible by tp={tp}")
        require(
            self.vocab_size % tp == 0,
            p + "vocab_size",
            f"{self.vocab_size} must be divisible by tp={tp} (pad the vocabulary in the checkpoint)",
        )
        self.rope_scaling.validate(p + "rope_scaling")
        if self.vision is not None:
            self.vision.validate(tp, p + "vision")
            require(self.hidden_size % tp == 0, p + "hidden_size",
                    f"{self.hidden_size} must be divisible by tp={tp} (the vision projector is split over it)")
            require(self.vision.image_token_id < self.vocab_size, p + "vision.image_token_id",
                    f"{self.vision.image_token_id} is outside the vocabulary (vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_dict(cls, data: dict | None) -> ModelConfig:
        """Nested dict (YAML layout) -> validated config; unknown keys raise."""
        cfg = from_dict(cls, data, "model")
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """A YAML file holding the fields at top level or under a ``model:`` key."""
        data = load_yaml(path)
        if set(data) == {"model"}:
            data = data["model"]
        return cls.from_dict(data)

    @classmethod
    def from_hf_config(cls, source: str | Path | dict) -> ModelConfig:
        """A Hugging Face ``config.json`` (path to the file or its folder, or the parsed dict)."""
        if isinstance(source, dict):
            hf, where = dict(source), "config.json"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"model: no Hugging Face config at {path}")
            hf, where = json.loads(path.read_text()), str(path)
        return _from_hf(hf, where)

    @classmethod
    def load(cls, source: str | Path | dict) -> ModelConfig:
        """A YAML config file, a Hugging Face ``config.json`` / checkpoint folder, or a dict of either."""
        if isinstance(source, dict):
            return cls.from_hf_config(source) if "model_type" in source else cls.from_dict(source)
        path = Path(source)
        if path.is_dir() or path.suffix == ".json":
            return cls.from_hf_config(path)
        return cls.from_yaml(path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ megatron

    def to_transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        dtype: str | None = None,
        sequence_parallel: bool = False,
        use_cpu_initialization: bool | None = None,
        **overrides: Any,
    ):
        """megatron-core ``TransformerConfig`` for this architecture and parallel layout.

        ``dtype`` (default ``params_dtype``) sets ``params_dtype`` and the bf16/fp16 flags.
        ``use_cpu_initialization`` defaults to "no CUDA available". ``overrides`` are passed to
        ``TransformerConfig`` last (e.g. ``recompute_granularity``).
        """
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tp)
        dtype = dtype or self.params_dtype
        require(dtype in DTYPES, "model.params_dtype", f"must be one of {DTYPES}, got {dtype!r}")
        torch_dtype = getattr(torch, dtype)
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        kwargs: dict[str, Any] = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.kv_heads,
            "kv_channels": self.kv_channels,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "context_parallel_size": cp,
            "sequence_parallel": sequence_parallel and tp > 1,
            "normalization": "RMSNorm",
            "layernorm_epsilon": self.norm_epsilon,
            "gated_linear_unit": True,
            "activation_func": F.silu,
            "add_bias_linear": False,
            "add_qkv_bias": self.qkv_bias,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "init_method_std": self.init_method_std,
            "apply_rope_fusion": False,
            "rotary_interleaved": False,
            "bias_activation_fusion": False,
            "bias_dropout_fusion": False,
            "masked_softmax_fusion": False,
            "persist_layer_norm": False,
            "gradient_accumulation_fusion": False,
            "attention_softmax_in_fp32": True,
            "use_cpu_initialization": use_cpu_initialization,
            "perform_initialization": True,
            "params_dtype": torch_dtype,
            "bf16": dtype == "bfloat16",
            "fp16": dtype == "float16",
            "pipeline_dtype": torch_dtype,
        }
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


# ---------------------------------------------------------------------- Hugging Face translation

_HF_DEFAULTS = {  # the transformers defaults of keys a config.json may omit, per family
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mistral": {"max_position_embeddings": 4096 * 32, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
}


def _hf_rope(hf: dict, where: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from either ``rope_parameters`` (transformers 5) or the v4 keys."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), RopeScaling()
    if rope_type == "linear":
        return float(theta), RopeScaling(type="linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(
        f"{where}: rope type {rope_type!r} is not supported (supported: default, linear, llama3); "
        "its position encoding would not match the checkpoint"
    )


def _from_hf(hf: dict, where: str) -> ModelConfig:
    family = hf.get("model_type")
    if family == "llava":
        return llava_from_hf(hf, where)
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)}, and llava over them)")
    defaults = _HF_DEFAULTS[family]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported; the layer spec is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (the layer spec has no MLP bias)")
    if family == "llama" and hf.get("attention_bias"):
        raise ValueError(
            f"{where}: attention_bias=true is not supported for llama (it also biases o_proj; only QKV bias is)"
        )
    max_pos = int(hf.get("max_position_embeddings", defaults["max_position_embeddings"]))
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", family == "mistral")
    if uses_window and window is not None and int(window) < max_pos:
        raise ValueError(
            f"{where}: sliding_window={window} (< max_position_embeddings={max_pos}) is not supported; "
            "shared-prefix attention is full causal attention"
        )
    other_layers = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
    if other_layers:
        raise ValueError(f"{where}: layer_types {other_layers} are not supported; only full_attention layers")
    theta, scaling = _hf_rope(hf, where)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == hidden // heads:
        head_dim = None
    dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    cfg = ModelConfig(
        family=family,
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=dtype if dtype in DTYPES else "float32",
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return cfg
