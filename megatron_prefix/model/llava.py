"""``SharedPrefixLLaVAModel``: ``SharedPrefixGPTModel`` with a CLIP vision tower and an MLP projector.

The language model is ``SharedPrefixGPTModel`` itself (parameter names ``embedding.*``, ``decoder.*``,
``output_layer.*``; shared-prefix attention, per-token RoPE, log-probs and reward head unchanged). On
the first pipeline stage the model also holds megatron-core's ``CLIPViTModel`` as ``vision_model`` and
``MultimodalProjector`` as ``vision_projection`` (the names megatron-core's ``LLaVAModel`` uses; built by
``model.vision_spec``). The forward, on the first stage:

1. ``pixel_values`` [N, 3, H, W] -> the tower's hidden state of ``vision.feature_layer`` (HF's
   ``hidden_states[vision_feature_layer]``: the embeddings (conv patches, class token, learned positions,
   ``ln_pre``) then only the first ``vision.layers_run`` layers; the later layers and ``post_layernorm``
   are kept, frozen, so every HF tensor round-trips) -> select (``default`` drops CLS) -> projector
   -> ``feats`` [N * tokens_per_image, h], image-major (image 0's tokens first, as HF concatenates);
2. the token embeddings ``emb_sbh`` [s, b, h] (this CP rank's tokens) get ``feats[image_feature_index]``
   wherever ``image_feature_index`` [b, s] >= 0 (HF's ``masked_scatter``, out of place);
3. under sequence parallelism the merged embeddings are scattered here (the language model is built
   with ``scatter_embedding_sequence_parallel=False``), then megatron's GPT forward runs with
   ``decoder_input``.

Checks (a user's data mistake gets a ``ValueError`` naming the argument): the positions with
``image_feature_index >= 0`` are exactly the image tokens (``vision.image_token_id``) of ``input_ids``;
indices are in range; without context parallelism every feature row is used exactly once (HF's
"image features and image tokens do not match").

``freeze_vision_parts(model, freeze_vision, freeze_projector)`` sets ``requires_grad`` (called at
construction from ``ModelConfig``; the trainer may call it again). A frozen tower runs under
``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_prefix.model.gpt import SharedPrefixGPTModel
from megatron_prefix.model.vision_config import VisionConfig


class SharedPrefixLLaVAModel(SharedPrefixGPTModel):
    """``SharedPrefixGPTModel`` + ``vision_model`` + ``vision_projection`` (first stage; module docstring)."""

    def __init__(self, config: TransformerConfig, *args: Any, vision: VisionConfig, impl: str = "local",
                 freeze_vision: bool = True, freeze_projector: bool = False, **kwargs: Any) -> None:
        kwargs["scatter_embedding_sequence_parallel"] = False
        super().__init__(config, *args, **kwargs)
        self.vision = vision
        self.vision_model = None
        self.vision_projection = None
        if self.pre_process:
            from megatron_prefix.model.vision_spec import build_vision_modules

            if config.hidden_size % config.tensor_model_parallel_size:
                raise ValueError(f"model.hidden_size: {config.hidden_size} must be divisible by "
                                 f"tp={config.tensor_model_parallel_size} (the projector is split over it)")
            self.vision_model, self.vision_projection = build_vision_modules(
                vision, config, impl, vp_stage=kwargs.get("vp_stage"))
        freeze_vision_parts(self, freeze_vision, freeze_projector)

    # ------------------------------------------------------------------ vision

    def unused_vision_layer_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the tower layers after ``feature_layer`` (never run, so never changed).

        They stay in the tower's block: megatron saves a block's layers (and their optimizer state) as one
        stacked tensor, so when the tower trains they are trainable too, in an optimizer group with learning
        rate and weight decay 0 (``training.setup.optimizer_overrides``); they get no gradient either.
        """
        if self.vision_model is None:
            return []
        layers = self.vision_model.decoder.layers[self.vision.layers_run:]
        return [p for layer in layers for p in layer.parameters()]

    def unused_vision_parameters(self) -> list[torch.nn.Parameter]:
        """The unused tower layers and HF's ``post_layernorm`` (kept only so that every HF tensor round-trips)."""
        if self.vision_model is None:
            return []
        return [*self.unused_vision_layer_parameters(), *self.vision_model.post_layernorm.parameters()]

    def vision_hidden(self, pixel_values: Tensor) -> Tensor:
        """``hidden_states[feature_layer]`` of the tower: [N, S, hv] (S = patches + 1 class token)."""
        vm, v = self.vision_model, self.vision
        want = (3, v.image_size, v.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values: expected [N, {want[0]}, {want[1]}, {want[2]}] (the tower's image size; "
                             f"no position interpolation), got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        x = vm.conv1(pixel_values.to(vm.conv1.weight.dtype))  # [N, hv, grid, grid]
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)  # [N, grid**2, hv]
        x = torch.cat([vm.class_token.expand(n, -1, -1), x], dim=1)  # [N, S, hv]
        positions = vm.position_ids.to(x.device)
        x = vm.ln_pre(x + vm.position_embeddings(positions))
        x_snh = x.permute(1, 0, 2).contiguous()  # [S, N, hv], megatron's layout
        for layer in vm.decoder.layers[: v.layers_run]:
            x_snh, _ = layer(hidden_states=x_snh, attention_mask=None)
        return x_snh.permute(1, 0, 2)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image features [N * tokens_per_image, h] (image-major), for the merge."""
        if self.vision_model is None:
            raise ValueError("pixel_values: only the first pipeline stage holds the vision tower")
        frozen = not any(p.requires_grad for p in self.vision_model.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            hidden_nsh = self.vision_hidden(pixel_values)
        if self.vision.select_strategy == "default":
            hidden_nsh = hidden_nsh[:, 1:]
        n, tokens, _ = hidden_nsh.shape
        feats_snh = self.vision_projection(hidden_nsh.permute(1, 0, 2).contiguous())  # [T_img, N, h]
        return feats_snh.permute(1, 0, 2).reshape(n * tokens, -1)

    def embed(self, input_ids: Tensor, position_ids: Tensor, pixel_values: Tensor | None,
              image_feature_index: Tensor | None) -> Tensor:
        """Token embeddings with the image features written in: [s, b, h] (or [s/tp, b, h] under SP)."""
        emb_sbh = self.embedding(input_ids=input_ids, position_ids=position_ids)
        if (pixel_values is None) != (image_feature_index is None):
            raise ValueError("pixel_values / image_feature_index: pass both (a batch with images) or neither")
        if pixel_values is not None:
            check_image_tokens(input_ids, image_feature_index, self.vision.image_token_id)
            emb_sbh = merge_image_features(emb_sbh, self.image_features(pixel_values), image_feature_index,
                                           every_row_once=self.config.context_parallel_size == 1)
        if self.config.sequence_parallel:
            emb_sbh = tensor_parallel.scatter_to_sequence_parallel_region(emb_sbh).clone()
        return emb_sbh

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
                decoder_input: Tensor | None = None, *args: Any, pixel_values: Tensor | None = None,
                image_feature_index: Tensor | None = None, padding_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """``SharedPrefixGPTModel.forward`` with the image features merged into the embeddings.

        Args:
            pixel_values: [N, 3, H, W] the micro-batch's images (rows concatenated), or None.
            image_feature_index: [b, s] int64 (this CP rank's slice, like ``input_ids``): -1, or the row of
                the token's feature in the flattened projected features [N * tokens_per_image, h].
            Other arguments: as ``SharedPrefixGPTModel.forward``. Stages after the first ignore the images.
        """
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, position_ids, pixel_values, image_feature_index)
            if padding_mask is not None and self.config.sequence_parallel:  # what megatron does for its own
                padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
                    padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, *args,
                               padding_mask=padding_mask, **kwargs)


def check_image_tokens(input_ids: Tensor, image_feature_index: Tensor, image_token_id: int) -> None:
    """The image positions of ``image_feature_index`` are exactly the image tokens of ``input_ids``."""
    if tuple(image_feature_index.shape) != tuple(input_ids.shape):
        raise ValueError(f"image_feature_index: shape {tuple(image_feature_index.shape)} differs from input_ids' "
                         f"{tuple(input_ids.shape)} (both are this CP rank's [b, s] slice)")
    mismatch = (image_feature_index >= 0) != (input_ids == image_token_id)
    if bool(mismatch.any()):
        b, s = (int(i) for i in mismatch.nonzero()[0])
        raise ValueError(
            f"image_feature_index: token {s} of row {b} is id {int(input_ids[b, s])} with feature index "
            f"{int(image_feature_index[b, s])}; image features go exactly where the image token "
            f"(id {image_token_id}, model.vision.image_token_id) is"
        )


def merge_image_features(emb_sbh: Tensor, feats_nh: Tensor, image_feature_index: Tensor,
                         every_row_once: bool = True) -> Tensor:
    """``emb_sbh`` with ``feats_nh[image_feature_index[b, s]]`` at [s, b] where the index is >= 0."""
    idx_sb = image_feature_index.t().to(emb_sbh.device)
    s_idx, b_idx = (idx_sb >= 0).nonzero(as_tuple=True)
    rows = idx_sb[s_idx, b_idx]
    n = feats_nh.shape[0]
    if rows.numel() and int(rows.max()) >= n:
        raise ValueError(f"image_feature_index: index {int(rows.max())} is out of range for {n} image feature "
                         "rows (pixel_values holds fewer images than the tokens refer to)")
    if every_row_once:
        counts = torch.bincount(rows, minlength=n)
        if bool((counts != 1).any()):
            raise ValueError(
                f"image_feature_index: {int((counts == 0).sum())} of {n} image feature rows are not used and "
                f"{int((counts > 1).sum())} are used more than once; every image of pixel_values must fill "
                "its image tokens exactly once (image features and image tokens do not match)"
            )
    return emb_sbh.index_put((s_idx, b_idx), feats_nh[rows].to(emb_sbh.dtype))


def freeze_vision_parts(model: torch.nn.Module, freeze_vision: bool, freeze_projector: bool) -> dict[str, int]:
    """``requires_grad`` of the vision side: the tower unless ``freeze_vision`` is False, the projector
    when ``freeze_projector``; ``post_layernorm`` always frozen, the unused tower layers follow the tower
    (held fixed in the optimizer, see ``unused_vision_layer_parameters``). Accepts a wrapped model
    (``.module`` chain); a text model or a later pipeline stage is left alone. Returns the number of
    trainable / frozen vision parameters (elements; the unused layers count as frozen)."""
    core = model
    while not isinstance(core, SharedPrefixLLaVAModel) and hasattr(core, "module"):
        core = core.module
    if not isinstance(core, SharedPrefixLLaVAModel) or core.vision_model is None:
        return {"trainable": 0, "frozen": 0}
    for p in core.vision_model.parameters():
        p.requires_grad_(not freeze_vision)
    for p in core.vision_model.post_layernorm.parameters():
        p.requires_grad_(False)
    for p in core.vision_projection.parameters():
        p.requires_grad_(not freeze_projector)
    fixed = {id(p) for p in core.unused_vision_parameters()}
    params = [*core.vision_model.parameters(), *core.vision_projection.parameters()]
    trains = [p.requires_grad and id(p) not in fixed for p in params]
    return {"trainable": sum(p.numel() for p, t in zip(params, trains) if t),
            "frozen": sum(p.numel() for p, t in zip(params, trains) if not t)}


def held_fixed_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters that must never change (the unused tower layers of a trained tower)."""
    core = model
    while not isinstance(core, SharedPrefixLLaVAModel) and hasattr(core, "module"):
        core = core.module
    if not isinstance(core, SharedPrefixLLaVAModel):
        return []
    return [p for p in core.unused_vision_layer_parameters() if p.requires_grad]
