"""The name table between our LLaVA model and Hugging Face ``LlavaForConditionalGeneration`` checkpoints.

Hugging Face key layouts (all read; ``normalize_hf_name`` maps each to the first one)::

    transformers 5 (what the installed version writes)   Hub / transformers 4.x
    language_model.model.<text>                           model.language_model.<text>
    language_model.lm_head.weight                         lm_head.weight
    vision_tower.<clip>                                   vision_tower.vision_model.<clip>, model.vision_tower[.vision_model].<clip>
    multi_modal_projector.linear_{1,2}.*                  model.multi_modal_projector.linear_{1,2}.*

The language model is the text table of ``convert.layout`` (``model.*`` / ``lm_head.weight`` read
through ``text_view``). The vision side (``V`` = ``vision_tower.``, layer ``L`` =
``vision_tower.encoder.layers.{i}.``; megatron names of ``model.vision_spec``)::

    vision_model.conv1.weight                         V.embeddings.patch_embedding.weight
    vision_model.class_token [1, 1, h]                V.embeddings.class_embedding [h]
    vision_model.position_embeddings.weight           V.embeddings.position_embedding.weight
    vision_model.ln_pre.{weight,bias}                 V.pre_layrnorm.{weight,bias}
    vision_model.post_layernorm.{weight,bias}         V.post_layernorm.{weight,bias}        (kept, unused)
    vision_model.decoder.layers.i.input_layernorm.*   L.layer_norm1.*
    ...self_attention.linear_qkv.{weight,bias}        L.self_attn.{q,k,v}_proj.* (interleaved per head)
    ...self_attention.linear_proj.{weight,bias}       L.self_attn.out_proj.*
    ...pre_mlp_layernorm.*                            L.layer_norm2.*
    ...mlp.linear_fc1.* / mlp.linear_fc2.*            L.mlp.fc1.* / L.mlp.fc2.*
    vision_projection.encoder.linear_fc1.*            multi_modal_projector.linear_1.*
    vision_projection.encoder.linear_fc2.*            multi_modal_projector.linear_2.*

The CLIP attention is multi-head (one head per group), so megatron's fused QKV is ``[q_h; k_h; v_h]``
per head (``convert.layout.interleave_qkv`` with ``groups = heads``). TP splits: QKV / fc1 / projector
fc1 (weight and bias) by rows, out_proj / fc2 / projector fc2 weights by columns; their biases, the norms
and the embeddings are whole on every rank. Checkpoint keys stack the tower's layers on a leading axis,
the norms under the TE spec's fused names (``self_attention.linear_qkv.layer_norm_{weight,bias}``).

Pure torch: no megatron import.
"""

from __future__ import annotations

from torch import Tensor

from megatron_prefix.convert.layout import HeadLayout, even_slice, interleave_qkv, qkv_rows
from megatron_prefix.model.vision_config import VisionConfig

TEXT_PREFIX = "language_model.model."
TEXT_HEAD = "language_model.lm_head.weight"
TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."
# (input prefix, canonical prefix); the first matching rule applies
_RENAMES = (
    ("model.language_model.", TEXT_PREFIX),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", TOWER),
    ("model.vision_tower.", TOWER),
    ("vision_tower.vision_model.", TOWER),
    ("model.multi_modal_projector.", PROJECTOR),
)
IGNORED = ("vision_tower.embeddings.position_ids",)  # a buffer older versions saved

