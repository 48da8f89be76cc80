"""Megatron-core GPT models with shared-prefix attention, positions and log-probs."""
