"""Checks that save a run: the dataset's token ids fit the model, and its tokenizer is the checkpoint's.

Run at start and on resume, before any model is built (``resolve_model_config``, called by
``training.runner.Run``), which also decides the model config the run builds:

- ``check_token_ids``: the largest token id of the dataset (``meta.json``'s ``max_token_id``, recorded at
  build; one pass over ``tokens.bin`` for older datasets) must be below the model's vocabulary, else
  an error naming the dataset and the checkpoint (an id beyond the embedding table would be read out of
  bounds on GPU, or trained as garbage);
- ``tokenizer_mismatch``: the tokenizer recorded in the dataset against the one recorded in the
  checkpoint's ``train_state.json`` at save (``tokenizer``): a warning naming both when their content
  hashes differ (same size, other ids: a silent mismatch the vocabulary check cannot see);
- ``image_checks.check_dataset_images``: an image dataset's ``meta.json["images"]`` against
  ``model.vision`` (image token id, tokens per image, pixel shape; an image dataset with a text model
  is refused).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from megatron_prefix.model.config import ModelConfig, RopeScaling
from megatron_prefix.training.checkpoint import CheckpointManager, resolve
from megatron_prefix.training.image_checks import check_dataset_images
from megatron_prefix.training.resume import TRAINING_FIELDS, check_model


def check_token_ids(dataset, vocab_size: int, model_source: str) -> None:
    """Raise ``ValueError`` when a token id of ``dataset`` is ``>= vocab_size``."""
    top = dataset.max_token_id()
    if top >= vocab_size:
        raise ValueError(
            f"data.path: the dataset {dataset.path} holds token ids up to {top} (tokenizer "
            f"{dataset.tokenizer_info.get('path')}, {dataset.tokenizer_info.get('vocab_size')} ids) but the model "
            f"of {model_source} has model.vocab_size {vocab_size}; build the dataset with the model's tokenizer"
        )


def _describe(info: dict) -> str:
    return f"{info.get('kind')} {info.get('path')} ({info.get('vocab_size')} ids, sha256 {str(info.get('sha256'))[:12]})"


def tokenizer_mismatch(dataset, ckpt_tokenizer: dict | None, ckpt_path: str) -> str | None:
    """A warning when the checkpoint recorded another tokenizer than the dataset's; None when they agree
    or the checkpoint recorded none (converted checkpoints, older runs)."""
    data_tok = dataset.tokenizer_info
    if not ckpt_tokenizer or not data_tok.get("sha256") or not ckpt_tokenizer.get("sha256"):
        return None
    if ckpt_tokenizer["sha256"] == data_tok["sha256"]:
        return None
    return (f"warning: the dataset {dataset.path} was tokenized with {_describe(data_tok)}, the checkpoint "
            f"{ckpt_path} was trained with {_describe(ckpt_tokenizer)}; the token ids may mean other text")


def _model_fields(saved: dict) -> dict:
    """The architecture fields of a checkpoint's recorded model (``train_state.json``'s ``model``) as
    ``ModelConfig`` values; what trains (``resume.TRAINING_FIELDS``) is left to the recipe."""
    out = {k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__ and k not in TRAINING_FIELDS}
    if isinstance(out.get("rope_scaling"), dict):
        out["rope_scaling"] = RopeScaling(**out["rope_scaling"])
    return out  # a ``vision`` dict becomes a ``VisionConfig`` in ``ModelConfig.__post_init__``


def model_config_from_dict(saved: dict) -> ModelConfig:
    """A ``ModelConfig`` from a recorded model dict (``train_state.json``'s ``model``), sections typed."""
    out = {k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__}
    if isinstance(out.get("rope_scaling"), dict):
        out["rope_scaling"] = RopeScaling(**out["rope_scaling"])
    return ModelConfig(**out)


def resolve_model_config(cfg, dataset, resume_path: Path | None, latest: Path | None,
                         log: Callable[[str], None]) -> ModelConfig:
    """The model config a run builds, checked against the dataset and the checkpoint it starts from.

    The dataset's tokenizer decides the vocabulary unless an HF config, a checkpoint or the recipe fixes it
    (a recipe's ``model.vocab_size`` is never replaced silently: smaller than the tokenizer is refused,
    larger is kept as padding and said). A resumed or loaded checkpoint's architecture must match
    (``resume.check_model``). The dataset's token ids must fit the model whose weights are loaded (its own
    ``latest`` on resume, else ``checkpoint.load``), and a tokenizer differing from the checkpoint's is
    a warning.
    """
    data_vocab = int(dataset.tokenizer_info["vocab_size"])
    fixed = cfg.checkpoint.load and resolve(cfg.checkpoint.load)
    from_hf = bool(getattr(cfg, "model_source", None))
    model_keys = getattr(cfg, "model_keys", None)
    model_cfg = cfg.model
    if resume_path is not None:
        check_model(CheckpointManager.read_train_state(resume_path).get("model"), model_cfg,
                    f"checkpoint {resume_path} (checkpoint.dir, resumed)", resume=True, only=None)
    elif fixed:
        saved = CheckpointManager.read_train_state(fixed).get("model")
        check_model(saved, model_cfg, f"checkpoint {fixed} (checkpoint.load)", resume=False, only=model_keys)
        if saved:
            model_cfg = ModelConfig(**{**asdict(model_cfg), **_model_fields(saved)})
    if fixed or from_hf:
        if data_vocab > model_cfg.vocab_size:
            raise ValueError(
                f"model.vocab_size: the tokenizer of the dataset {dataset.path} has {data_vocab} ids but "
                f"the model ({fixed or 'hf_config'}) has {model_cfg.vocab_size}; rebuild the "
                "dataset with the model's tokenizer"
            )
    elif "vocab_size" in (model_keys or ()) and model_cfg.vocab_size != data_vocab:
        if model_cfg.vocab_size < data_vocab:
            raise ValueError(
                f"model.vocab_size: the recipe sets {model_cfg.vocab_size} but the tokenizer of the dataset "
                f"{dataset.path} has {data_vocab} ids; remove model.vocab_size (it then follows the "
                f"dataset) or set it >= {data_vocab}"
            )
        log(f"model.vocab_size: {model_cfg.vocab_size} as the recipe sets (the dataset's tokenizer has "
            f"{data_vocab} ids; the rows above are padding)")
    else:
        model_cfg = replace(model_cfg, vocab_size=data_vocab)
    loaded = latest or fixed
    state = CheckpointManager.read_train_state(loaded) if loaded else {}
    vocab = int((state.get("model") or {}).get("vocab_size", model_cfg.vocab_size))
    source = f"model.hf_config {cfg.model_source}" if from_hf else "the recipe"
    check_token_ids(dataset, min(vocab, model_cfg.vocab_size),
                    f"checkpoint {loaded} (vocab_size {vocab})" if loaded else source)
    warning = tokenizer_mismatch(dataset, state.get("tokenizer"), str(loaded))
    if warning:
        log(warning)
    check_dataset_images(dataset.meta, getattr(model_cfg, "vision", None), str(dataset.path),
                         f"checkpoint {loaded}" if loaded else source)
    return model_cfg
