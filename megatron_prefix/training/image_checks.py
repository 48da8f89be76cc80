"""Checks that the images of a dataset are the ones the model reads (run at start and on resume).

A dataset built with ``tools/build_dataset.py --image-processor DIR`` records in ``meta.json["images"]``
how its images were laid out: ``image_token_id`` (the id every ``<image>`` placeholder was expanded to),
``tokens_per_image`` (how many copies), ``shape`` ([C, H, W] of the stored pixels) and the processor
settings. The model reads them through ``model.vision`` (``VisionConfig``): the same image token id,
``tokens_per_image`` feature rows per image, and ``image_size`` x ``image_size`` pixels of
``num_channels`` (3) channels. Any difference would train on images the model cannot see (or on the
wrong token positions), so it is refused at start, naming the dataset, the model and both values.

- an image dataset with a text-only model: refused (the images would be read as ordinary tokens);
- a text dataset with a vision model: fine (rows without images skip the vision encoder).

Pure logic: no torch, no megatron.
"""

from __future__ import annotations

from typing import Any


def vision_tokens_per_image(vision: Any) -> int:
    """Feature rows one image becomes: ``(image_size / patch_size)^2`` (+1 for the CLS token under
    ``select_strategy: full``); ``VisionConfig.tokens_per_image`` when it has one."""
    value = _get(vision, "tokens_per_image")
    if value is not None and not callable(value):
        return int(value)
    patches = (int(_get(vision, "image_size")) // int(_get(vision, "patch_size"))) ** 2
    return patches + (1 if _get(vision, "select_strategy", "default") == "full" else 0)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def image_mismatches(meta_images: dict, vision: Any) -> list[str]:
    """``what: the dataset has A, the model B`` for each image setting that differs (empty: they agree)."""
    out = []
    want_id = _get(vision, "image_token_id")
    if want_id is not None and int(meta_images.get("image_token_id", -1)) != int(want_id):
        out.append(f"image_token_id: the dataset has {meta_images.get('image_token_id')}, the model "
                   f"(model.vision.image_token_id) {want_id}")
    tpi = vision_tokens_per_image(vision)
    if int(meta_images.get("tokens_per_image", -1)) != tpi:
        out.append(f"tokens_per_image: the dataset has {meta_images.get('tokens_per_image')}, the model "
                   f"{tpi} (model.vision image_size {_get(vision, 'image_size')} / patch_size "
                   f"{_get(vision, 'patch_size')}, select_strategy {_get(vision, 'select_strategy', 'default')})")
    size = int(_get(vision, "image_size"))
    shape = [int(_get(vision, "num_channels", 3) or 3), size, size]
    got = [int(x) for x in meta_images.get("shape", [])]
    if got != shape:
        out.append(f"image shape [C, H, W]: the dataset has {got}, the model reads {shape} "
                   f"(model.vision.image_size {size})")
    return out


def check_dataset_images(meta: dict, vision: Any, data_path: str, model_source: str) -> None:
    """Raise ``ValueError`` when the dataset's images do not fit the model (see the module doc).

    ``meta``: the dataset's ``meta.json``; ``vision``: ``model.vision`` (a ``VisionConfig``, its dict,
    or None for a text model); ``model_source``: where the model config came from (for the message).
    """
    images = meta.get("images")
    if not images:
        return  # a text dataset trains any model, a vision one included
    if vision is None:
        raise ValueError(
            f"data.path: the dataset {data_path} holds {images.get('count', '?')} images (image token id "
            f"{images.get('image_token_id')}, {images.get('tokens_per_image')} tokens per image) but the model "
            f"of {model_source} has no vision encoder (model.vision is not set); train a vision-language "
            "model (model.hf_config=HF_LLAVA_DIR, or checkpoint.load of a converted LLaVA), or rebuild the "
            "dataset without images"
        )
    diffs = image_mismatches(images, vision)
    if diffs:
        raise ValueError(
            f"data.path: the images of the dataset {data_path} (its meta.json \"images\") do not match the "
            f"model of {model_source}: " + "; ".join(diffs)
            + ". Rebuild the dataset with tools/build_dataset.py --image-processor <the model's HF folder>"
        )