VISION_GLOBAL: dict[str, tuple[str, int | None]] = {
    "vision_model.conv1.weight": ("vision_tower.embeddings.patch_embedding.weight", None),
    "vision_model.class_token": ("vision_tower.embeddings.class_embedding", None),
    "vision_model.position_embeddings.weight": ("vision_tower.embeddings.position_embedding.weight", None),
    "vision_model.ln_pre.weight": ("vision_tower.pre_layrnorm.weight", None),
    "vision_model.ln_pre.bias": ("vision_tower.pre_layrnorm.bias", None),
    "vision_model.post_layernorm.weight": ("vision_tower.post_layernorm.weight", None),
    "vision_model.post_layernorm.bias": ("vision_tower.post_layernorm.bias", None),
    "vision_projection.encoder.linear_fc1.weight": ("multi_modal_projector.linear_1.weight", 0),
    "vision_projection.encoder.linear_fc1.bias": ("multi_modal_projector.linear_1.bias", 0),
    "vision_projection.encoder.linear_fc2.weight": ("multi_modal_projector.linear_2.weight", 1),
    "vision_projection.encoder.linear_fc2.bias": ("multi_modal_projector.linear_2.bias", None),
}
VISION_LAYER: dict[str, tuple[tuple[str, ...], int | None]] = {
    "input_layernorm.weight": (("layer_norm1.weight",), None),
    "input_layernorm.bias": (("layer_norm1.bias",), None),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), 0),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), 0),
    "self_attention.linear_proj.weight": (("self_attn.out_proj.weight",), 1),
    "self_attention.linear_proj.bias": (("self_attn.out_proj.bias",), None),
    "pre_mlp_layernorm.weight": (("layer_norm2.weight",), None),
    "pre_mlp_layernorm.bias": (("layer_norm2.bias",), None),
    "mlp.linear_fc1.weight": (("mlp.fc1.weight",), 0),
    "mlp.linear_fc1.bias": (("mlp.fc1.bias",), 0),
    "mlp.linear_fc2.weight": (("mlp.fc2.weight",), 1),
    "mlp.linear_fc2.bias": (("mlp.fc2.bias",), None),
}
VISION_LAYER_PARAM = "vision_model.decoder.layers.{}."
HF_VISION_LAYER = "vision_tower.encoder.layers.{}."
_FUSED_NORMS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def vision_ckpt_layer_key(suffix: str) -> str:
    """The checkpoint key (layer axis first) of a tower layer parameter ``suffix``."""
    for local, fused in _FUSED_NORMS.items():
        if suffix.startswith(local):
            suffix = fused + suffix[len(local):]
    return "vision_model.decoder.layers." + suffix


