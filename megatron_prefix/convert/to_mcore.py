"""Hugging Face (llama / qwen2 / mistral, and LLaVA over them) -> our megatron ``dist_checkpointing`` checkpoint.

Every rank builds its stage of ``SharedPrefixGPTModel`` at the target TP/PP (megatron local spec, CPU,
no random init), fills each parameter with *its* TP shard of *its* layers read from the safetensors
files by slice (``HFReader``; the fused QKV and SwiGLU layouts of ``convert.layout``), and the ranks
save ``{"model": model.sharded_state_dict()}`` together. The output is a run directory::

    OUT/iter_0000000/   dist_checkpointing files + train_state.json
    OUT/latest          "iter_0000000"

so ``checkpoint.load: OUT`` (or ``OUT/iter_0000000``) loads it at any TP/PP (resharding is
dist_checkpointing's job). ``train_state.json`` = ``{"step": 0, "has_optimizer": false, "model":
<ModelConfig>, "task": ..., "source": {"hf_dir", "config_sha256"}, "world": {...}}``.
A LLaVA checkpoint (``model_type: llava``) also fills the first stage's ``vision_model`` /
``vision_projection`` (``convert.llava``); its ``model`` entry holds the ``vision`` section.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prefix.convert import llava, session
from megatron_prefix.convert.hf_files import HFReader, sha256_file
from megatron_prefix.convert.layout import (
    GLOBAL_TABLE,
    LAYER_TABLE,
    HeadLayout,
    even_slice,
    hf_names,
    interleave_qkv,
    qkv_rows,
    split_layer_name,
)
from megatron_prefix.model.config import DTYPES, ModelConfig

ITER_DIR = "iter_0000000"
TASKS = ("dpo", "rm")
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name a checkpoint of ``cfg`` must hold."""
    names = []
    for i in range(cfg.num_layers):
        for suffix in LAYER_TABLE:
            if suffix.endswith(".bias") and not cfg.qkv_bias:
                continue
            names.extend(hf_names(f"decoder.layers.{i}.{suffix}")[0])
    names += [GLOBAL_TABLE["embedding.word_embeddings.weight"][0], GLOBAL_TABLE["decoder.final_layernorm.weight"][0]]
    if not cfg.tie_word_embeddings:
        names.append(GLOBAL_TABLE["output_layer.weight"][0])
    return names


def check_hf_tensors(reader: HFReader, cfg: ModelConfig) -> None:
    """Refuse a checkpoint with missing tensors, or with tensors this mapping would silently drop."""
    expected = set(expected_hf_names(cfg))
    present = set(reader.names())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"--hf: {len(missing)} tensors missing from {reader.dir}, e.g. {missing[:5]}")
    tied_head = GLOBAL_TABLE["output_layer.weight"][0] if cfg.tie_word_embeddings else None
    extra = sorted(n for n in present - expected if n != tied_head and not n.endswith(IGNORED_HF_SUFFIXES))
    if extra:
        raise ValueError(
            f"--hf: {len(extra)} tensors have no megatron counterpart (unsupported architecture feature?), "
            f"e.g. {extra[:5]}"
        )


def read_local_shard(reader: HFReader, name: str, cfg: ModelConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of megatron parameter ``name`` (global layer numbering), read from HF files."""
    hf, dim = hf_names(name, tied=cfg.tie_word_embeddings)
    layer = split_layer_name(name)
    suffix = layer[1] if layer else name
    if suffix.startswith("self_attention.linear_qkv."):
        layout = HeadLayout.of(cfg)
        q_rows, kv_rows = qkv_rows(layout, tp, tp_rank)
        q, k, v = (reader.read(n, rows=r) for n, r in zip(hf, (q_rows, kv_rows, kv_rows)))
        return interleave_qkv(q, k, v, layout)
    if suffix == "mlp.linear_fc1.weight":
        rows = even_slice(cfg.ffn_hidden_size, tp, tp_rank, "model.ffn_hidden_size")
        return torch.cat([reader.read(hf[0], rows=rows), reader.read(hf[1], rows=rows)], dim=0)
    if dim is None or tp == 1:
        return reader.read(hf[0])
    part = even_slice(reader.shape(hf[0])[dim], tp, tp_rank, hf[0])
    return reader.read(hf[0], rows=part) if dim == 0 else reader.read(hf[0], cols=part)


def _global_name(model: torch.nn.Module, local_name: str) -> str:
    """``decoder.layers.<local i>`` -> ``decoder.layers.<global i>`` (pipeline stages number from 0)."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def fill_from_hf(model: torch.nn.Module, reader: HFReader, cfg: ModelConfig, tp: int, tp_rank: int,
                 skip_prefixes: tuple[str, ...] = (), progress: bool = False) -> int:
    """Copy every parameter of this stage from the HF files; returns the number of parameters filled."""
    from tqdm import tqdm

    params = [(n, p) for n, p in model.named_parameters() if not n.startswith(skip_prefixes)]
    with torch.no_grad():
        for local_name, p in tqdm(params, desc="hf -> megatron", disable=not progress, unit="tensor"):
            name = _global_name(model, local_name)
            shard = read_local_shard(reader, name, cfg, tp, tp_rank)
            if tuple(shard.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}: the Hugging Face tensors give shape {tuple(shard.shape)} on tp rank {tp_rank}, "
                    f"the model expects {tuple(p.shape)} (config.json does not match the weights?)"
                )
            p.copy_(shard.to(p.dtype))
    return len(params)


