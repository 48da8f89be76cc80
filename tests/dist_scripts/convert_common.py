"""Helpers shared by ``tests/test_convert.py`` and the ``convert_*`` torchrun scripts.

- ``make_hf_checkpoint(kind, dir)``: a tiny random Hugging Face model (llama, llama with tied embeddings,
  llama 3.1 rope scaling with non-default constants, qwen2 tied / untied, mistral) with init std 0.15
  and perturbed norm weights and biases, saved with ``save_pretrained`` in fp32;
- ``megatron_logits(model, tokens)``: our ``SharedPrefixGPTModel`` on one unpacked sequence (one unit
  ``[prompt, response]`` packed alone into a row: positions 0..L-1, plain causal attention), logits
  gathered over TP, [L, V] on the last pipeline stage (pipeline stages pass hidden states with
  send/recv);
- ``load_converted(run_dir)``: build the model at the current parallel layout and load the checkpoint
  (the output-layer copy of tied embeddings on the last pipeline stage is loaded from the embedding key).

Only ``make_hf_checkpoint`` / ``hf_logits`` import transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

KINDS = ("llama", "llama_tied", "llama31", "qwen2", "qwen2_tied", "mistral")
SEQ_LEN = 24
INIT_STD = 0.15


def hf_config(kind: str):
    """The transformers config of a test model ``kind``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "initializer_range": INIT_STD, "attn_implementation": "eager"}
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=50000.0)
    if kind == "llama_tied":
        return LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True)
    if kind == "llama31":
        scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                   "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_scaling=scaling, rope_theta=10000.0)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
    if kind == "qwen2_tied":
        return Qwen2Config(**{**common, "num_key_value_heads": 8}, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, rope_theta=20000.0)
    raise ValueError(f"kind: unknown {kind!r}")


def make_hf_model(kind: str, seed: int = 0):
    """A random fp32 HF causal LM of ``kind`` (norm weights 1 + N(0, 0.1), biases N(0, 0.1))."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_hf_checkpoint(kind: str, directory: str | Path, seed: int = 0):
    """``make_hf_model`` saved to ``directory`` (safetensors); returns the model."""
    model = make_hf_model(kind, seed)
    model.save_pretrained(str(directory))
    return model


def sample_tokens(vocab: int, seed: int = 0, length: int = SEQ_LEN) -> torch.Tensor:
    """[L] int64 random token ids in [1, vocab)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(1, vocab, length)).long()


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[L, V] fp32 logits of the HF model on one sequence."""
    return model(tokens[None]).logits[0].float()


def _micro_batch(tokens: torch.Tensor, prompt_len: int):
    from megatron_prefix.data.row import pack_row
    from megatron_prefix.data.unit import Unit
    from megatron_prefix.model.batch import MicroBatch

    ids = tokens.numpy()
    unit = Unit(ids[:prompt_len], [ids[prompt_len:]], np.zeros(1, dtype=np.float32), unit_id=0)
    return MicroBatch.from_rows([pack_row([unit], len(ids), pad_id=0)])


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, prompt_len: int = 7) -> torch.Tensor | None:
    """[L, V] fp32 logits (full vocabulary) of our model on one sequence; None off the last PP stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    mb = _micro_batch(tokens, prompt_len)
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    h = model.config.hidden_size
    if pp_rank > 0:
        hidden = torch.empty(len(tokens), 1, h, dtype=model.config.params_dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = mb.forward(model)
    if pp_rank < pp - 1:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    logits_sbv = gather_from_tensor_model_parallel_region(out)
    return logits_sbv[:, 0].float()


def load_converted(run_dir: str | Path, impl: str = "local"):
    """``SharedPrefixGPTModel`` (dense attention) at the current parallel layout, loaded from ``run_dir``."""
    import json

    from megatron.core import dist_checkpointing

    from megatron_prefix.convert.to_mcore import no_embedding_sync
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.training.checkpoint import resolve

    path = resolve(run_dir)
    cfg = ModelConfig(**json.loads((path / "train_state.json").read_text())["model"])
    with no_embedding_sync():  # tied embeddings at PP > 1: no .cuda() copy on CPU; both copies are loaded
        model = build_model(cfg, "dense", impl=impl)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()