def vision_layout(vision: VisionConfig) -> HeadLayout:
    return HeadLayout(vision.num_attention_heads, vision.num_attention_heads,
                      vision.hidden_size // vision.num_attention_heads)


def normalize_hf_name(name: str) -> str:
    """Any LLaVA key layout -> the transformers 5 names (see the module docstring)."""
    for src, dst in _RENAMES:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def text_name(canonical: str) -> str | None:
    """``language_model.model.X`` -> ``model.X``, ``language_model.lm_head.weight`` -> ``lm_head.weight``."""
    if canonical.startswith(TEXT_PREFIX):
        return "model." + canonical[len(TEXT_PREFIX):]
    if canonical == TEXT_HEAD:
        return "lm_head.weight"
    return None


def llava_name(text: str) -> str:
    """Inverse of ``text_name``: a text-model HF name inside a LLaVA checkpoint."""
    if text == "lm_head.weight":
        return TEXT_HEAD
    if text.startswith("model."):
        return TEXT_PREFIX + text[len("model."):]
    raise ValueError(f"{text}: not a language-model tensor name")


class RenamedReader:
    """An ``HFReader`` seen under other names (``names``: shown name -> name in the files)."""

    def __init__(self, reader, names: dict[str, str]):
        self.base, self.map, self.dir = reader, names, reader.dir

    def names(self) -> list[str]:
        return sorted(self.map)

    def __contains__(self, name: str) -> bool:
        return name in self.map

    def _actual(self, name: str) -> str:
        if name not in self.map:
            raise ValueError(f"--hf: tensor {name!r} is missing from {self.dir}")
        return self.map[name]

    def shape(self, name: str) -> list[int]:
        return self.base.shape(self._actual(name))

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        return self.base.read(self._actual(name), rows=rows, cols=cols)


def llava_views(reader) -> tuple[RenamedReader, RenamedReader]:
    """(text view with ``model.*`` / ``lm_head.weight`` names, vision view with canonical names)."""
    text, vision, seen = {}, {}, {}
    for actual in reader.names():
        canonical = normalize_hf_name(actual)
        if canonical in IGNORED:
            continue
        if canonical in seen:
            raise ValueError(f"--hf: {actual!r} and {seen[canonical]!r} are the same tensor in two key layouts; "
                             "a checkpoint must use one")
        seen[canonical] = actual
        t = text_name(canonical)
        if t is not None:
            text[t] = actual
        else:
            vision[canonical] = actual
    return RenamedReader(reader, text), RenamedReader(reader, vision)


def vision_hf_names(name: str) -> tuple[tuple[str, ...], int | None]:
    """HF tensor names feeding the vision parameter ``name``, and its TP split dim."""
    if name in VISION_GLOBAL:
        hf, dim = VISION_GLOBAL[name]
        return (hf,), dim
    parts = name.split(".")
    if parts[:3] == ["vision_model", "decoder", "layers"]:
        i, suffix = int(parts[3]), ".".join(parts[4:])
        if suffix in VISION_LAYER:
            hf, dim = VISION_LAYER[suffix]
            return tuple(HF_VISION_LAYER.format(i) + h for h in hf), dim
    raise ValueError(f"{name}: no Hugging Face counterpart for this vision parameter")


def expected_vision_names(vision: VisionConfig) -> list[str]:
    """Every vision / projector HF tensor name a LLaVA checkpoint must hold (canonical names)."""
    names = [hf for hf, _ in VISION_GLOBAL.values()]
    for i in range(vision.num_layers):
        for hf, _ in VISION_LAYER.values():
            names += [HF_VISION_LAYER.format(i) + h for h in hf]
    return names


def read_vision_shard(reader: RenamedReader, name: str, vision: VisionConfig, tp: int, tp_rank: int) -> Tensor:
    """This TP rank's shard of the vision parameter ``name``, read from the HF files."""
    hf, dim = vision_hf_names(name)
    if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        layout = vision_layout(vision)
        q_rows, kv_rows = qkv_rows(layout, tp, tp_rank)
        q, k, v = (reader.read(n, rows=r) for n, r in zip(hf, (q_rows, kv_rows, kv_rows)))
        return interleave_qkv(q, k, v, layout)
    if name == "vision_model.class_token":
        return reader.read(hf[0]).reshape(1, 1, -1)
    if dim is None or tp == 1:
        return reader.read(hf[0])
    part = even_slice(reader.shape(hf[0])[dim], tp, tp_rank, hf[0])
    return reader.read(hf[0], rows=part) if dim == 0 else reader.read(hf[0], cols=part)


def vision_to_hf(name: str, tensor: Tensor, vision: VisionConfig) -> list[tuple[str, Tensor]]:
    """A full (TP-gathered) vision parameter -> its HF tensors (the inverse of ``read_vision_shard``)."""
    from megatron_prefix.convert.layout import split_qkv

    hf, _ = vision_hf_names(name)
    if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        return list(zip(hf, split_qkv(tensor, vision_layout(vision))))
    if name == "vision_model.class_token":
        return [(hf[0], tensor.reshape(-1).contiguous())]
    return [(hf[0], tensor)]


def vision_shapes(vision: VisionConfig, lm_hidden: int) -> dict[str, tuple[int, ...]]:
    """Global shape of every vision parameter (megatron names; layers ``{i}``-templated by suffix)."""
    h, i, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    shapes = {
        "vision_model.conv1.weight": (h, 3, p, p),
        "vision_model.class_token": (1, 1, h),
        "vision_model.position_embeddings.weight": (vision.num_patches + 1, h),
        "vision_model.ln_pre.weight": (h,), "vision_model.ln_pre.bias": (h,),
        "vision_model.post_layernorm.weight": (h,), "vision_model.post_layernorm.bias": (h,),
        "vision_projection.encoder.linear_fc1.weight": (lm_hidden, h),
        "vision_projection.encoder.linear_fc1.bias": (lm_hidden,),
        "vision_projection.encoder.linear_fc2.weight": (lm_hidden, lm_hidden),
        "vision_projection.encoder.linear_fc2.bias": (lm_hidden,),
    }
    layer = {
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
        "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
        "pre_mlp_layernorm.weight": (h,), "pre_mlp_layernorm.bias": (h,),
        "mlp.linear_fc1.weight": (i, h), "mlp.linear_fc1.bias": (i,),
        "mlp.linear_fc2.weight": (h, i), "mlp.linear_fc2.bias": (h,),
    }
    shapes.update({vision_ckpt_layer_key(k): (vision.num_layers, *v) for k, v in layer.items()})
    return shapes