@contextlib.contextmanager
def no_embedding_sync() -> Iterator[None]:
    """Build tied-embedding models at PP > 1 without megatron's initial embedding all-reduce.

    ``LanguageModule.setup_embeddings_and_output_layer`` copies the first stage's embedding to the last
    stage's output layer with ``weight.data.cuda()`` + ``all_reduce`` (fails on a CPU build, and would
    move the weight to the GPU on a CUDA one). Conversion fills both copies from the same HF tensor, so
    the copy is skipped: ``_is_in_embd_group`` answers False while the block runs.
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        yield
    finally:
        LanguageModule._is_in_embd_group = original


def _prepare_out(out: Path) -> None:
    """Rank 0: refuse a non-empty ``out``, create the temporary checkpoint directory."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty")
    (out / (ITER_DIR + ".tmp")).mkdir(parents=True, exist_ok=True)


def _broadcast_error(err: Exception | None) -> None:
    """Raise on every rank if rank 0 found a problem (so that no rank hangs in a collective)."""
    box = [None if err is None else f"{type(err).__name__}: {err}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise ValueError(f"rank 0 failed: {box[0]}")


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int | None = None, pp: int | None = None,
                        dtype: str | None = None, task: str = "dpo", seed: int = 1234,
                        progress: bool = True) -> Path:
    """Convert ``hf_dir`` to a run directory ``out_dir`` at TP/PP (default: the world layout); returns it.

    Collective under ``torchrun``: every rank calls it. ``dtype`` (default: the checkpoint's
    ``torch_dtype``) is the parameter dtype stored. ``task="rm"`` replaces the vocabulary projection by a
    freshly initialised ``ScalarHead`` (seeded by ``seed``), the starting point of reward training.
    Inside an existing process group it leaves megatron's model-parallel groups initialised at (tp, pp).
    """
    from megatron.core import dist_checkpointing

    from megatron_prefix.model.spec import build_model
    from megatron_prefix.parallel import init_parallel

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if task not in TASKS:
        raise ValueError(f"--task: must be one of {TASKS}, got {task!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: must be one of {DTYPES}, got {dtype!r}")
    cfg = ModelConfig.from_hf_config(hf_dir)  # refuses unsupported architectures (names the key)
    cfg.validate(tp or 1)
    with session.gloo_world():
        tp, pp = session.world_layout(tp, pp, dist.get_world_size())
        dtype = dtype or cfg.params_dtype
        cfg.params_dtype = dtype
        cfg.validate(tp)
        if cfg.num_layers % pp:
            raise ValueError(f"--pp: {cfg.num_layers} layers cannot be split evenly over pp={pp}")
        if task == "rm":
            cfg.tie_word_embeddings = False
        reader = vision_reader = HFReader(hf_dir)
        if cfg.vision is not None:  # LLaVA: the language model is read through its own view
            reader, vision_reader = llava.hf_views(reader)
        err = None
        try:
            if session.rank() == 0:
                check_hf_tensors(reader, ModelConfig.from_hf_config(hf_dir))
                if cfg.vision is not None:
                    llava.check_vision_tensors(vision_reader, cfg.vision)
                _prepare_out(out)
        except ValueError as e:
            err = e
        _broadcast_error(err)
        tmp = out / (ITER_DIR + ".tmp")
        info = init_parallel(tp, pp, 1, seed=seed)
        tc = cfg.to_transformer_config(tp, pp, 1, dtype=dtype, use_cpu_initialization=True,
                                       perform_initialization=False)
        with no_embedding_sync():
            model = build_model(cfg, "dense", transformer_config=tc, impl="local")
        skip: tuple[str, ...] = ()
        if task == "rm":
            from megatron_prefix.training.reward import attach_reward_head

            attach_reward_head(model, tc)
            skip = ("output_layer.",)
        if cfg.vision is not None:
            skip += llava.VISION_PREFIXES
            llava.fill_vision_from_hf(model, vision_reader, cfg.vision, tp, info.tp_rank)
        fill_from_hf(model, reader, cfg, tp, info.tp_rank, skip, progress=progress and session.rank() == 0)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
        session.barrier()
        if session.rank() == 0:
            source = {"hf_dir": str(hf_dir.resolve()), "config_sha256": sha256_file(hf_dir / "config.json")}
            state = {"step": 0, "has_optimizer": False, "model": asdict(cfg), "task": task, "source": source,
                     "world": {"tp": tp, "pp": pp, "cp": 1, "dp": 1}}
            (tmp / "train_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            final = out / ITER_DIR
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (out / "latest.tmp").write_text(ITER_DIR + "\n")
            os.replace(out / "latest.tmp", out / "latest")
        session.barrier()
    return out
