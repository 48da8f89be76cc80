"""Checkpoint conversion between Hugging Face (llama / qwen2 / mistral) and our megatron checkpoints.

- ``convert_hf_to_mcore(hf_dir, out_dir, tp, pp, dtype, task)``: collective (every torchrun rank calls
  it; each reads only its layers and TP shards); writes a run dir that ``checkpoint.load`` accepts.
- ``convert_mcore_to_hf(ckpt, out_dir, tokenizer, dtype, shard_size, hf_config, reward_bias_mode)``:
  single process, streams one layer at a time; ``*ForCausalLM`` or, for a reward model,
  ``*ForSequenceClassification``.

The name table and the fused-tensor layouts are in ``megatron_prefix.convert.layout``; see
``docs/convert.md``.
"""

from megatron_prefix.convert.to_hf import convert_mcore_to_hf, inspect_checkpoint
from megatron_prefix.convert.to_mcore import convert_hf_to_mcore

__all__ = ["convert_hf_to_mcore", "convert_mcore_to_hf", "inspect_checkpoint"]
