"""The reward model's scalar head, in place of the vocabulary projection.

A 1-output head cannot be vocab-parallel, so ``ScalarHead`` is replicated on every tensor-parallel rank:
its input (the final-norm hidden states, full hidden size on every TP rank) is identical across TP ranks,
so its output and gradients are too. It has the call signature of megatron's ``output_layer``
(``(hidden, weight=None, runtime_gather_output=None) -> (out, bias)``) so it drops into
``GPTModel.output_layer`` and the checkpoint carries it as ``output_layer.weight`` / ``output_layer.bias``
(replicated sharded tensors, resharding-safe). The reward of a response is the head's output at the
response's last token (its EOS).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor


class ScalarHead(MegatronModule):
    """``reward_sb1 = hidden_sbh @ weight.T + bias``, replicated across tensor-parallel ranks."""

    def __init__(self, config: TransformerConfig, init_std: float | None = None):
        super().__init__(config=config)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype, device=device))
        std = init_std if init_std is not None else 1.0 / (config.hidden_size + 1) ** 0.5
        with torch.no_grad():
            self.weight.normal_(0.0, std)

    def forward(self, hidden_sbh: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
        """[s, b, h] -> ([s, b, 1], None)."""
        assert weight is None, "a reward head is never tied to the embeddings"
        if self.config.sequence_parallel:
            hidden_sbh = gather_from_sequence_parallel_region(hidden_sbh, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden_sbh, self.weight, self.bias), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Replicated across TP (no tensor-parallel axis), so any TP can load it."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)


def attach_reward_head(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Replace ``model.output_layer`` (last pipeline stage) by a ``ScalarHead``."""
    if getattr(model, "share_embeddings_and_output_weights", False):
        raise ValueError("model.tie_word_embeddings: a reward model has an untied scalar head; set it false")
    if getattr(model, "post_process", False):
        model.output_layer = ScalarHead(config)
