"""Which checkpoint a run starts from, and whether its model is the one the run asks for.

A resumed run (``<checkpoint.dir>/latest``) builds the model from the recipe, so every architecture field
must equal the saved one. A run started from ``checkpoint.load`` takes the architecture from the
checkpoint; a field the recipe sets explicitly (or an ``model.hf_config``) that disagrees is refused
instead of being ignored. The error names each field with both values. Fields that do not change the
weights' meaning are not compared: ``vocab_size`` (checked against the dataset separately),
``max_position_embeddings``, ``init_method_std``, ``params_dtype`` (a checkpoint loads into another dtype).

What trains is not architecture: ``model.freeze_vision`` / ``model.freeze_projector`` (``TRAINING_FIELDS``)
are never compared as "another model" and always come from this run's recipe. They do decide which
parameters the optimizer holds state for, so ``freeze_changes`` lists them when they differ from the
checkpoint's and a run that would load that optimizer state (a resume, or ``checkpoint.load`` with
``checkpoint.load_optimizer``) is refused with the way to do it: start a new ``checkpoint.dir`` with
``checkpoint.load=<the checkpoint> checkpoint.load_optimizer=false`` (the weights are kept, Adam's state
starts fresh for the new set of trained parameters).

``model_mismatch`` / ``check_model`` are pure logic; ``start_points`` imports the checkpoint module
(torch) when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

TRAINING_FIELDS = ("freeze_vision", "freeze_projector")  # what trains, not what the model is
NOT_COMPARED = ("vocab_size", "max_position_embeddings", "init_method_std", "params_dtype", *TRAINING_FIELDS)


def _normalized(model: dict, fill_head_dim: bool) -> dict:
    out = dict(model)
    heads = out.get("num_attention_heads")
    if out.get("num_query_groups") is None:
        out["num_query_groups"] = heads
    if fill_head_dim and out.get("head_dim") is None and heads:
        out["head_dim"] = out.get("hidden_size", 0) // heads
    return out


def model_mismatch(saved: dict, requested: Any, only: set[str] | None = None) -> list[str]:
    """``model.FIELD: checkpoint has A, this run asks B`` for each differing architecture field.

    ``saved``: the ``model`` dict of ``train_state.json``; ``requested``: a ``ModelConfig`` (or dict);
    ``only``: compare just these fields (the ones the recipe set), None for all.
    """
    req = requested if isinstance(requested, dict) else asdict(requested)
    explicit_head_dim = req.get("head_dim") is not None or saved.get("head_dim") is not None
    req, old = _normalized(req, explicit_head_dim), _normalized(saved, explicit_head_dim)
    out = []
    for name in sorted(req):
        if name in NOT_COMPARED or name not in old or (only is not None and name not in only):
            continue
        a, b = old[name], req[name]
        if isinstance(a, dict) or isinstance(b, dict):
            a = {k: v for k, v in (a or {}).items()}
            b = {k: v for k, v in (b or {}).items()}
        if a != b:
            out.append(f"model.{name}: the checkpoint has {old[name]!r}, this run asks {req[name]!r}")
    return out


def check_model(saved: dict | None, requested: Any, where: str, resume: bool, only: set[str] | None) -> None:
    """Raise ``ValueError`` naming every differing field (see the module doc)."""
    if not saved:
        return
    diffs = model_mismatch(saved, requested, None if resume else only)
    if diffs:
        how = ("resume it with the recipe it was saved with, or use a new checkpoint.dir" if resume
               else "drop those fields from the recipe (the checkpoint decides the architecture) or load a "
                    "matching checkpoint")
        raise ValueError(f"{where} was saved with another model: " + "; ".join(diffs) + f". {how}")


def freeze_changes(saved: dict | None, requested: Any) -> list[str]:
    """``model.freeze_X: the checkpoint trained with A, this run asks B`` for each differing freeze flag
    (a checkpoint that recorded none: the defaults, vision frozen and projector trained)."""
    if not saved:
        return []
    req = requested if isinstance(requested, dict) else asdict(requested)
    defaults = {"freeze_vision": True, "freeze_projector": False}
    out = []
    for name in TRAINING_FIELDS:
        if name not in req:
            continue
        a, b = bool(saved.get(name, defaults[name])), bool(req[name])
        if a != b:
            out.append(f"model.{name}: the checkpoint trained with {a}, this run asks {b}")
    return out


def check_freeze(saved: dict | None, requested: Any, where: str, load_path: Any) -> None:
    """Refuse loading optimizer state saved for another set of trained parameters (module doc)."""
    diffs = freeze_changes(saved, requested)
    if diffs:
        raise ValueError(
            f"{where}: " + "; ".join(diffs) + ". Its optimizer state holds only the parameters it trained, "
            f"so it cannot continue with another set: to change what trains, start a new checkpoint.dir "
            f"with checkpoint.load={load_path} checkpoint.load_optimizer=false (the weights are kept, the "
            "optimizer state starts fresh), or keep the flags of the checkpoint"
        )


def start_points(ckpt: Any, load: str | None, log: Callable[[str], None]) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume from, checkpoint to load weights from): at most one is set; both verified.

    ``ckpt``: the run's ``CheckpointManager`` (its ``latest``, or ``checkpoint.resume_from`` while that
    is unusable); ``load``: ``checkpoint.load`` (used only for a fresh run).
    """
    from megatron_prefix.training.checkpoint import resolve, verify

    resume = ckpt.resume_point(log=log)
    if resume is not None or not load:
        return resume, None
    path = resolve(load)
    if path is None:
        raise ValueError(f"checkpoint.load: {load} holds no checkpoint")
    note = verify(path)
    if note:
        log(note)
    return None, path
