"""``SharedPrefixGPTModel``: megatron-core's ``GPTModel`` with RoPE taken from ``position_ids``.

Stock ``GPTModel`` builds its rotary tensor for positions ``0..s-1`` from the sequence length alone and
ignores ``position_ids``; in a shared row ``[prompt, r1, ..., rK]`` every response restarts at the
prompt length, so that would rotate ``r2`` as if it followed ``r1`` (measured: 1.8e-3 off in log-prob,
versus 1e-7 with per-token positions). This subclass keeps megatron's embedding, ``TransformerBlock``
(any layer spec, incl. ``SharedPrefixCoreAttention``), output layer, checkpoint layout and forward
signature, and overrides only megatron's two hooks (``forward`` itself is megatron's, so upstream
changes to it reach us; ours only checks arguments first):

1. ``_preprocess`` (RoPE): on *every* pipeline stage, ``rotary_pos_emb`` = ``PositionRotary(position_ids)``
   of shape [s, b, 1, d]; layers apply it with megatron's unfused ``apply_rotary_pos_emb``. Under context
   parallelism the model receives this rank's tokens and position ids (``split_for_cp``), so the rotary
   tensor is already CP-local (no ``get_pos_emb_on_this_cp_rank``).
2. ``_postprocess`` (output): no loss path. ``post_process`` False -> the stage's hidden states [s, b, h]
   (for the next stage). ``post_process`` True -> vocab-parallel logits ``logits_sbv`` [s, b, V/tp] (megatron would
   return [b, s, V]); ``return_hidden=True`` -> the final-norm hidden states ``hidden_sbh`` [s, b, h]
   (full sequence even with sequence parallelism) for a reward head (``logprobs.last_token_hidden``).
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_prefix.model.rope import PositionRotary


class SharedPrefixGPTModel(GPTModel):
    """GPTModel whose rotary embedding follows ``position_ids`` (see the module docstring).

    Constructed like ``GPTModel`` plus ``rotary``; the stock ``RotaryEmbedding`` is not built
    (``position_embedding_type='none'`` for the parent, so no learned position table either).
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        rotary: PositionRotary,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        pg_collection: Any = None,
        vp_stage: int | None = None,
        scatter_embedding_sequence_parallel: bool = True,
    ) -> None:
        if getattr(config, "apply_rope_fusion", False):
            raise ValueError("apply_rope_fusion: must be False (per-token RoPE uses the unfused path)")
        if getattr(config, "mtp_num_layers", None):
            raise ValueError("mtp_num_layers: multi-token prediction is not supported")
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="none",
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        )
        self.rotary = rotary
        self._return_hidden = False  # set by forward for _postprocess

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        decoder_input: Tensor | None = None,
        labels: Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        extra_block_kwargs: dict | None = None,
        runtime_gather_output: bool | None = None,
        *,
        inference_params: Any = None,
        loss_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """One stage's forward: megatron's ``GPTModel.forward`` itself, after our checks.

        Args:
            input_ids: [b, s] token ids (this CP rank's slice); used on the first stage only.
            position_ids: [b, s] position ids (same slice); required on every stage.
            attention_mask: ignored by ``SharedPrefixCoreAttention`` (it reads ``packed_seq_params``);
                passed through for stock core attentions (e.g. the causal reference in tests).
            packed_seq_params: the micro-batch's ``SharedPrefixParams``.
            padding_mask: [b, s], True = padding; passed on to megatron unchanged (it only routes MoE
                tokens; megatron checks its shape and scatters it under sequence parallelism).
            return_hidden: on the last stage, return ``hidden_sbh`` instead of logits.

        Returns: hidden states [s, b, h] (not last stage, or ``return_hidden``) or logits [s, b, V/tp].
        """
        if labels is not None:
            raise ValueError("labels: SharedPrefixGPTModel has no loss path; use megatron_prefix.model.logprobs")
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("inference_context: inference is not supported by SharedPrefixGPTModel")
        if position_ids is None:
            raise ValueError("position_ids: required on every pipeline stage (RoPE is computed from them)")
        self._return_hidden = return_hidden
        try:
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                packed_seq_params=packed_seq_params, extra_block_kwargs=extra_block_kwargs,
                runtime_gather_output=runtime_gather_output, loss_mask=loss_mask, padding_mask=padding_mask,
            )
        finally:
            self._return_hidden = False

    def _preprocess(self, input_ids: Tensor, position_ids: Tensor, *args: Any, **kwargs: Any) -> tuple:
        """megatron's preprocessing (embedding, padding mask), then RoPE from ``position_ids``.

        The parent has no rotary module here (``position_embedding_type='none'``), so its
        ``rotary_pos_emb`` (second element) is None; it becomes ``PositionRotary(position_ids)``
        [s, b, 1, d] on every stage.
        """
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        assert out[1] is None, "the parent built a rotary embedding; position_embedding_type must be 'none'"
        return (out[0], self.rotary(position_ids), *out[2:])

    def _postprocess(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        """Last stage: logits ``logits_sbv`` [s, b, V/tp] (no loss, no [b, s] transpose) or ``hidden_sbh``.

        Other stages return the hidden states unchanged, as megatron's does (MTP is refused in
        ``__init__``, so nothing else of megatron's postprocessing applies).
        """
        if not self.post_process:
            return hidden_states
        if self._return_hidden:
            if self.config.sequence_parallel:
                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
                )
            return hidden_states
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits_sbv, _ = self.output_layer(
            hidden_states, weight=output_weight, runtime_gather_output=kwargs.get("runtime_gather_output")
        )
        return logits_sbv
