"""The LLaVA side of ``tools/verify_sharing.py``: transformers' own model on each response alone, and
the ``--control image`` rotation.

- ``hf_alone_logps``: every ``[prompt with its images + response]`` through ``LlavaForConditionalGeneration``
  by itself (the ordinary unshared computation, in transformers' code, not ours);
- ``rotate_images``: the negative control: every unit reads another unit's pictures;
- where the alone side's HF folder comes from (``is_hf_llava``, ``mcore_llava``, ``export_for_alone``), and
  ``require_transformers`` (an extra: ``pip install 'megatron_prefix[vision]'``).

Imports torch, transformers and the converter lazily (the tool imports this before relaunching itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def require_transformers() -> None:
    """A LLaVA's alone side is transformers' own ``LlavaForConditionalGeneration``: refuse clearly without it."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError("--model is a LLaVA: its alone side runs transformers' LlavaForConditionalGeneration, "
                         "and transformers is not installed; pip install 'megatron_prefix[vision]' (or transformers)")


def rotate_images(units):
    """Copies of ``units`` whose images are those of the next unit with images (``--control image``).

    All images of the checked units are rolled by one over the list, then dealt back with each unit's own
    image count, so every image token reads another unit's picture (when the units hold at least two
    different images)."""
    import copy

    import numpy as np

    with_images = [u for u in units if getattr(u, "images", None) is not None and len(u.images)]
    if not with_images:
        raise ValueError("--control image: none of the checked units has an image")
    flat = np.concatenate([u.images for u in with_images])
    if len(flat) < 2 or all(np.array_equal(flat[0], x) for x in flat[1:]):
        raise ValueError("--control image: the checked units hold a single distinct image; check more --units")
    flat = np.roll(flat, 1, axis=0)
    out, start = [], 0
    for u in units:
        if getattr(u, "images", None) is None or not len(u.images):
            out.append(u)
            continue
        v = copy.copy(u)
        v.images = flat[start : start + len(u.images)]
        start += len(u.images)
        out.append(v)
    return out


def hf_alone_logps(hf_model, units):
    """[R] summed log-prob of every response, each ``[prompt + response]`` run alone through transformers'
    ``LlavaForConditionalGeneration`` with the unit's images (unit order, response order)."""
    import torch

    out = []
    for u in units:
        p = u.prompt_len
        images = getattr(u, "images", None)
        pixel_values = torch.from_numpy(np.asarray(images, dtype="float32")) if images is not None and len(images) else None
        for i in range(u.k):
            seq = torch.from_numpy(u.unshared_sequence(i)).long()[None]
            logits = hf_model(input_ids=seq, pixel_values=pixel_values, attention_mask=torch.ones_like(seq)).logits
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            out.append(logp[p - 1 : seq.shape[1] - 1].gather(1, seq[0, p:, None]).sum())
    return torch.stack(out)


def is_hf_llava(model: str | Path) -> bool:
    """An HF folder whose ``config.json`` says ``model_type: llava``."""
    import json

    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def mcore_llava(model: str | Path) -> Path | None:
    """The checkpoint dir when ``model`` is one of our megatron checkpoints of a LLaVA, else None."""
    from megatron_prefix.training.checkpoint import CheckpointManager, resolve

    ckpt = resolve(model) if Path(model).is_dir() else None
    if ckpt is None:
        return None
    return ckpt if (CheckpointManager.read_train_state(ckpt).get("model") or {}).get("vision") else None


def export_for_alone(ckpt: Path) -> Path:
    """Export a megatron LLaVA checkpoint to a temporary HF folder (single process) for the alone side."""
    import tempfile

    from megatron_prefix.convert import convert_mcore_to_hf

    out = Path(tempfile.mkdtemp(prefix="verify_sharing_hf_"))
    convert_mcore_to_hf(ckpt, out, progress=False)
    return out
